"""TransformerLens 3.9's `transformer_lens.utilities.activation_functions` (activation functions) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    gelu_fast,
    gelu_new,
    solu,
)

__all__ = [
    "gelu_fast",
    "gelu_new",
    "solu",
]
