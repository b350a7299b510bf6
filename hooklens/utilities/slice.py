"""TransformerLens 3.9's `transformer_lens.utilities.slice` (slices) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    Slice,
    SliceInput,
)

__all__ = [
    "Slice",
    "SliceInput",
]
