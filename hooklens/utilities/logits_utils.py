"""TransformerLens 3.9's `transformer_lens.utilities.logits_utils` (logits) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    logits_to_df,
    sample_logits,
)

__all__ = [
    "logits_to_df",
    "sample_logits",
]
