"""TransformerLens 3.9's `transformer_lens.utilities.tensors` (tensor helpers) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    filter_dict_by_prefix,
    get_corner,
    get_cumsum_along_dim,
    get_offset_position_ids,
    is_lower_triangular,
    is_square,
    remove_batch_dim,
    repeat_along_head_dimension,
    to_numpy,
    transpose,
)

__all__ = [
    "filter_dict_by_prefix",
    "get_corner",
    "get_cumsum_along_dim",
    "get_offset_position_ids",
    "is_lower_triangular",
    "is_square",
    "remove_batch_dim",
    "repeat_along_head_dimension",
    "to_numpy",
    "transpose",
]
