"""TransformerLens-compatible helper functions.

Names, signatures and semantics follow ``transformer_lens.utils`` (TransformerLens 3.9).
Much of this module is ported from TransformerLens (MIT License,
Copyright (c) 2022 TransformerLensOrg); see https://github.com/TransformerLensOrg/TransformerLens.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from copy import deepcopy
from typing import Any, List, Literal, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "get_act_name",
    "to_numpy",
    "get_device",
    "get_corner",
    "remove_batch_dim",
    "transpose",
    "is_square",
    "is_lower_triangular",
    "get_offset_position_ids",
    "get_cumsum_along_dim",
    "lm_cross_entropy_loss",
    "lm_accuracy",
    "gelu_new",
    "gelu_fast",
    "solu",
    "get_input_with_manually_prepended_bos",
    "get_tokens_with_bos_removed",
    "get_attention_mask",
    "override_or_use_default_value",
    "USE_DEFAULT_VALUE",
    "SliceInput",
    "Slice",
    "test_prompt",
    "calc_fan_in_and_fan_out",
    "init_xavier_uniform_",
    "init_xavier_normal_",
    "init_kaiming_uniform_",
    "init_kaiming_normal_",
    "is_library_available",
    "get_tokenizer_with_bos",
    "logits_to_df",
    "sample_logits",
    "tokenize_and_concatenate",
    "keep_single_column",
    "get_nested_attr",
    "set_nested_attr",
    "repeat_along_head_dimension",
    "filter_dict_by_prefix",
    "composition_scores",
]

USE_DEFAULT_VALUE = None


# ---------------------------------------------------------------------------
# Activation names
# ---------------------------------------------------------------------------

_LAYER_TYPE_ALIAS = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}

_ACT_NAME_ALIAS = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}

_ATTN_ACTS = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_ACTS = ("pre", "post", "mid", "pre_linear")
_LAYER_NORM_NAMES = ("scale", "normalized")


def get_act_name(
    name: str,
    layer: Optional[Union[int, str]] = None,
    layer_type: Optional[str] = None,
) -> str:
    """Convert shorthand to a full hook name, exactly like TransformerLens.

    Examples: ``get_act_name('k', 6, 'a') == 'blocks.6.attn.hook_k'``,
    ``get_act_name('k6') == 'blocks.6.attn.hook_k'``,
    ``get_act_name('scale4ln1') == 'blocks.4.ln1.hook_scale'``,
    ``get_act_name('embed') == 'hook_embed'``, ``get_act_name('scale') == 'ln_final.hook_scale'``.
    The first run of digits in ``name`` (if any) is the layer, anything after it the layer type.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        # Already a full name.
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)  # type: ignore[assignment]

    if name in _ACT_NAME_ALIAS:
        name = _ACT_NAME_ALIAS[name]

    full_act_name = ""
    if layer is not None:
        full_act_name += f"blocks.{layer}."
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]

    if layer_type:
        full_act_name += f"{layer_type}."
    full_act_name += f"hook_{name}"

    if name in _LAYER_NORM_NAMES and layer is None:
        full_act_name = f"ln_final.{full_act_name}"
    return full_act_name


# ---------------------------------------------------------------------------
# Tensor helpers
# ---------------------------------------------------------------------------


def to_numpy(tensor: Any) -> np.ndarray:
    """Convert a tensor (or list, tuple, scalar, array) to a numpy array."""
    if isinstance(tensor, np.ndarray):
        return tensor
    elif isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    elif isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.to(torch.float32)
        return tensor.numpy()
    elif isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    else:
        raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}")


def get_device() -> str:
    """Best available device: "cuda", then "mps" (only if TRANSFORMERLENS_ALLOW_MPS=1), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available() and torch.backends.mps.is_built():
        if os.environ.get("TRANSFORMERLENS_ALLOW_MPS", "") == "1":
            return "mps"
        logging.info(
            "MPS device available but not auto-selected due to known correctness issues "
            "(PyTorch %s). Set TRANSFORMERLENS_ALLOW_MPS=1 to override.",
            torch.__version__,
        )
    return "cpu"


def get_corner(tensor: Any, n: int = 3) -> Any:
    """Top-left ``n x n x ...`` corner of a tensor."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Squeeze the first dimension if it has size 1, else return the tensor unchanged."""
    if tensor.shape[0] == 1:
        return tensor.squeeze(0)
    return tensor


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    """Swap the last two dimensions."""
    return tensor.transpose(-1, -2)


def is_square(x: torch.Tensor) -> bool:
    """Whether ``x`` is a square matrix."""
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: torch.Tensor) -> bool:
    """Whether ``x`` is a lower-triangular square matrix."""
    if not is_square(x):
        return False
    return x.equal(x.tril())


def get_offset_position_ids(past_kv_pos_offset: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from the first attended token (leading pads get 0)."""
    shifted_position_ids = attention_mask.cumsum(dim=1) - 1
    position_ids = shifted_position_ids.masked_fill(shifted_position_ids < 0, 0)
    return position_ids[:, past_kv_pos_offset:]


def get_cumsum_along_dim(tensor: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """Cumulative sum along ``dim`` (from the end if ``reverse``)."""
    if reverse:
        tensor = tensor.flip(dims=(dim,))
    cumsum = tensor.cumsum(dim=dim)
    if reverse:
        cumsum = cumsum.flip(dims=(dim,))
    return cumsum


# ---------------------------------------------------------------------------
# Losses and activation functions
# ---------------------------------------------------------------------------


def lm_cross_entropy_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    per_token: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy loss.

    ``per_token=True`` returns the ``[batch, pos-1]`` negative log probs (masked positions are 0);
    otherwise the mean over positions where both the token and the next one are attended.
    """
    log_probs = F.log_softmax(logits, dim=-1)
    predicted_log_probs = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]

    if attention_mask is not None:
        assert attention_mask.shape == tokens.shape, (
            "attention_mask must have the same shape as tokens, "
            f"got {tuple(attention_mask.shape)} and {tuple(tokens.shape)}"
        )
        # Ignore positions that are masked out or whose next token is masked out.
        next_token_mask = torch.logical_and(attention_mask[:, :-1], attention_mask[:, 1:])
        predicted_log_probs = predicted_log_probs.masked_fill(~next_token_mask, 0.0)
        n_tokens = next_token_mask.sum().item()
    else:
        n_tokens = predicted_log_probs.numel()
    if per_token:
        return -predicted_log_probs
    return -predicted_log_probs.sum() / n_tokens


def lm_accuracy(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Top-1 next-token accuracy (``[batch, pos-1]`` booleans if ``per_token``)."""
    top_prediction = logits.argmax(dim=-1)
    correct_matches = top_prediction[:, :-1] == tokens[:, 1:]
    if per_token:
        return correct_matches
    return correct_matches.sum() / correct_matches.numel()


def gelu_new(input: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU (same formula as TransformerLens)."""
    return (
        0.5
        * input
        * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (input + 0.044715 * torch.pow(input, 3.0))))
    )


def gelu_fast(input: torch.Tensor) -> torch.Tensor:
    """Fast tanh-approximated GELU (same formula as TransformerLens)."""
    return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


def solu(input: torch.Tensor) -> torch.Tensor:
    """SoLU: ``x * softmax(x)`` over the last dimension (the LayerNorm lives in the MLP)."""
    return input * F.softmax(input, dim=-1)


# ---------------------------------------------------------------------------
# Weight initialization (TL's conventions: [d_in, d_out] matrices, [n_heads, d_model, d_head] attention weights)
# ---------------------------------------------------------------------------

NonlinearityType = Literal[
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "sigmoid", "tanh", "relu", "leaky_relu", "selu",
]


def calc_fan_in_and_fan_out(tensor: torch.Tensor) -> Tuple[int, int]:
    """(fan_in, fan_out) in TL's layout: `[d]` -> (1, d), `[d_in, d_out]` -> (d_in, d_out),
    `[n_heads, d_model, d_head]` -> (d_model, n_heads * d_head). Scalars and 4+-D tensors raise ValueError."""
    # lazy: hooklens.model_weights imports this module (composition_scores), so a top-level import is a cycle
    from hooklens.model_weights import fan_in_and_fan_out

    if tensor.dim() == 0:
        raise ValueError("Fan in and fan out can not be computed for scalars.")
    if tensor.dim() > 3:
        raise ValueError(f"Fan in and fan out can not be computed for shape {tensor.shape} tensors.")
    return fan_in_and_fan_out(tensor)


def init_xavier_uniform_(param: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Fill `param` in place from U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)); returns `param`."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    bound = gain * np.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(param, -bound, bound)


def init_xavier_normal_(param: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Fill `param` in place from N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)); returns `param`."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    return nn.init.normal_(param, mean=0.0, std=gain * np.sqrt(2.0 / (fan_in + fan_out)))


def _kaiming_gain_and_fan(param: torch.Tensor, a: float, nonlinearity: str, gain: float, mode: str):
    """(gain * calculate_gain(nonlinearity, a), fan): fan is fan_in for mode "fan_in", else fan_out."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    return gain * nn.init.calculate_gain(nonlinearity, a), fan_in if mode == "fan_in" else fan_out


def init_kaiming_uniform_(
    param: torch.Tensor, a: float = 0, nonlinearity: NonlinearityType = "relu", gain: float = 1.0,
    mode: str = "fan_in",
) -> torch.Tensor:
    """Kaiming (He) uniform init in place: U(-b, b), b = gain * calculate_gain(nonlinearity, a) * sqrt(3 / fan).
    `a` is the nonlinearity's parameter (leaky_relu's slope), as in torch; returns `param`."""
    gain, fan = _kaiming_gain_and_fan(param, a, nonlinearity, gain, mode)
    bound = gain * np.sqrt(3.0 / fan)
    return nn.init.uniform_(param, -bound, bound)


def init_kaiming_normal_(
    param: torch.Tensor, a: float = 0, nonlinearity: NonlinearityType = "relu", gain: float = 1.0,
    mode: str = "fan_in",
) -> torch.Tensor:
    """Kaiming (He) normal init in place: N(0, std^2), std = gain * calculate_gain(nonlinearity, a) / sqrt(fan);
    returns `param`."""
    gain, fan = _kaiming_gain_and_fan(param, a, nonlinearity, gain, mode)
    return nn.init.normal_(param, mean=0.0, std=gain * np.sqrt(1.0 / fan))


def is_library_available(name: str) -> bool:
    """Whether module `name` is importable, found without importing it."""
    return name in sys.modules or importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------
# Tokenization helpers
# ---------------------------------------------------------------------------


def get_input_with_manually_prepended_bos(
    bos_token: Optional[str], input: Union[str, List[str]]
) -> Union[str, List[str]]:
    """Prepend ``bos_token`` to a string or each string of a list (no-op if it is None)."""
    if bos_token is None:
        return input
    if isinstance(input, str):
        return bos_token + input
    return [bos_token + string for string in input]


def get_tokenizer_with_bos(tokenizer: Any) -> Any:
    """A tokenizer like `tokenizer` that prepends BOS itself (`add_bos_token=True`), reloaded from its
    `name_or_path` with the same init arguments and padding side; `tokenizer` itself when it already does, has
    no BOS token, or cannot express one (TL 3.9's semantics)."""
    if tokenizer.bos_token is None:
        return tokenizer
    init_kwargs = deepcopy(tokenizer.init_kwargs)
    pretrained_model_name_or_path = init_kwargs.pop("name_or_path")
    add_bos_token = init_kwargs.pop("add_bos_token", None)
    if add_bos_token is None:
        add_bos_token = getattr(tokenizer, "add_bos_token", False)
    if add_bos_token:
        return tokenizer
    from transformers import AutoTokenizer  # lazy: transformers is slow to import and only this helper needs it

    huggingface_token = os.environ.get("HF_TOKEN", "")
    try:
        tokenizer_with_bos = AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, add_bos_token=True, token=huggingface_token or None, **init_kwargs
        )
    except ValueError:  # special tokens the post-processor template cannot express: keep the original
        return tokenizer
    tokenizer_with_bos.padding_side = tokenizer.padding_side  # from_pretrained resets it
    return tokenizer_with_bos


def get_tokens_with_bos_removed(
    tokenizer: Any, tokens: torch.Tensor, padding_side: Optional[str] = None
) -> torch.Tensor:
    """Remove the BOS token from the start of each (possibly left-padded) sequence."""
    if tokenizer.bos_token_id is None:
        return tokens
    if padding_side is None:
        padding_side = tokenizer.padding_side
    if padding_side == "right":
        return tokens[..., 1:]

    bos_removed_shape = list(tokens.shape)
    bos_removed_shape[-1] -= 1
    if tokenizer.bos_token_id == tokenizer.pad_token_id:
        is_not_pad_token = tokens.ne(tokenizer.pad_token_id)
        is_leading_pad = get_cumsum_along_dim(is_not_pad_token, -1, reverse=False) == 0
        real_bos_positions = is_leading_pad.sum(-1) - 1
    else:
        real_bos_positions = (tokens == tokenizer.bos_token_id).int().argmax(-1)
    tokens = tokens.scatter(dim=1, index=real_bos_positions.unsqueeze(-1), value=-100)
    return tokens[tokens != -100].view(*bos_removed_shape)


def get_attention_mask(
    tokenizer: Any,
    tokens: torch.Tensor,
    prepend_bos: bool,
    padding_side: Optional[str] = None,
) -> torch.Tensor:
    """Attention mask (1 = attend) for ``tokens``.

    Only leading pads (left padding) or trailing pads (right padding) count as padding. With left
    padding and ``prepend_bos``, a BOS that shares the pad id is unmasked.
    """
    attention_mask = torch.ones_like(tokens)
    if tokenizer is None:
        return attention_mask
    if padding_side is None:
        padding_side = tokenizer.padding_side
    is_not_pad_token = tokens.ne(tokenizer.pad_token_id)

    if padding_side == "right":
        is_trailing_pad = get_cumsum_along_dim(is_not_pad_token, -1, reverse=True) == 0
        attention_mask[is_trailing_pad] = 0
    else:
        is_leading_pad = get_cumsum_along_dim(is_not_pad_token, -1, reverse=False) == 0
        attention_mask[is_leading_pad] = 0
        if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
            pad_bos_positions = is_leading_pad.sum(-1) - 1
            attention_mask[torch.arange(attention_mask.shape[0]), pad_bos_positions] = 1
    return attention_mask


def override_or_use_default_value(default_flag: Any, override: Optional[Any] = None) -> Any:
    """``override`` if it is not None, else ``default_flag``."""
    return override if override is not None else default_flag


# ---------------------------------------------------------------------------
# Slice
# ---------------------------------------------------------------------------

SliceInput = Optional[
    Union[int, Tuple[int], Tuple[int, int], Tuple[int, int, int], List[int], torch.Tensor, np.ndarray]
]


def repeat_along_head_dimension(tensor: torch.Tensor, n_heads: int, clone_tensor: bool = True) -> torch.Tensor:
    """`[batch, pos, d_model]` -> `[batch, pos, n_heads, d_model]` (a copy unless `clone_tensor=False`)."""
    repeated = tensor.unsqueeze(-2).expand(*tensor.shape[:-1], n_heads, tensor.shape[-1])
    return repeated.clone() if clone_tensor else repeated


def filter_dict_by_prefix(dictionary: dict, prefix: str) -> dict:
    """Entries whose key starts with `prefix` + "." (the dot is added if missing), with that prefix stripped."""
    search_prefix = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(search_prefix):]: v for k, v in dictionary.items() if k.startswith(search_prefix)}


def get_nested_attr(obj: Any, attr_str: str) -> Any:
    """`obj.a.b.c` for `attr_str="a.b.c"`."""
    for attr in attr_str.split("."):
        obj = getattr(obj, attr)
    return obj


def set_nested_attr(obj: Any, attr_str: str, value: Any) -> None:
    """Set `obj.a.b.c = value` for `attr_str="a.b.c"`."""
    *path, last = attr_str.split(".")
    setattr(get_nested_attr(obj, ".".join(path)) if path else obj, last, value)


def keep_single_column(dataset: Any, col_name: str) -> Any:
    """A Hugging Face `datasets` dataset with every column but `col_name` removed."""
    for key in list(dataset.features):
        if key != col_name:
            dataset = dataset.remove_columns(key)
    return dataset


def tokenize_and_concatenate(
    dataset: Any, tokenizer: Any, streaming: bool = False, max_length: int = 1024, column_name: str = "text",
    add_bos_token: bool = True, num_proc: Optional[int] = 10, set_format: bool = True,
) -> Any:
    """TL's `tokenize_and_concatenate`: tokenize each document of a `datasets` dataset, join them with an EOS token
    between documents, and cut the stream into rows of `max_length` tokens (BOS first if `add_bos_token`) in a single
    `"tokens"` column. Each `map` batch keeps whole rows only (its tail is dropped; a batch shorter than one row is
    padded with the pad token, EOS if there is none). Unlike TL, a tokenizer without a pad token is not modified.
    `num_proc=None` tokenizes in-process; `streaming=True` (an IterableDataset) never uses processes."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_and_concatenate needs a tokenizer with an EOS token (it separates documents).")
    if add_bos_token and tokenizer.bos_token_id is None:
        raise ValueError("add_bos_token=True needs a tokenizer with a BOS token; pass add_bos_token=False.")
    if column_name not in dataset.features:
        raise KeyError(f"Column {column_name!r} is not in the dataset (columns: {list(dataset.features)}); "
                       "pass column_name=...")
    dataset = keep_single_column(dataset, column_name)
    seq_len = max_length - 1 if add_bos_token else max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def tokenize_batch(examples: dict) -> dict:
        ids = tokenizer(examples[column_name], add_special_tokens=False)["input_ids"] if examples[column_name] else []
        pieces: List[np.ndarray] = []
        for i, row in enumerate(ids):
            pieces.append(np.asarray(row, dtype=np.int64))
            if i < len(ids) - 1:
                pieces.append(np.array([tokenizer.eos_token_id], dtype=np.int64))
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if len(tokens) < seq_len:
            tokens = np.concatenate([tokens, np.full(seq_len - len(tokens), pad_id, dtype=np.int64)])
        n_rows = len(tokens) // seq_len
        rows = tokens[: n_rows * seq_len].reshape(n_rows, seq_len)  # [rows, seq_len]
        if add_bos_token:
            rows = np.concatenate([np.full((n_rows, 1), tokenizer.bos_token_id, dtype=np.int64), rows], axis=1)
        return {"tokens": rows}

    process_kwargs = {} if streaming else {"num_proc": num_proc}
    tokenized = dataset.map(tokenize_batch, batched=True, remove_columns=[column_name], **process_kwargs)
    if set_format:
        tokenized.set_format(type="torch", columns=["tokens"])
    return tokenized


def logits_to_df(logits: torch.Tensor, tokenizer: Optional[Any] = None, top_k: Optional[int] = None) -> Any:
    """A `[d_vocab]` logit vector as a pandas DataFrame sorted by descending probability, columns `token_index`,
    `token_string` (only with a tokenizer), `logit`, `log_prob`, `probability`; `top_k` keeps the first rows."""
    import pandas as pd  # lazy: pandas is an optional dependency, needed by this helper only

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    order = torch.argsort(probs, descending=True)
    if top_k is not None:
        order = order[:top_k]
    indices = order.cpu().tolist()
    data: dict = {"token_index": indices}
    if tokenizer is not None:
        data["token_string"] = [tokenizer.decode([i]) for i in indices]
    data["logit"] = logits[order].detach().cpu().tolist()
    data["log_prob"] = log_probs[order].detach().cpu().tolist()
    data["probability"] = probs[order].detach().cpu().tolist()
    return pd.DataFrame(data)


def sample_logits(
    final_logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None, temperature: float = 1.0,
    freq_penalty: float = 0.0, repetition_penalty: float = 1.0, tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Next token per row from `[b, v]` logits (TL's `utils.sample_logits`, same arguments and draws).

    temperature 0 is greedy (argmax). `repetition_penalty` (Hugging Face style, applied first, greedy included)
    divides the positive and multiplies the negative logits of every token in `tokens`; `freq_penalty` subtracts
    `freq_penalty * count` per token after temperature; then `top_k` or `top_p` filtering."""
    if repetition_penalty != 1.0 and tokens is not None:
        seen = torch.zeros_like(final_logits, dtype=torch.bool).scatter_(1, tokens, True)  # [b, v]
        penalised = torch.where(final_logits > 0, final_logits / repetition_penalty, final_logits * repetition_penalty)
        final_logits = torch.where(seen, penalised, final_logits)
    if temperature == 0.0:
        return final_logits.argmax(dim=-1)
    logits = final_logits / temperature
    if freq_penalty > 0:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens generated so far.")
        counts = torch.zeros_like(logits).scatter_add_(1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, sorted_idx = logits.sort(descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()  # keep the token that crosses top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return torch.distributions.Categorical(logits=logits.float()).sample()  # float32 draws, as TL


class Slice:
    """A slice along one dimension, TransformerLens-style.

    ``int`` indexes (drops the dim); a tuple ``t`` means ``slice(*t)``; a ``slice`` is used as is;
    a list / tensor / array selects those indices; ``None`` is the identity.
    """

    slice: Union[int, slice, np.ndarray]

    def __init__(self, input_slice: SliceInput = None):
        if isinstance(input_slice, tuple):
            self.slice = slice(*input_slice)
            self.mode = "slice"
        elif isinstance(input_slice, int):
            self.slice = input_slice
            self.mode = "int"
        elif isinstance(input_slice, slice):
            self.slice = input_slice
            self.mode = "slice"
        elif type(input_slice) in [list, torch.Tensor, np.ndarray]:
            self.slice = to_numpy(input_slice)
            self.mode = "array"
        elif input_slice is None:
            self.slice = slice(None)
            self.mode = "identity"
        elif isinstance(getattr(input_slice, "mode", None), str) and hasattr(input_slice, "slice"):
            # A Slice of this or another library (transformer_lens.utilities.Slice): same fields, same meaning.
            self.slice, self.mode = input_slice.slice, input_slice.mode
        else:
            raise ValueError(
                f"Invalid slice {input_slice!r}: use an int, a tuple (start, stop[, step]), a slice, a list / "
                "tensor / array of indices, None, or a Slice"
            )

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Apply the slice along ``dim`` (negative dims allowed)."""
        slices: list = [slice(None)] * tensor.ndim
        slices[dim] = self.slice
        return tensor[tuple(slices)]

    def indices(self, max_ctx: Optional[int] = None) -> np.ndarray:
        """Indices selected on an axis of size ``max_ctx`` (not needed for int slices)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be specified if slice is not an integer")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "

    @classmethod
    def unwrap(cls, slice_input: Union["Slice", SliceInput]) -> "Slice":
        """Convert to a Slice; a bare int becomes ``[int]`` so the dimension is kept."""
        if not isinstance(slice_input, Slice):
            if isinstance(slice_input, int):
                slice_input = [slice_input]
            slice_input = Slice(slice_input)
        return slice_input


# ---------------------------------------------------------------------------
# Exploratory analysis
# ---------------------------------------------------------------------------


def _rich_print(text: str) -> None:
    try:
        from rich import print as rprint
    except ImportError:  # rich is optional: drop the bold markup
        print(text.replace("[b]", "").replace("[/b]", ""))
    else:
        rprint(text)


def test_prompt(
    prompt: str,
    answer: Union[str, List[str]],
    model: Any,
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: Optional[bool] = USE_DEFAULT_VALUE,
    top_k: int = 10,
) -> None:
    """Print the model's rank, logit and probability for ``answer`` after ``prompt``, plus the top-k tokens.

    A list of answers compares single next-token completions. Prints, returns None.
    """
    answers = [answer] if isinstance(answer, str) else answer
    n_answers = len(answers)
    using_multiple_answers = n_answers > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_tokens = model.to_tokens(answers, prepend_bos=False)
    if using_multiple_answers:  # only a single next token is compared
        answer_tokens = answer_tokens[:, :1]
    prompt_tokens = prompt_tokens.repeat(answer_tokens.shape[0], 1)
    tokens = torch.cat((prompt_tokens, answer_tokens), dim=1)
    prompt_str_tokens = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_str_tokens_list = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    prompt_length = len(prompt_str_tokens)
    answer_length = 1 if using_multiple_answers else len(answer_str_tokens_list[0])

    if print_details:
        print("Tokenized prompt:", prompt_str_tokens)
        if using_multiple_answers:
            print("Tokenized answers:", answer_str_tokens_list)
        else:
            print("Tokenized answer:", answer_str_tokens_list[0])
    logits = model(tokens)
    probs = logits.softmax(dim=-1)
    answer_ranks = []

    for index in range(prompt_length, prompt_length + answer_length):
        answer_tokens = tokens[:, index]
        answer_str_tokens = [a[index - prompt_length] for a in answer_str_tokens_list]
        token_probs = probs[:, index - 1]  # models predict the NEXT token
        sorted_token_probs, sorted_token_positions = token_probs.sort(descending=True)
        answer_token_ranks = sorted_token_positions.argsort(-1)[
            range(n_answers), answer_tokens.cpu()
        ].tolist()
        answer_ranks.append(list(zip(answer_str_tokens, answer_token_ranks)))
        if print_details:
            _rich_print(
                f"Performance on answer token{'s' if n_answers > 1 else ''}:\n"
                + "\n".join(
                    f"[b]Rank: {answer_token_ranks[i]: <8} "
                    f"Logit: {logits[i, index - 1, answer_tokens[i]].item():5.2f} "
                    f"Prob: {token_probs[i, answer_tokens[i]].item():6.2%} "
                    f"Token: |{answer_str_tokens[i]}|[/b]"
                    for i in range(n_answers)
                )
            )
            for i in range(top_k):
                print(
                    f"Top {i}th token. "
                    f"Logit: {logits[0, index - 1, sorted_token_positions[0, i]].item():5.2f} "
                    f"Prob: {sorted_token_probs[0, i].item():6.2%} "
                    f"Token: |{model.to_string(sorted_token_positions[0, i])}|"
                )
    if not using_multiple_answers:
        single_answer_ranks = [r[0] for r in answer_ranks]
        _rich_print(f"[b]Ranks of the answer tokens:[/b] {single_answer_ranks}")
    else:
        _rich_print(f"[b]Ranks of the answer tokens:[/b] {answer_ranks}")


# Keep pytest from collecting ``test_prompt`` when this module is imported in a test file.
test_prompt.__test__ = False  # type: ignore[attr-defined]


def composition_scores(left: Any, right: Any, broadcast_dims: bool = True) -> torch.Tensor:
    """Composition scores ||L R||_F / (||L||_F ||R||_F) of two FactoredMatrix (Elhage et al. 2021).

    With `broadcast_dims`, every leading index of `left` is paired with every leading index of `right`
    (output shape `left.batch + right.batch`); otherwise the leading dims are matched elementwise.
    The SVD-collapsed factors are used as in TransformerLens; the pairwise norms come from one GEMM of
    flattened Gram matrices when that is cheaper than forming every product.
    """
    if left.rdim != right.ldim:
        raise ValueError(f"Composition scores need left.rdim == right.ldim, shapes were left: {tuple(left.shape)}, "
                         f"right: {tuple(right.shape)}")
    new_left = left.collapse_l()  # [*L, m1, n]
    new_right = right.collapse_r()  # [*R, n, m2]
    l_norms = left.S.pow(2).sum(-1).sqrt()  # ||S Vh||_F = ||S||
    r_norms = right.S.pow(2).sum(-1).sqrt()
    n, m1, m2 = new_left.shape[-1], new_left.shape[-2], new_right.shape[-1]
    if not broadcast_dims:
        comp = (new_left @ new_right).norm(dim=(-2, -1))
        return comp / r_norms / l_norms
    l_batch, r_batch = new_left.shape[:-2], new_right.shape[:-2]
    if n <= m1 * m2:
        # ||P Q||_F^2 = <P^T P, Q Q^T>: one [#L, n*n] @ [n*n, #R] GEMM instead of #L * #R products.
        gram_l = (new_left.transpose(-2, -1) @ new_left).reshape(-1, n * n)  # [#L, n*n]
        gram_r = (new_right @ new_right.transpose(-2, -1)).reshape(-1, n * n)  # [#R, n*n]
        comp = (gram_l @ gram_r.T).clamp(min=0).sqrt()  # [#L, #R]
    else:
        flat_l = new_left.reshape(-1, n)  # [#L*m1, n]
        flat_r = new_right.transpose(-2, -1).reshape(-1, n)  # [#R*m2, n]
        products = (flat_l @ flat_r.T).view(-1, m1, flat_r.shape[0] // m2, m2)  # [#L, m1, #R, m2]
        comp = products.pow(2).sum(dim=(1, 3)).sqrt()
    comp = comp.view(l_batch + r_batch)
    l_norms = l_norms.view(l_batch + (1,) * len(r_batch))
    return comp / r_norms / l_norms
