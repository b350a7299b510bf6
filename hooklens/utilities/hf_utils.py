"""TransformerLens 3.9's `transformer_lens.utilities.hf_utils` (Hugging Face datasets) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    keep_single_column,
)

__all__ = [
    "keep_single_column",
]
