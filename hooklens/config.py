"""Model configuration: TransformerLens 3.9 field names and defaults for GPT-2-style models.

`HookedTransformerConfig` keeps TL's names so existing code (`model.cfg.n_layers`, `cfg.d_head`, ...) reads the
same. Only fields that make sense for a GPT-2-family model exist; asking for a feature outside that family
(rotary embeddings, grouped-query attention, MoE, ...) raises instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


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
        if self.n_heads == -1:
            if self.d_model % self.d_head != 0:
                raise ValueError(f"d_model={self.d_model} is not a multiple of d_head={self.d_head}; set n_heads.")
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
        if self.default_prepend_bos not in (True, False):
            raise ValueError(f"default_prepend_bos must be True or False, got {self.default_prepend_bos!r}")
        if self.device is None:
            self.device = default_device()
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)
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
