"""Tokenizers: the GPT-2 BPE files ship inside the package, so tokenizing works on a fresh offline machine.

A model directory's own tokenizer files take precedence over the shipped ones.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import torch
from torch import Tensor

SHIPPED_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "gpt2-tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def has_tokenizer_files(directory: os.PathLike | str) -> bool:
    directory = Path(directory)
    has_bpe_files = (directory / "vocab.json").exists() and (directory / "merges.txt").exists()
    return directory.is_dir() and ((directory / "tokenizer.json").exists() or has_bpe_files)


def load_tokenizer(name_or_dir: Optional[str] = None) -> Any:
    """A Hugging Face tokenizer from `name_or_dir` if it holds tokenizer files, else the shipped GPT-2 one."""
    from transformers import AutoTokenizer, GPT2TokenizerFast  # lazy: transformers is slow to import

    if name_or_dir is not None and has_tokenizer_files(name_or_dir):
        if (Path(name_or_dir) / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(name_or_dir), local_files_only=True)
        return GPT2TokenizerFast.from_pretrained(str(name_or_dir), local_files_only=True)
    return GPT2TokenizerFast.from_pretrained(str(SHIPPED_TOKENIZER_DIR), local_files_only=True)


def prepare_tokenizer(tokenizer: Any, default_padding_side: Optional[str] = None) -> Any:
    """TL's conventions: EOS/PAD/BOS default to `<|endoftext|>`; padding on the right unless told otherwise."""
    if default_padding_side not in ("left", "right", None):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|endoftext|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if default_padding_side is not None:
        tokenizer.padding_side = default_padding_side
    if getattr(tokenizer, "padding_side", None) is None:
        tokenizer.padding_side = "right"
    return tokenizer


def encode_batch(
    tokenizer: Any,
    texts: List[str],
    prepend_bos: bool,
    tokenizer_prepends_bos: bool,
    padding_side: str,
    max_length: Optional[int],
) -> Tensor:
    """Texts -> `[batch, pos]` ids: optional BOS first, truncated to `max_length`, padded with the pad token."""
    rows = encode_ids(tokenizer, texts, prepend_bos, tokenizer_prepends_bos)
    return pad_ids(rows, tokenizer.pad_token_id, padding_side, max_length)


def encode_ids(tokenizer: Any, texts: List[str], prepend_bos: bool, tokenizer_prepends_bos: bool) -> List[List[int]]:
    """Texts -> one list of ids per text, BOS first when `prepend_bos` (exactly once, whatever the tokenizer
    adds), nothing truncated: callers see how long each text really is before `pad_ids` cuts it."""
    encoded = tokenizer(list(texts), add_special_tokens=tokenizer_prepends_bos)["input_ids"]
    rows = []
    for ids in encoded:
        ids = list(ids)
        if tokenizer_prepends_bos and ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]  # normalize: add BOS ourselves below, exactly once
        rows.append([tokenizer.bos_token_id] + ids if prepend_bos else ids)
    return rows


def pad_ids(rows: List[List[int]], pad_id: int, padding_side: str, max_length: Optional[int]) -> Tensor:
    """Rows of ids -> `[batch, pos]`: each row keeps its first `max_length` ids, then is padded with `pad_id` on
    `padding_side` to the longest row."""
    rows = [ids[:max_length] if max_length is not None else ids for ids in rows]
    length = max(len(r) for r in rows) if rows else 0
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        if not ids:
            continue
        if padding_side == "left":
            tokens[i, length - len(ids):] = torch.tensor(ids)
        else:
            tokens[i, : len(ids)] = torch.tensor(ids)
    return tokens
