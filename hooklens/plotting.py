"""Plots for sweep results and attention patterns, saved as PNG (matplotlib, headless "Agg" backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _as_array(values) -> np.ndarray:
    """float32 NumPy copy for matplotlib: handing it a Tensor makes NumPy 2 warn about Tensor.__array__'s signature."""
    return torch.as_tensor(values).detach().float().cpu().numpy()


def heatmap(
    values: Union[Tensor, Sequence[Sequence[float]]],
    path: Optional[Union[str, Path]] = None,
    title: str = "",
    x_labels: Optional[Sequence[str]] = None,
    y_labels: Optional[Sequence[str]] = None,
    x_title: str = "",
    y_title: str = "",
    diverging: bool = True,
    colorbar_title: str = "",
):
    """A [rows, cols] heatmap (e.g. layer x position patching results, layer x head scores).

    Diverging results are centred on 0 (red positive, blue negative). `colorbar_title` names the values' quantity
    and unit. Saved to `path` when given; the figure is returned either way, so notebooks can display it.
    """
    plt = _pyplot()
    data = _as_array(values)
    if data.ndim != 2:
        raise ValueError(f"heatmap takes a 2-D tensor [rows, cols], got shape {tuple(data.shape)}")
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * cols, 18), min(1.5 + 0.4 * rows, 14)))
    if diverging:
        finite = abs(data[np.isfinite(data)])  # NaN cells (e.g. positions a sweep skipped) must not set the scale
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    else:
        image = ax.imshow(data, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=colorbar_title or None)
    ax.set_xticks(range(cols))
    ax.set_xticklabels(list(x_labels) if x_labels is not None else range(cols), rotation=90 if x_labels else 0,
                       fontsize=8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(list(y_labels) if y_labels is not None else range(rows), fontsize=8)
    ax.set_xlabel(x_title)
    ax.set_ylabel(y_title)
    ax.set_title(title)
    return _finish(plt, fig, path)


def line(values: Tensor, path: Optional[Union[str, Path]] = None, title: str = "", x_title: str = "",
         y_title: str = ""):
    """A simple line plot of a 1-D tensor (e.g. loss by position)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(_as_array(values))
    ax.set_xlabel(x_title)
    ax.set_ylabel(y_title)
    ax.set_title(title)
    return _finish(plt, fig, path)


def _finish(plt, fig, path: Optional[Union[str, Path]]):
    """Lay out the figure; save it to `path` (and release it) when given; return it for notebooks."""
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
