"""TransformerLens 3.9's `transformer_lens.utilities.components_utils` (hook names) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    get_act_name,
)

__all__ = [
    "get_act_name",
]
