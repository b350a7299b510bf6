"""Build script. All metadata lives in pyproject.toml; this file exists so compiled extensions
(csrc/ -> hooklens._C) can be added with torch.utils.cpp_extension without changing the install commands."""
from setuptools import setup

setup()
