"""Triton kernels for causal GPT-2 attention, each with a validating launcher.

* `pattern_attention` (pattern_attention.py): writes TL's `pattern` (and optionally `attn_scores`) and `z`,
  exact probabilities (log-sum-exp pass, then a write pass), into caller-provided buffers if given.
* `flash_attention` (flash_attention.py): z only, no T×T memory.
* `attention_stats` (attention_stats.py): flash attention plus per-head means of chosen pattern diagonals /
  columns computed in the kernel's epilogue (induction, previous-token, duplicate-token, BOS scores).

The PyTorch reference all three are tested against is `hooklens.attention.reference_attention` (TL's eager
attention): one reference for the kernels, the CPU path and the benchmarks. It lives in the op module, not here,
because this package imports nothing else from hooklens.

Importing this package imports Triton (`hooklens` itself never does; `hooklens.attention` imports this package
the first time the Triton backend runs). Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter
when TRITON_INTERPRET=1 is set before this package is first imported (how CI tests them).
"""
import torch

from hooklens.kernels._common import MAX_HEAD_DIM, SUPPORTED_DTYPES, is_interpreted
from hooklens.kernels.attention_stats import attention_stats, stat_counts
from hooklens.kernels.flash_attention import flash_attention, runs_interpreted
from hooklens.kernels.pattern_attention import pattern_attention

__all__ = [
    "MAX_HEAD_DIM", "SUPPORTED_DTYPES", "attention_stats", "flash_attention", "is_interpreted", "kernels_runnable_on",
    "pattern_attention", "stat_counts",
]


def kernels_runnable_on(device) -> bool:
    """Whether the kernels can run on tensors of `device` (CUDA, or CPU with the interpreter on)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and runs_interpreted())
