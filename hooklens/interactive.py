"""Interactive figures (plotly): head-score heatmaps, loss by position, patching results and attention patterns,
with the tokens on the axes and the values on hover. Each function returns a `plotly.graph_objects.Figure`, which
a notebook displays inline and `save_html` (or the figure's own `write_html`) writes as a page.

plotly is an optional dependency (`pip install hooklens[plot]`); it is imported when a figure is made, never when
hooklens is imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

INSTALL_HINT = "pip install hooklens[plot]"
# The diverging scale of the PNG heatmaps (matplotlib's RdBu_r): blue negative, white 0, red positive.
DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"


def _go():
    """plotly.graph_objects, or an ImportError that says how to get it."""
    try:
        import plotly.graph_objects as go
    except ImportError as err:
        raise ImportError(f"hooklens.interactive needs plotly, an optional dependency: {INSTALL_HINT} "
                          f"(or pip install plotly). ({err})") from err
    return go


def available() -> bool:
    """Whether plotly can be imported (the interactive figures can be made)."""
    try:
        _go()
    except ImportError:
        return False
    return True


def _as_array(values, ndim: int, what: str) -> np.ndarray:
    """float32 NumPy copy of `values` (a Tensor of any dtype or device, or nested lists), checked to be `ndim`-D.
    float32, not float64: plotly writes NumPy arrays as typed binary blocks, so the page holds the input's values
    at half the size."""
    data = torch.as_tensor(values).detach().float().cpu().numpy()
    if data.ndim != ndim:
        raise ValueError(f"{what} takes a {ndim}-D tensor, got shape {tuple(data.shape)}")
    return data


def unique_labels(labels: Sequence[str]) -> list:
    """Axis labels as given when they are distinct; otherwise each gets its position ("the|3"), because plotly
    merges equal category labels into one tick (a prompt's repeated tokens would share a column)."""
    labels = [str(label) for label in labels]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{label}|{i}" for i, label in enumerate(labels)]


def _axis_labels(labels: Optional[Sequence[str]], n: int, what: str) -> list:
    if labels is None:
        return [str(i) for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} {what} labels for {n} {what}s; give one label per {what}")
    return unique_labels(labels)


def _diverging_limit(data: np.ndarray) -> float:
    """The largest |value| (NaN cells, e.g. positions a sweep skipped, do not count), 1 when there is none."""
    finite = np.abs(data[np.isfinite(data)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def heatmap(values: Union[Tensor, Sequence[Sequence[float]]], title: str = "",
            x_labels: Optional[Sequence[str]] = None, y_labels: Optional[Sequence[str]] = None,
            x_title: str = "", y_title: str = "", diverging: bool = True, colorbar_title: str = "",
            value_format: str = ".4g"):
    """A [rows, cols] heatmap (layer x position patching results, layer x head scores, ...): the labels on the axes
    (first row at the top, as the PNG heatmaps), and on hover the row, column and value. Diverging values are
    centred on 0 (blue negative, red positive); `colorbar_title` names their quantity and unit."""
    go = _go()
    data = _as_array(values, 2, "heatmap")
    rows, cols = data.shape
    x = _axis_labels(x_labels, cols, "column")
    y = _axis_labels(y_labels, rows, "row")
    scale = dict(colorscale=DIVERGING, zmid=0, zmin=-_diverging_limit(data), zmax=_diverging_limit(data)) \
        if diverging else dict(colorscale=SEQUENTIAL)
    hover = f"{y_title or 'row'} %{{y}}<br>{x_title or 'column'} %{{x}}<br>{colorbar_title or 'value'} " \
            f"%{{z:{value_format}}}<extra></extra>"
    trace = go.Heatmap(z=data, x=x, y=y, hovertemplate=hover, colorbar=dict(title=dict(text=colorbar_title)),
                       **scale)
    fig = go.Figure(trace)
    _layout(fig, title, x_title, y_title, rows, cols)
    return fig


def _layout(fig, title: str, x_title: str, y_title: str, rows: int, cols: int) -> None:
    """Category axes (token labels that look like numbers stay labels), first row on top, a size that fits the
    cells."""
    fig.update_layout(title=dict(text=title), height=int(min(max(320, 120 + 22 * rows), 900)),
                      margin=dict(l=70, r=30, t=60, b=60))
    fig.update_xaxes(title_text=x_title, type="category", tickangle=-90 if cols > 12 else 0)
    fig.update_yaxes(title_text=y_title, type="category", autorange="reversed")


def head_scores(scores: Tensor, title: str = "Head scores", score_name: str = "score"):
    """A [n_layers, n_heads] score per head (induction, previous-token, OV copying ...) as a layer x head heatmap,
    labelled L0.. and H0.., on a sequential scale."""
    data = _as_array(scores, 2, "head_scores")
    n_layers, n_heads = data.shape
    return heatmap(data, title, [f"H{h}" for h in range(n_heads)], [f"L{layer}" for layer in range(n_layers)],
                   "head", "layer", diverging=False, colorbar_title=score_name)


def patching(results: Tensor, x_labels: Sequence[str], title: str = "Activation patching", x_title: str = "position",
             y_labels: Optional[Sequence[str]] = None, y_title: str = "layer", metric_name: str = "metric"):
    """Patching results [layers, positions or heads] on a diverging scale centred on 0, the tokens (or heads) on the
    x axis, layers L0.. on the y axis unless `y_labels` says otherwise, the metric on hover."""
    data = _as_array(results, 2, "patching")
    layers = [f"L{layer}" for layer in range(data.shape[0])] if y_labels is None else y_labels
    return heatmap(data, title, x_labels, layers, x_title, y_title, diverging=True, colorbar_title=metric_name)


def line(values: Tensor, title: str = "", x_labels: Optional[Sequence[str]] = None, x_title: str = "position",
         y_title: str = "", value_format: str = ".4g"):
    """A 1-D tensor (e.g. loss by position) as a line with markers; hover shows the x label (e.g. the token) and
    the value."""
    go = _go()
    data = _as_array(values, 1, "line")
    labels = _axis_labels(x_labels, data.shape[0], "point")
    trace = go.Scatter(x=np.arange(data.shape[0]), y=data, mode="lines+markers", marker=dict(size=4),
                       text=labels, hovertemplate=f"{x_title} %{{x}}: %{{text}}<br>{y_title or 'value'} "
                       f"%{{y:{value_format}}}<extra></extra>")
    fig = go.Figure(trace)
    fig.update_layout(title=dict(text=title), height=340, margin=dict(l=70, r=30, t=60, b=50))
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def curves(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], title: str = "", x_title: str = "",
           y_title: str = "", log_x: bool = False):
    """Several named (x, y) curves on one plot (e.g. faithfulness against circuit size for two rankings); hover
    shows the curve's name, x and y."""
    go = _go()
    traces = []
    for name, (xs, ys) in series.items():
        x, y = _as_array(xs, 1, "curves (x)"), _as_array(ys, 1, "curves (y)")
        if x.shape != y.shape:
            raise ValueError(f"curves: {name!r} has {x.shape[0]} x values and {y.shape[0]} y values")
        traces.append(go.Scatter(x=x, y=y, name=name, mode="lines+markers",
                                 hovertemplate=f"{x_title or 'x'} %{{x:.4g}}<br>{y_title or 'y'} %{{y:.4g}}"))
    fig = go.Figure(traces)
    fig.update_layout(title=dict(text=title), height=380, margin=dict(l=70, r=30, t=60, b=50))
    fig.update_xaxes(title_text=x_title, type="log" if log_x else "linear")
    fig.update_yaxes(title_text=y_title)
    return fig


def attention_patterns(patterns: Tensor, tokens: Sequence[str], layer: Optional[int] = None, head: int = 0,
                       title: str = ""):
    """Attention patterns of all heads of one layer, `[n_heads, dest, src]` (one prompt's slice of the `pattern`
    hook), one head at a time with a selector over all of them (starting at `head`). Hover shows the destination
    token, the source token and the attention probability. `tokens` are the prompt's string tokens
    (`model.to_str_tokens`); repeated tokens get their positions so that every row and column has its own label."""
    go = _go()
    data = _as_array(patterns, 3, "attention_patterns ([n_heads, dest, src])")
    n_heads, dest, src = data.shape
    if dest != src or len(tokens) != dest:
        raise ValueError(f"attention_patterns: patterns of shape {tuple(data.shape)} and {len(tokens)} tokens; "
                         "give [n_heads, pos, pos] with one string token per position")
    if not 0 <= head < n_heads:
        raise ValueError(f"head={head}: the patterns have heads 0 .. {n_heads - 1}")
    labels = unique_labels(tokens)
    name = (lambda h: f"L{layer}H{h}") if layer is not None else (lambda h: f"H{h}")
    hover = "destination %{y}<br>source %{x}<br>attention %{z:.4f}<extra>" + "%{meta}</extra>"
    fig = go.Figure([
        go.Heatmap(z=data[h], x=labels, y=labels, zmin=0, zmax=1, colorscale=SEQUENTIAL, visible=h == head,
                   name=name(h), meta=name(h), hovertemplate=hover, colorbar=dict(title=dict(text="attention")))
        for h in range(n_heads)
    ])
    heading = title or "Attention pattern"
    buttons = [dict(label=name(h), method="update",
                    args=[{"visible": [g == h for g in range(n_heads)]}, {"title.text": f"{heading}: {name(h)}"}])
               for h in range(n_heads)]
    _layout(fig, f"{heading}: {name(head)}", "source token", "destination token", dest, dest)
    fig.update_layout(height=int(min(max(420, 140 + 9 * dest), 950)),
                      updatemenus=[dict(type="dropdown", buttons=buttons, active=head, x=1.0, xanchor="right",
                                        y=1.12, yanchor="top", showactive=True)])
    return fig


def save_html(fig, path: Union[str, Path], include_plotlyjs: Union[bool, str] = True) -> Path:
    """Write `fig` as a standalone page; plotly.js is embedded by default (the page works offline)."""
    path = Path(path)
    fig.write_html(path, include_plotlyjs=include_plotlyjs, full_html=True)
    return path
