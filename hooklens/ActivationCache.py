"""ActivationCache: the activations of one forward pass, plus TransformerLens 3.9's analysis helpers.

Same semantics, shapes, labels and defaults as `transformer_lens.ActivationCache` for GPT-2-style models. The class
lives in the module of TL's path, so `type(cache)` is `hooklens.ActivationCache.ActivationCache` as TL's is
`transformer_lens.ActivationCache.ActivationCache` (and pickles refer to that path); `hooklens.cache` re-exports it.
Keys are TL hook names (`hook_embed`, `blocks.3.hook_resid_pre`, `blocks.0.attn.hook_z`, `ln_final.hook_scale`,
...). Shorthand lookups (`cache["pattern", 0]`, `cache["resid_pre", -1]`) go through `get_act_name`.

Shape conventions (as in TL): most activations are `[batch, pos, ...]`; after `remove_batch_dim()` the batch
dim is gone, and an integer `pos_slice` drops the pos dim too. "*batch_and_pos" below stands for whichever of
those dims remain. Stacks put their component axis first: `[num_components, *batch_and_pos, d_model]`.

The helpers only use these model attributes: `cfg` (n_layers, n_heads, d_mlp, normalization_type, attn_only,
device), `blocks[l].attn.W_O`, `blocks[l].mlp.W_out`, `ln_final`, `tokens_to_residual_directions`,
`to_single_token` and `accumulated_bias`.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Union

import torch

from hooklens.activation_layout import layout_of
from hooklens.utils import Slice, SliceInput, get_act_name


def _to_slice(slice_input: Any) -> Slice:
    """A Slice for `slice_input`; anything already Slice-like (hooklens's or TL's) is passed through."""
    if isinstance(slice_input, Slice) or (hasattr(slice_input, "apply") and hasattr(slice_input, "mode")):
        return slice_input
    return Slice(slice_input)


def _projection_2d(project: Optional[torch.Tensor]):
    """`project_output_onto` as `[d_model, n_outs]`, and whether to squeeze n_outs at the end (a 1-D projection)."""
    if project is None:
        return None, False
    if project.ndim not in (1, 2):
        raise ValueError(f"project_output_onto must be [d_model] or [d_model, n_outs], got {tuple(project.shape)}")
    return (project[:, None], True) if project.ndim == 1 else (project, False)


class ActivationCache:
    """Cached activations of a forward pass (`cache_dict`: hook name -> tensor) plus analysis helpers."""

    def __init__(self, cache_dict: Dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        self.has_embed = "hook_embed" in cache_dict
        self.has_pos_embed = "hook_pos_embed" in cache_dict

    # ------------------------------------------------------------------ dict-like access

    def __getitem__(self, key: Union[str, tuple]) -> torch.Tensor:
        """The activation at `key`: a hook name, a shorthand (`"embed"`, `"pre5"`) or a tuple
        `(name, layer[, layer_type])` passed to `get_act_name` (negative layers count from the end)."""
        if key in self.cache_dict:
            return self.cache_dict[key]
        name = self._hook_name(key)
        if name not in self.cache_dict:
            raise KeyError(self._missing_message(name))
        return self.cache_dict[name]

    def _hook_name(self, key: Union[str, tuple]) -> str:
        """The hook name `key` stands for (see `__getitem__`)."""
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key)
        if len(key) > 1 and key[1] is not None and key[1] < 0:
            n_layers = self._n_layers()
            if n_layers is not None and key[1] < -n_layers:
                raise KeyError(f"{key!r}: layer {key[1]} does not exist in the model, which has n_layers={n_layers} "
                               f"(negative layers count back at most to -{n_layers}).")
            key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return get_act_name(*key)

    def _n_layers(self) -> Optional[int]:
        cfg = getattr(self.model, "cfg", None)
        return getattr(cfg, "n_layers", None)

    def _pos_sliced(self, key: Union[str, tuple], pos_slice: Slice) -> torch.Tensor:
        """`self[key]` with `pos_slice` applied to its position axis (from the activation's layout, counted from
        the end, so it is the same axis with or without the batch dim)."""
        name = self._hook_name(key)
        return pos_slice.apply(self[name], dim=layout_of(name, self.model.cfg).from_end("pos"))

    def _missing_message(self, name: str) -> str:
        layer, n_layers = re.match(r"blocks\.(-?\d+)\.", name), self._n_layers()
        if layer is not None and n_layers is not None and not 0 <= int(layer.group(1)) < n_layers:
            # not a names_filter matter: no run of this model can cache it
            return (f"{name!r} is not in this cache: layer {layer.group(1)} does not exist in the model, which has "
                    f"n_layers={n_layers} (layers 0 to {n_layers - 1}; negative layers count from the end).")
        why = ""
        if name.endswith("hook_scale"):
            why = " apply_ln / logit attributions divide by the cached LayerNorm scale, so they need it."
        return (f"{name!r} is not in this cache ({len(self.cache_dict)} activations).{why} If the cache came from "
                f"run_with_cache(names_filter=...), include {name!r} in the filter (or drop the filter).")

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __contains__(self, key: object) -> bool:
        return key in self.cache_dict

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict.keys())}"

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    # ------------------------------------------------------------------ batch / device

    def _batch_size(self) -> int:
        """The most common leading dim across entries (TL's rule)."""
        counts = Counter(v.size(0) for v in self.cache_dict.values() if v.ndim > 0)
        return counts.most_common(1)[0][0] if counts else 1

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dim in place (batch size must be 1); returns self."""
        if not self.has_batch_dim:
            logging.warning("Tried removing batch dimension after already having removed it.")
            return self
        batch_size = self._batch_size()
        assert batch_size == 1, f"Cannot remove batch dimension from cache with batch size {batch_size}"
        for key, value in self.cache_dict.items():
            if value.ndim > 0 and value.size(0) == 1:
                self.cache_dict[key] = value[0]
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Union[Slice, SliceInput]) -> "ActivationCache":
        """A new cache with `batch_slice` applied to every batched entry (an int slice drops the batch dim)."""
        batch_slice = _to_slice(batch_slice)
        assert self.has_batch_dim, "Cannot index into a cache without a batch dim"
        still_has_batch_dim = batch_slice.mode != "int" and self.has_batch_dim
        batch_size = self._batch_size()
        new_cache_dict = {
            name: batch_slice.apply(value, dim=0) if value.ndim > 0 and value.size(0) == batch_size else value
            for name, value in self.cache_dict.items()
        }
        return ActivationCache(new_cache_dict, self.model, has_batch_dim=still_has_batch_dim)

    def to(self, device: Union[str, torch.device], move_model: bool = False) -> "ActivationCache":
        """Move every cached tensor (and the model too if `move_model`) to `device`; returns self."""
        self.cache_dict = {key: value.to(device) for key, value in self.cache_dict.items()}
        if move_model:
            self.model.to(device)
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """Set torch's *global* grad mode (`torch.set_grad_enabled(mode)`)."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    # ------------------------------------------------------------------ residual stream views

    def accumulated_resid(
        self,
        layer: Optional[int] = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Union[Slice, SliceInput] = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ):
        """Residual stream at the input to each layer up to `layer` (None/-1/n_layers: also the final stream).

        Returns `[num_components, *batch_and_pos, d_model]` with labels `"{l}_pre"`, `"{l}_mid"` (incl_mid, or
        mlp_input for layer `layer`) and `"final_post"`. `apply_ln` applies the final LN with statistics
        recomputed per component when `layer` is the unembed (logit lens), else the cached LN scale of `layer`.
        """
        pos_slice = _to_slice(pos_slice)
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n_layers
        components, labels = [], []
        for l in range(layer + 1):
            if l == n_layers:
                components.append(("resid_post", n_layers - 1))
                labels.append("final_post")
                continue
            components.append(("resid_pre", l))
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                components.append(("resid_mid", l))
                labels.append(f"{l}_mid")
        stack = torch.stack([self._pos_sliced(name, pos_slice) for name in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack,
                layer,
                pos_slice=pos_slice,
                mlp_input=mlp_input,
                has_batch_dim=self.has_batch_dim,
                recompute_ln=layer == n_layers,
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Union[Slice, SliceInput] = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """The residual stream input to `layer` split into embed, pos_embed and each layer's attn/mlp output.

        Returns `[num_components, *batch_and_pos, d_model]`, labels `"embed"`, `"pos_embed"`, `"{l}_attn_out"`,
        `"{l}_mlp_out"`. `mode` is "all", "attn" or "mlp"; `mlp_input` adds `layer`'s own attn_out.
        """
        pos_slice = _to_slice(pos_slice)
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not self.model.cfg.attn_only
        components, labels = [], []
        if incl_embeds:
            if self.has_embed:
                components.append("hook_embed")
                labels.append("embed")
            if self.has_pos_embed:
                components.append("hook_pos_embed")
                labels.append("pos_embed")
        for l in range(layer):
            if incl_attn:
                components.append(("attn_out", l))
                labels.append(f"{l}_attn_out")
            if incl_mlp:
                components.append(("mlp_out", l))
                labels.append(f"{l}_mlp_out")
        if mlp_input and incl_attn:
            components.append(("attn_out", layer))
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([self._pos_sliced(name, pos_slice) for name in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ attention heads

    def compute_head_results(self) -> None:
        """Add `blocks.{l}.attn.hook_result` (`[*batch, pos, n_heads, d_model]`, z @ W_O per head, no b_O)
        for every layer, unless already cached."""
        if "blocks.0.attn.hook_result" in self.cache_dict:
            logging.warning("Tried to compute head results when they were already cached")
            return
        self._ensure_head_results()

    def _ensure_head_results(self) -> None:
        """`compute_head_results` without TL's warning when they already exist."""
        if "blocks.0.attn.hook_result" in self.cache_dict:
            return
        for l in range(self.model.cfg.n_layers):
            z = self[("z", l, "attn")]  # [*batch, pos, head, d_head]
            W_O = self.model.blocks[l].attn.W_O  # [head, d_head, d_model]
            self.cache_dict[f"blocks.{l}.attn.hook_result"] = (z[..., None] * W_O).sum(dim=-2)

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Union[Slice, SliceInput] = None,
        apply_ln: bool = False,
    ):
        """Every head's residual contribution in layers `< layer`: `[layer * n_heads (+1), *batch_and_pos, d_model]`.

        Labels `"L{l}H{h}"`; `incl_remainder` appends resid_post[layer-1] minus the heads' sum ("remainder").
        """
        pos_slice = _to_slice(pos_slice)
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        self._ensure_head_results()

        labels: List[str] = []
        per_layer = []
        for l in range(layer):
            per_layer.append(self._pos_sliced(("result", l, "attn"), pos_slice))  # [..., head, d_model]
            labels.extend(f"L{l}H{h}" for h in range(self.model.cfg.n_heads))
        stack = self._stack_per_layer(per_layer, layer, pos_slice, incl_remainder)
        if incl_remainder:
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _stack_per_layer(
        self, per_layer: List[torch.Tensor], layer: int, pos_slice: Slice, incl_remainder: bool,
        project_2d: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-layer `[*batch_and_pos, n, d_model]` results -> `[total_n (+1), *batch_and_pos, d_model]`, with
        the remainder (resid_post[layer-1] minus their sum) last if asked. No layers: an empty stack shaped like
        the (pos-sliced) embedding, as TL does. With `project_2d` the results are already projected (last dim
        n_outs) and so is the residual the remainder comes from."""
        if per_layer:
            stack = torch.cat(per_layer, dim=-2).movedim(-2, 0)
        else:
            shape = self._pos_sliced("hook_embed", pos_slice).shape
            if project_2d is not None:
                shape = shape[:-1] + project_2d.shape[-1:]
            stack = torch.zeros(0, *shape, device=self.model.cfg.device)
        if not incl_remainder:
            return stack
        resid = self._pos_sliced(("resid_post", layer - 1), pos_slice)
        if project_2d is not None:
            resid = resid @ project_2d
        if not per_layer:
            return resid[None].clone()
        return torch.cat([stack, (resid - stack.sum(dim=0))[None]], dim=0)

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: Optional[str] = None
    ) -> torch.Tensor:
        """`activation_name` for every layer `< layer` (default all), stacked: `[layer, *activation_shape]`."""
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)], dim=0)

    # ------------------------------------------------------------------ MLP neurons

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: Union[Slice, SliceInput] = None,
        pos_slice: Union[Slice, SliceInput] = None,
        project_output_onto: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Each neuron's residual contribution in `layer` (post-activation x W_out row):
        `[*batch_and_pos, n_neurons, d_model]` (not cached).

        `project_output_onto` (`[d_model]` or `[d_model, n_outs]`) is contracted with W_out first, so the result is
        `[*batch_and_pos, n_neurons]` or `[..., n_neurons, n_outs]` and no `[..., n_neurons, d_model]` tensor exists."""
        neuron_slice = _to_slice(neuron_slice)
        pos_slice = _to_slice(pos_slice)
        # pos first: an int pos slice drops a dim, and the neuron dim stays last either way.
        neuron_acts = neuron_slice.apply(self._pos_sliced(("post", layer, "mlp"), pos_slice), dim=-1)
        W_out = neuron_slice.apply(self.model.blocks[layer].mlp.W_out, dim=0)
        if project_output_onto is None:
            return neuron_acts[..., None] * W_out
        projected = W_out @ project_output_onto  # [n_neurons] or [n_neurons, n_outs]
        return neuron_acts * projected if projected.ndim == 1 else neuron_acts[..., None] * projected

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: Union[Slice, SliceInput] = None,
        neuron_slice: Union[Slice, SliceInput] = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Optional[torch.Tensor] = None,
    ):
        """Every neuron's residual contribution in layers `< layer`:
        `[layer * n_neurons (+1), *batch_and_pos, d_model]`.

        Labels `"L{l}N{n}"`; `incl_remainder` appends resid_post[layer-1] minus the neurons' sum ("remainder").
        `project_output_onto` (`[d_model]` / `[d_model, n_outs]`) replaces d_model by the projection (squeezed for
        1-D) without forming the d_model-wide stack, LayerNorm included (as TL 3.9).
        """
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        neuron_slice = _to_slice(neuron_slice)
        pos_slice = _to_slice(pos_slice)
        labels = self._neuron_labels(layer, neuron_slice)

        if incl_remainder:
            labels.append("remainder")
        project_2d, squeeze = _projection_2d(project_output_onto)
        if project_2d is not None:
            stack = self._projected_neuron_stack(
                layer, pos_slice, neuron_slice, incl_remainder, apply_ln, project_2d, mlp_input=False
            )
            stack = stack.squeeze(-1) if squeeze else stack
            return (stack, labels) if return_labels else stack
        per_layer = [
            self.get_neuron_results(l, pos_slice=pos_slice, neuron_slice=neuron_slice) for l in range(layer)
        ]
        stack = self._stack_per_layer(per_layer, layer, pos_slice, incl_remainder)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _neuron_labels(self, layer: int, neuron_slice: Slice) -> List[str]:
        neuron_ids = neuron_slice.apply(torch.arange(self.model.cfg.d_mlp), dim=0)
        return [f"L{l}N{n}" for l in range(layer) for n in neuron_ids]

    def _projected_neuron_stack(
        self, layer: int, pos_slice: Slice, neuron_slice: Slice, incl_remainder: bool, apply_ln: bool,
        project_2d: torch.Tensor, mlp_input: bool,
    ) -> torch.Tensor:
        """`stack_neuron_results(...) @ project_2d` without the d_model-wide stack: `[n (+1), *batch_and_pos, n_outs]`.

        The cached-scale LN is linear: `LN(x) @ p = (x @ p_c) / scale` with p_c = p minus its mean over d_model
        (centring; RMS norms have none), so each neuron needs only `W_out @ p_c`."""
        normalization = self.model.cfg.normalization_type
        ln = apply_ln and normalization in ("LN", "LNPre", "RMS", "RMSPre")
        centred = ln and normalization in ("LN", "LNPre")
        linear = project_2d - project_2d.mean(0, keepdim=True) if centred else project_2d
        per_layer = [
            self.get_neuron_results(l, pos_slice=pos_slice, neuron_slice=neuron_slice, project_output_onto=linear)
            for l in range(layer)
        ]
        stack = self._stack_per_layer(per_layer, layer, pos_slice, incl_remainder, project_2d=linear)
        return stack / self._cached_ln_scale(layer, mlp_input, pos_slice) if ln else stack

    # ------------------------------------------------------------------ layer norm

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        pos_slice: Union[Slice, SliceInput] = None,
        batch_slice: Union[Slice, SliceInput] = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """Treat each component of `residual_stack` (`[num_components, *batch_and_pos, d_model]`) as input to
        `layer`'s ln1 (ln2 if `mlp_input`; None/-1/n_layers: ln_final) and apply it with the *cached* scale:
        centre (LN/LNPre only), divide by scale. Same shape out (batch_slice applied to dim 1 if has_batch_dim).

        `pos_slice` must already have been applied to the stack; it is applied to the cached scale here.
        `recompute_ln` (final layer only) runs `model.ln_final` on each component with its own statistics.
        Models without LN/RMS normalization get the stack back unchanged.
        """
        normalization = self.model.cfg.normalization_type
        if normalization not in ("LN", "LNPre", "RMS", "RMSPre"):
            return residual_stack
        pos_slice = _to_slice(pos_slice)
        batch_slice = _to_slice(batch_slice)
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n_layers
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)

        if recompute_ln and layer == n_layers and hasattr(self.model, "ln_final"):
            d_model = residual_stack.shape[-1]
            # ln_final wants [batch, pos, d_model]; LN acts per vector, so flatten the rest into batch.
            return torch.stack(
                [self.model.ln_final(x.reshape(-1, 1, d_model)).reshape(x.shape) for x in residual_stack], dim=0
            )

        if normalization in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        scale = self._cached_ln_scale(layer, mlp_input, pos_slice)  # [*batch_and_pos, 1]
        if self.has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        return residual_stack / scale

    def _cached_ln_scale(self, layer: int, mlp_input: bool, pos_slice: Slice) -> torch.Tensor:
        """The cached scale of the LN feeding `layer` (ln2 if `mlp_input`; n_layers: ln_final), pos-sliced."""
        n_layers = self.model.cfg.n_layers
        key = "ln_final.hook_scale" if layer == n_layers else f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        return self._pos_sliced(key, pos_slice)

    # ------------------------------------------------------------------ logit attribution

    def _token_shape(self, tokens: Any) -> torch.Size:
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        return torch.as_tensor(tokens).shape

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens: Union[str, int, torch.Tensor],
        incorrect_tokens: Union[str, int, torch.Tensor, None] = None,
        pos_slice: Union[Slice, SliceInput] = None,
        batch_slice: Union[Slice, SliceInput] = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """Each component's direct contribution to the logit of `tokens` (minus `incorrect_tokens`' if given),
        through the final LN's cached scale: `[num_components, *batch_and_pos]`."""
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if self._token_shape(tokens) != self._token_shape(incorrect_tokens):
                raise ValueError(
                    "tokens and incorrect_tokens must have the same shape! "
                    f"(tokens.shape={self._token_shape(tokens)}, "
                    f"incorrect_tokens.shape={self._token_shape(incorrect_tokens)})"
                )
            directions = directions - self.model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(
            residual_stack, layer=-1, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        return (scaled * directions).sum(dim=-1)

    # ------------------------------------------------------------------ full decomposition

    def get_full_resid_decomposition(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Union[Slice, SliceInput] = None,
        return_labels: bool = False,
        project_output_onto: Optional[torch.Tensor] = None,
    ):
        """The residual stream input to `layer` split into every head, every neuron (or MLP layer if not
        `expand_neurons`), embed, pos_embed and the accumulated biases: `[num_components, *batch_and_pos, d_model]`.

        Labels in order: `"L{l}H{h}"`, `"L{l}N{n}"` (or `"{l}_mlp_out"`), `"embed"`, `"pos_embed"`, `"bias"`.
        `project_output_onto` (`[d_model]` / `[d_model, n_outs]`): the stack projected onto it (after `apply_ln`),
        with the neurons projected before they are expanded, so no `[n_neurons, ..., d_model]` tensor is formed.
        """
        project_2d, squeeze = _projection_2d(project_output_onto)
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        pos_slice = _to_slice(pos_slice)

        head_stack, labels = self.stack_head_results(
            layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True
        )
        components = [head_stack]
        neuron_index = None  # position in `components` of an already projected (and LN-ed) neuron stack
        if not self.model.cfg.attn_only and layer > 0:
            if expand_neurons and project_2d is not None:
                mlp_labels = self._neuron_labels(layer, Slice(None))
                mlp_stack = self._projected_neuron_stack(
                    layer, pos_slice, Slice(None), False, apply_ln, project_2d, mlp_input=mlp_input
                )
                neuron_index = len(components)
            elif expand_neurons:
                mlp_stack, mlp_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                mlp_stack, mlp_labels = self.decompose_resid(
                    layer, mlp_input=mlp_input, pos_slice=pos_slice, incl_embeds=False, mode="mlp", return_labels=True
                )
            components.append(mlp_stack)
            labels.extend(mlp_labels)
        if self.has_embed:
            components.append(self._pos_sliced("hook_embed", pos_slice)[None])
            labels.append("embed")
        if self.has_pos_embed:
            components.append(self._pos_sliced("hook_pos_embed", pos_slice)[None])
            labels.append("pos_embed")
        # Without expanded neurons the MLP biases are already inside the MLP outputs.
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        components.append(bias.expand((1,) + head_stack.shape[1:]))
        labels.append("bias")

        if project_2d is None:
            stack = torch.cat(components, dim=0)
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            return (stack, labels) if return_labels else stack
        for i, component in enumerate(components):
            if i != neuron_index:
                if apply_ln:
                    component = self.apply_ln_to_stack(component, layer, pos_slice=pos_slice, mlp_input=mlp_input)
                components[i] = component @ project_2d
        stack = torch.cat(components, dim=0)
        stack = stack.squeeze(-1) if squeeze else stack
        return (stack, labels) if return_labels else stack
