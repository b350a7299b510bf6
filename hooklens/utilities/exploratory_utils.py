"""TransformerLens 3.9's `transformer_lens.utilities.exploratory_utils` (exploratory analysis) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    test_prompt,
)

__all__ = [
    "test_prompt",
]
