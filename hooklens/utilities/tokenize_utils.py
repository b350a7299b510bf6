"""TransformerLens 3.9's `transformer_lens.utilities.tokenize_utils` (tokenization) after the import swap.

Re-exports of `hooklens.utils`, where the code lives.
"""
from hooklens.utils import (
    get_attention_mask,
    get_input_with_manually_prepended_bos,
    get_tokenizer_with_bos,
    get_tokens_with_bos_removed,
    tokenize_and_concatenate,
)

__all__ = [
    "get_attention_mask",
    "get_input_with_manually_prepended_bos",
    "get_tokenizer_with_bos",
    "get_tokens_with_bos_removed",
    "tokenize_and_concatenate",
]
