"""TransformerLens 3.9's `transformer_lens.utilities.lm_utils` (language-model losses) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    lm_accuracy,
    lm_cross_entropy_loss,
)

__all__ = [
    "lm_accuracy",
    "lm_cross_entropy_loss",
]
