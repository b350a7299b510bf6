"""HookedTransformer: a hooked GPT-2 with TransformerLens 3.9's API, names, shapes and numerics.

The forward pass reads top to bottom: tokens -> `embed` + `pos_embed` -> `blocks` -> `ln_final` -> `unembed`.
Every activation passes a HookPoint; `components.py` holds the modules and `attention.py` the one place where
the attention op is chosen per call.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from hooklens import tokenizer as tok
from hooklens.components import Embed, PosEmbed, TransformerBlock, Unembed, make_norm
from hooklens.config import HookedTransformerConfig
from hooklens.hook_points import HookedRootModule, HookPoint
from hooklens.kv_cache import HookedTransformerKeyValueCache

logger = logging.getLogger(__name__)

_DEFAULT = object()  # "use the model's default" for prepend_bos / padding_side


def _fan_in_and_fan_out(param: Tensor) -> Tuple[int, int]:
    """TL's convention: [d_in, d_out] matrices, [h, d_model, d_head] attention weights."""
    if param.dim() == 1:
        return 1, param.shape[0]
    if param.dim() == 2:
        return param.shape[0], param.shape[1]
    return param.shape[1], param.shape[0] * param.shape[2]


class Output(NamedTuple):
    logits: Tensor
    loss: Tensor


class HookedTransformer(HookedRootModule):
    """A GPT-2-style transformer with a HookPoint on every activation TransformerLens hooks."""

    def __init__(
        self,
        cfg: Union[HookedTransformerConfig, Dict[str, Any]],
        tokenizer: Any = None,
        move_to_device: bool = True,
        default_padding_side: Literal["left", "right"] = "right",
    ):
        super().__init__()
        self.cfg = HookedTransformerConfig.unwrap(cfg)
        cfg = self.cfg
        if cfg.d_vocab == -1 and tokenizer is None and cfg.tokenizer_name is None:
            raise ValueError("d_vocab must be set when the model has no tokenizer.")
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer, default_padding_side=default_padding_side)
        elif cfg.tokenizer_name is not None:
            self.set_tokenizer(tok.load_tokenizer(cfg.tokenizer_name), default_padding_side=default_padding_side)

        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [b, p, d]
        self.pos_embed = PosEmbed(cfg)
        self.hook_pos_embed = HookPoint()  # [b, p, d]
        if cfg.use_hook_tokens:
            self.hook_tokens = HookPoint()  # [b, p]
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        if cfg.normalization_type is not None:
            self.ln_final = make_norm(cfg)
        self.unembed = Unembed(cfg)
        if cfg.init_weights:
            self.init_weights()
        if move_to_device:
            self.to(cfg.device)
        self.setup()

    def init_weights(self) -> None:
        """Initialize every `W_*` matrix as TL does for `cfg.init_mode` (biases 0, LayerNorm w 1).

        With `cfg.seed` set, the global RNG is seeded first (as TL does), so the weights equal TL's."""
        if self.cfg.seed is not None:
            torch.manual_seed(self.cfg.seed)
        mode, gain = self.cfg.init_mode, self.cfg.initializer_range
        for name, stored in self.named_parameters():
            if "W_" not in name:
                continue
            # Drawn into a contiguous tensor, then copied: random fills follow memory order, and W_Q/W_K/W_V
            # are stored head-major (components._head_major); TL's draws are in logical order.
            param = torch.empty(stored.shape, dtype=stored.dtype, device=stored.device)
            fan_in, fan_out = _fan_in_and_fan_out(param)
            if mode == "gpt2":
                nn.init.normal_(param, std=gain)
            elif mode == "xavier_uniform":
                bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
                nn.init.uniform_(param, -bound, bound)
            elif mode == "xavier_normal":
                nn.init.normal_(param, std=gain * math.sqrt(2.0 / (fan_in + fan_out)))
            elif mode in ("kaiming_uniform", "kaiming_normal"):
                std = gain * nn.init.calculate_gain("relu") / math.sqrt(fan_in)
                if mode == "kaiming_uniform":
                    nn.init.uniform_(param, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
                else:
                    nn.init.normal_(param, std=std)
            elif mode == "muP":
                # TL checks "embed" before "unembed", so W_U gets scale 1 too; kept so seeded inits agree.
                scale = 1.0 if "embed" in name else fan_in**-0.5
                nn.init.normal_(param, std=scale)
            else:
                raise ValueError(f"Unknown init_mode {mode!r}; use gpt2, xavier_uniform, xavier_normal, "
                                 "kaiming_uniform, kaiming_normal or muP.")
            with torch.no_grad():
                stored.copy_(param)

    def to(self, *args: Any, print_details: bool = False, **kwargs: Any) -> "HookedTransformer":
        """`nn.Module.to` that keeps `cfg.device` and `cfg.dtype` in sync (LayerNorm casts to `cfg.dtype`).

        Also takes TL's form `to(device_or_dtype, print_details)`; hooklens is quiet unless `print_details=True`."""
        if "device_or_dtype" in kwargs:
            args = (kwargs.pop("device_or_dtype"),) + args
        if len(args) == 2 and isinstance(args[1], bool):  # TL's positional print_details
            args, print_details = args[:1], args[1]
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if print_details:
            print("Moving model to device: ", device if device is not None else dtype)
        if device is not None:
            self.cfg.device = str(device)
        if dtype is not None:
            self.cfg.dtype = dtype
        return super().to(*args, **kwargs)

    def cuda(self, device: Any = None) -> "HookedTransformer":
        return self.to(f"cuda:{device}" if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> "HookedTransformer":
        return self.to("cpu")

    def float(self) -> "HookedTransformer":
        return self.to(torch.float32)

    def double(self) -> "HookedTransformer":
        return self.to(torch.float64)

    def half(self) -> "HookedTransformer":
        return self.to(torch.float16)

    def bfloat16(self) -> "HookedTransformer":
        return self.to(torch.bfloat16)

    # -- tokenizer ----------------------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Any, default_padding_side: Optional[str] = None) -> None:
        """Use a Hugging Face tokenizer; missing EOS/PAD/BOS default to GPT-2's `<|endoftext|>`."""
        tok.prepare_tokenizer(tokenizer, default_padding_side)
        self.tokenizer = tokenizer
        self.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
        if self.cfg.d_vocab == -1:
            self.cfg.d_vocab = max(tokenizer.get_vocab().values()) + 1
        if self.cfg.d_vocab_out == -1:
            self.cfg.d_vocab_out = self.cfg.d_vocab

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, but this model has none. Pass token ids instead, or call "
                "model.set_tokenizer(tokenizer)."
            )
        return self.tokenizer

    def _prepend_bos(self, prepend_bos: Any) -> bool:
        return self.cfg.default_prepend_bos if prepend_bos is _DEFAULT or prepend_bos is None else bool(prepend_bos)

    def _padding_side(self, padding_side: Any) -> str:
        if padding_side is _DEFAULT or padding_side is None:
            return self.tokenizer.padding_side if self.tokenizer is not None else "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return padding_side

    def to_tokens(
        self,
        input: Union[str, List[str]],
        prepend_bos: Any = _DEFAULT,
        padding_side: Any = _DEFAULT,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Tensor:
        """Strings -> `[batch, pos]` token ids (lists are padded with the pad token on `padding_side`)."""
        tokenizer = self._require_tokenizer("to_tokens")
        tokens = tok.encode_batch(
            tokenizer,
            [input] if isinstance(input, str) else list(input),
            prepend_bos=self._prepend_bos(prepend_bos),
            tokenizer_prepends_bos=bool(self.cfg.tokenizer_prepends_bos),
            padding_side=self._padding_side(padding_side),
            max_length=self.cfg.n_ctx if truncate else None,
        )
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def to_string(self, tokens: Union[List[int], Tensor, np.ndarray]) -> Union[str, List[str]]:
        tokenizer = self._require_tokenizer("to_string")
        tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens)
        if tokens.dim() == 2:
            return tokenizer.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
        if tokens.dim() <= 1:
            return tokenizer.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
        raise ValueError(f"to_string takes tokens of shape [pos] or [batch, pos], got {tuple(tokens.shape)}")

    def to_str_tokens(self, input: Any, prepend_bos: Any = _DEFAULT, padding_side: Any = _DEFAULT) -> Union[List[str], List[List[str]]]:
        """Text, tokens, or a list of either -> the tokens as strings."""
        tokenizer = self._require_tokenizer("to_str_tokens")
        if isinstance(input, list) and not (input and isinstance(input[0], (int, np.integer))):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            tokens = torch.as_tensor(np.asarray(input) if not isinstance(input, Tensor) else input).squeeze()
            if tokens.dim() == 0:
                tokens = tokens.unsqueeze(0)
            if tokens.dim() != 1:
                raise ValueError(f"to_str_tokens takes tokens of shape [pos] or [1, pos], got {tuple(tokens.shape)}")
        return tokenizer.batch_decode([[t] for t in tokens.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token; raises if it is not."""
        tokens = self.to_tokens(string, prepend_bos=False).squeeze(0)
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is not a single token: it tokenizes to {self.to_str_tokens(tokens)}.")
        return int(tokens[0])

    def to_single_str_token(self, int_token: int) -> str:
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(
        self, single_token: Union[str, int], input: Union[str, Tensor], mode: str = "first",
        prepend_bos: Any = _DEFAULT, padding_side: Any = _DEFAULT,
    ) -> int:
        """Position of `single_token` in `input` (a string or `[pos]` / `[1, pos]` tokens)."""
        tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) if isinstance(input, str) else input
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"Rank-2 tokens must have shape [1, pos], got {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token)
        indices = torch.nonzero(tokens == single_token).flatten()
        if len(indices) == 0:
            raise ValueError(f"Token {single_token} does not occur in the prompt.")
        if mode == "first":
            return int(indices[0])
        if mode == "last":
            return int(indices[-1])
        raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")

    def tokens_to_residual_directions(self, tokens: Union[str, int, Tensor]) -> Tensor:
        """Unembedding direction(s) of token(s): `[d_model]`, or `[..., d_model]` for a tensor of tokens."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)  # [d, ...] -> [..., d]
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, (int, np.integer)):
            token = int(tokens)
        elif isinstance(tokens, Tensor):
            token = int(tokens)
        else:
            raise ValueError(f"Invalid token type: {type(tokens).__name__}")
        return self.W_U[:, token]

    # -- forward ------------------------------------------------------------------------------------------------
    def _check_tokens(self, tokens: Tensor, pos_offset: int) -> None:
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"Token ids must be an integer tensor, got dtype {tokens.dtype}.")
        if tokens.dim() != 2 or tokens.shape[-1] == 0:
            raise ValueError(
                f"Tokens must be [batch, pos] (or [pos]) with at least one position, got shape {tuple(tokens.shape)}"
                + ("; an empty string needs prepend_bos=True to give a token." if tokens.dim() == 2 else ".")
            )
        if tokens.shape[-1] + pos_offset > self.cfg.n_ctx:
            raise ValueError(
                f"Sequence length {tokens.shape[-1] + pos_offset} exceeds the model's context n_ctx={self.cfg.n_ctx}; "
                "truncate the input (to_tokens(..., truncate=True) does) or split it into windows."
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise ValueError(
                f"Token ids must lie in [0, {self.cfg.d_vocab}) for this model, got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]; check the tokenizer matches the model."
            )

    def padding_attention_mask(
        self, tokens: Tensor, prepend_bos: Any = _DEFAULT, padding_side: Any = _DEFAULT, required: bool = False
    ) -> Optional[Tensor]:
        """The `[b, p]` mask of real (non-padding) tokens that forward derives for token input: None for right
        padding (trailing pads cannot affect earlier positions) unless `required`."""
        side = self._padding_side(padding_side)
        if side != "left" and not required:
            return None
        from hooklens.utils import get_attention_mask

        if self.tokenizer is None:
            raise ValueError("Cannot compute a padding mask without a tokenizer; pass attention_mask.")
        return get_attention_mask(self.tokenizer, tokens, self._prepend_bos(prepend_bos), padding_side=side)

    def input_to_embed(
        self, input: Union[str, List[str], Tensor], prepend_bos: Any = _DEFAULT, padding_side: Any = _DEFAULT,
        attention_mask: Optional[Tensor] = None, past_kv_cache: Optional[HookedTransformerKeyValueCache] = None,
    ) -> Tuple[Tensor, Tensor, None, Optional[Tensor]]:
        """Input -> (residual [b, p, d], tokens [b, p], None (TL's shortformer slot), attention_mask [b, p] or None)."""
        if isinstance(input, (str, list)):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = input
        if tokens.dim() == 1:
            tokens = tokens[None]  # [p] -> [1, p]
        tokens = tokens.to(self.embed.W_E.device)
        pos_offset = past_kv_cache.past_length if past_kv_cache is not None else 0
        self._check_tokens(tokens, pos_offset)
        if attention_mask is not None or past_kv_cache is not None or self._padding_side(padding_side) == "left":
            if attention_mask is None:
                attention_mask = self.padding_attention_mask(tokens, prepend_bos, padding_side, required=True)
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have shape {tuple(tokens.shape)}."
                )
            attention_mask = attention_mask.to(tokens.device)
            if past_kv_cache is not None:
                attention_mask = past_kv_cache.append_attention_mask(attention_mask)  # [b, past + p]
        if self.cfg.use_hook_tokens:
            tokens = self.hook_tokens(tokens)
        embed = self.hook_embed(self.embed(tokens))  # [b, p, d]
        pos_embed = self.hook_pos_embed(self.pos_embed(tokens, pos_offset, attention_mask))  # [b, p, d]
        return embed + pos_embed, tokens, None, attention_mask

    def forward(
        self,
        input: Union[str, List[str], Tensor],
        return_type: Optional[str] = "logits",
        loss_per_token: bool = False,
        prepend_bos: Any = _DEFAULT,
        padding_side: Any = _DEFAULT,
        start_at_layer: Optional[int] = None,
        tokens: Optional[Tensor] = None,
        shortformer_pos_embed: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        stop_at_layer: Optional[int] = None,
        past_kv_cache: Optional[HookedTransformerKeyValueCache] = None,
    ) -> Any:
        """Run the model. `return_type`: "logits" [b, p, v], "loss", "both" (Output(logits, loss)) or None.

        `stop_at_layer=k` returns the residual stream entering block k; `start_at_layer=k` takes that residual
        (`[b, p, d]`) as `input`. Strings are tokenized (BOS prepended unless `prepend_bos=False`).
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if shortformer_pos_embed is not None:
            raise NotImplementedError("shortformer positional embeddings are not supported (GPT-2 family only).")
        if start_at_layer is None:
            residual, tokens, _, attention_mask = self.input_to_embed(
                input, prepend_bos, padding_side, attention_mask, past_kv_cache
            )
        else:
            if not isinstance(input, Tensor) or input.dim() != 3:
                raise ValueError("With start_at_layer, input must be the residual stream [batch, pos, d_model].")
            residual = input
        for index in range(self.cfg.n_layers)[start_at_layer:stop_at_layer]:
            entry = past_kv_cache[index] if past_kv_cache is not None else None
            residual = self.blocks[index](residual, entry, attention_mask)  # [b, p, d]
        if stop_at_layer is not None:
            return residual
        if return_type is None:
            if self.cfg.normalization_type is not None:
                self.ln_final(residual)  # its hooks fire as in TL
            return None
        logits = self.logits_from_resid(residual)  # [b, p, v]
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("return_type 'loss'/'both' with start_at_layer needs tokens=... for the targets.")
        loss = self.loss_fn(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def logits_from_resid(self, resid: Tensor) -> Tensor:
        """The final step of the forward: `ln_final` (when the model has one), then `unembed`. `[..., p, d]` ->
        `[..., p, v]`; the one place the residual stream becomes logits (sweeps and attribution call it too)."""
        if self.cfg.normalization_type is not None:
            resid = self.ln_final(resid)
        return self.unembed(resid)

    def loss_fn(self, logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None, per_token: bool = False) -> Tensor:
        """Next-token cross-entropy (mean, or `[b, p-1]` with `per_token=True`); padding is ignored."""
        from hooklens.utils import lm_cross_entropy_loss

        return lm_cross_entropy_loss(logits, tokens.to(logits.device), attention_mask, per_token)

    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any):
        """Run and return `(output, ActivationCache)` (or a plain dict with `return_cache_object=False`)."""
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        from hooklens.cache import ActivationCache

        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def check_hooks_to_add(self, hook_point: HookPoint, hook_point_name: str, hook: Any, dir: str = "fwd",
                           is_permanent: bool = False, prepend: bool = False) -> None:
        flags = (
            ("attn.hook_result", "use_attn_result", "set_use_attn_result"),
            ("hook_q_input", "use_split_qkv_input", "set_use_split_qkv_input"),
            ("hook_k_input", "use_split_qkv_input", "set_use_split_qkv_input"),
            ("hook_v_input", "use_split_qkv_input", "set_use_split_qkv_input"),
            ("hook_mlp_in", "use_hook_mlp_in", "set_use_hook_mlp_in"),
            ("hook_attn_in", "use_attn_in", "set_use_attn_in"),
        )
        for suffix, flag, setter in flags:
            if hook_point_name.endswith(suffix) and not getattr(self.cfg, flag):
                raise ValueError(f"Cannot add a hook on {hook_point_name!r} while cfg.{flag} is False; call "
                                 f"model.{setter}(True) first.")

    # -- hook-point switches ------------------------------------------------------------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head outputs `attn.hook_result` [b, p, h, d] (costs memory)."""
        self.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own q/k/v input hooks `hook_q_input` etc. [b, p, h, d]."""
        self.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        if self.cfg.attn_only:
            raise ValueError("An attention-only model has no MLP input to hook.")
        self.cfg.use_hook_mlp_in = use_hook_mlp_in

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        self.cfg.use_attn_in = use_attn_in

    def set_use_hook_tokens(self, use_hook_tokens: bool) -> None:
        """Add (or remove) the `hook_tokens` hook point [b, p] on the input token ids."""
        self.cfg.use_hook_tokens = use_hook_tokens
        if use_hook_tokens and not hasattr(self, "hook_tokens"):
            self.hook_tokens = HookPoint()
        elif not use_hook_tokens and hasattr(self, "hook_tokens"):
            del self.hook_tokens
        self.setup()

    # -- weights, stacked like TL -------------------------------------------------------------------------------
    def _stack(self, getter) -> Tensor:
        return torch.stack([getter(block) for block in self.blocks], dim=0)

    @property
    def W_U(self) -> Tensor:  # [d, v]
        return self.unembed.W_U

    @property
    def b_U(self) -> Tensor:  # [v]
        return self.unembed.b_U

    @property
    def W_E(self) -> Tensor:  # [v, d]
        return self.embed.W_E

    @property
    def W_pos(self) -> Tensor:  # [n_ctx, d]
        return self.pos_embed.W_pos

    @property
    def W_E_pos(self) -> Tensor:  # [v + n_ctx, d]
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_K(self) -> Tensor:  # [l, h, d, dh]
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_Q(self) -> Tensor:  # [l, h, d, dh]
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_V(self) -> Tensor:  # [l, h, d, dh]
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Tensor:  # [l, h, dh, d]
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_K(self) -> Tensor:  # [l, h, dh]
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_Q(self) -> Tensor:  # [l, h, dh]
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def b_V(self) -> Tensor:  # [l, h, dh]
        return self._stack(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> Tensor:  # [l, d]
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Tensor:  # [l, d, m]
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_out(self) -> Tensor:  # [l, m, d]
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Tensor:  # [l, m]
        return self._stack(lambda b: b.mlp.b_in)

    @property
    def b_out(self) -> Tensor:  # [l, d]
        return self._stack(lambda b: b.mlp.b_out)



    @property
    def QK(self):
        """`FactoredMatrix` W_Q @ W_K^T per head: `[n_layers, n_heads, d_model, d_model]`, hidden d_head."""
        from hooklens.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """`FactoredMatrix` W_V @ W_O per head: `[n_layers, n_heads, d_model, d_model]`, hidden d_head."""
        from hooklens.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def all_composition_scores(self, mode: str) -> Tensor:
        """Q-, K- or V-composition scores of every head pair `[l1, h1, l2, h2]`, zero unless l1 < l2."""
        from hooklens.utils import composition_scores

        left = self.OV
        rights = {"Q": lambda: self.QK, "K": lambda: self.QK.T, "V": lambda: self.OV}
        if mode not in rights:
            raise ValueError(f"mode must be one of ['Q', 'K', 'V'] not {mode!r}")
        scores = composition_scores(left, rights[mode](), broadcast_dims=True)
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        mask = layers[:, None, None, None] < layers[None, None, :, None]
        return torch.where(mask, scores, torch.zeros_like(scores))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the biases written to the residual stream before `layer` (plus its attention with mlp_input)."""
        bias = torch.zeros(self.cfg.d_model, device=self.W_E.device, dtype=self.W_E.dtype)
        for index, block in enumerate(self.blocks[:layer]):
            bias = bias + block.attn.b_O
            if include_mlp_biases and not self.cfg.attn_only:
                bias = bias + block.mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError("mlp_input=True needs layer < n_layers.")
            bias = bias + self.blocks[layer].attn.b_O
        return bias

    def all_head_labels(self) -> List[str]:
        return [f"L{layer}H{head}" for layer in range(self.cfg.n_layers) for head in range(self.cfg.n_heads)]

    @property
    def n_params_total(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        refactor_factored_attn_matrices: bool = False,
        checkpoint_index: Optional[int] = None,
        checkpoint_value: Optional[int] = None,
        checkpoint_label: Optional[int] = None,
        hf_model: Any = None,
        device: Optional[Union[str, torch.device]] = None,
        n_devices: int = 1,
        tokenizer: Any = None,
        move_to_device: bool = True,
        fold_value_biases: bool = True,
        default_prepend_bos: Optional[bool] = None,
        default_padding_side: Optional[Literal["left", "right"]] = None,
        dtype: Union[torch.dtype, str] = torch.float32,
        first_n_layers: Optional[int] = None,
        n_ctx: Optional[int] = None,
        **config_overrides: Any,
    ) -> "HookedTransformer":
        """Load GPT-2 weights from an HF-format directory, a GPT-2 name in the local HF cache, or `hf_model`.

        Weights are processed as TL does by default (fold LayerNorm, centre writing weights and unembedding, fold
        value biases); `from_pretrained_no_processing` keeps HF's raw weights. TL's signature, positional order
        included: `first_n_layers` keeps only the first blocks, `n_ctx` shortens the context (and `W_pos`),
        `move_to_device=False` leaves the weights on the CPU. GPT-2 has no training checkpoints and hooklens runs on
        one device, so `checkpoint_*` and `n_devices > 1` are refused with an error.
        """
        from hooklens import loading

        if checkpoint_index is not None or checkpoint_value is not None or checkpoint_label is not None:
            raise ValueError("checkpoint_index / checkpoint_value / checkpoint_label select training checkpoints, "
                             "which GPT-2 checkpoints do not have; pass a directory of the checkpoint you want.")
        if n_devices != 1:
            raise ValueError(f"n_devices={n_devices}: hooklens runs a model on one device; pass device=... instead.")
        return loading.load_pretrained(
            cls, model_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, fold_ln=fold_ln,
            center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            default_prepend_bos=True if default_prepend_bos is None else default_prepend_bos,
            default_padding_side=default_padding_side or "right", move_to_device=move_to_device,
            first_n_layers=first_n_layers, n_ctx=n_ctx, **config_overrides,
        )

    @classmethod
    def from_pretrained_no_processing(cls, model_name: str, **kwargs: Any) -> "HookedTransformer":
        """`from_pretrained` without any weight processing: activations equal Hugging Face's."""
        for flag in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
            kwargs.setdefault(flag, False)
        return cls.from_pretrained(model_name, **kwargs)

    def load_and_process_state_dict(
        self, state_dict: Dict[str, Tensor], fold_ln: bool = True, center_writing_weights: bool = True,
        center_unembed: bool = True, fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """Load a TL-format state dict and process it (see `hooklens.loading.process_weights`)."""
        from hooklens import loading

        loading.load_and_process_state_dict(
            self, state_dict, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
            center_unembed=center_unembed, fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )

    def process_weights_(
        self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
        fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """Process this model's own weights in place (a no-op for steps already applied, e.g. fold_ln twice)."""
        self.load_and_process_state_dict(
            {k: v.detach().clone() for k, v in self.state_dict().items()}, fold_ln=fold_ln,
            center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )

    # The individual processing steps, on TL-format state dicts (each returns the processed dict).
    def fold_layer_norm(self, state_dict: Dict[str, Tensor], fold_biases: bool = True, center_weights: bool = True) -> Dict[str, Tensor]:
        from hooklens import loading

        return loading.fold_layer_norm(dict(state_dict), self.cfg, fold_biases, center_weights)

    def center_writing_weights(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        from hooklens import loading

        return loading.center_writing_weights(dict(state_dict), self.cfg)

    def center_unembed(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        from hooklens import loading

        return loading.center_unembed(dict(state_dict))

    def fold_value_biases(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        from hooklens import loading

        return loading.fold_value_biases(dict(state_dict), self.cfg)

    def refactor_factored_attn_matrices(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        from hooklens import loading

        return loading.refactor_factored_attn_matrices(dict(state_dict), self.cfg)

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input: Union[str, List[str], Tensor] = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        do_sample: bool = True,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: Any = _DEFAULT,
        padding_side: Any = _DEFAULT,
        return_type: Optional[str] = "input",
        verbose: bool = True,
    ) -> Union[str, List[str], Tensor]:
        """Sample (or greedily decode with `do_sample=False`) up to `max_new_tokens` tokens, with a KV cache."""
        from hooklens.generation import generate

        return generate(
            self, input, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
            do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature, freq_penalty=freq_penalty,
            use_past_kv_cache=use_past_kv_cache, prepend_bos=prepend_bos, padding_side=padding_side,
            return_type=return_type, verbose=verbose,
        )
