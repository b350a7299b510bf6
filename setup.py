"""Build script. All metadata lives in pyproject.toml; this file adds the C++ extension hooklens._C
(csrc/*.cpp, custom operators torch.ops.hooklens.*) built with torch.utils.cpp_extension.

The extension is compiled against the PyTorch of the environment it is installed into, so install torch
first (`pip install torch==2.13.0` on CPU machines, your CUDA build on GPU machines). Then both of these work:

    pip install -e ".[test]"                          # pip's default build isolation
    pip install --no-build-isolation -e ".[test]"     # needs setuptools>=64 and wheel in the environment

torch is deliberately not in [build-system] requires: pip would install a second torch into its isolated
build environment (from PyPI that is a multi-GB CUDA build, maybe a different version from the installed
one, which the extension must match). Under build isolation, setup.py asks the installing interpreter where
its torch lives and imports it from there (see _import_torch).

HOOKLENS_NO_EXTENSION=1 skips the extension; hooklens.ops then runs its pure-PyTorch implementations.
"""
import glob
import os
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

NO_TORCH = """
hooklens builds a C++ extension (hooklens._C) against the PyTorch installed in this environment, but
`import torch` failed{detail}.
Install torch first, then hooklens:

    pip install torch==2.13.0        # CPU machines; on a GPU machine install your CUDA build of torch
    pip install -e ".[test]"         # or: pip install --no-build-isolation -e ".[test]"

(or set HOOKLENS_NO_EXTENSION=1 to install without the extension; hooklens.ops then uses pure PyTorch).
"""


def _import_torch():
    """Import the installing environment's torch, also from inside pip's isolated build environment."""
    try:
        import torch

        return torch
    except ImportError:
        pass
    # pip runs this script with the target environment's interpreter, hiding that environment's
    # site-packages through PYTHONPATH (a sitecustomize) and PYTHONNOUSERSITE. Ask a clean run of the same
    # interpreter where torch is, and append that directory (after the build environment's own paths,
    # so the isolated setuptools still wins).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    code = "import os, torch; print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(),
                             capture_output=True, text=True, check=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        stderr = getattr(e, "stderr", "") or ""
        detail = f" for {sys.executable}" + (f":\n{stderr.strip().splitlines()[-1]}" if stderr.strip() else "")
        raise SystemExit(NO_TORCH.format(detail=detail)) from None
    site_dir = out.stdout.strip().splitlines()[-1]
    if site_dir not in sys.path:
        sys.path.append(site_dir)
    import torch

    return torch


def _openmp_flags():
    """-fopenmp where the compiler supports it (at::parallel_for's OpenMP backend is inlined in headers)."""
    if sys.platform != "linux":
        return []
    cxx = os.environ.get("CXX", "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([*cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    return ["-fopenmp"] if ok else []


def _extensions():
    if os.environ.get("HOOKLENS_NO_EXTENSION", "0") not in ("", "0"):
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    omp = _openmp_flags() if torch.backends.openmp.is_available() else []
    ext = CppExtension(
        "hooklens._C",
        sources=sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))),
        depends=sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.h"))),
        extra_compile_args={"cxx": ["-O3", *omp]},  # cpp_extension adds -DPy_LIMITED_API itself
        extra_link_args=omp,
        py_limited_api=True,  # the module only loads the operators: one .so for every CPython >= 3.10
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
