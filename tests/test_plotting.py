"""hooklens.plotting: figures from tensors, saved as PNG, without warnings."""
import warnings

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch

from hooklens import plotting


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heatmap_and_line_from_tensors_without_warnings(tmp_path, dtype):
    values = torch.randn(3, 5, dtype=dtype, requires_grad=dtype.is_floating_point)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. NumPy 2's DeprecationWarning about Tensor.__array__
        fig = plotting.heatmap(values * 2, tmp_path / "map.png", title="t", x_labels=list("abcde"))
        line_fig = plotting.line(values[0] * 2, tmp_path / "line.png")
    assert isinstance(fig, matplotlib.figure.Figure) and isinstance(line_fig, matplotlib.figure.Figure)
    # The figures draw the given numbers, on the labelled axes.
    want = (values * 2).detach().float()
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), want.numpy())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("abcde")
    assert fig.axes[0].get_title() == "t"
    np.testing.assert_allclose(line_fig.axes[0].lines[0].get_ydata(), want[0].numpy())
    # The saved files are real PNGs of the figure's size (110 dpi) that show more than one colour.
    for name, figure in (("map.png", fig), ("line.png", line_fig)):
        pixels = matplotlib.image.imread(tmp_path / name)  # [height, width, RGBA]
        width, height = figure.get_size_inches() * 110
        assert abs(pixels.shape[0] - height) < 1 and abs(pixels.shape[1] - width) < 1, name  # whole pixels
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10, name


def test_heatmap_colour_scale_ignores_nan_cells():
    values = torch.tensor([[float("nan"), -2.0], [1.0, 0.5]])
    image = plotting.heatmap(values).axes[0].images[0]
    assert image.get_clim() == (-2.0, 2.0)
    all_nan = plotting.heatmap(torch.full((2, 2), float("nan"))).axes[0].images[0]
    assert all_nan.get_clim() == (-1.0, 1.0)


def test_heatmap_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"2-D tensor \[rows, cols\], got shape \(2, 2, 2\)"):
        plotting.heatmap(torch.zeros(2, 2, 2))
