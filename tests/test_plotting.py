"""hooklens.plotting: figures from tensors, saved as PNG, without warnings."""
import warnings

import matplotlib
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
    assert (tmp_path / "map.png").stat().st_size > 1000 and (tmp_path / "line.png").stat().st_size > 1000


def test_heatmap_colour_scale_ignores_nan_cells():
    values = torch.tensor([[float("nan"), -2.0], [1.0, 0.5]])
    image = plotting.heatmap(values).axes[0].images[0]
    assert image.get_clim() == (-2.0, 2.0)
    all_nan = plotting.heatmap(torch.full((2, 2), float("nan"))).axes[0].images[0]
    assert all_nan.get_clim() == (-1.0, 1.0)


def test_heatmap_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"2-D tensor \[rows, cols\], got shape \(2, 2, 2\)"):
        plotting.heatmap(torch.zeros(2, 2, 2))
