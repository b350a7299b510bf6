"""Model configuration: TransformerLens 3.9 field names and defaults for GPT-2-style models.

`HookedTransformerConfig` keeps TL's names so existing code (`model.cfg.n_layers`, `cfg.d_head`, ...) reads the
same. Only fields that make sense for a GPT-2-family model exist; asking for a feature outside that family
(rotary embeddings, grouped-query attention, MoE, ...) raises instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from hooklens.errors import InvalidInputError


def default_device() -> str:
    """Where a model goes when no device is given: "cuda" when PyTorch sees a GPU, else "cpu" (TL 3.9's rule)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "solu_ln")
SUPPORTED_NORMALIZATION = ("LN", "LNPre", None)

# TL 3.9 fields that describe architectures (or loading modes) outside the GPT-2 family, with the value that means
# "not used". They read as that value (`cfg.gated_mlp` is False), so code that checks them runs; setting any other
# value raises instead of being silently ignored.
_UNSUPPORTED_FIELDS: Dict[str, Any] = {
    "rotary_dim": None, "rotary_base": 10000, "rotary_base_local": None, "rotary_scaling_factor": 1.0,
    "rotary_adjacent_pairs": False, "use_NTK_by_parts_rope": False, "NTK_by_parts_low_freq_factor": 1.0,
    "NTK_by_parts_high_freq_factor": 4.0, "NTK_by_parts_factor": 8.0, "NTK_original_ctx_len": 8192,
    "use_dynamic_ntk_rope": False, "use_yarn_rope": False, "yarn_factor": 1.0, "yarn_attention_factor": 1.0,
    "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_original_max_position_embeddings": 4096,
    "yarn_truncate": True, "yarn_global_attn_only": False, "use_logn_attn": False, "train_seq_length": None,
    "n_key_value_heads": None, "ungroup_grouped_query_attention": False, "num_experts": None,
    "experts_per_token": None, "norm_topk_prob": False, "gated_mlp": False, "parallel_attn_mlp": False,
    "use_local_attn": False, "window_size": None, "attn_types": None, "post_embedding_ln": False,
    "uses_rms_norm": False, "final_rms": False, "use_normalization_before_and_after": False, "use_qk_norm": False,
    "clip_qkv": None, "attn_scores_soft_cap": -1.0, "output_logits_soft_cap": -1.0,
    "scale_attn_by_inverse_layer_idx": False, "relative_attention_max_distance": None,
    "relative_attention_num_buckets": None, "decoder_start_token_id": None, "use_attention_sinks": False,
    "load_in_4bit": False, "quantization_method": None, "trust_remote_code": False, "layer_norm_folding": False,
    "checkpoint_index": None, "checkpoint_label_type": None, "checkpoint_value": None,
}


def _check_unsupported(name: str, value: Any) -> None:
    if value != _UNSUPPORTED_FIELDS[name]:
        raise NotImplementedError(
            f"{name}={value!r} describes an architecture outside the GPT-2 family, which hooklens does not support "
            f"(leave it at {_UNSUPPORTED_FIELDS[name]!r})."
        )


# What each size means, for errors that say how to fix a bad value ("GPT-2 small" gives a value that works).
_SIZE_HINTS: Dict[str, str] = {
    "n_layers": "the number of transformer blocks, 12 for GPT-2 small; 0 gives an embedding-unembedding model",
    "d_model": "the residual stream width, 768 for GPT-2 small",
    "n_ctx": "the number of positions the model reads, 1024 for GPT-2",
    "d_head": "the width of one attention head, 64 for GPT-2",
    "n_heads": "the number of heads per layer, 12 for GPT-2 small",
    "d_mlp": "the MLP's hidden width, 3072 for GPT-2 small; None means 4 * d_model",
    "d_vocab": "the vocabulary size, 50257 for GPT-2",
    "d_vocab_out": "the number of logits, 50257 for GPT-2",
}
# The "derive it" value of a size field, and what it means.
_UNSET = {"n_heads": (-1, "derives it as d_model // d_head"), "d_vocab": (-1, "takes it from the tokenizer"),
          "d_vocab_out": (-1, "makes it d_vocab")}
# (field, smallest valid value): checked in this order, before any size is used.
_SIZE_RULES = (("n_layers", 0), ("d_model", 1), ("n_ctx", 1), ("d_head", 1), ("n_heads", 1), ("d_mlp", 1),
               ("d_vocab", 1), ("d_vocab_out", 1))
# No GPT-2-style model comes near 2**38 weights (GPT-2 XL has 1.6e9; 2**38 float32 weights fill 1 TiB): a config
# that asks for more has a typo, and building it would exhaust memory before any error could name the field.
MAX_MODEL_WEIGHTS = 2**38


def _check_size(name: str, value: Any, low: int, label: Optional[str] = None, derivable: bool = True) -> Any:
    """`value` as an int if it is a valid size for field `name` (or, if `derivable`, its "derive it" value), else
    an error that names `label` (default: `name`) and says which values work."""
    unset, meaning = _UNSET.get(name, (None, "")) if derivable else (None, "")
    if unset is not None and value == unset and not isinstance(value, bool):
        return value
    label = label or name
    fix = (f"set it to {'a positive integer' if low == 1 else 'an integer >= 0'} ({_SIZE_HINTS[name]})"
           + (f", or to {unset}, which {meaning}." if meaning else "."))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{label}={value!r} is not an integer: {fix}")
    if value < low:
        raise InvalidInputError(f"{label}={value!r} cannot form a model: {fix}")
    return int(value)


def _check_positive_real(name: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is not a number: {fix}.")
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"{name}={value!r} cannot form a model (it must be finite and > 0): {fix}.")


def _model_weights(cfg: "HookedTransformerConfig") -> Dict[str, int]:
    """How many weights each part of the model described by `cfg` holds, keyed by the fields that size it."""
    d = cfg.d_model
    per_layer = 4 * cfg.n_heads * cfg.d_head * d + (0 if cfg.attn_only else 2 * d * cfg.d_mlp)
    return {"d_vocab (embedding)": max(cfg.d_vocab, 0) * d, "n_ctx (position embedding)": cfg.n_ctx * d,
            "d_vocab_out (unembedding)": max(cfg.d_vocab_out, 0) * d,
            "n_layers x (n_heads, d_head, d_mlp) (blocks)": cfg.n_layers * per_layer}


def check_config_values(cfg: "HookedTransformerConfig") -> None:
    """Raise, naming the field and a value that works, if `cfg` cannot form a model: sizes that are not positive
    integers, eps or attn_scale <= 0, or more weights than any GPT-2-style model has (`MAX_MODEL_WEIGHTS`).

    Runs when a config is built, and again wherever fields are changed afterwards (from_pretrained's overrides)."""
    for name, low in _SIZE_RULES:
        if name == "d_mlp" and (cfg.attn_only or cfg.d_mlp is None):
            continue  # None means 4 * d_model; an attention-only model has no MLP, so TL configs carry any d_mlp
        setattr(cfg, name, _check_size(name, getattr(cfg, name), low))
    _check_positive_real("eps", cfg.eps, "set eps (LayerNorm's epsilon) to e.g. 1e-5, GPT-2's value")
    if cfg.attn_scale != -1.0:
        _check_positive_real("attn_scale", cfg.attn_scale, "leave attn_scale at -1 for sqrt(d_head), or pass "
                             "use_attn_scale=False for no scaling")
    if cfg.n_heads == -1 or (cfg.d_mlp is None and not cfg.attn_only):
        return  # derived by __post_init__, which checks the result
    parts = _model_weights(cfg)
    total = sum(parts.values())
    if total > MAX_MODEL_WEIGHTS:
        largest = max(parts, key=parts.get)
        raise InvalidInputError(
            f"This config describes a model with {total:.3g} weights ({total * 4 / 2**40:.3g} TiB in float32), "
            f"more than any GPT-2-style model (GPT-2 XL has 1.6e9); most of them come from {largest}. Check those "
            f"fields (n_ctx={cfg.n_ctx}, d_vocab={cfg.d_vocab}, d_model={cfg.d_model}, d_mlp={cfg.d_mlp}, "
            f"n_layers={cfg.n_layers}) for a typo."
        )


@dataclass
class HookedTransformerConfig:
    """Configuration of a GPT-2-style HookedTransformer (TransformerLens 3.9 field names)."""

    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int
    model_name: str = "custom"
    n_heads: int = -1
    d_mlp: Optional[int] = None
    act_fn: Optional[str] = "relu"
    d_vocab: int = -1
    eps: float = 1e-5
    use_attn_result: bool = False
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_hook_tokens: bool = False
    original_architecture: Optional[str] = None
    tokenizer_name: Optional[str] = None
    normalization_type: Optional[str] = "LN"
    device: Optional[str] = None
    n_devices: int = 1
    attention_dir: str = "causal"
    attn_only: bool = False
    seed: Optional[int] = None
    initializer_range: float = -1.0
    init_weights: bool = True
    init_mode: str = "gpt2"
    positional_embedding_type: str = "standard"
    d_vocab_out: int = -1
    n_params: Optional[int] = None
    dtype: torch.dtype = torch.float32
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: Optional[bool] = None
    from_checkpoint: bool = False
    tie_word_embeddings: bool = False
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_config_values(self)
        if self.n_heads == -1:
            if self.d_model % self.d_head != 0:
                raise InvalidInputError(f"d_model={self.d_model} is not a multiple of d_head={self.d_head}; set "
                                        "n_heads, or pick a d_head that divides d_model.")
            self.n_heads = self.d_model // self.d_head
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if not self.attn_only and self.act_fn is None:
            raise ValueError("act_fn must be set for models with MLPs (e.g. act_fn='gelu_new' for GPT-2).")
        if self.act_fn is not None and self.act_fn not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; choose one of {SUPPORTED_ACTIVATIONS}.")
        if self.normalization_type not in SUPPORTED_NORMALIZATION:
            raise ValueError(
                f"normalization_type={self.normalization_type!r} is not supported by hooklens (GPT-2 family); "
                f"choose one of {SUPPORTED_NORMALIZATION}."
            )
        if self.positional_embedding_type != "standard":
            raise NotImplementedError(
                f"positional_embedding_type={self.positional_embedding_type!r} is not supported: hooklens implements "
                "GPT-2-style models with learned absolute positions ('standard') only."
            )
        if self.attention_dir != "causal":
            raise NotImplementedError("Only causal attention (attention_dir='causal') is supported.")
        if self.n_devices != 1:
            raise NotImplementedError("n_devices > 1 is not supported; move the model with .to(device) instead.")
        if self.initializer_range < 0:
            self.initializer_range = 0.8 / math.sqrt(self.d_model) if self.init_mode == "gpt2" else 1.0
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = math.sqrt(self.d_head)
        if not self.use_attn_scale:
            self.attn_scale = 1.0
        check_config_values(self)  # again, now that n_heads, d_mlp and attn_scale are derived
        if self.default_prepend_bos not in (True, False):
            raise ValueError(f"default_prepend_bos must be True or False, got {self.default_prepend_bos!r}")
        if self.device is None:
            self.device = default_device()
        if isinstance(self.dtype, str):  # "float32" or "torch.float32", as configs saved to JSON spell it
            self.dtype = getattr(torch, self.dtype.removeprefix("torch."), self.dtype)
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype={self.dtype!r} is not a torch dtype: pass e.g. torch.float32 or 'float32'.")
        self.n_params = self.n_layers * (self.d_model * self.d_head * self.n_heads * 4)
        if not self.attn_only:
            self.n_params += self.n_layers * self.d_model * self.d_mlp * 2
        if self.seed is not None:
            torch.manual_seed(self.seed)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "HookedTransformerConfig":
        """Build from a dict of TL field names; fields of other architectures raise unless they are unset."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, extra = {}, {}
        for key, value in config.items():
            if key in known:
                kwargs[key] = value
            elif key in _UNSUPPORTED_FIELDS:
                _check_unsupported(key, value)
            else:
                extra[key] = value
        kwargs.setdefault("extra", {}).update(extra)
        return cls(**kwargs)

    @classmethod
    def unwrap(cls, config: "HookedTransformerConfig | Dict[str, Any]") -> "HookedTransformerConfig":
        return cls.from_dict(config) if isinstance(config, dict) else config

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}

    def __getattr__(self, name: str) -> Any:
        # Called only for names that are not real fields: TL's fields of other architectures read as "not used".
        if name in _UNSUPPORTED_FIELDS:
            return _UNSUPPORTED_FIELDS[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _UNSUPPORTED_FIELDS:
            _check_unsupported(name, value)
            return
        super().__setattr__(name, value)

    def is_layer_norm_activation(self) -> bool:
        return self.act_fn == "solu_ln"


# Hugging Face GPT2Config's size fields -> the HookedTransformerConfig field each becomes (for the hints).
_HF_SIZE_FIELDS = {"n_layer": "n_layers", "n_embd": "d_model", "n_head": "n_heads", "n_positions": "n_ctx",
                   "vocab_size": "d_vocab", "n_inner": "d_mlp"}


def _check_hf_sizes(hf_config: Any) -> None:
    """Errors in the Hugging Face field names (those of config.json) for GPT-2 configs that cannot form a model."""
    for hf_name, name in _HF_SIZE_FIELDS.items():
        value = getattr(hf_config, hf_name, None)
        if hf_name == "n_inner" and value is None:
            continue  # None means 4 * n_embd
        _check_size(name, value, 0 if hf_name == "n_layer" else 1, f"GPT-2 config {hf_name}", derivable=False)
    if hf_config.n_embd % hf_config.n_head != 0:
        raise InvalidInputError(
            f"GPT-2 config n_head={hf_config.n_head} does not divide n_embd={hf_config.n_embd}: every head is n_embd / "
            f"n_head wide. Set n_head to a divisor of n_embd (GPT-2 small: n_embd=768, n_head=12)."
        )
    _check_positive_real("GPT-2 config layer_norm_epsilon", getattr(hf_config, "layer_norm_epsilon", None),
                         "set layer_norm_epsilon to e.g. 1e-5, GPT-2's value")


def config_from_hf(
    hf_config: Any, dtype: torch.dtype = torch.float32, model_name: str = "custom"
) -> HookedTransformerConfig:
    """Translate a Hugging Face `GPT2Config` into a HookedTransformerConfig (as TL's GPT-2 conversion does)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "gpt2":
        raise NotImplementedError(f"hooklens loads GPT-2-architecture checkpoints only (config.json model_type "
                                  f"'gpt2'), got {model_type!r}.")
    act = hf_config.activation_function
    if act not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(
            f"activation_function={act!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}."
        )
    _check_hf_sizes(hf_config)
    d_model = hf_config.n_embd
    n_heads = hf_config.n_head
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or getattr(
        hf_config, "reorder_and_upcast_attn", False
    ):
        raise NotImplementedError(
            "GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported."
        )
    return HookedTransformerConfig(
        n_layers=hf_config.n_layer,
        d_model=d_model,
        n_ctx=hf_config.n_positions,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        d_mlp=hf_config.n_inner if getattr(hf_config, "n_inner", None) else 4 * d_model,
        d_vocab=hf_config.vocab_size,
        act_fn=act,
        eps=hf_config.layer_norm_epsilon,
        use_attn_scale=getattr(hf_config, "scale_attn_weights", True),
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
        model_name=model_name,
        tokenizer_name=model_name,
        dtype=dtype,
        tie_word_embeddings=getattr(hf_config, "tie_word_embeddings", True),
    )
