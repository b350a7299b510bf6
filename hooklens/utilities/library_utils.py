"""TransformerLens 3.9's `transformer_lens.utilities.library_utils` (optional libraries) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    is_library_available,
)

__all__ = [
    "is_library_available",
]
