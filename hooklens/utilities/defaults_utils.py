"""TransformerLens 3.9's `transformer_lens.utilities.defaults_utils` (default values) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    USE_DEFAULT_VALUE,
    override_or_use_default_value,
)

__all__ = [
    "USE_DEFAULT_VALUE",
    "override_or_use_default_value",
]
