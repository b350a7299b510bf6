"""The attention seam: which attention computation runs for this call.

`Attention.forward` computes q, k, v and then asks `attend(...)` for `z`. Only this module decides how. The choice
is made per call from two things: the **backend** and what the **active hooks** on `hook_attn_scores` /
`hook_pattern` need.

Backend (`with hooklens.attention_backend("auto" | "triton" | "torch"):`, a context variable, default "auto"):

* "torch": PyTorch ops only.
* "triton": the kernels of `hooklens.kernels` (imported on first use, never by `import hooklens`). CUDA tensors,
  or CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 set before the kernels are first imported;
  this is how CI tests the kernels). Inputs the kernels cannot take (float64, d_head > 128, CPU without the
  interpreter, Triton not installed) raise an error saying so.
* "auto": "triton" for CUDA tensors of a supported dtype / d_head when Triton imports, "torch" otherwise, except
  for attention nothing reads the pattern of: that runs PyTorch's `scaled_dot_product_attention` on every device.
  On an H100 SDPA (PyTorch's fused attention kernels) was faster than hooklens's Triton flash kernel for GPT-2
  small at 8 x 1024 (bf16 50 us vs 64-94 us per layer, float32 0.5 ms vs 1.9 ms; `benchmarks/NOTES.md`), so the
  flash kernel runs only when asked for with "triton".

What runs (`attend`):

| active hooks / request                  | torch backend                       | triton backend                   |
|-----------------------------------------|-------------------------------------|----------------------------------|
| nothing on attn_scores / pattern        | `sdpa_attention` (no pattern)       | `flash_attention` kernel (*)     |
| any hook there (caching or user)        | `reference_attention` (TL's eager)  | `pattern_attention` kernel+hooks |
| `pattern_stats(...)` (head_scores)      | reference + pattern line sums       | `attention_stats` kernel         |

(*) "auto" runs `sdpa_attention` here (see above); `pattern_stats` still uses the kernel, which SDPA cannot replace.

Triton path with hooks (`triton_pattern_attention`): one fused kernel writes `pattern` (and `attn_scores` when
that hook point has hooks) and `z`. Then `hook_attn_scores` runs on the scores tensor; if a hook returned a
different tensor or edited it in place (its `_version` changed), the rest is TL's eager tail from the edited
scores (softmax, NaN -> 0, `hook_pattern`, `pattern @ v`). Otherwise `hook_pattern` runs on the kernel's pattern,
and `z` is recomputed as `pattern @ v` (`_z_from_pattern`) only if a hook returned a different tensor or edited it
in place. Hooks that only read — caching hooks included — cost no recomputation.

Cache-buffer handoff: the pattern / scores the hooks receive are the kernel's output buffers themselves.
`run_with_cache`'s caching hook stores `activation.detach()`, a view of that same storage, so the cache holds the
buffer the kernel wrote — no copy, and no need to identify caching hooks (read-only-ness is detected generically
through identity + `_version`). Copies happen only where the caching hook itself makes them (`device=`, a list
`pos_slice`), exactly as with the torch backend. Under `torch.inference_mode` the buffers are allocated as normal
tensors (inference tensors have no version counter). An edit made through `.data` is invisible to `_version` and
is not detected; edit the tensor itself or return a new one.

Autograd: the kernels run without autograd. When autograd records (grad enabled and q/k/v require grad), their
outputs are wrapped in autograd.Functions whose backward recomputes with PyTorch ops: the fused path gets TL's graph
q, k -> scores -> pattern -> z with the hook points in between (so gradients and backward hooks on
`hook_attn_scores` / `hook_pattern` are TL's), and the flash path gets one Function for q, k, v -> z.

Torch ops and Triton kernels differ only by float rounding (the kernels softmax in float32 for every dtype).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.components import Attention

BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MAX_D_HEAD = 128

_backend: ContextVar[str] = ContextVar("hooklens_attention_backend", default="auto")
_stats: ContextVar[Optional["PatternStats"]] = ContextVar("hooklens_pattern_stats", default=None)


# -- backend selection ------------------------------------------------------------------------------------------
@contextmanager
def attention_backend(backend: str) -> Iterator[None]:
    """Force the attention backend ("triton", "torch" or "auto") for every forward pass inside the block."""
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
    """`hooklens.kernels`, imported on first use; None (remembering why) if Triton is missing or broken."""
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
    if backend == "torch":
        return False
    device = torch.device(device)
    supported = dtype in _TRITON_DTYPES and 1 <= d_head <= _TRITON_MAX_D_HEAD
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
            f"attention_backend('triton'): the kernels support dtypes {_TRITON_DTYPES} and d_head <= "
            f"{_TRITON_MAX_D_HEAD}, got {dtype} and d_head={d_head}. Use attention_backend('auto'|'torch')."
        )
    if not kernels.kernels_runnable_on(device):
        raise RuntimeError(
            f"attention_backend('triton') got tensors on {device}. The kernels run on CUDA, or on CPU in Triton's "
            "interpreter when TRITON_INTERPRET=1 is set before hooklens.kernels is first imported."
        )
    return True


def _grad_recording(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -- torch ops --------------------------------------------------------------------------------------------------
def causal_mask(
    query_len: int, key_len: int, pos_offset: int, attention_mask: Optional[Tensor], device: torch.device
) -> Tensor:
    """Boolean mask, True where query i may attend key j: `[1, 1, q, k]`, or `[b, 1, q, k]` with padding."""
    query_pos = torch.arange(pos_offset, pos_offset + query_len, device=device)
    key_pos = torch.arange(key_len, device=device)
    mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, q, k]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :key_len].bool().to(device)  # [b, 1, q, k]
    return mask


def _masked_scores(
    q: Tensor, k: Tensor, attn_scale: float, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """TL's attention scores `[b, h, q, k]`: `q @ k^T / attn_scale`, -inf where a key is invisible."""
    q_ = q.permute(0, 2, 1, 3)  # [b, h, q, dh]
    k_ = k.permute(0, 2, 3, 1)  # [b, h, dh, k]
    scores = q_ @ k_ / attn_scale  # [b, h, q, k]
    mask = causal_mask(q.shape[1], k.shape[1], pos_offset, attention_mask, scores.device)
    return torch.where(mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))


def _softmax_rows(scores: Tensor) -> Tensor:
    """TL's softmax: rows with no visible key (all -inf, NaN after softmax) become 0."""
    pattern = F.softmax(scores, dim=-1)
    return torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)


def _pattern_from_scores(attn: "Attention", scores: Tensor) -> Tensor:
    """TL's tail after `hook_attn_scores`: softmax, NaN rows (nothing visible) -> 0, `hook_pattern`."""
    return attn.hook_pattern(_softmax_rows(scores))  # [b, h, q, k]


def _z_from_pattern(pattern: Tensor, v: Tensor) -> Tensor:
    """`z = pattern @ v`: pattern `[b, h, q, k]`, v `[b, k, h, dh]` -> z `[b, q, h, dh]` (a permuted view)."""
    return (pattern.to(dtype=v.dtype) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def _reference_with_pattern(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    scores = attn.hook_attn_scores(_masked_scores(q, k, attn.cfg.attn_scale, pos_offset, attention_mask))
    pattern = _pattern_from_scores(attn, scores)
    return _z_from_pattern(pattern, v), pattern


def reference_attention(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """TL 3.9's eager attention. q: [b, q, h, dh], k/v: [b, k, h, dh] -> z: [b, q, h, dh] (a permuted view)."""
    return _reference_with_pattern(attn, q, k, v, pos_offset, attention_mask)[0]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, pos_offset: int, attention_mask: Optional[Tensor]) -> Tensor:
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, t, dh]
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
    return z.transpose(1, 2)


def sdpa_attention(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """Fused attention without a pattern. Same shapes and (up to rounding) values as `reference_attention`."""
    return _sdpa(q, k, v, 1.0 / attn.cfg.attn_scale, pos_offset, attention_mask)


# -- Triton kernels ---------------------------------------------------------------------------------------------
class _FlashAttentionFn(torch.autograd.Function):
    """The flash kernel forward; backward recomputes attention with PyTorch ops (T×T memory in backward only)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, pos_offset, attention_mask):  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.pos_offset, ctx.attention_mask = scale, pos_offset, attention_mask
        return _load_kernels().flash_attention(q, k, v, scale, pos_offset, attention_mask)

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        fn = lambda q, k, v: _sdpa(q, k, v, ctx.scale, ctx.pos_offset, ctx.attention_mask)  # noqa: E731
        return (*_recompute_grads(fn, ctx.saved_tensors, grad_z), None, None, None)


def triton_flash_attention(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """z `[b, q, h, dh]` from the flash kernel (differentiable through a recomputing backward)."""
    scale = 1.0 / attn.cfg.attn_scale
    if _grad_recording(q, k, v):
        return _FlashAttentionFn.apply(q, k, v, scale, pos_offset, attention_mask)
    return _load_kernels().flash_attention(q, k, v, scale, pos_offset, attention_mask)


def _edited(hooked: Tensor, original: Tensor, version: int) -> bool:
    """Whether the hooks replaced the tensor or modified it in place."""
    return hooked is not original or original._version != version


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


# The fused kernel computes scores, pattern and z in one go without autograd. When autograd records, these
# Functions give the kernel's outputs the graph TL's eager code would have (q, k -> scores -> pattern -> z, with
# the hook points in between), so gradients and backward hooks on hook_attn_scores / hook_pattern are TL's.
# Each backward recomputes its step with PyTorch ops.
class _KernelScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, attn_scale, pos_offset, attention_mask, out):  # type: ignore[override]
        ctx.save_for_backward(q, k)
        ctx.args = (attn_scale, pos_offset, attention_mask)
        return out.tensor

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grads = _recompute_grads(lambda q, k: _masked_scores(q, k, *ctx.args), ctx.saved_tensors, grad)
        return (*grads, None, None, None, None)


class _KernelSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, out):  # type: ignore[override]
        ctx.save_for_backward(scores)
        return out.tensor

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _recompute_grads(_softmax_rows, ctx.saved_tensors, grad)[0], None


class _KernelPattern(_KernelScores):  # the same forward (q, k -> kernel output); backward through the softmax too
    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        fn = lambda q, k: _softmax_rows(_masked_scores(q, k, *ctx.args))  # noqa: E731
        return (*_recompute_grads(fn, ctx.saved_tensors, grad), None, None, None, None)


class _KernelPatternV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pattern, v, out):  # type: ignore[override]
        ctx.save_for_backward(pattern, v)
        return out.tensor

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        fn = lambda p, v: (p.to(v.dtype) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # noqa: E731
        return (*_recompute_grads(fn, ctx.saved_tensors, grad), None)


def triton_pattern_attention(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Fused kernel for (scores,) pattern and z, then the hooks; downstream is recomputed only after an edit.
    Returns `(z, pattern as the hooks left it)`."""
    write_scores = attn.hook_attn_scores.has_hooks()
    b, tq, h, _ = q.shape
    # Buffers the hooks (and the cache) receive. Inside torch.inference_mode they are allocated as normal
    # tensors, because inference tensors have no version counter to detect in-place edits with.
    with torch.inference_mode(False):
        pattern_buf = q.new_empty((b, h, tq, k.shape[1]))
        scores_buf = q.new_empty((b, h, tq, k.shape[1])) if write_scores else None
    with torch.no_grad():
        scores, pattern, z = _load_kernels().pattern_attention(
            q.detach(), k.detach(), v.detach(), 1.0 / attn.cfg.attn_scale, pos_offset, attention_mask,
            pattern_out=pattern_buf, scores_out=scores_buf,
        )
    grad = _grad_recording(q, k, v)
    graph_args = (attn.cfg.attn_scale, pos_offset, attention_mask)
    if scores is not None:
        if grad:
            scores = _KernelScores.apply(q, k, *graph_args, _Precomputed(scores))
        version = scores._version
        hooked_scores = attn.hook_attn_scores(scores)
        if _edited(hooked_scores, scores, version):  # TL's tail from the edited scores
            pattern = _pattern_from_scores(attn, hooked_scores)
            return _z_from_pattern(pattern, v), pattern
        if grad:
            pattern = _KernelSoftmax.apply(scores, _Precomputed(pattern))
    elif grad:
        pattern = _KernelPattern.apply(q, k, *graph_args, _Precomputed(pattern))
    version = pattern._version
    hooked = attn.hook_pattern(pattern)
    if _edited(hooked, pattern, version):
        return _z_from_pattern(hooked, v), hooked
    if grad:
        z = _KernelPatternV.apply(pattern, v, _Precomputed(z))
    return z, pattern


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
    """Per-layer sums (over batch and line entries) of pattern lines, filled in by `attend` during a forward."""

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


# -- the seam ---------------------------------------------------------------------------------------------------
def needs_pattern(attn: "Attention") -> bool:
    """Whether any hook (a user hook or a caching hook) reads or edits the scores or the pattern."""
    return attn.hook_attn_scores.has_hooks() or attn.hook_pattern.has_hooks()


def attend(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """Compute z `[b, q, h, dh]` for one layer with the cheapest op that still serves every active hook."""
    if attention_mask is not None:
        attention_mask = attention_mask[:, : k.shape[1]]
    use_triton = uses_triton(q.device, q.dtype, q.shape[-1])
    stats = _stats.get()
    if needs_pattern(attn) or (stats is not None and not use_triton):
        if use_triton:
            z, pattern = triton_pattern_attention(attn, q, k, v, pos_offset, attention_mask)
        else:
            z, pattern = _reference_with_pattern(attn, q, k, v, pos_offset, attention_mask)
        if stats is not None:
            stats.add(attn.layer_id, pattern_line_sums(pattern.detach(), stats.specs), from_kernel=False)
        return z
    if not use_triton:
        return sdpa_attention(attn, q, k, v, pos_offset, attention_mask)
    if stats is not None and not _grad_recording(q, k, v):
        z, sums = _load_kernels().attention_stats(
            q, k, v, stats.specs, 1.0 / attn.cfg.attn_scale, pos_offset, attention_mask, reduction="sum"
        )  # sums: [n_stats, b, h]
        stats.add(attn.layer_id, sums.sum(1), from_kernel=True)
        return z
    if stats is not None:  # autograd recording: z through the differentiable path, stats from the pattern
        z, pattern = _reference_with_pattern(attn, q, k, v, pos_offset, attention_mask)
        stats.add(attn.layer_id, pattern_line_sums(pattern.detach(), stats.specs), from_kernel=False)
        return z
    if _backend.get() == "auto":  # SDPA beat the flash kernel on an H100 (module docstring)
        return sdpa_attention(attn, q, k, v, pos_offset, attention_mask)
    return triton_flash_attention(attn, q, k, v, pos_offset, attention_mask)
