"""TransformerLens 3.9's `transformer_lens.utilities.devices` (device selection) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    get_device,
)

__all__ = [
    "get_device",
]
