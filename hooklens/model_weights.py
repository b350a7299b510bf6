"""The weight surface of `HookedTransformer`: TL's weight initialization, the per-layer weights stacked as TL
stacks them (`W_Q` ... `b_out`), the QK / OV circuits, composition scores and accumulated biases.

Shapes: l = n_layers, h = n_heads, d = d_model, dh = d_head, m = d_mlp, v = d_vocab.
"""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from hooklens.factored_matrix import FactoredMatrix
from hooklens.utils import composition_scores


def fan_in_and_fan_out(param: Tensor) -> Tuple[int, int]:
    """TL's convention: [d_in, d_out] matrices, [h, d_model, d_head] attention weights."""
    if param.dim() == 1:
        return 1, param.shape[0]
    if param.dim() == 2:
        return param.shape[0], param.shape[1]
    return param.shape[1], param.shape[0] * param.shape[2]


def init_weight_(param: Tensor, name: str, mode: str, gain: float) -> None:
    """Fill `param` in place as TL's `init_weights` does for `init_mode=mode`."""
    fan_in, fan_out = fan_in_and_fan_out(param)
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
        nn.init.normal_(param, std=1.0 if "embed" in name else fan_in**-0.5)
    else:
        raise ValueError(f"Unknown init_mode {mode!r}; use gpt2, xavier_uniform, xavier_normal, "
                         "kaiming_uniform, kaiming_normal or muP.")


class WeightsMixin:
    """Weight initialization, stacked weights and circuit analysis of `HookedTransformer`."""

    def init_weights(self) -> None:
        """Initialize every `W_*` matrix as TL does for `cfg.init_mode` (biases 0, LayerNorm w 1).

        With `cfg.seed` set, the global RNG is seeded first (as TL does), so the weights equal TL's."""
        if self.cfg.seed is not None:
            torch.manual_seed(self.cfg.seed)
        for name, stored in self.named_parameters():
            if "W_" not in name:
                continue
            # Drawn into a contiguous tensor, then copied: random fills follow memory order, and a parameter may
            # be stored with other strides than its logical layout (attention weights are head-major), while
            # TL's draws follow the logical order.
            param = torch.empty(stored.shape, dtype=stored.dtype, device=stored.device)
            init_weight_(param, name, self.cfg.init_mode, self.cfg.initializer_range)
            with torch.no_grad():
                stored.copy_(param)

    # -- weights, stacked over layers like TL -------------------------------------------------------------------
    def _stack_over_layers(self, getter: Callable[[nn.Module], Tensor]) -> Tensor:
        """`getter(block)` for every block, stacked on a new leading layer axis."""
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
        return self._stack_over_layers(lambda b: b.attn.W_K)

    @property
    def W_Q(self) -> Tensor:  # [l, h, d, dh]
        return self._stack_over_layers(lambda b: b.attn.W_Q)

    @property
    def W_V(self) -> Tensor:  # [l, h, d, dh]
        return self._stack_over_layers(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Tensor:  # [l, h, dh, d]
        return self._stack_over_layers(lambda b: b.attn.W_O)

    @property
    def b_K(self) -> Tensor:  # [l, h, dh]
        return self._stack_over_layers(lambda b: b.attn.b_K)

    @property
    def b_Q(self) -> Tensor:  # [l, h, dh]
        return self._stack_over_layers(lambda b: b.attn.b_Q)

    @property
    def b_V(self) -> Tensor:  # [l, h, dh]
        return self._stack_over_layers(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> Tensor:  # [l, d]
        return self._stack_over_layers(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Tensor:  # [l, d, m]
        return self._stack_over_layers(lambda b: b.mlp.W_in)

    @property
    def W_out(self) -> Tensor:  # [l, m, d]
        return self._stack_over_layers(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Tensor:  # [l, m]
        return self._stack_over_layers(lambda b: b.mlp.b_in)

    @property
    def b_out(self) -> Tensor:  # [l, d]
        return self._stack_over_layers(lambda b: b.mlp.b_out)

    # -- circuits -----------------------------------------------------------------------------------------------
    @property
    def QK(self) -> FactoredMatrix:
        """`FactoredMatrix` W_Q @ W_K^T per head: `[n_layers, n_heads, d_model, d_model]`, hidden d_head."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """`FactoredMatrix` W_V @ W_O per head: `[n_layers, n_heads, d_model, d_model]`, hidden d_head."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_composition_scores(self, mode: str) -> Tensor:
        """Q-, K- or V-composition scores of every head pair `[l1, h1, l2, h2]`, zero unless l1 < l2."""
        rights = {"Q": lambda: self.QK, "K": lambda: self.QK.T, "V": lambda: self.OV}
        if mode not in rights:
            raise ValueError(f"mode must be one of ['Q', 'K', 'V'] not {mode!r}")
        scores = composition_scores(self.OV, rights[mode](), broadcast_dims=True)
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        earlier = layers[:, None, None, None] < layers[None, None, :, None]  # [l1, 1, l2, 1]
        return torch.where(earlier, scores, torch.zeros_like(scores))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the biases written to the residual stream before `layer` (plus its attention with mlp_input)."""
        bias = torch.zeros(self.cfg.d_model, device=self.W_E.device, dtype=self.W_E.dtype)
        for block in self.blocks[:layer]:
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
