"""TransformerLens 3.9's `transformer_lens.utilities.attribute_utils` (nested attributes) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    get_nested_attr,
    set_nested_attr,
)

__all__ = [
    "get_nested_attr",
    "set_nested_attr",
]
