"""Which axis of each cached activation is batch, position and head: the one table every sweep and cache reads.

Every hook point of a GPT-2-style model holds a tensor whose axes follow one of a few layouts (as in
TransformerLens 3.9). Axis 0 is always the batch; "pos" is the token position (the *query* position for attention
patterns and scores, whose last axis is the key position):

| kind (the hook name ends in `hook_<kind>`)                              | layout                          |
|--------------------------------------------------------------------------|---------------------------------|
| `tokens`                                                                 | `[batch, pos]`                  |
| `embed`, `pos_embed`, `resid_pre/mid/post`, `attn_out`, `mlp_out`, `mlp_in` | `[batch, pos, d_model]`      |
| `q_input`, `k_input`, `v_input`, `attn_in`, `result`                     | `[batch, pos, head, d_model]`   |
| `q`, `k`, `v`, `z`, `rot_q`, `rot_k`                                     | `[batch, pos, head, d_head]`    |
| `attn_scores`, `pattern` (pos = the query position)                      | `[batch, head, pos, key_pos]`   |
| `pre`, `post`, `mid`, `pre_linear` (MLP neurons)                         | `[batch, pos, d_mlp]`           |
| `scale` (LayerNorm)                                                      | `[batch, pos, 1]`               |
| `normalized` (LayerNorm)                                                 | `[batch, pos, d_model]`         |
| `unembed.hook_in`                                                        | `[batch, pos, d_model]`         |
| `unembed.hook_out` (the logits)                                          | `[batch, pos, d_vocab]`         |
| `ln1.hook_scale` / `ln1.hook_normalized` when the model splits attention | `[batch, pos, head, 1]` /       |
| inputs per head (`use_split_qkv_input` or `use_attn_in`)                 | `[batch, pos, head, d_model]`   |

    >>> layout = layout_of("blocks.3.attn.hook_pattern")
    >>> layout.dims, layout.pos, layout.head, layout.axis("pos", batch_dim=False)
    (('batch', 'head', 'pos', 'key_pos'), 2, 1, 1)

`layout_of` takes a full hook name, a cache key of a gradient (`..._grad`) or a `get_act_name` shorthand
(`"pattern"`, `"resid_pre"`); pass the model's `cfg` so that `ln1` hooks get their per-head layout when the model
splits its attention inputs per head. "Site" axes are the ones a patch can address (position, head, key
position); the remaining "feature" axes are what attribution sums over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from hooklens.utils import get_act_name

__all__ = ["ActivationLayout", "LAYOUTS", "layout_of", "find_layout"]

SITE_DIMS = ("pos", "head", "key_pos")  # axes that index *where* in the model an entry sits


@dataclass(frozen=True)
class ActivationLayout:
    """The named axes of one activation, batch first: e.g. `("batch", "pos", "head", "d_head")`."""

    dims: Tuple[str, ...]

    def axis(self, dim: str, batch_dim: bool = True) -> Optional[int]:
        """Index of axis `dim` ("batch", "pos", "head", "key_pos", "d_model", ...), or None when the activation has
        no such axis. `batch_dim=False` counts axes as in a cache made with `remove_batch_dim`."""
        if dim not in self.dims:
            return None
        if not batch_dim and dim == "batch":
            return None
        return self.dims.index(dim) - (0 if batch_dim else 1)

    def from_end(self, dim: str) -> Optional[int]:
        """Index of axis `dim` counted from the end (negative): the same axis with or without the batch dim."""
        return self.dims.index(dim) - len(self.dims) if dim in self.dims else None

    @property
    def ndim(self) -> int:
        return len(self.dims)

    @property
    def batch(self) -> int:
        """The batch axis: always 0."""
        return 0

    @property
    def pos(self) -> int:
        """The position axis (the query position of attention patterns / scores), counted with the batch."""
        return self.dims.index("pos")

    @property
    def head(self) -> Optional[int]:
        """The head axis counted with the batch, or None."""
        return self.axis("head")

    @property
    def key_pos(self) -> Optional[int]:
        """The key-position axis of attention patterns / scores, or None."""
        return self.axis("key_pos")

    def site_axes(self, batch_dim: bool = True) -> Tuple[int, ...]:
        """The axes a patch addresses (position, head, key position), in the activation's order."""
        shift = 0 if batch_dim else 1
        return tuple(i - shift for i, dim in enumerate(self.dims) if dim in SITE_DIMS)

    def feature_axes(self, batch_dim: bool = True) -> Tuple[int, ...]:
        """The vector axes within one site (d_model, d_head, d_mlp, the LayerNorm scale's 1)."""
        shift = 0 if batch_dim else 1
        return tuple(i - shift for i, dim in enumerate(self.dims) if dim != "batch" and dim not in SITE_DIMS)


_RESID = ActivationLayout(("batch", "pos", "d_model"))
_HEAD_INPUT = ActivationLayout(("batch", "pos", "head", "d_model"))
_HEAD_VECTOR = ActivationLayout(("batch", "pos", "head", "d_head"))
_ATTENTION_MAP = ActivationLayout(("batch", "head", "pos", "key_pos"))
_NEURONS = ActivationLayout(("batch", "pos", "d_mlp"))
_SCALE = ActivationLayout(("batch", "pos", "1"))

# kind (the hook point's name without "hook_") -> layout
LAYOUTS: Dict[str, ActivationLayout] = {
    "tokens": ActivationLayout(("batch", "pos")),
    **dict.fromkeys(("embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in",
                     "normalized"), _RESID),
    **dict.fromkeys(("q_input", "k_input", "v_input", "attn_in"), _HEAD_INPUT),
    **dict.fromkeys(("q", "k", "v", "z", "rot_q", "rot_k"), _HEAD_VECTOR),
    "result": ActivationLayout(("batch", "pos", "head", "d_model")),
    **dict.fromkeys(("attn_scores", "pattern"), _ATTENTION_MAP),
    **dict.fromkeys(("pre", "post", "mid", "pre_linear"), _NEURONS),
    "scale": _SCALE,
}
# Hook points whose kind alone does not say the layout: (module, kind) -> layout.
_BY_MODULE = {
    ("unembed", "in"): _RESID,
    ("unembed", "out"): ActivationLayout(("batch", "pos", "d_vocab")),
}
# ln1 normalizes q/k/v inputs that are already split per head when the model splits them (use_split_qkv_input,
# use_attn_in): its scale and output then carry the head axis.
_PER_HEAD_LN1 = {
    "scale": ActivationLayout(("batch", "pos", "head", "1")),
    "normalized": ActivationLayout(("batch", "pos", "head", "d_model")),
}


def find_layout(hook_name: str, cfg: Any = None) -> Optional[ActivationLayout]:
    """`layout_of(hook_name, cfg)`, or None for a hook point outside the table (e.g. a user's own HookedRootModule)."""
    if hook_name.endswith("_grad"):  # a cached gradient has its activation's layout
        hook_name = hook_name[: -len("_grad")]
    if "." not in hook_name and not hook_name.startswith("hook_"):
        hook_name = get_act_name(hook_name)
    parent, _, point = hook_name.rpartition(".")
    if not point.startswith("hook_"):
        return None
    kind = point[len("hook_"):]
    splits_heads = getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)
    if splits_heads and parent.endswith("ln1") and kind in _PER_HEAD_LN1:
        return _PER_HEAD_LN1[kind]
    module = parent.rpartition(".")[2]
    return _BY_MODULE.get((module, kind), LAYOUTS.get(kind))


def layout_of(hook_name: str, cfg: Any = None) -> ActivationLayout:
    """The layout of the activation at `hook_name` (a full hook name, a `..._grad` cache key or a `get_act_name`
    shorthand). `cfg` (the model's config) matters only for `ln1` hooks, which gain a head axis when the model
    splits its attention inputs per head. Unknown kinds raise KeyError."""
    layout = find_layout(hook_name, cfg)
    if layout is None:
        raise KeyError(f"No activation layout for {hook_name!r}: hook names end in hook_<kind> with a kind in "
                       f"{sorted(LAYOUTS)}.")
    return layout
