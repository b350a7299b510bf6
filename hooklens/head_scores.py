"""Per-head attention-pattern scores (induction, previous-token, duplicate-token, BOS) without storing patterns.

`head_scores(model, tokens)` returns `{kind: [n_layers, n_heads]}`. Each score is the mean of one line of the
attention pattern `pattern[b, h, i, j]` (`blocks.{l}.attn.hook_pattern`, query i, key j, T = tokens.shape[-1]),
over every batch row and every entry of the line:

| kind              | line (key j of query i)             | queries i       | on BOS + x + x: attends to       |
|-------------------|-------------------------------------|-----------------|----------------------------------|
| "induction"       | diagonal 1 - seq_len: j = i-seq_len+1 | seq_len-1..T-1 | the token after x's earlier copy |
| "duplicate_token" | diagonal -seq_len: j = i - seq_len  | seq_len..T-1    | the earlier copy of its token    |
| "previous_token"  | diagonal -1: j = i - 1              | 1..T-1          | the previous token               |
| "current_token"   | diagonal 0: j = i                   | 0..T-1          | itself                           |
| "bos"             | column 0: j = 0                     | 0..T-1          | the first token                  |

That is, `pattern.diagonal(offset, dim1=-2, dim2=-1).mean()` per head (ARENA's / TL's usual induction-score
definition) and `pattern[..., :, 0].mean()` for BOS. For "induction" and "duplicate_token" the tokens are meant to
be BOS followed by a random sequence x of length seq_len repeated twice (T = 2 * seq_len + 1); `seq_len` defaults
to `(T - 1) // 2`. "previous_token", "current_token" and "bos" need no structure.

Every attention layer adds its line sums to a `pattern_stats(...)` request (`hooklens.attention`): on the triton
backend they come from the flash kernel's epilogue (`hooklens.kernels.attention_stats`) and no pattern is
materialized; on the torch backend (CPU, or no Triton) from TL's pattern, computed and reduced layer by layer.
Both give the same numbers up to float rounding. Large inputs are streamed in chunks of `batch_size` rows with a
tqdm progress bar; only the `[n_layers, kinds, n_heads]` sums are kept.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooklens.attention import line_length, pattern_stats
from hooklens.progress import bar_disabled

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.model import HookedTransformer

KINDS = ("induction", "previous_token", "duplicate_token", "bos")
ALL_KINDS = ("induction", "previous_token", "duplicate_token", "current_token", "bos")
DEFAULT_BATCH_SIZE = 32


def kind_specs(kinds: Sequence[str], seq_len: Optional[int]) -> List[tuple]:
    """The pattern line of each kind: ("diagonal", offset) or ("column", index)."""
    specs = []
    for kind in kinds:
        if kind in ("induction", "duplicate_token"):
            if seq_len is None or seq_len < 1:
                raise ValueError(f"{kind!r} needs seq_len >= 1 (tokens = BOS + x + x with len(x) = seq_len).")
            specs.append(("diagonal", 1 - seq_len if kind == "induction" else -seq_len))
        elif kind == "previous_token":
            specs.append(("diagonal", -1))
        elif kind == "current_token":
            specs.append(("diagonal", 0))
        elif kind == "bos":
            specs.append(("column", 0))
        else:
            raise ValueError(f"Unknown head-score kind {kind!r}; choose from {ALL_KINDS}.")
    return specs


def head_scores(
    model: "HookedTransformer",
    tokens: Tensor,
    kinds: Union[str, Sequence[str]] = KINDS,
    seq_len: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Tensor]:
    """Mean attention of every head along each kind's pattern line (see the module docstring for the exact
    definitions). `tokens`: `[batch, T]` (or `[T]`) token ids, used as given (no BOS is added). Returns
    `{kind: float32 [n_layers, n_heads]}` on CPU. `batch_size` rows per forward pass (default 32)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    if len(kinds) == 0 or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be a non-empty list of distinct kinds from {ALL_KINDS}, got {kinds!r}.")
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dim() not in (1, 2):
        raise TypeError("tokens must be an integer tensor [batch, pos] (or [pos]) of token ids.")
    if tokens.dim() == 1:
        tokens = tokens[None]
    n_rows, length = tokens.shape
    if n_rows == 0 or length == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}.")
    if seq_len is None and any(k in ("induction", "duplicate_token") for k in kinds):
        seq_len = (length - 1) // 2
        if seq_len < 1:
            raise ValueError(f"Cannot infer seq_len from {length} tokens; pass BOS + x + x with len(x) >= 1.")
    if seq_len is not None and not 1 <= seq_len < length:
        raise ValueError(f"seq_len must be in 1..{length - 1} for {length} tokens, got {seq_len}.")
    specs = kind_specs(kinds, seq_len)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

    cfg = model.cfg
    device = next(model.parameters()).device
    # Accumulated on the model's device and read once at the end (no synchronization per layer or chunk).
    sums = torch.zeros(cfg.n_layers, len(specs), cfg.n_heads, dtype=torch.float64, device=device)
    chunks = range(0, n_rows, batch_size)
    with torch.no_grad():
        for start in tqdm(chunks, desc="head_scores", disable=bar_disabled(progress), total=len(chunks)):
            with pattern_stats(specs) as stats:
                model(tokens[start : start + batch_size].to(device), return_type=None)
            for layer, layer_sums in stats.sums.items():
                sums[layer] += layer_sums

    counts = torch.tensor([line_length(spec, length, length) for spec in specs], dtype=torch.float64) * n_rows
    means = (sums.cpu() / counts[None, :, None]).to(torch.float32)  # [layers, kinds, heads]
    return {kind: means[:, i].clone() for i, kind in enumerate(kinds)}
