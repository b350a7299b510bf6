"""A layered matplotlib drawing of a circuit (EAP-IG draws with graphviz; hooklens needs no system library).

Rows from bottom to top: `input`, then per layer the attention heads and the MLP (side by side when the model runs
them in parallel), then `logits`. Only in-graph nodes and edges are drawn. An edge's colour is its score's sign
(blue positive, red negative), its width grows with |score|, and its line style tells the receiver input
(solid: residual / MLP / logits, dashed: q, dotted: k, dash-dot: v).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

if TYPE_CHECKING:  # imported for annotations only: matplotlib is loaded when a drawing is made
    from matplotlib.figure import Figure

    from hooklens.circuits.graph import Graph

POSITIVE_COLOR = "#1f5fbf"
NEGATIVE_COLOR = "#d62728"
_QKV_STYLE = {None: "solid", "q": (0, (4, 2)), "k": (0, (1, 1.5)), "v": (0, (4, 1.5, 1, 1.5))}


def _node_positions(graph: "Graph") -> Dict[str, Tuple[float, float]]:
    """(x, y) for every node: one row per attention layer and per MLP (a shared row if parallel), heads spread
    across [0, 1], MLPs, input and logits centred."""
    n_layers, n_heads = graph.cfg["n_layers"], graph.cfg["n_heads"]
    parallel = graph.cfg["parallel_attn_mlp"]
    positions = {"input": (0.5, 0.0)}
    rows_per_layer = 1 if parallel else 2
    head_span = 0.8 if parallel else 1.0  # parallel: the MLP takes the row's right end
    for layer in range(n_layers):
        attn_y = 1 + rows_per_layer * layer
        for head in range(n_heads):
            x = head_span * (head + 0.5) / n_heads
            positions[f"a{layer}.h{head}"] = (x, float(attn_y))
        positions[f"m{layer}"] = (0.92, float(attn_y)) if parallel else (0.5, float(attn_y + 1))
    positions["logits"] = (0.5, float(1 + rows_per_layer * n_layers))
    return positions


def draw_graph(graph: "Graph", path: Optional[Union[str, os.PathLike]] = None, *, min_width: float = 0.4,
               max_width: float = 5.0, node_colorscheme: Optional[str] = None, seed: Optional[int] = None,
               title: Optional[str] = None, figsize: Optional[Tuple[float, float]] = None, dpi: int = 150,
               show_all_nodes: bool = False) -> "Figure":
    """Draw `graph`'s circuit; save it to `path` (format from the suffix, e.g. .png / .svg / .pdf) if given.

    min_width / max_width: line widths for the smallest / largest |score| among drawn edges.
    node_colorscheme: a matplotlib colormap name to fill nodes with random colours from (EAP-IG's look, e.g.
    'Pastel2'; seed fixes them); default: heads light blue, MLPs light green, input/logits grey.
    show_all_nodes: also draw the nodes outside the circuit, faintly, for orientation.
    Returns the matplotlib Figure (not shown; no pyplot state is touched).
    """
    if not 0 <= min_width <= max_width:
        raise ValueError(f"draw: need 0 <= min_width <= max_width, got {min_width} and {max_width}")
    from matplotlib.figure import Figure

    positions = _node_positions(graph)
    n_layers, n_heads = graph.cfg["n_layers"], graph.cfg["n_heads"]
    height = 1 + (1 if graph.cfg["parallel_attn_mlp"] else 2) * n_layers
    if figsize is None:
        figsize = (max(6.0, 0.55 * n_heads + 2), max(4.0, 0.45 * height + 1.5))
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_subplot()

    in_nodes = graph.nodes_in_graph.tolist()
    drawn = {name for name, node in graph.nodes.items() if name == "logits" or in_nodes[node._forward]}

    _draw_edges(ax, graph, positions, min_width, max_width)
    _draw_nodes(ax, positions, drawn, node_colorscheme, seed, small_font=n_heads > 16, show_all_nodes=show_all_nodes)
    _style_axes(ax, graph, height, title, n_drawn=len(drawn))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def _draw_edges(ax, graph: "Graph", positions, min_width: float, max_width: float) -> None:
    """The circuit's edges: colour by score sign, width by |score| between min_width and max_width."""
    from matplotlib.collections import LineCollection

    # Edges in one LineCollection per receiver-input style: thousands of edges draw in one call.
    scores, in_graph = graph.scores.tolist(), graph.in_graph.tolist()
    edges = [(edge, scores[f][b]) for edge in graph.edges.values()
             for f, b in [edge.matrix_index] if in_graph[f][b]]
    magnitudes = [abs(score) for _, score in edges]
    low, high = (min(magnitudes), max(magnitudes)) if magnitudes else (0.0, 0.0)
    by_style: Dict[object, list] = {}
    for edge, score in edges:
        scale = (abs(score) - low) / (high - low) if high > low else 1.0
        width = min_width + scale * (max_width - min_width)
        color = NEGATIVE_COLOR if score < 0 else POSITIVE_COLOR
        segment = (positions[edge.parent.name], positions[edge.child.name])
        by_style.setdefault(edge.qkv, []).append((segment, color, width))
    for qkv, items in by_style.items():
        segments, colors, widths = zip(*items)
        ax.add_collection(LineCollection(list(segments), colors=list(colors), linewidths=list(widths),
                                         linestyles=_QKV_STYLE[qkv], alpha=0.7, zorder=1))


def _draw_nodes(ax, positions, drawn, node_colorscheme: Optional[str], seed: Optional[int], small_font: bool,
                show_all_nodes: bool) -> None:
    """Node labels in boxes; nodes outside the circuit faint (only with show_all_nodes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cmap = None
    if node_colorscheme is not None:
        import matplotlib

        cmap = matplotlib.colormaps[node_colorscheme]
    for name, (x, y) in positions.items():
        if name not in drawn and not show_all_nodes:
            continue
        if cmap is not None:
            face = cmap(rng.random())
        elif name[0] == "a":
            face = "#cfe2f3"
        elif name[0] == "m":
            face = "#d9ead3"
        else:
            face = "#e0e0e0"
        faint = name not in drawn
        ax.text(x, y, name, ha="center", va="center", fontsize=5 if small_font else 7, zorder=2,
                alpha=0.35 if faint else 1.0,
                bbox=dict(boxstyle="round,pad=0.25", facecolor="white" if faint else face,
                          edgecolor="#bbbbbb" if faint else "black", linewidth=0.6))


def _style_axes(ax, graph: "Graph", height: int, title: Optional[str], n_drawn: int) -> None:
    """Layer ticks, legend (score sign, q/k/v line styles) and title."""
    from matplotlib.lines import Line2D

    n_layers = graph.cfg["n_layers"]
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.6, height + 0.6)
    ax.set_yticks([1 + (1 if graph.cfg["parallel_attn_mlp"] else 2) * layer for layer in range(n_layers)])
    ax.set_yticklabels([f"layer {layer}" for layer in range(n_layers)], fontsize=7)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    legend = [Line2D([], [], color=POSITIVE_COLOR, label="score > 0"),
              Line2D([], [], color=NEGATIVE_COLOR, label="score < 0")]
    legend += [Line2D([], [], color="black", linestyle=_QKV_STYLE[q], label=f"into {q}") for q in "qkv"]
    ax.legend(handles=legend, loc="upper left", fontsize=6, frameon=False, bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title if title is not None else
                 f"{graph.count_included_edges()} edges, {n_drawn - 1} nodes + logits", fontsize=9)
