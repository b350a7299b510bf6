"""Attention ops: TL's eager attention as small reference steps, SDPA, the Triton kernels' wrappers, the backend.

Every function here takes tensors and scalars — q `[b, q, h, dh]`, k / v `[b, k, h, dh]` (TL's hook_q / hook_k /
hook_v layout, k = cached + new positions), `attn_scale` (TL's divisor: scores = q.k / attn_scale), `pos_offset`
(number of cached keys before the first query) and an optional `attention_mask` `[b, k]` (1 = real token). None of
them knows a module or a hook point: `Attention.forward` (hooklens/components.py) fires the hooks and picks, per
call, which of these ops to run.

Reference (TL 3.9's eager attention, the one ground truth for the CPU path, the kernel tests and the benchmarks):
`attention_scores` -> `softmax_pattern` -> `z_from_pattern`, composed by `reference_attention`.

Backend (`with hooklens.attention_backend("auto" | "triton" | "torch" | "eager"):`, a context variable, default
"auto"):

* "torch": PyTorch ops only.
* "triton": the kernels of `hooklens.kernels` (imported on first use, never by `import hooklens`). CUDA tensors,
  or CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 set before the kernels are first imported;
  this is how CI tests the kernels). Inputs the kernels cannot take (float64, d_head > 128, CPU without the
  interpreter, Triton not installed) raise an error saying so.
* "auto": "triton" for CUDA tensors of a supported dtype / d_head when Triton imports, "torch" otherwise, except
  for attention nothing reads the pattern of: that runs PyTorch's `scaled_dot_product_attention` on every device,
  because PyTorch's fused attention kernels are faster than hooklens's flash kernel for GPT-2 shapes. The flash
  kernel runs only when asked for with "triton".
* "eager": TL 3.9's computation, op for op, on every path: the reference steps even when no hook reads the
  pattern, and (in hooklens/components.py) TL's formulas where hooklens's faster ones round differently — ln1
  called once per q / k / v input (its hooks fire three times, as in TL), the W_O and unembed GEMMs as TL's
  `F.linear` on contiguous transposed weights, TL's `hook_result` product, TL's weight layout for split q/k/v
  inputs. On CPU in float32, logits, every activation and every gradient equal TL 3.9's bit for bit on identical
  weights. For users who need TL's numbers exactly; it runs at TL's speed.

What `Attention.forward` runs:

| hooks on attn_scores / pattern     | torch backend                         | triton backend                      |
|------------------------------------|---------------------------------------|-------------------------------------|
| none                               | `sdpa_attention` (z only)             | `triton_flash_attention` (*)        |
| any (caching or user hooks)        | `SdpaPatternOutputs`, hooks between   | `triton_pattern_attention`, hooks   |
| none, inside `pattern_stats(...)`  | `SdpaPatternOutputs` + line sums      | `triton_attention_stats` (**)       |
| (any, "eager" backend)             | the reference steps, hooks between    | —                                   |

(*) via `attention_without_pattern`: "auto" runs `sdpa_attention` here (see above).
(**) the flash kernel sums the requested pattern lines in its epilogue, so no pattern is materialized. The stats
kernel has no backward: while autograd records, the pattern kernel runs and the sums come from its pattern.

Consistency: hooks that only read never change which op makes z. On the torch backend (every CPU run under
"auto") `SdpaPatternOutputs` gives the hooks TL's reference scores and pattern and takes z from the very
`sdpa_attention` call un-hooked attention makes, so `model(x)`, `run_with_hooks(x, <read-only hooks>)` and
`run_with_cache(x)` give bitwise identical logits and activations. Only a hook that edits the scores or the pattern
(returns another tensor or changes it in place) switches z to `z_from_pattern` of the edited tensor. On CUDA the
fused kernels stay: un-hooked attention runs SDPA ("auto") or the flash kernel ("triton"), hooked attention the
pattern kernel, so those paths agree to float32 rounding of a reordered softmax sum (tests/tolerances.py
"fused_vs_eager": rtol 1e-4, atol 2e-5 on activations; bfloat16 / float16 round at their own precision), not bit for
bit. "torch" takes z from one SDPA call on both paths on CUDA too; "eager" gives TL's exact numbers.

Triton path with hooks: one kernel call writes `pattern` (and `attn_scores` when that hook point has hooks) and `z`
into fresh buffers (`PatternKernelOutputs`). The hooks run on those buffers. If a hook returned a different tensor
or edited it in place (its `_version` changed), the kernel's later outputs are stale and the rest is recomputed
from the edited tensor with the reference steps (edited scores: `softmax_pattern`, `hook_pattern`,
`z_from_pattern`; edited pattern: `z_from_pattern`). Hooks that only read cost no recomputation. A write through
`.data` or a NumPy view moves no version counter, so when a hook other than hooklens's caching hooks is attached,
`Attention.forward` also compares the values with a copy taken before the hooks ran (`_run_hook`): such edits are
applied on every backend, at the price of one copy and one comparison (a host sync) per hooked tensor.

Cache-buffer hand-off: the pattern / scores the hooks receive are the kernel's output buffers themselves.
`run_with_cache`'s caching hook stores `activation.detach()`, a view of that same storage, so the cache holds the
buffer the kernel wrote — no copy. Caching hooks are marked read-only (`hook_points.read_only_hook`), so caching
alone needs no value comparison either. Copies happen only where the caching hook itself makes them (`device=`, a
list `pos_slice`), exactly as with the torch backend. Under `torch.inference_mode` the buffers are allocated as
normal tensors (inference tensors have no version counter).

Autograd: the kernels run without autograd. When autograd records (grad enabled and q/k/v require grad), their
outputs are wrapped in autograd.Functions whose backward recomputes with PyTorch ops: the pattern kernel's outputs
get TL's graph q, k -> scores -> pattern -> z with the hook points in between, each edge differentiated through its
reference step (so gradients and backward hooks on `hook_attn_scores` / `hook_pattern` are TL's), and the flash
kernel gets one Function for q, k, v -> z, differentiated through `sdpa_attention`.

Torch ops and Triton kernels differ only by float rounding (the kernels softmax in float32 for every dtype).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "triton", "torch", "eager")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_D_HEAD = 128

_backend: ContextVar[str] = ContextVar("hooklens_attention_backend", default="auto")
_stats: ContextVar[Optional["PatternStats"]] = ContextVar("hooklens_pattern_stats", default=None)


# -- backend selection ------------------------------------------------------------------------------------------
@contextmanager
def attention_backend(backend: str) -> Iterator[None]:
    """Force the attention backend ("auto", "triton", "torch" or "eager") for every forward pass inside the block."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}.")
    token = _backend.set(backend)
    try:
        yield
    finally:
        _backend.reset(token)


def get_attention_backend() -> str:
    """The backend requested for the current context ("auto" unless inside `attention_backend(...)`)."""
    return _backend.get()


_kernels_module = None
_kernels_error: Optional[BaseException] = None


def _load_kernels():
    """`hooklens.kernels`, imported on first use; None (remembering why) if Triton is missing or broken.

    Imported lazily because importing it imports Triton, a heavy optional dependency `import hooklens` must not
    pull in (and Triton's interpreter switch must still be settable after `import hooklens`)."""
    global _kernels_module, _kernels_error
    if _kernels_module is None and _kernels_error is None:
        try:
            import hooklens.kernels as kernels

            _kernels_module = kernels
        except Exception as error:  # ImportError, or a Triton that fails while initializing
            _kernels_error = error
    return _kernels_module


def triton_available() -> bool:
    """Whether `hooklens.kernels` (hence Triton) imports. Imports Triton on first call."""
    return _load_kernels() is not None


def uses_triton(device: torch.device, dtype: torch.dtype, d_head: int) -> bool:
    """Whether attention on tensors of this device / dtype / d_head runs the Triton kernels under the current
    backend. Raises when "triton" is forced but cannot run them."""
    backend = _backend.get()
    if backend in ("torch", "eager"):
        return False
    device = torch.device(device)
    supported = dtype in TRITON_DTYPES and 1 <= d_head <= TRITON_MAX_D_HEAD
    if backend == "auto":
        return device.type == "cuda" and supported and _load_kernels() is not None
    kernels = _load_kernels()
    if kernels is None:
        raise RuntimeError(
            f"attention_backend('triton') needs Triton, but importing hooklens.kernels failed: {_kernels_error!r}. "
            "Install it (`pip install triton`, or hooklens[cuda]) or use attention_backend('auto'|'torch')."
        )
    if not supported:
        raise ValueError(
            f"attention_backend('triton'): the kernels support dtypes {TRITON_DTYPES} and d_head <= "
            f"{TRITON_MAX_D_HEAD}, got {dtype} and d_head={d_head}. Use attention_backend('auto'|'torch')."
        )
    if not kernels.kernels_runnable_on(device):
        raise RuntimeError(
            f"attention_backend('triton') got tensors on {device}. The kernels run on CUDA, or on CPU in Triton's "
            "interpreter when TRITON_INTERPRET=1 is set before hooklens.kernels is first imported."
        )
    return True


def eager_backend() -> bool:
    """Whether `attention_backend("eager")` is active: TL's reference steps on every path, hooked or not."""
    return _backend.get() == "eager"


def grad_recording(*tensors: Tensor) -> bool:
    """Whether autograd records an op on these tensors (the kernels themselves are not differentiable)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -- the reference: TL's eager attention, step by step ----------------------------------------------------------
def causal_mask(
    query_len: int, key_len: int, pos_offset: int, attention_mask: Optional[Tensor], device: torch.device
) -> Tensor:
    """Boolean mask, True where query i may attend key j (j <= i + pos_offset, key not padding): `[1, 1, q, k]`,
    or `[b, 1, q, k]` with an `attention_mask` `[b, >= k]` (nonzero = real token)."""
    query_pos = torch.arange(pos_offset, pos_offset + query_len, device=device)
    key_pos = torch.arange(key_len, device=device)
    mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, q, k]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :key_len].bool().to(device)  # [b, 1, q, k]
    return mask


def attention_scores(
    q: Tensor, k: Tensor, attn_scale: float, pos_offset: int = 0, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """TL's attention scores `[b, h, q, k]`: `q @ k^T / attn_scale`, -inf where a key is invisible."""
    q_ = q.permute(0, 2, 1, 3)  # [b, h, q, dh]
    k_ = k.permute(0, 2, 3, 1)  # [b, h, dh, k]
    scores = q_ @ k_ / attn_scale  # [b, h, q, k]
    mask = causal_mask(q.shape[1], k.shape[1], pos_offset, attention_mask, scores.device)
    return torch.where(mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))


def softmax_pattern(scores: Tensor) -> Tensor:
    """TL's pattern `[b, h, q, k]`: softmax over keys; rows with no visible key (all -inf, NaN after softmax) -> 0."""
    pattern = F.softmax(scores, dim=-1)
    return torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)


def z_from_pattern(pattern: Tensor, v: Tensor) -> Tensor:
    """`z = pattern @ v`: pattern `[b, h, q, k]`, v `[b, k, h, dh]` -> z `[b, q, h, dh]` (a permuted view)."""
    return (pattern.to(dtype=v.dtype) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_scale: float, pos_offset: int = 0, attention_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """TL 3.9's eager attention in q's dtype (pass float64 tensors for a ground truth): `(z [b, q, h, dh],
    pattern [b, h, q, k])`. Exactly the steps `Attention.forward` runs on the torch backend, without the hooks."""
    pattern = softmax_pattern(attention_scores(q, k, attn_scale, pos_offset, attention_mask))
    return z_from_pattern(pattern, v), pattern


# -- fused attention without a pattern --------------------------------------------------------------------------
def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_scale: float, pos_offset: int = 0, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """PyTorch's `scaled_dot_product_attention`: z `[b, q, h, dh]`, equal to `reference_attention`'s up to
    rounding, without materializing the pattern."""
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, t, dh]
    scale = 1.0 / attn_scale
    if attention_mask is None and pos_offset == 0 and q.shape[1] == k.shape[1]:
        z = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale)
        return z.transpose(1, 2)  # [b, q, h, dh]
    mask = causal_mask(q.shape[1], k.shape[1], pos_offset, attention_mask, q.device)  # [b|1, 1, q, k]
    # A query whose every key is masked (a left-pad position) gets z = 0 in the reference (its NaN pattern row
    # is zeroed). SDPA would return NaN there, so give such rows one dummy key and zero their output after.
    row_has_key = mask.any(dim=-1, keepdim=True)  # [b|1, 1, q, 1]
    safe_mask = mask | ~row_has_key
    z = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=safe_mask, scale=scale)  # [b, h, q, dh]
    z = torch.where(row_has_key, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return z.transpose(1, 2)  # [b, q, h, dh]


def attention_without_pattern(
    q: Tensor, k: Tensor, v: Tensor, attn_scale: float, pos_offset: int, attention_mask: Optional[Tensor],
    use_triton: bool,
) -> Tensor:
    """z `[b, q, h, dh]` from one fused op, for attention no hook reads the pattern of: the flash kernel when
    `attention_backend("triton")` is forced, else SDPA. "auto" picks SDPA even where the kernels could run,
    because PyTorch's fused attention kernels are faster than the flash kernel for GPT-2 shapes."""
    if use_triton and _backend.get() == "triton":
        return triton_flash_attention(q, k, v, attn_scale, pos_offset, attention_mask)
    return sdpa_attention(q, k, v, attn_scale, pos_offset, attention_mask)


# -- Triton kernels ---------------------------------------------------------------------------------------------
class _Precomputed:
    """A kernel output handed to an autograd.Function without being one of its (differentiated) inputs."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


def _recompute_grads(fn, inputs: Sequence[Tensor], grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
    """Backward by recomputation: rerun `fn` on detached copies of `inputs` and differentiate it."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)


class _FlashAttentionFn(torch.autograd.Function):
    """The flash kernel forward; backward recomputes attention with SDPA (T×T memory in backward only)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_scale, pos_offset, attention_mask):  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        ctx.args = (attn_scale, pos_offset, attention_mask)
        return _load_kernels().flash_attention(q, k, v, 1.0 / attn_scale, pos_offset, attention_mask)

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        fn = lambda q, k, v: sdpa_attention(q, k, v, *ctx.args)  # noqa: E731
        return (*_recompute_grads(fn, ctx.saved_tensors, grad_z), None, None, None)


def triton_flash_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_scale: float, pos_offset: int = 0, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """z `[b, q, h, dh]` from the flash kernel (differentiable through a recomputing backward)."""
    if grad_recording(q, k, v):
        return _FlashAttentionFn.apply(q, k, v, attn_scale, pos_offset, attention_mask)
    return _load_kernels().flash_attention(q, k, v, 1.0 / attn_scale, pos_offset, attention_mask)


# The pattern kernel computes scores, pattern and z in one go without autograd. When autograd records, these
# Functions give the kernel's outputs the graph TL's eager code would have (q, k -> scores -> pattern -> z, with
# the hook points in between), so gradients and backward hooks on hook_attn_scores / hook_pattern are TL's.
# Each backward recomputes its step with the reference ops.
class _KernelScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, attn_scale, pos_offset, attention_mask, out):  # type: ignore[override]
        ctx.save_for_backward(q, k)
        ctx.args = (attn_scale, pos_offset, attention_mask)
        return out.tensor

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grads = _recompute_grads(lambda q, k: attention_scores(q, k, *ctx.args), ctx.saved_tensors, grad)
        return (*grads, None, None, None, None)


class _KernelSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, out):  # type: ignore[override]
        ctx.save_for_backward(scores)
        return out.tensor

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _recompute_grads(softmax_pattern, ctx.saved_tensors, grad)[0], None


class _KernelPattern(_KernelScores):  # the same forward (q, k -> kernel output); backward through the softmax too
    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        fn = lambda q, k: softmax_pattern(attention_scores(q, k, *ctx.args))  # noqa: E731
        return (*_recompute_grads(fn, ctx.saved_tensors, grad), None, None, None, None)


class _PrecomputedZ(torch.autograd.Function):
    """A z computed elsewhere (the pattern kernel, or SDPA on the torch backend) given TL's edge pattern, v -> z."""

    @staticmethod
    def forward(ctx, pattern, v, out):  # type: ignore[override]
        ctx.save_for_backward(pattern, v)
        return out.tensor

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return (*_recompute_grads(z_from_pattern, ctx.saved_tensors, grad), None)


class PatternKernelOutputs:
    """What one pattern-kernel call wrote, handed out as TL's intermediate tensors.

    `scores` (None unless asked for), `pattern_after(scores)` and `z_after(pattern)` are the kernel's buffers
    themselves (no copy). While autograd records, each carries TL's graph edge (q, k -> scores -> pattern -> z,
    backward recomputed with the reference steps); `pattern_after` / `z_after` take the tensors the edge starts
    from, which must be this call's own `scores` / pattern, unedited."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, attn_scale: float, pos_offset: int,
                 attention_mask: Optional[Tensor], scores: Optional[Tensor], pattern: Tensor, z: Tensor):
        self._q, self._k, self._v = q, k, v
        self._args = (attn_scale, pos_offset, attention_mask)
        self._grad = grad_recording(q, k, v)
        self._pattern, self._z = pattern, z
        if self._grad and scores is not None:
            scores = _KernelScores.apply(q, k, *self._args, _Precomputed(scores))
        self.scores = scores  # [b, h, q, k] or None

    def pattern_after(self, scores: Optional[Tensor]) -> Tensor:
        """The pattern `[b, h, q, k]`, as `softmax_pattern(scores)` (of q, k when no scores were written)."""
        if not self._grad:
            return self._pattern
        if scores is None:
            return _KernelPattern.apply(self._q, self._k, *self._args, _Precomputed(self._pattern))
        return _KernelSoftmax.apply(scores, _Precomputed(self._pattern))

    def z_after(self, pattern: Tensor) -> Tensor:
        """z `[b, q, h, dh]`, as `z_from_pattern(pattern, v)`."""
        if not self._grad:
            return self._z
        return _PrecomputedZ.apply(pattern, self._v, _Precomputed(self._z))


def triton_pattern_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_scale: float, pos_offset: int, attention_mask: Optional[Tensor],
    with_scores: bool,
) -> PatternKernelOutputs:
    """One pattern-kernel call: pattern (and scores when `with_scores`) `[b, h, q, k]` and z `[b, q, h, dh]`."""
    b, tq, h, _ = q.shape
    # Buffers the hooks (and the cache) receive. Inside torch.inference_mode they are allocated as normal
    # tensors, because inference tensors have no version counter to detect in-place edits with.
    with torch.inference_mode(False):
        pattern_buf = q.new_empty((b, h, tq, k.shape[1]))
        scores_buf = q.new_empty((b, h, tq, k.shape[1])) if with_scores else None
    with torch.no_grad():
        scores, pattern, z = _load_kernels().pattern_attention(
            q.detach(), k.detach(), v.detach(), 1.0 / attn_scale, pos_offset, attention_mask,
            pattern_out=pattern_buf, scores_out=scores_buf,
        )
    return PatternKernelOutputs(q, k, v, attn_scale, pos_offset, attention_mask, scores, pattern, z)


def triton_attention_stats(
    q: Tensor, k: Tensor, v: Tensor, specs: Sequence["StatSpec"], attn_scale: float, pos_offset: int,
    attention_mask: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The flash kernel with pattern-line sums in its epilogue (no autograd, no pattern materialized):
    `(z [b, q, h, dh], sums [n_stats, h])`, each line summed over batch and entries."""
    z, sums = _load_kernels().attention_stats(
        q, k, v, specs, 1.0 / attn_scale, pos_offset, attention_mask, reduction="sum"
    )  # sums: [n_stats, b, h]
    return z, sums.sum(1)


# -- torch backend with hooks on the scores / pattern -----------------------------------------------------------
def _versioned_outputs():
    """Inside `torch.inference_mode`, a context that makes new tensors normal ones: inference tensors have no
    version counter, and the hooks' scores / pattern need one for in-place edits to be detected."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()


class SdpaPatternOutputs:
    """The torch backend's attention when hooks (or `pattern_stats`) need the scores / pattern.

    `scores` (None unless asked for) and `pattern_after(scores)` are TL's reference steps; `z_after(pattern)` is the
    very `sdpa_attention` call un-hooked attention makes, so hooks that only read (caching hooks included) change
    no bit of z or of anything after it. `z_after` is valid only for this call's own unedited pattern:
    `Attention.forward` drops this object once a hook edits the scores or the pattern and recomputes with
    `z_from_pattern`. While autograd records, z carries TL's edge pattern, v -> z (backward through
    `z_from_pattern`), so gradients and backward hooks on hook_attn_scores / hook_pattern are TL's."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, attn_scale: float, pos_offset: int,
                 attention_mask: Optional[Tensor], with_scores: bool):
        self._q, self._k, self._v = q, k, v
        self._args = (attn_scale, pos_offset, attention_mask)
        self.scores = self._scores() if with_scores else None  # [b, h, q, k] or None

    def _scores(self) -> Tensor:
        with _versioned_outputs():
            return attention_scores(self._q, self._k, *self._args)

    def pattern_after(self, scores: Optional[Tensor]) -> Tensor:
        """The pattern `[b, h, q, k]`: `softmax_pattern(scores)` (of q, k when no scores were asked for)."""
        scores = self._scores() if scores is None else scores
        with _versioned_outputs():
            return softmax_pattern(scores)

    def z_after(self, pattern: Tensor) -> Tensor:
        """z `[b, q, h, dh]` from `sdpa_attention`, equal in value to `z_from_pattern(pattern, v)` up to rounding."""
        # The un-hooked path's exact call, in the same grad mode (so the same SDPA kernel is picked); its own graph
        # is dropped for TL's edge through the pattern.
        z = sdpa_attention(self._q, self._k, self._v, *self._args)
        if not grad_recording(pattern, self._v):
            return z
        return _PrecomputedZ.apply(pattern, self._v, _Precomputed(z.detach()))


# -- pattern statistics (head_scores) ---------------------------------------------------------------------------
StatSpec = Tuple[str, int]  # ("diagonal", offset) or ("column", index)


def line_entries(pattern: Tensor, spec: StatSpec) -> Tensor:
    """Entries of one line of a `[..., q, k]` pattern: `("diagonal", d)` -> `pattern.diagonal(d, -2, -1)`
    (entries [i, i + d]); `("column", c)` -> `pattern[..., :, c]`. Returns `[..., n_entries]`."""
    kind, value = spec
    if kind == "column":
        if value >= pattern.shape[-1]:
            return pattern.new_zeros(pattern.shape[:-2] + (0,))
        return pattern[..., :, value]
    if kind == "diagonal":
        return pattern.diagonal(value, dim1=-2, dim2=-1)
    raise ValueError(f"A stat is ('diagonal', offset) or ('column', index), got {spec!r}.")


def line_length(spec: StatSpec, q_len: int, k_len: int) -> int:
    """Number of entries in one line of a `[q_len, k_len]` pattern."""
    kind, value = spec
    if kind == "column":
        return q_len if 0 <= value < k_len else 0
    return max(0, min(q_len, k_len - value) - max(0, -value))


def pattern_line_sums(pattern: Tensor, specs: Sequence[StatSpec]) -> Tensor:
    """float64 `[n_stats, h]`: each line of a `[b, h, q, k]` pattern summed over batch and entries."""
    return torch.stack([line_entries(pattern, s).double().sum(dim=(0, -1)) for s in specs])


class PatternStats:
    """Per-layer sums (over batch and line entries) of pattern lines, added by `Attention.forward` while a
    `pattern_stats(...)` block is active."""

    def __init__(self, specs: Sequence[StatSpec]):
        for spec in specs:
            line_entries(torch.zeros(1, 1, 1, 1), spec)  # validate
        self.specs: List[StatSpec] = [(str(kind), int(value)) for kind, value in specs]
        self.sums: Dict[int, Tensor] = {}  # layer -> float64 [n_stats, h] on the activations' device
        self.from_kernel: Dict[int, bool] = {}  # layer -> whether the in-kernel statistics produced it

    def add(self, layer: int, sums: Tensor, from_kernel: bool) -> None:
        # Kept on the device: a copy to the host here would synchronize once per layer inside the forward.
        sums = sums.detach().double()
        self.sums[layer] = self.sums[layer] + sums if layer in self.sums else sums
        self.from_kernel[layer] = from_kernel


@contextmanager
def pattern_stats(specs: Sequence[StatSpec]) -> Iterator[PatternStats]:
    """Inside the block, every attention layer adds the sums of the chosen pattern lines to the yielded
    `PatternStats` (in the flash kernel's epilogue on the triton backend; from the pattern otherwise)."""
    request = PatternStats(specs)
    token = _stats.set(request)
    try:
        yield request
    finally:
        _stats.reset(token)


def pattern_stats_request() -> Optional[PatternStats]:
    """The `PatternStats` of the innermost active `pattern_stats(...)` block, or None."""
    return _stats.get()
