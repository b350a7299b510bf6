"""Pattern statistics computed inside the flash attention kernel: per-head means of chosen pattern diagonals.

Op: run causal attention (z as in `flash_attention.py`, which is returned so a model can continue its forward
pass) and, for each requested statistic, the mean over batch and entries of one line of the pattern
`[b, h, q, k]`:

    ("diagonal", d): entries pattern[b, h, i, i + d] for every i with 0 <= i + d < k_len   (torch's
                     `pattern.diagonal(d, dim1=-2, dim2=-1)`; d = 1 - seq_len induction, -seq_len duplicate
                     token, -1 previous token, 0 current token)
    ("column", c):   entries pattern[b, h, i, c] for every query i (c = 0: attention to BOS)

Result: float32 `[n_stats, h]` means. Entries outside the causal/padding mask are 0 and still counted (as
`diagonal().mean()` counts them); the pattern is the one TL computes (rows seeing no key are 0).

How: the flash kernel ends a query block with its rows' log-sum-exp; the pattern entry at one (i, j) is then
`exp2(q_i.k_j * scale * log2(e) - lse2_i)`, so each statistic costs one gathered k row and one dot product per
query row, reduced in-register to one partial sum per (stat, batch·head, query block) in a float32 buffer that
the launcher sums (deterministic; no atomics). No T×T memory.

Supported: as `flash_attention` (float32 / bfloat16 / float16, d_head <= 128, any length, padding mask,
pos_offset; the diagonal index is the row index of the `[q, k]` pattern, not the absolute position). At most 16
statistics per call. Differences from the reference (TL's pattern from `hooklens.attention.reference_attention` in
q's dtype, then torch.diagonal means): the probabilities are float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from hooklens.kernels.flash_attention import launch_flash_kernel

StatSpec = Tuple[str, int]  # ("diagonal", offset) or ("column", index)
MAX_STATS = 16


def _encode(stats: Sequence[StatSpec], device: torch.device) -> Tensor:
    if len(stats) == 0 or len(stats) > MAX_STATS:
        raise ValueError(f"stats must list 1..{MAX_STATS} (kind, value) pairs, got {len(stats)}.")
    rows = []
    for spec in stats:
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] in ("diagonal", "column")
                and int(spec[1]) == spec[1]):
            raise ValueError(f"Each stat must be ('diagonal', offset) or ('column', index), got {spec!r}.")
        if spec[0] == "column" and spec[1] < 0:
            raise ValueError(f"A column index must be >= 0, got {spec!r}.")
        rows.append((0 if spec[0] == "diagonal" else 1, int(spec[1])))
    return torch.tensor(rows, dtype=torch.int32, device=device)


def stat_counts(stats: Sequence[StatSpec], q_len: int, k_len: int) -> Tensor:
    """Number of pattern entries per batch row and head in each statistic's line (the mean's denominator)."""
    counts = []
    for kind, value in stats:
        if kind == "column":
            counts.append(q_len if 0 <= value < k_len else 0)
        else:  # rows i with 0 <= i + value < k_len
            lo, hi = max(0, -value), min(q_len, k_len - value)
            counts.append(max(0, hi - lo))
    return torch.tensor(counts, dtype=torch.float64)


def attention_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    stats: Sequence[StatSpec],
    scale: Optional[float] = None,
    pos_offset: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    *,
    z_out: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tuple[Tensor, Tensor]:
    """Returns `(z [b, q, h, dh], scores)`: float32 scores `[n_stats, h]` (`reduction="mean"`, the mean over
    batch and line entries) or `[n_stats, b, h]` (`reduction="sum"`, per-batch-row sums, for streaming).
    A statistic whose line is empty (e.g. an offset beyond the sequence) has mean NaN."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    spec = _encode(stats, q.device)
    z, partial = launch_flash_kernel(q, k, v, scale, pos_offset, key_padding_mask, z_out, spec)  # [n_stats, b*h, n_mb]
    b, h = q.shape[0], q.shape[2]
    sums = partial.sum(-1).view(len(stats), b, h)
    if reduction == "sum":
        return z, sums
    denom = (stat_counts(stats, q.shape[1], k.shape[1]) * b).to(torch.float32).to(q.device)
    return z, sums.sum(1) / denom[:, None]
