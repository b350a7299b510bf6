"""HookedTransformer: a hooked GPT-2 with TransformerLens 3.9's API, names, shapes and numerics.

The forward pass reads top to bottom: tokens -> `embed` + `pos_embed` -> `blocks` -> `ln_final` -> `unembed`.
Every activation passes a HookPoint; `components.py` holds the modules. The TL surface around the core lives in
mixins: `model_tokens.py` (text <-> tokens), `model_weights.py` (init, stacked weights, circuits) and
`model_loading.py` (`from_pretrained`, weight processing); `generation.py` holds `generate`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from hooklens import generation, loading
from hooklens import tokenizer as tok
from hooklens.cache import ActivationCache
from hooklens.components import Embed, PosEmbed, TransformerBlock, Unembed, make_norm
from hooklens.config import HookedTransformerConfig
from hooklens.errors import InvalidInputError
from hooklens.hook_points import HookedRootModule, HookPoint
from hooklens.kv_cache import HookedTransformerKeyValueCache
from hooklens.model_loading import LoadingMixin
from hooklens.model_tokens import TokensMixin
from hooklens.model_weights import WeightsMixin
from hooklens.utils import lm_cross_entropy_loss

logger = logging.getLogger(__name__)


class Output(NamedTuple):
    logits: Tensor
    loss: Tensor


class HookedTransformer(TokensMixin, WeightsMixin, LoadingMixin, HookedRootModule):
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

    # -- device and dtype ---------------------------------------------------------------------------------------
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

    # -- input checks: dtype and shape checks, then one reduction over the caller's tokens and mask ------------
    def _token_ids(self, tokens: Any) -> Tensor:
        """Tokens `[b, p]` (or `[p]`) as ids the embedding can index with, on the model's device; refuses what
        cannot be token ids (non-integer dtypes, a dtype too narrow for the vocabulary, wrong rank, empty)."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"Input must be a string, a list of strings or a tensor of token ids, got "
                            f"{type(tokens).__name__}; wrap ids with torch.tensor(ids).")
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            residual = "; a residual stream [batch, pos, d_model] goes in with start_at_layer=0" \
                if tokens.dim() == 3 and tokens.is_floating_point() else ""
            raise TypeError(f"Token ids must be an integer tensor, got dtype {tokens.dtype}: pass ids as torch.long "
                            f"(e.g. tokens.long()){residual}.")
        if tokens.dtype not in (torch.int64, torch.int32):
            # Indexing refuses int8/int16 and reads uint8 as a boolean mask, so narrower ids are widened. Only when
            # the dtype holds every id of the vocabulary, though: otherwise an id may have wrapped round to a
            # valid-looking one before it got here (a signed dtype that holds d_vocab ids turns any overflow
            # negative, which the range check refuses).
            if self.cfg.d_vocab > 2 ** torch.iinfo(tokens.dtype).bits:
                raise TypeError(f"Token ids of dtype {tokens.dtype} cannot hold every id of this model's vocabulary "
                                f"(d_vocab={self.cfg.d_vocab}), so some may have wrapped round already; build the "
                                "tokens as torch.long from the original ids (to_tokens returns torch.long).")
            tokens = tokens.long()
        if tokens.dim() == 1:
            tokens = tokens[None]  # [p] -> [1, p]
        if tokens.dim() != 2 or tokens.shape[-1] == 0:
            raise InvalidInputError(
                f"Tokens must be [batch, pos] (or [pos]) with at least one position, got shape {tuple(tokens.shape)}"
                + ("; an empty string needs prepend_bos=True to give a token." if tokens.dim() == 2 else
                   "; run one [batch, pos] tensor per call (e.g. tokens.flatten(0, -2) merges the leading dims).")
            )
        if tokens.shape[0] == 0:
            raise InvalidInputError(f"Tokens have an empty batch (shape {tuple(tokens.shape)}): pass at least one "
                                    "prompt.")
        return tokens.to(self.embed.W_E.device)

    def _check_context(self, tokens: Tensor, past_kv_cache: Optional[HookedTransformerKeyValueCache]) -> int:
        """The number of cached positions before `tokens`; refuses a batch the cache was not built for and a
        sequence longer than the model's context (W_pos has n_ctx rows)."""
        pos_offset = past_kv_cache.past_length if past_kv_cache is not None else 0
        if past_kv_cache is not None and past_kv_cache.previous_attention_mask.shape[0] != tokens.shape[0]:
            raise InvalidInputError(
                f"past_kv_cache holds {past_kv_cache.previous_attention_mask.shape[0]} prompts but the tokens have "
                f"batch size {tokens.shape[0]}; build the cache with HookedTransformerKeyValueCache.init_cache(cfg, "
                "device, batch_size) for this batch.")
        if tokens.shape[-1] + pos_offset > self.cfg.n_ctx:
            raise InvalidInputError(
                f"Sequence length {tokens.shape[-1] + pos_offset} exceeds the model's context n_ctx={self.cfg.n_ctx}"
                f"{f' ({pos_offset} of them in past_kv_cache)' if pos_offset else ''}; keep the first n_ctx tokens "
                f"(tokens[:, :{self.cfg.n_ctx}], or to_tokens(text, truncate=True)) or split the input into windows."
            )
        return pos_offset

    def _check_attention_mask(self, attention_mask: Tensor, tokens: Tensor, what: str = "tokens have") -> Tensor:
        """A padding mask of 0/1 (1 = real token) with the shape of `tokens` (only its shape and device are read),
        on their device. `what` names `tokens` in the error."""
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(
                f"attention_mask must be a 0/1 integer or bool tensor (1 = real token), got dtype "
                f"{attention_mask.dtype}; convert a 0./1. mask with mask.long() (an additive 0/-inf mask is not "
                "supported: pass (mask == 0).long())."
            )
        if attention_mask.shape != tokens.shape:
            raise InvalidInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but {what} shape "
                                    f"{tuple(tokens.shape)}; pass one 0/1 entry per token.")
        return attention_mask.to(tokens.device)

    def _check_values(
        self, tokens: Optional[Tensor], attention_mask: Optional[Tensor], past_mask: Optional[Tensor] = None,
        derived_mask: bool = False,
    ) -> None:
        """Refuse token ids outside the vocabulary, mask entries other than 0/1, and prompts that are all padding
        (counting `past_mask` `[b, past]`, the cached part: a chunk of padding after real tokens is fine).
        `derived_mask`: the mask came from the pad token, not from the caller."""
        # min/max reductions stacked into one tensor: a single host sync, and few small ops on the hot path
        reductions, names = [], []
        if tokens is not None:
            reductions += tokens.aminmax()
            names += ["token min", "token max"]
        if attention_mask is not None:
            mask = attention_mask.long() if attention_mask.dtype == torch.bool else attention_mask
            row_max = mask.amax(dim=1)  # [b]: 0 for a row of padding only (once the values are known to be 0/1)
            if past_mask is not None and past_mask.shape[1]:
                row_max = torch.maximum(row_max, past_mask.to(row_max.device).amax(dim=1).to(row_max.dtype))
            reductions += [*mask.aminmax(), row_max.amin()]
            names += ["mask min", "mask max", "rows min"]
        if not reductions:
            return
        found = dict(zip(names, torch.stack(reductions).tolist()))
        if tokens is not None and (found["token min"] < 0 or found["token max"] >= self.cfg.d_vocab):
            raise InvalidInputError(
                f"Token ids must lie in [0, {self.cfg.d_vocab}) for this model, got range "
                f"[{found['token min']}, {found['token max']}]; check the tokenizer matches the model."
            )
        if attention_mask is not None and (found["mask min"] < 0 or found["mask max"] > 1):
            values = sorted(set(attention_mask.unique().tolist()))
            raise InvalidInputError(
                f"attention_mask must hold only 0 (padding) and 1 (real token), got values {values[:8]}"
                f"{' ...' if len(values) > 8 else ''}; pass (mask != 0).long() if nonzero means a real token.")
        if attention_mask is not None and found["rows min"] < 1:
            empty = (row_max < 1).nonzero().flatten().tolist()
            source = (f" (no attention_mask was passed: the mask marks the pad token id "
                      f"{getattr(self.tokenizer, 'pad_token_id', None)} at the padded end as padding; pass "
                      "attention_mask=torch.ones_like(tokens) if those tokens are real)") if derived_mask else ""
            raise InvalidInputError(
                f"attention_mask rows {empty} have no real token (all 0): such a prompt is padding only, so its "
                "outputs are meaningless (its loss is NaN); drop those rows or give each prompt at least one token"
                f"{source}.")

    def _check_layers(self, start_at_layer: Optional[int], stop_at_layer: Optional[int]) -> None:
        """Refuse a layer bound outside the model: as in TL each is a slice bound over the blocks, so it may be
        negative, but one outside [-n_layers, n_layers] would run a silently clipped range of blocks."""
        n_layers = self.cfg.n_layers
        for name, value in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}.")
            if not -n_layers <= value <= n_layers:
                raise InvalidInputError(
                    f"{name}={value} is outside this model's {n_layers} layers: it is a slice bound over the blocks "
                    f"and must lie in [-{n_layers}, {n_layers}] (None = from the start / to the end).")

    # -- forward ------------------------------------------------------------------------------------------------
    def input_to_embed(
        self,
        input: Union[str, List[str], Tensor],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        attention_mask: Optional[Tensor] = None,
        past_kv_cache: Optional[HookedTransformerKeyValueCache] = None,
    ) -> Tuple[Tensor, Tensor, None, Optional[Tensor]]:
        """Input -> (residual [b, p, d], tokens [b, p], None (TL's shortformer slot), attention_mask [b, p] or
        None)."""
        if isinstance(input, (str, list)):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = input
        tokens = self._token_ids(tokens)
        pos_offset = self._check_context(tokens, past_kv_cache)
        derived_mask = attention_mask is None
        if attention_mask is not None or past_kv_cache is not None or self.resolve_padding_side(padding_side) == "left":
            if attention_mask is None:
                attention_mask = self.padding_attention_mask(tokens, prepend_bos, padding_side, required=True)
            attention_mask = self._check_attention_mask(attention_mask, tokens)
        # before the cache stores the mask: a refused input leaves the cache as it was
        past_mask = past_kv_cache.previous_attention_mask if past_kv_cache is not None else None
        self._check_values(tokens, attention_mask, past_mask, derived_mask)
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
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
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
        self._check_layers(start_at_layer, stop_at_layer)
        if start_at_layer is None:
            residual, tokens, _, attention_mask = self.input_to_embed(
                input, prepend_bos, padding_side, attention_mask, past_kv_cache
            )
        else:
            if not isinstance(input, Tensor) or input.dim() != 3 or input.shape[-1] != self.cfg.d_model:
                shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
                raise InvalidInputError(f"With start_at_layer, input must be the residual stream [batch, pos, "
                                        f"d_model={self.cfg.d_model}], got {shape}; tokens go in without "
                                        "start_at_layer.")
            residual = input
            if attention_mask is not None:  # the blocks read it as given: one entry per key, cached ones included
                keys = residual.shape[1] + (past_kv_cache.past_length if past_kv_cache is not None else 0)
                attention_mask = self._check_attention_mask(attention_mask, residual[:, :1, 0].expand(-1, keys),
                                                            "the residual's [batch, cached + new positions] have")
                self._check_values(None, attention_mask)
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

    def loss_fn(
        self, logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None, per_token: bool = False
    ) -> Tensor:
        """Next-token cross-entropy (mean, or `[b, p-1]` with `per_token=True`); padding is ignored."""
        return lm_cross_entropy_loss(logits, tokens.to(logits.device), attention_mask, per_token)

    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> Tuple[Any, Union[ActivationCache, Dict[str, Tensor]]]:
        """Run and return `(output, ActivationCache)` (or a plain dict with `return_cache_object=False`)."""
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def check_hooks_to_add(self, hook_point: HookPoint, hook_point_name: str, hook: Any, dir: str = "fwd",
                           is_permanent: bool = False, prepend: bool = False) -> None:
        """Refuse a hook on a hook point that a cfg flag switches off (it would never run); TL asserts the same."""
        flags = (  # (name suffix as TL tests it, cfg flag, the flag's name in TL's message, the setter)
            ("attn.hook_result", "use_attn_result", "use_attn_result_hook", "set_use_attn_result"),
            ("hook_q_input", "use_split_qkv_input", "use_split_qkv_input", "set_use_split_qkv_input"),
            ("hook_k_input", "use_split_qkv_input", "use_split_qkv_input", "set_use_split_qkv_input"),
            ("hook_v_input", "use_split_qkv_input", "use_split_qkv_input", "set_use_split_qkv_input"),
            ("mlp_in", "use_hook_mlp_in", "use_hook_mlp_in", "set_use_hook_mlp_in"),
            ("attn_in", "use_attn_in", "use_attn_in", "set_use_attn_in"),
        )
        for suffix, flag, tl_flag, setter in flags:
            if hook_point_name.endswith(suffix) and not getattr(self.cfg, flag):
                raise InvalidInputError(f"Cannot add hook {hook_point_name} if {tl_flag} is False: cfg.{flag} "
                                        f"switches this hook point off; call model.{setter}(True) first.")

    # -- hook-point switches ------------------------------------------------------------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head outputs `attn.hook_result` [b, p, h, d] (costs memory)."""
        self.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own q/k/v input hooks `hook_q_input` etc. [b, p, h, d]."""
        self.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        if self.cfg.attn_only:
            raise InvalidInputError("Can't use hook_mlp_in with attn_only model: an attention-only model has no MLP "
                                    "input to hook.")
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

    # -- loading a state dict into this model -------------------------------------------------------------------
    def load_and_process_state_dict(
        self, state_dict: Dict[str, Tensor], fold_ln: bool = True, center_writing_weights: bool = True,
        center_unembed: bool = True, fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """Process a TL-format state dict as TL does (see `hooklens.loading.process_state_dict`) and load it
        strictly; the caller's dict is left unchanged. Folding LayerNorm into an "LN" model makes it "LNPre"."""
        low_precision = any(v.is_floating_point() and v.dtype not in (torch.float32, torch.float64)
                            for v in state_dict.values())
        if low_precision and fold_ln:  # from_pretrained processes in float32 before casting, so it never warns
            logger.warning("Processing weights in reduced precision loses accuracy; consider "
                           "from_pretrained_no_processing.")
        processed, ln_folded = loading.process_state_dict(
            state_dict, self.cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
            center_unembed=center_unembed, fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        if ln_folded:
            self._replace_layer_norms_with_layer_norm_pre()
        loading.load_weights(self, processed)

    def _replace_layer_norms_with_layer_norm_pre(self) -> None:
        """Switch every LayerNorm of this model to LayerNormPre (`cfg.normalization_type = "LNPre"`).

        The one place modules are replaced after construction, kept for TL's API: `load_and_process_state_dict` on
        an existing "LN" model folds each LayerNorm's w and b into the weights that read its output, so the norms
        must drop theirs, as TL's method does. `from_pretrained` never needs this: it builds the model from a
        config that already says "LNPre"."""
        self.cfg.normalization_type = "LNPre"
        self.ln_final = make_norm(self.cfg)
        for block in self.blocks:
            block.ln1 = make_norm(self.cfg)
            if not self.cfg.attn_only:
                block.ln2 = make_norm(self.cfg)
                if self.cfg.act_fn == "solu_ln":
                    block.mlp.ln = make_norm(self.cfg, self.cfg.d_mlp)
        self.setup()  # the hook registry must list the new norms' hook points

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
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        return_type: Optional[str] = "input",
        verbose: bool = True,
        **generation_kwargs: Any,
    ) -> Any:
        """Sample (or greedily decode with `do_sample=False`) up to `max_new_tokens` tokens, with a KV cache.
        `input`: text, tokens or token embeddings `[b, p, d_model]`; `return_type`: "input", "str", "tokens" or
        "embeds"; `output_logits=True` returns `GenerateDecoderOnlyOutput(sequences, logits)` (see
        `hooklens.generation.generate`)."""
        return generation.generate(
            self, input, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
            do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature, freq_penalty=freq_penalty,
            use_past_kv_cache=use_past_kv_cache, prepend_bos=prepend_bos, padding_side=padding_side,
            return_type=return_type, verbose=verbose, **generation_kwargs,
        )
