"""FLOP floors of the patching sweeps, and the machine's dense GEMM rate that turns a floor into seconds.

The floor of a sweep is the matmul FLOPs (2·m·n·k per product) of the ideal *reuse* algorithm: the corrupted
prompt runs once (its residual streams, keys and values cached), then each variant — a patch at layer l whose
effect starts at position p — recomputes only what the patch can change:

* blocks l..L-1 at positions p..M, where M is the last position the metric reads (causal attention: positions
  before p are unchanged, positions after M are never read), each query attending to every earlier key
  (keys and values of positions < p come from the corrupted run's cache);
* in the last block only the metric's positions (>= p) need queries, attention, output projection and MLP; keys
  and values are still needed at p..M;
* in the patched block only what follows the patched activation: all of it for `resid_pre`, the output projection
  and the MLP for a head's `z` (`attn_head_out_*`), nothing for `mlp_out` (its output is the patch);
* the unembedding at the metric's positions >= p (logits at earlier positions are the corrupted run's).

A variant whose start is after every metric position changes nothing and costs 0. LayerNorm, GELU, softmax and
the embedding are not matmuls and are not counted (they are O(d_model) per row, against O(d_model²)).

`sweep_floor(...)` returns the total (the corrupted run once plus every variant, times the prompts in the batch);
`gemm_peak_flops(...)` measures FLOP/s of a large dense `torch.mm` with the run's timer, so
`floor_s = flops / peak` is the time the sweep would take if every FLOP ran at the GEMM rate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

# The patched activation decides which part of its own block a variant recomputes (see the module docstring).
ENTRY_POINTS = ("resid_pre", "z", "mlp_out")


@dataclass(frozen=True)
class Shape:
    """The dimensions the floor depends on (GPT-2 style block: attention then MLP, one unembedding)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int

    @classmethod
    def of(cls, cfg) -> "Shape":
        """From a hooklens / TransformerLens `HookedTransformerConfig`."""
        return cls(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp or 4 * cfg.d_model,
                   getattr(cfg, "d_vocab_out", cfg.d_vocab))


def _block_flops(s: Shape, kv_rows: Sequence[int], out_rows: Sequence[int], entry: str = "resid_pre") -> int:
    """Matmul FLOPs of one block whose keys/values are needed at `kv_rows` and whose output (queries, attention,
    output projection, MLP) at `out_rows`; `entry` skips what precedes the patched activation."""
    a = s.n_heads * s.d_head  # width of q, k, v and z
    n_out = len(out_rows)
    flops = 0
    if entry == "resid_pre":
        flops += 2 * n_out * s.d_model * a  # queries
        flops += 2 * len(kv_rows) * s.d_model * 2 * a  # keys and values
        # scores q·k and pattern @ v, each query row t against keys 0..t, all heads: 2 * (t + 1) * a each
        flops += sum(2 * 2 * (t + 1) * a for t in out_rows)
    if entry in ("resid_pre", "z"):
        flops += 2 * n_out * a * s.d_model  # output projection W_O
        flops += 2 * 2 * n_out * s.d_model * s.d_mlp  # W_in and W_out
    return flops


def variant_flops(s: Shape, layer: int, start: int, metric_positions: Sequence[int], entry: str) -> int:
    """FLOPs of one variant for one prompt: a patch of `entry` at `layer` whose effect starts at position `start`,
    with the metric reading (non-negative, in-range) `metric_positions`."""
    if entry not in ENTRY_POINTS:
        raise ValueError(f"entry must be one of {ENTRY_POINTS}, got {entry!r}")
    if not 0 <= layer < s.n_layers:
        raise ValueError(f"layer {layer} is outside 0..{s.n_layers - 1}")
    read = sorted({m for m in metric_positions if m >= start})
    if not read:
        return 0  # the patch cannot reach any position the metric reads
    last = read[-1]
    rows = list(range(start, last + 1))
    flops = 0
    for block in range(layer, s.n_layers):
        out_rows = read if block == s.n_layers - 1 else rows
        flops += _block_flops(s, rows, out_rows, entry if block == layer else "resid_pre")
    return flops + 2 * len(read) * s.d_model * s.d_vocab  # unembedding where the metric reads


def corrupted_run_flops(s: Shape, n_pos: int, metric_positions: Sequence[int]) -> int:
    """The one corrupted forward the reuse needs: every block at every position up to the last metric position,
    logits at the metric's positions (what a `resid_pre` patch at layer 0, position 0 recomputes)."""
    return variant_flops(s, 0, 0, metric_positions, "resid_pre")


def sweep_variants(kind: str, s: Shape, n_pos: int) -> Tuple[str, List[Tuple[int, int]]]:
    """(entry point, [(layer, start position)]) of the named hooklens / TransformerLens sweep.

    `attn_head_out_all_pos` patches a head at every position, so each of its layer x head variants starts at 0
    (a data-dependent start — the first position where clean and corrupted z differ — is not assumed)."""
    if kind == "resid_pre":
        return "resid_pre", [(l, p) for l in range(s.n_layers) for p in range(n_pos)]
    if kind == "mlp_out":
        return "mlp_out", [(l, p) for l in range(s.n_layers) for p in range(n_pos)]
    if kind == "attn_head_out_all_pos":
        return "z", [(l, 0) for l in range(s.n_layers) for _ in range(s.n_heads)]
    if kind == "attn_head_out_by_pos":
        return "z", [(l, p) for l in range(s.n_layers) for p in range(n_pos) for _ in range(s.n_heads)]
    raise ValueError(f"unknown sweep {kind!r}; known: resid_pre, mlp_out, attn_head_out_all_pos, "
                     "attn_head_out_by_pos")


def _normalized_positions(metric_positions: Optional[Iterable[int]], n_pos: int) -> List[int]:
    if metric_positions is None:
        return list(range(n_pos))
    out = []
    for m in metric_positions:
        if not -n_pos <= m < n_pos:
            raise ValueError(f"metric position {m} is outside a prompt of {n_pos} positions")
        out.append(m % n_pos)
    return out


def sweep_floor(kind: str, s: Shape, n_pos: int, metric_positions: Optional[Iterable[int]] = None,
                batch: int = 1, include_corrupted_run: bool = True) -> int:
    """Floor FLOPs of the sweep `kind` over `batch` prompts of `n_pos` tokens (metric positions may be negative;
    None: all positions)."""
    if n_pos < 1 or batch < 1:
        raise ValueError(f"n_pos and batch must be >= 1, got {n_pos} and {batch}")
    metric = _normalized_positions(metric_positions, n_pos)
    entry, variants = sweep_variants(kind, s, n_pos)
    total = sum(variant_flops(s, l, p, metric, entry) for l, p in variants)
    if include_corrupted_run:
        total += corrupted_run_flops(s, n_pos, metric)
    return batch * total


def gemm_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` `[n, n] @ [n, n]` products (after one warmup), timed with the harness's
    timer (so `--timer cpu --threads 1` gives the one-thread rate). The fastest, not the median: it is a ceiling,
    and contention on a shared machine only ever slows a call down."""
    import harness  # lazy: harness imports nothing from here, but keep this module importable on its own

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    times = harness.time_fn_all(lambda: torch.mm(a, b), warmup=1, repeats=repeats, device=device)
    return 2 * n ** 3 / min(times)
