"""Loading GPT-2 checkpoints: name/path resolution, safe file reading, HF -> TL layout, weight processing.

`load_checkpoint(name) -> (cfg, state_dict)` runs the whole pipeline; `HookedTransformer.from_pretrained` builds
the model once from that config and loads the weights with `load_weights` (strict: every key and shape).
Files are read with safetensors or `torch.load(weights_only=True)`: pickled code is never executed. Only regular
files are read (a FIFO or a link to a device is refused before it is opened for reading), config.json only up to
`MAX_CONFIG_BYTES`. The config is checked on its own, then against the checkpoint's tensor shapes, before anything
the config sizes is allocated; every key and shape is checked before anything is loaded. Weights holding NaN or
inf load with a warning that names them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from hooklens import config as hooklens_config
from hooklens import tokenizer as tok
from hooklens.config import HookedTransformerConfig, check_config_values, config_from_hf
from hooklens.errors import InvalidInputError
from hooklens.hook_points import _caller_stacklevel

logger = logging.getLogger(__name__)

# Names TransformerLens users type, -> Hugging Face repository ids (either spelling may be in the local cache).
GPT2_NAMES: Dict[str, List[str]] = {
    "gpt2": ["openai-community/gpt2", "gpt2"],
    "gpt2-small": ["openai-community/gpt2", "gpt2"],
    "gpt2-medium": ["openai-community/gpt2-medium", "gpt2-medium"],
    "gpt2-large": ["openai-community/gpt2-large", "gpt2-large"],
    "gpt2-xl": ["openai-community/gpt2-xl", "gpt2-xl"],
    "distilgpt2": ["distilbert/distilgpt2", "distilgpt2"],
}
for _name, _repos in list(GPT2_NAMES.items()):
    for _repo in _repos:
        GPT2_NAMES.setdefault(_repo, _repos)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A GPT-2 config.json is about 1 KB; anything near this is not a config, and reading it whole could exhaust memory.
MAX_CONFIG_BYTES = 1 << 20
# TL's attention buffers (a mask and the -inf fill value) are not weights: their non-finite values are intended.
_MASK_BUFFERS = ("mask", "IGNORE", "masked_bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unreadable, unsafe, or not a GPT-2 of the expected shape."""


# -- finding the checkpoint -------------------------------------------------------------------------------------
def _hf_cache_dir() -> Path:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE  # lazy: only resolving a name needs huggingface_hub

        return Path(HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _cached_snapshot(repo_id: str) -> Optional[Path]:
    """The newest local snapshot directory of `repo_id` that holds config.json and weights, if any."""
    repo_dir = _hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = [p for p in snapshots.iterdir()
                  if (p / "config.json").exists() and any((p / f).exists() for f in WEIGHT_FILES)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_model_dir(name_or_path: Union[str, os.PathLike]) -> Path:
    """A local HF-format directory for `name_or_path` (a directory, or a GPT-2 name in the local HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} is a directory but has no config.json; expected a Hugging Face GPT-2 "
                                  "directory (config.json + model.safetensors or pytorch_model.bin).")
        return path
    name = str(name_or_path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or path.exists():
        raise CheckpointError(
            f"{path} is not a directory. Pass a Hugging Face GPT-2 directory (config.json + model.safetensors or "
            f"pytorch_model.bin), or a model name such as 'gpt2' that is in the local Hugging Face cache."
        )
    repos = GPT2_NAMES.get(name, GPT2_NAMES.get(name.lower(), [name] if "/" in name else []))
    looked = []
    for repo in repos:
        snapshot = _cached_snapshot(repo)
        looked.append(str(_hf_cache_dir() / ("models--" + repo.replace("/", "--"))))
        if snapshot is not None:
            return snapshot
    known = ", ".join(sorted(k for k in GPT2_NAMES if "/" not in k))
    where = "\n  ".join([str(path.resolve()) + " (as a directory)"] + looked)
    raise CheckpointError(
        f"Could not find model {name!r}. Looked in:\n  {where}\n"
        f"hooklens never downloads. To use real weights: on a machine with network run\n"
        f"  huggingface-cli download {repos[0] if repos else 'openai-community/gpt2'}\n"
        f"(it fills the HF cache; copy ~/.cache/huggingface to this machine), or pass a local directory holding "
        f"config.json + model.safetensors. Known names: {known}."
    )


def _require_regular_file(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a file: hooklens reads checkpoints from regular files only "
                              "(a FIFO could block forever, a device could be endless). Replace it with the real file.")


def read_config_file(path: Path) -> Dict[str, Any]:
    """config.json as a dict. Refuses, with a CheckpointError, anything but a regular file of at most
    `MAX_CONFIG_BYTES` holding a JSON object; the file is opened non-blocking and checked before it is read."""
    try:  # O_NONBLOCK: opening a FIFO with no writer returns at once (then fstat refuses it) instead of hanging
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise CheckpointError(f"Could not open {path}: {err}") from err
    try:
        _require_regular_file(path, os.fstat(fd).st_mode)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes, which no model config is; point "
                              "hooklens at the checkpoint's real config.json.")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore the checkpoint's config.json.") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object: a config.json is an object "
                              'of fields, e.g. {"model_type": "gpt2", "n_layer": 12, ...}; restore the real file.')
    return config


def _all_finite(tensor: Tensor) -> bool:
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return True
    # One pass without a mask the size of the tensor (several times faster than isfinite().all()): NaN propagates
    # to both extremes and an infinity is one of them, so both are finite exactly when every element is.
    low, high = torch.aminmax(tensor)
    return bool(low.isfinite() & high.isfinite())


def find_non_finite(state: Dict[str, Tensor]) -> List[str]:
    """Names of the floating-point tensors in `state` holding NaN or inf (one reduction each; mask buffers skipped)."""
    return [k for k, v in state.items() if v.is_floating_point() and k.rsplit(".", 1)[-1] not in _MASK_BUFFERS
            and not _all_finite(v)]


def warn_non_finite(names: List[str], source: str) -> None:
    """Warn that `source` holds NaN or inf in the tensors `names` (nothing when `names` is empty)."""
    if names:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(f"{source} holds NaN or inf in {shown}. hooklens loads the weights as they are, so every "
                      "activation they reach is NaN or inf too; use an intact checkpoint (download it again) or fix "
                      "those tensors.", UserWarning, stacklevel=_caller_stacklevel())


def read_weight_file(model_dir: Path) -> Dict[str, Tensor]:
    """Read the checkpoint's tensors without executing pickled code."""
    safetensors_file, bin_file = model_dir / "model.safetensors", model_dir / "pytorch_model.bin"
    if not safetensors_file.exists() and not bin_file.exists():
        pth_files = sorted(model_dir.glob("*.pth")) + sorted(model_dir.glob("*.pt"))  # TL's toy models: model_final.pth
        if len(pth_files) > 1:
            raise CheckpointError(f"{model_dir} holds several checkpoints {[p.name for p in pth_files]}; keep one.")
        if pth_files:
            bin_file = pth_files[0]
    if safetensors_file.exists():
        from safetensors.torch import load_file  # lazy: only reading a checkpoint needs safetensors

        _require_regular_file(safetensors_file, safetensors_file.stat().st_mode)

        try:
            return load_file(str(safetensors_file))
        except Exception as err:
            raise CheckpointError(
                f"Could not read {safetensors_file}: {err}. The file is truncated or corrupt; download it again."
            ) from err
    if bin_file.exists():
        _require_regular_file(bin_file, bin_file.stat().st_mode)
        try:
            state = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for unsafe pickles, RuntimeError/EOFError for corrupt files
            raise CheckpointError(
                f"Refused or failed to read {bin_file}: {err}\nhooklens loads .bin files with "
                "torch.load(weights_only=True) and never runs pickled code; if the file is a plain state dict it "
                "is corrupt, otherwise convert it to model.safetensors in a trusted environment."
            ) from err
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{bin_file} does not hold a state dict of tensors.")
        return state
    raise CheckpointError(f"{model_dir} has no model.safetensors, pytorch_model.bin or *.pth checkpoint.")


# -- HF GPT-2 -> TL layout --------------------------------------------------------------------------------------
def _expected_hf_shapes(cfg: HookedTransformerConfig) -> Dict[str, tuple]:
    d, m, v = cfg.d_model, cfg.d_mlp, cfg.d_vocab
    shapes = {"wte.weight": (v, d), "wpe.weight": (cfg.n_ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for l in range(cfg.n_layers):
        p = f"h.{l}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "mlp.c_fc.weight": (d, m), p + "mlp.c_fc.bias": (m,),
            p + "mlp.c_proj.weight": (m, d), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def convert_hf_gpt2_state_dict(hf_state: Dict[str, Tensor], cfg: HookedTransformerConfig) -> Dict[str, Tensor]:
    """HF `GPT2LMHeadModel`/`GPT2Model` tensors -> TL names and layouts, checking every key and shape."""
    state = {}
    for key, value in hf_state.items():
        key = key[len("transformer."):] if key.startswith("transformer.") else key
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers in older checkpoints, not weights
        state[key] = value
    lm_head = state.pop("lm_head.weight", None)
    blocks = {k.split(".")[1] for k in state if k.startswith("h.")}
    if len(blocks) != cfg.n_layers:  # first: the expected shapes below take memory and time per configured layer
        raise CheckpointError(f"The config has n_layer={cfg.n_layers}, but the checkpoint holds {len(blocks)} blocks "
                              f"(h.0 ...); set n_layer to {len(blocks)} in config.json (or use the checkpoint's own).")
    expected = _expected_hf_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {expected[k]})"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append("wrong shapes " + "; ".join(wrong[:8]))
        raise CheckpointError("Checkpoint does not match its config.json as a GPT-2: " + ", ".join(parts) + ". "
                              "Use the config.json that came with these weights (n_embd, n_inner, n_positions and "
                              "vocab_size size them).")
    if lm_head is not None and tuple(lm_head.shape) != (cfg.d_vocab, cfg.d_model):
        raise CheckpointError(
            f"lm_head.weight has shape {tuple(lm_head.shape)}, expected {(cfg.d_vocab, cfg.d_model)}."
        )

    h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    out = {
        "embed.W_E": state["wte.weight"],
        "pos_embed.W_pos": state["wpe.weight"],
        "ln_final.w": state["ln_f.weight"],
        "ln_final.b": state["ln_f.bias"],
        "unembed.W_U": (lm_head if lm_head is not None else state["wte.weight"]).T,  # [d, v]
        "unembed.b_U": torch.zeros(cfg.d_vocab, dtype=state["wte.weight"].dtype),
    }
    for l in range(cfg.n_layers):
        p, t = f"h.{l}.", f"blocks.{l}."
        W_Q, W_K, W_V = state[p + "attn.c_attn.weight"].split(d, dim=1)  # 3 x [d, h*dh]
        b_Q, b_K, b_V = state[p + "attn.c_attn.bias"].split(d)  # 3 x [h*dh]
        out.update({
            t + "ln1.w": state[p + "ln_1.weight"], t + "ln1.b": state[p + "ln_1.bias"],
            t + "ln2.w": state[p + "ln_2.weight"], t + "ln2.b": state[p + "ln_2.bias"],
            t + "attn.W_Q": W_Q.reshape(d, h, dh).permute(1, 0, 2),  # [d, h*dh] -> [h, d, dh]
            t + "attn.W_K": W_K.reshape(d, h, dh).permute(1, 0, 2),
            t + "attn.W_V": W_V.reshape(d, h, dh).permute(1, 0, 2),
            t + "attn.b_Q": b_Q.reshape(h, dh), t + "attn.b_K": b_K.reshape(h, dh), t + "attn.b_V": b_V.reshape(h, dh),
            t + "attn.W_O": state[p + "attn.c_proj.weight"].reshape(h, dh, d),  # [h*dh, d] -> [h, dh, d]
            t + "attn.b_O": state[p + "attn.c_proj.bias"],
            t + "mlp.W_in": state[p + "mlp.c_fc.weight"], t + "mlp.b_in": state[p + "mlp.c_fc.bias"],
            t + "mlp.W_out": state[p + "mlp.c_proj.weight"], t + "mlp.b_out": state[p + "mlp.c_proj.bias"],
        })
    # TL's converter returns these views as they are (W_Q/W_K/W_V head-major views of c_attn, W_U the transpose of
    # the embedding): processing reduces over them in their strides, so keeping them makes its sums round as TL's.
    return out


# -- weight processing (TL's formulas, in TL's order) -------------------------------------------------------------
def fold_layer_norm(
    state: Dict[str, Tensor], cfg: HookedTransformerConfig, fold_biases: bool = True, center_weights: bool = True
) -> Dict[str, Tensor]:
    """Fold each LayerNorm's w (and b) into the weights that read its output; optionally centre those reads."""
    for l in range(cfg.n_layers):
        t = f"blocks.{l}."
        w1, b1 = state.pop(t + "ln1.w"), state.pop(t + "ln1.b")
        for x in "QKV":
            W = state[t + f"attn.W_{x}"]  # [h, d, dh]
            if fold_biases:
                state[t + f"attn.b_{x}"] = state[t + f"attn.b_{x}"] + (W * b1[None, :, None]).sum(-2)
            W = W * w1[None, :, None]
            if center_weights:
                W = W - W.mean(-2, keepdim=True)
            state[t + f"attn.W_{x}"] = W
        if not cfg.attn_only and cfg.act_fn == "solu_ln" and t + "mlp.ln.w" in state:
            # SoLU's LayerNorm over d_mlp folds into W_out the same way; its output has zero mean over d_mlp,
            # so W_out can be centred along d_mlp.
            wm, bm = state.pop(t + "mlp.ln.w"), state.pop(t + "mlp.ln.b")
            W_out = state[t + "mlp.W_out"]  # [m, d]
            if fold_biases:
                state[t + "mlp.b_out"] = state[t + "mlp.b_out"] + (W_out * bm[:, None]).sum(-2)
            W_out = W_out * wm[:, None]
            if center_weights:
                W_out = W_out - W_out.mean(0, keepdim=True)
            state[t + "mlp.W_out"] = W_out
        if not cfg.attn_only:
            w2, b2 = state.pop(t + "ln2.w"), state.pop(t + "ln2.b")
            W_in = state[t + "mlp.W_in"]  # [d, m]
            if fold_biases:
                state[t + "mlp.b_in"] = state[t + "mlp.b_in"] + (W_in * b2[:, None]).sum(-2)
            W_in = W_in * w2[:, None]
            if center_weights:
                W_in = W_in - W_in.mean(-2, keepdim=True)
            state[t + "mlp.W_in"] = W_in
    wf, bf = state.pop("ln_final.w"), state.pop("ln_final.b")
    W_U = state["unembed.W_U"]  # [d, v]
    if fold_biases:
        state["unembed.b_U"] = state["unembed.b_U"] + (W_U * bf[:, None]).sum(-2)
    W_U = W_U * wf[:, None]
    if center_weights:
        W_U = W_U - W_U.mean(-2, keepdim=True)
    state["unembed.W_U"] = W_U
    return state


def center_writing_weights(state: Dict[str, Tensor], cfg: HookedTransformerConfig) -> Dict[str, Tensor]:
    """Remove the d_model mean of everything written to the residual stream (LayerNorm ignores it)."""
    state["embed.W_E"] = state["embed.W_E"] - state["embed.W_E"].mean(-1, keepdim=True)
    state["pos_embed.W_pos"] = state["pos_embed.W_pos"] - state["pos_embed.W_pos"].mean(-1, keepdim=True)
    for l in range(cfg.n_layers):
        t = f"blocks.{l}."
        state[t + "attn.W_O"] = state[t + "attn.W_O"] - state[t + "attn.W_O"].mean(-1, keepdim=True)
        state[t + "attn.b_O"] = state[t + "attn.b_O"] - state[t + "attn.b_O"].mean()
        if not cfg.attn_only:
            state[t + "mlp.W_out"] = state[t + "mlp.W_out"] - state[t + "mlp.W_out"].mean(-1, keepdim=True)
            state[t + "mlp.b_out"] = state[t + "mlp.b_out"] - state[t + "mlp.b_out"].mean()
    return state


def center_unembed(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Remove the vocab mean of W_U and b_U: logits shift by a per-position constant, log-probs are unchanged."""
    state["unembed.W_U"] = state["unembed.W_U"] - state["unembed.W_U"].mean(-1, keepdim=True)
    state["unembed.b_U"] = state["unembed.b_U"] - state["unembed.b_U"].mean()
    return state


def fold_value_biases(state: Dict[str, Tensor], cfg: HookedTransformerConfig) -> Dict[str, Tensor]:
    """b_O += sum over heads of b_V @ W_O, then b_V = 0 (patterns sum to 1, so the effect is identical)."""
    for l in range(cfg.n_layers):
        t = f"blocks.{l}."
        b_V, W_O = state[t + "attn.b_V"], state[t + "attn.W_O"]  # [h, dh], [h, dh, d]
        state[t + "attn.b_O"] = state[t + "attn.b_O"] + (b_V[:, :, None] * W_O).sum([0, 1])
        state[t + "attn.b_V"] = torch.zeros_like(b_V)
    return state


def _svd_of_product(A: Tensor, B: Tensor):
    """SVD of A @ B (A: [..., m, k], B: [..., k, n]) truncated to its k components:
    U [..., m, k], S [..., k], Vh [..., k, n]."""
    U, S, Vh = torch.linalg.svd(A @ B, full_matrices=False)
    k = A.shape[-1]
    return U[..., :k], S[..., :k], Vh[..., :k, :]


def _make_even(A: Tensor, B: Tensor):
    """Refactor A @ B (A: [..., m, k], B: [..., k, n]) as U√S, √S Vh so both factors have equal singular values."""
    U, S, Vh = _svd_of_product(A, B)
    sqrt_S = S.sqrt()
    return U * sqrt_S[..., None, :], sqrt_S[..., :, None] * Vh


def refactor_factored_attn_matrices(state: Dict[str, Tensor], cfg: HookedTransformerConfig) -> Dict[str, Tensor]:
    """TL's experimental refactor, by SVD of each head's W_QK and W_OV.

    W_Q/W_K (with their biases as an extra input row) become the "even" pair U√S, (√S Vh)^T. W_OV is refactored as
    TL does, W_V = U S and W_O = Vh (orthonormal rows: W_O is a rotation), after folding b_V into b_O.
    """
    for l in range(cfg.n_layers):
        t = f"blocks.{l}."
        W_Q = torch.cat([state[t + "attn.W_Q"], state[t + "attn.b_Q"][:, None, :]], dim=1)  # [h, d+1, dh]
        W_K = torch.cat([state[t + "attn.W_K"], state[t + "attn.b_K"][:, None, :]], dim=1)  # [h, d+1, dh]
        Q_even, K_even_T = _make_even(W_Q, W_K.transpose(-1, -2))
        K_even = K_even_T.transpose(-1, -2)
        state[t + "attn.W_Q"], state[t + "attn.b_Q"] = Q_even[:, :-1, :], Q_even[:, -1, :]
        state[t + "attn.W_K"], state[t + "attn.b_K"] = K_even[:, :-1, :], K_even[:, -1, :]
        W_V, W_O, b_V = state[t + "attn.W_V"], state[t + "attn.W_O"], state[t + "attn.b_V"]
        state[t + "attn.b_O"] = state[t + "attn.b_O"] + (b_V[:, :, None] * W_O).sum([0, 1])
        state[t + "attn.b_V"] = torch.zeros_like(b_V)
        U, S, Vh = _svd_of_product(W_V, W_O)  # [h, d, dh], [h, dh], [h, dh, d]
        state[t + "attn.W_V"], state[t + "attn.W_O"] = U * S[..., None, :], Vh
    return state


def process_weights(
    state: Dict[str, Tensor], cfg: HookedTransformerConfig, fold_ln: bool = True, center_writing_weights_: bool = True,
    center_unembed_: bool = True, fold_value_biases_: bool = True, refactor_factored_attn_matrices_: bool = False,
) -> Dict[str, Tensor]:
    """Apply TL's processing steps, in TL's order, to a TL-format state dict (returns a new dict)."""
    state = dict(state)
    has_ln = "ln_final.w" in state
    if fold_ln and has_ln:
        state = fold_layer_norm(state, cfg)
    centre_writes = center_writing_weights_ and (fold_ln or cfg.normalization_type in ("LN", "LNPre"))
    if centre_writes:
        state = center_writing_weights(state, cfg)
    if center_unembed_:
        state = center_unembed(state)
    if fold_value_biases_:
        state = fold_value_biases(state, cfg)
        if centre_writes:  # with W_O centred, b_V @ W_O has zero mean only up to rounding: TL re-centres b_O
            for l in range(cfg.n_layers):
                b_O = state[f"blocks.{l}.attn.b_O"]
                state[f"blocks.{l}.attn.b_O"] = b_O - b_O.mean()
    if refactor_factored_attn_matrices_:
        state = refactor_factored_attn_matrices(state, cfg)
    return state


def tl_bias_shapes(cfg: HookedTransformerConfig) -> Dict[str, Tuple[int, ...]]:
    """Every bias of a TL-format state dict for `cfg`, with its shape."""
    h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    shapes: Dict[str, Tuple[int, ...]] = {"unembed.b_U": (cfg.d_vocab_out,)}
    for l in range(cfg.n_layers):
        t = f"blocks.{l}."
        shapes.update({t + "attn.b_Q": (h, dh), t + "attn.b_K": (h, dh), t + "attn.b_V": (h, dh), t + "attn.b_O": (d,)})
        if not cfg.attn_only:
            shapes.update({t + "mlp.b_in": (cfg.d_mlp,), t + "mlp.b_out": (d,)})
    return shapes


def fill_missing_biases(state: Dict[str, Tensor], cfg: HookedTransformerConfig) -> Dict[str, Tensor]:
    """A bias the state dict leaves out is zero, like TL's `fill_missing_keys`: TL's own GPT-2 converter
    (`convert_gpt2_weights`) emits no `unembed.b_U`, since GPT-2 has no unembedding bias. Returns a new dict."""
    missing = {k: shape for k, shape in tl_bias_shapes(cfg).items() if k not in state}
    if not missing:
        return dict(state)
    logger.info("State dict has no %s; filling with zeros.", sorted(missing))
    like = next((v for v in state.values() if v.is_floating_point()), torch.empty(0, dtype=cfg.dtype))
    return {**state, **{k: torch.zeros(shape, dtype=like.dtype, device=like.device) for k, shape in missing.items()}}


def process_state_dict(
    state: Dict[str, Tensor], cfg: HookedTransformerConfig, fold_ln: bool = True, center_writing_weights: bool = True,
    center_unembed: bool = True, fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
) -> Tuple[Dict[str, Tensor], bool]:
    """TL's `load_and_process_state_dict` without the load: fill missing biases, then process.

    Returns `(processed, ln_folded)`. LayerNorm is folded only into a model with LN weights ("LN") from a state
    dict that holds them; once folded, the model's norms must be LNPre (`normalization_type="LNPre"`). Warns,
    naming them, if tensors of `state` hold NaN or inf."""
    warn_non_finite(find_non_finite(state), "The state dict")
    return _process_state_dict(state, cfg, fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                               refactor_factored_attn_matrices)


def _process_state_dict(
    state: Dict[str, Tensor], cfg: HookedTransformerConfig, fold_ln: bool, center_writing_weights: bool,
    center_unembed: bool, fold_value_biases: bool, refactor_factored_attn_matrices: bool,
) -> Tuple[Dict[str, Tensor], bool]:
    """`process_state_dict` without its NaN/inf check (`load_checkpoint` checks the checkpoint's own tensors)."""
    ln_folded = fold_ln and cfg.normalization_type == "LN" and "ln_final.w" in state
    processed = process_weights(
        fill_missing_biases(state, cfg), cfg, ln_folded, center_writing_weights, center_unembed, fold_value_biases,
        refactor_factored_attn_matrices,
    )
    return processed, ln_folded


def load_weights(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Load every parameter of `model` from `state_dict`, strictly: the state dict must hold exactly the model's
    parameter names, with the model's shapes, or a CheckpointError names the differences. Buffers (TL's unused
    attention `mask`/`IGNORE`) carry no weights: the model keeps its own, whatever the state dict holds."""
    own = model.state_dict()
    buffers = {name for name, _ in model.named_buffers() if name in own}
    weights = {k: v for k, v in state_dict.items() if k not in buffers}
    expected = {k: tuple(v.shape) for k, v in own.items() if k not in buffers}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"State dict does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}.")
    for key, value in weights.items():
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}, the model expects {expected[key]}.")
    model.load_state_dict({**{k: own[k] for k in buffers}, **weights}, strict=True)


# -- from a name, a directory or an HF model to (config, processed weights) ---------------------------------------
def tokenizer_source(model_dir: Optional[Path], cfg: HookedTransformerConfig, tl_format: bool) -> Optional[str]:
    """Where the checkpoint's tokenizer comes from: the directory's own tokenizer files, else the GPT-2 tokenizer
    shipped with hooklens (for TL-format checkpoints only when the vocabulary is GPT-2's: TL's toy models use
    other tokenizers), else None (the model takes token ids only)."""
    if model_dir is not None and tok.has_tokenizer_files(model_dir):
        return str(model_dir)
    if not tl_format or cfg.d_vocab == 50257:
        return str(tok.SHIPPED_TOKENIZER_DIR)
    return None


def check_tl_checkpoint_sizes(state: Dict[str, Tensor], cfg: HookedTransformerConfig, source: str) -> None:
    """Check the sizes of a TL-format config against the tensors that pin them, before anything the config sizes is
    allocated: a config.json whose n_ctx or d_mlp is off by orders of magnitude must fail here, naming the field,
    not while building a model of terabytes. (`load_weights` checks every key and shape afterwards.)"""
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    odd = sorted(k for k in state if k.startswith("blocks.") and not k.split(".")[1].isdigit())
    if odd:
        raise CheckpointError(f"{source} holds {odd[:4]}: TL-format blocks are named blocks.<layer>.<weight>; use an "
                              "intact TL-format checkpoint.")
    if len(blocks) != cfg.n_layers:
        raise CheckpointError(f"{source}: config.json has n_layers={cfg.n_layers}, but the checkpoint holds "
                              f"{len(blocks)} blocks; set n_layers to {len(blocks)} (or use the checkpoint's own "
                              "config.json).")
    pins = [("d_vocab", "embed.W_E", 0), ("d_model", "embed.W_E", 1), ("n_ctx", "pos_embed.W_pos", 0),
            ("d_vocab_out", "unembed.W_U", 1)]
    for l in range(cfg.n_layers):
        pins += [("n_heads", f"blocks.{l}.attn.W_Q", 0), ("d_head", f"blocks.{l}.attn.W_Q", 2)]
        pins += [] if cfg.attn_only else [("d_mlp", f"blocks.{l}.mlp.W_in", 1)]
    for field_name, key, dim in pins:
        if key not in state:
            raise CheckpointError(f"{source} has no {key}, which every TL-format checkpoint of the model its "
                                  "config.json describes holds; use the complete checkpoint.")
        shape, value = tuple(state[key].shape), getattr(cfg, field_name)
        if len(shape) <= dim or shape[dim] != value:
            fix = f"set {field_name} to {shape[dim]}" if len(shape) > dim else "use the checkpoint's own config.json"
            raise CheckpointError(f"{source}: config.json has {field_name}={value}, but {key} has shape {shape}; "
                                  f"{fix} (or use the checkpoint this config.json belongs to).")


def _gpt2_config(raw_config: Dict[str, Any], path: Path) -> Any:
    from transformers import GPT2Config  # lazy: transformers takes seconds to import and only loading needs it

    try:
        return GPT2Config.from_dict(raw_config)
    except Exception as err:  # transformers validates field types with its own exception classes
        raise CheckpointError(f"{path}: transformers' GPT2Config refuses it: {err}\nFix that field of config.json "
                              "(GPT-2 small's, for reference: n_layer=12, n_embd=768, n_head=12, n_positions=1024, "
                              "vocab_size=50257, layer_norm_epsilon=1e-05).") from err


def _config_from_file(model_dir: Path, dtype: torch.dtype, name: str) -> Tuple[HookedTransformerConfig, bool]:
    """(config, is it TL-format) from `model_dir`'s config.json, whose values are checked before any weight is read."""
    path = model_dir / "config.json"
    raw_config = read_config_file(path)
    tl_format = "model_type" not in raw_config and "n_layers" in raw_config and "d_model" in raw_config
    try:
        if tl_format:
            cfg = HookedTransformerConfig.from_dict({**raw_config, "dtype": dtype, "device": "cpu",
                                                     "init_weights": False})
            cfg.model_name = raw_config.get("model_name", name)
        else:
            cfg = config_from_hf(_gpt2_config(raw_config, path), dtype=dtype, model_name=name)
    except (ValueError, TypeError) as err:  # values that cannot form a model: say which file holds them
        raise CheckpointError(f"{path}: {err}") from err
    return cfg, tl_format


def _read_checkpoint(
    model_name: Any, hf_model: Any, dtype: torch.dtype
) -> Tuple[HookedTransformerConfig, Dict[str, Tensor], List[str], str]:
    """`read_checkpoint`'s (cfg, state), with the names of the checkpoint's own tensors holding NaN or inf and
    a description of where they came from, for the warning."""
    if hf_model is not None:
        cfg = config_from_hf(hf_model.config, dtype=dtype, model_name=str(model_name))
        hf_state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
        cfg.tokenizer_name = tokenizer_source(None, cfg, tl_format=False)
        return cfg, convert_hf_gpt2_state_dict(hf_state, cfg), find_non_finite(hf_state), "hf_model"
    model_dir = resolve_model_dir(model_name)
    name = Path(str(model_name)).name if Path(str(model_name)).is_dir() else str(model_name)
    cfg, tl_format = _config_from_file(model_dir, dtype, name)
    raw_state = read_weight_file(model_dir)
    if tl_format:
        check_tl_checkpoint_sizes(raw_state, cfg, str(model_dir))
        state = raw_state
    else:
        state = convert_hf_gpt2_state_dict(raw_state, cfg)
    cfg.tokenizer_name = tokenizer_source(model_dir, cfg, tl_format)
    return cfg, state, find_non_finite(raw_state), f"The checkpoint in {model_dir}"


def read_checkpoint(
    model_name: Any, hf_model: Any = None, dtype: torch.dtype = torch.float32
) -> Tuple[HookedTransformerConfig, Dict[str, Tensor]]:
    """The checkpoint's config and its unprocessed weights in TL's layout (converted from HF's unless the directory
    is TL-format, as TL's toy models are published). `cfg.tokenizer_name` is set by `tokenizer_source`. Warns,
    naming them, if tensors of the checkpoint hold NaN or inf."""
    cfg, state, non_finite, source = _read_checkpoint(model_name, hf_model, dtype)
    warn_non_finite(non_finite, source)
    return cfg, state


def load_checkpoint(
    model_name: Any, hf_model: Any = None, *, device: Any = None, dtype: Union[torch.dtype, str] = torch.float32,
    fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
    fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False, default_prepend_bos: bool = True,
    first_n_layers: Optional[int] = None, n_ctx: Optional[int] = None, **config_overrides: Any,
) -> Tuple[HookedTransformerConfig, Dict[str, Tensor]]:
    """A GPT-2 checkpoint as `(cfg, state_dict)`: `HookedTransformer(cfg)` takes `state_dict` strictly.

    Reads the checkpoint (`read_checkpoint`), applies the settings and `config_overrides` to its config, keeps the
    first `first_n_layers` blocks and `n_ctx` positions, and processes the weights as TL does, in float32 (float64
    for a float64 model), before casting them to `dtype`. The config describes the processed weights: its
    normalization is "LNPre" once LayerNorm is folded."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cfg, state, non_finite, source = _read_checkpoint(model_name, hf_model, dtype)
    warn_non_finite(non_finite, source)
    cfg.default_prepend_bos = default_prepend_bos
    cfg.device = str(device) if device is not None else hooklens_config.default_device()
    cfg.init_weights = False  # every weight comes from the checkpoint
    for key, value in config_overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"from_pretrained got an unknown argument {key!r}.")
        setattr(cfg, key, value)
    check_config_values(cfg)  # the overrides may have changed sizes, eps or attn_scale
    state, cfg = truncate_checkpoint(state, cfg, first_n_layers, n_ctx)
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    state, ln_folded = _process_state_dict(
        {k: v.to(work_dtype) for k, v in state.items()}, cfg, fold_ln=fold_ln,
        center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )
    if ln_folded:
        cfg.normalization_type = "LNPre"
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}  # contiguous: safetensors can save them
    if not non_finite and dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(work_dtype).max:
        # Finite weights can overflow in a cast to a narrower range (float16 ends at 65504); processing in float32
        # or float64 cannot, short of weights no checkpoint holds, so wider dtypes skip this second pass.
        warn_non_finite(find_non_finite(state), f"After processing and the cast to {dtype}, the model loaded from "
                        f"{source if hf_model is not None else model_name}")
    return cfg, state


def truncate_checkpoint(
    tl_state: Dict[str, Tensor], cfg: HookedTransformerConfig, first_n_layers: Optional[int], n_ctx: Optional[int]
) -> Tuple[Dict[str, Tensor], HookedTransformerConfig]:
    """Keep the first `first_n_layers` blocks and the first `n_ctx` positions (TL's from_pretrained arguments)."""
    for name, value in (("first_n_layers", first_n_layers), ("n_ctx", n_ctx)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name}={value!r} is not an integer: pass a whole number of "
                            f"{'layers' if name == 'first_n_layers' else 'positions'}, or None to keep them all.")
    if first_n_layers is not None:
        if not 1 <= first_n_layers <= cfg.n_layers:
            raise InvalidInputError(f"first_n_layers={first_n_layers}: the checkpoint has {cfg.n_layers} layers; "
                                    f"pass 1 to {cfg.n_layers}.")
        tl_state = {k: v for k, v in tl_state.items()
                    if not (k.startswith("blocks.") and int(k.split(".")[1]) >= first_n_layers)}
        cfg = dataclasses.replace(cfg, n_layers=first_n_layers)  # re-derives n_params
    if n_ctx is not None:
        if not 1 <= n_ctx <= cfg.n_ctx:
            raise InvalidInputError(f"n_ctx={n_ctx}: the checkpoint's learned position embeddings cover "
                                    f"{cfg.n_ctx} positions; pass 1 to {cfg.n_ctx}.")
        tl_state = {**tl_state, "pos_embed.W_pos": tl_state["pos_embed.W_pos"][:n_ctx]}
        cfg = dataclasses.replace(cfg, n_ctx=n_ctx)
    return tl_state, cfg
