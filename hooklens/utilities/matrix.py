"""TransformerLens 3.9's `transformer_lens.utilities.matrix` (factored matrices) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    composition_scores,
)

__all__ = [
    "composition_scores",
]
