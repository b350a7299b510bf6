"""Opt-in lower precision for patching sweeps: `dtype=torch.bfloat16` / `torch.float16` and TF32 matmuls.

`SweepPrecision(model, dtype, allow_tf32)` checks the request when it is made (before any forward) and is a context
manager for the sweep's engine call (`hooklens.patching`, `hooklens.ablation` use it):

* `dtype=None` or the model's own dtype: nothing is entered. The sweep runs exactly the code it runs without these
  arguments (float32 stays the default and stays exact).
* `dtype=torch.bfloat16` or `torch.float16` on a float32 model: the sweep runs under
  `torch.autocast(model's device type, dtype)`. Matmuls, linear layers and attention run in `dtype` (autocast's
  casting lists); LayerNorm statistics, the residual stream additions and everything else stay float32, as mixed
  precision training does. The model is not touched: the low-precision weights are autocast's own copies, so
  neither the parameters (same tensors, values, `_version`) nor other threads running the model see any change.
  Results are float32 tensors, as always. On the CPU autocast casts each weight once per sweep into its
  thread-local cache (freed when the sweep ends). On CUDA that cache is switched off and each matmul casts its
  weight again: a CUDA graph captured in one sweep (`hooklens.sweep_graphs`) and replayed in a later one must
  record the casts, not read a cached copy that the first sweep's end freed (casting is a fraction of a matmul's
  memory traffic).
* `allow_tf32=True`: float32 matmuls on CUDA use TF32 tensor cores for the duration of the sweep. This is
  PyTorch's process-wide cuBLAS flag (`torch.backends.cuda.matmul.fp32_precision`), not a thread-local one: other
  threads' CUDA matmuls running at the same time use TF32 too. It is restored when the last sweep using it ends,
  also on exceptions (concurrent sweeps share it by reference count). On a CPU model it is a no-op (TF32 is a CUDA
  tensor-core format; CPU float32 matmuls are unchanged) and the flag is not touched.

Refused, with an error naming the allowed values: dtypes other than those; a lower dtype for a model that is not
float32 (between float16 and bfloat16 one loses range, the other precision); a *higher* dtype than the model's
(float64 for a float32 model, float32 for a bfloat16 one) — autocast only lowers precision, and upcasting would need
a full copy of the weights; for a float64 reference run the sweep on a float64 copy of the model
(`copy.deepcopy(model).to(torch.float64)`).

Measured errors against float32 (IOI and repeated-token sweeps): docs/sweep-precision.md.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

__all__ = ["LOWER_SWEEP_DTYPES", "SweepPrecision", "cuda_matmul_precision"]

LOWER_SWEEP_DTYPES = (torch.bfloat16, torch.float16)
"""The dtypes a float32 model's sweep can run in (besides its own)."""


class SweepPrecision:
    """The precision a sweep runs in (see the module docstring); the arguments are checked here, when it is made.

    `with SweepPrecision(model, torch.bfloat16): run_sweep(...)`. Reusable and re-entrant: each `with` enters its
    own autocast region."""

    def __init__(self, model, dtype: Optional[torch.dtype] = None, allow_tf32: bool = False):
        if not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be True or False, got {allow_tf32!r}.")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16) or None for the model's dtype, got "
                            f"{dtype!r}.")
        weight = model.W_E
        self.model_dtype: torch.dtype = weight.dtype
        self.device_type: str = weight.device.type
        # None: run in the model's own precision, i.e. enter no autocast region at all (the default path).
        self.autocast_dtype: Optional[torch.dtype] = None
        if dtype is not None and dtype != self.model_dtype:
            self.autocast_dtype = _checked_lower_dtype(dtype, self.model_dtype, self.device_type)
        # TF32 only exists for CUDA matmuls; on other devices the process-wide flag is left alone.
        self.tf32 = allow_tf32 and self.device_type == "cuda"
        self._autocasts = []  # one per active `with`, innermost last (a SweepPrecision may be entered re-entrantly)

    @property
    def is_default(self) -> bool:
        """Whether the sweep runs exactly as without these arguments (nothing to enter)."""
        return self.autocast_dtype is None and not self.tf32

    def __enter__(self) -> "SweepPrecision":
        if self.tf32:
            _tf32_enter()
        if self.autocast_dtype is not None:
            # No weight cache on CUDA: captured graphs must not point at cached casts freed when the region ends.
            autocast = torch.autocast(self.device_type, dtype=self.autocast_dtype,
                                      cache_enabled=self.device_type != "cuda")
            try:
                autocast.__enter__()
            except BaseException:
                if self.tf32:
                    _tf32_exit()
                raise
            self._autocasts.append(autocast)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.autocast_dtype is not None:
                self._autocasts.pop().__exit__(exc_type, exc, tb)
        finally:
            if self.tf32:
                _tf32_exit()

    def __repr__(self) -> str:
        dtype = self.autocast_dtype or self.model_dtype
        return f"SweepPrecision(dtype={dtype}, allow_tf32={self.tf32}, device_type={self.device_type!r})"


def _checked_lower_dtype(dtype: torch.dtype, model_dtype: torch.dtype, device_type: str) -> torch.dtype:
    allowed = f"None (the model's {model_dtype})"
    if model_dtype == torch.float32:
        allowed += ", " + " or ".join(str(d) for d in LOWER_SWEEP_DTYPES)
    if dtype not in LOWER_SWEEP_DTYPES or model_dtype != torch.float32:
        hint = ""
        if dtype.is_floating_point and torch.finfo(dtype).bits > torch.finfo(model_dtype).bits:
            hint = (f" A sweep only lowers precision (autocast); for a {dtype} reference run it on a {dtype} copy of "
                    f"the model: copy.deepcopy(model).to({dtype}).")
        elif model_dtype != torch.float32:
            hint = f" Lower-precision sweeps start from a float32 model; this one is {model_dtype}."
        raise ValueError(f"dtype={dtype} is not supported for a sweep of a {model_dtype} model; use {allowed}.{hint}")
    if not _autocast_available(device_type):
        raise ValueError(f"dtype={dtype}: PyTorch has no autocast for {device_type!r} tensors, so the sweep cannot "
                         f"run in {dtype} there; use dtype=None, or move the model to 'cuda' or 'cpu'.")
    return dtype


def _autocast_available(device_type: str) -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.3
    return check(device_type) if check is not None else device_type in ("cpu", "cuda")


# -- TF32: a process-wide flag, shared by concurrent sweeps ---------------------------------------------------------
_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_saved: Optional[str] = None  # the flag's value before the first of the current users entered


def _tf32_enter() -> None:
    global _tf32_users, _tf32_saved
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_saved = cuda_matmul_precision()
            if _tf32_saved != "tf32":
                _set_matmul_precision("tf32")
        _tf32_users += 1


def _tf32_exit() -> None:
    global _tf32_users
    with _tf32_lock:
        _tf32_users -= 1
        # Restore only when the last concurrent sweep leaves: an earlier restore would drop TF32 under the others.
        if _tf32_users == 0 and _tf32_saved != "tf32":
            _set_matmul_precision(_tf32_saved)


def cuda_matmul_precision() -> str:
    """The float32 cuBLAS matmul precision now: "tf32" when TF32 is on, else "ieee" or "none" (PyTorch's names).
    Read this, not `torch.backends.cuda.matmul.allow_tf32`: since PyTorch 2.9 reading the legacy flag raises once
    the new `fp32_precision` API (which a TF32 sweep uses) has set it."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; reading the legacy allow_tf32 can raise there
        return matmul.fp32_precision
    return "tf32" if matmul.allow_tf32 else "ieee"


def _set_matmul_precision(value: str) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = value
    else:
        matmul.allow_tf32 = value == "tf32"
