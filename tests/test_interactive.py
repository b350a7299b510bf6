"""hooklens.interactive (plotly figures) and hooklens.report (report.html): structure, the data equals the input
tensors, labels and hover, offline pages, and a clear message without plotly."""
from __future__ import annotations

import re
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch

from hooklens import interactive, plotting, report

pytest.importorskip("plotly", reason="plotly is in the test extra: pip install -e '.[test]'")


def test_heatmap_data_labels_and_hover():
    values = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True) * 2
    tokens = ["<|endoftext|>", " When", " John", " and", " 42"]
    fig = interactive.heatmap(values, "t", tokens, ["L0", "L1", "L2"], "position", "layer",
                              colorbar_title="logit diff")
    (trace,) = fig.data
    assert trace.type == "heatmap"
    np.testing.assert_array_equal(trace.z, values.detach().float().numpy())
    assert list(trace.x) == tokens and list(trace.y) == ["L0", "L1", "L2"]
    # hover names the row, the column and the value (with its quantity)
    assert "layer %{y}" in trace.hovertemplate and "position %{x}" in trace.hovertemplate
    assert "logit diff %{z:" in trace.hovertemplate
    assert fig.layout.xaxis.title.text == "position" and fig.layout.yaxis.title.text == "layer"
    assert fig.layout.xaxis.type == "category"  # " 42" stays a label, not the number 42
    assert fig.layout.yaxis.autorange == "reversed"  # first row on top, as the PNG heatmaps
    assert fig.layout.title.text == "t"


def test_heatmap_diverging_scale_is_centred_and_ignores_nan():
    fig = interactive.heatmap(torch.tensor([[float("nan"), -2.0], [1.0, 0.5]]))
    (trace,) = fig.data
    assert (trace.zmin, trace.zmid, trace.zmax) == (-2.0, 0, 2.0)
    assert np.isnan(trace.z[0, 0])  # NaN cells stay gaps, not zeros
    sequential = interactive.heatmap(torch.ones(2, 2), diverging=False).data[0]
    assert sequential.zmid is None and sequential.zmin is None


def test_repeated_tokens_get_their_positions():
    """plotly merges equal category labels into one tick; a prompt's repeated tokens must stay apart."""
    fig = interactive.heatmap(torch.zeros(1, 4), x_labels=[" a", " b", " a", " c"])
    assert list(fig.data[0].x) == [" a|0", " b|1", " a|2", " c|3"]
    assert interactive.unique_labels(["x", "y"]) == ["x", "y"]


def test_head_scores_and_patching():
    scores = torch.rand(2, 4)
    fig = interactive.head_scores(scores, "Induction scores", "induction score")
    trace = fig.data[0]
    np.testing.assert_array_equal(trace.z, scores.numpy())
    assert list(trace.x) == ["H0", "H1", "H2", "H3"] and list(trace.y) == ["L0", "L1"]
    assert "induction score %{z:" in trace.hovertemplate

    results = torch.randn(2, 3, dtype=torch.float64)
    fig = interactive.patching(results, [" When", " John", " gave"], metric_name="normalized logit diff")
    trace = fig.data[0]
    np.testing.assert_array_equal(trace.z, results.float().numpy())
    assert list(trace.x) == [" When", " John", " gave"] and list(trace.y) == ["L0", "L1"]
    assert trace.zmid == 0 and "normalized logit diff %{z:" in trace.hovertemplate


def test_line_hover_shows_token_and_value():
    losses = torch.rand(6) * 10
    tokens = list("abcdef")
    fig = interactive.line(losses, "Loss by position", tokens, "position", "loss (nats)")
    (trace,) = fig.data
    np.testing.assert_array_equal(trace.y, losses.numpy())
    np.testing.assert_array_equal(trace.x, np.arange(6))
    assert list(trace.text) == tokens
    assert "%{text}" in trace.hovertemplate and "loss (nats) %{y:" in trace.hovertemplate


def test_curves():
    fig = interactive.curves({"signed": ([0.01, 0.1, 1.0], [0.2, 0.6, 1.0]), "abs": ([0.01, 0.1, 1.0], [0, 1, 1])},
                             "f", "k", "faithfulness", log_x=True)
    assert [t.name for t in fig.data] == ["signed", "abs"] and fig.layout.xaxis.type == "log"
    np.testing.assert_allclose(fig.data[0].y, [0.2, 0.6, 1.0], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="'bad' has 2 x values and 3 y values"):
        interactive.curves({"bad": ([1, 2], [1, 2, 3])})


def test_attention_patterns_head_selector():
    n_heads, pos = 3, 5
    patterns = torch.rand(n_heads, pos, pos).softmax(-1)
    tokens = ["<|endoftext|>", " A", " B", " A", " B"]
    fig = interactive.attention_patterns(patterns, tokens, layer=1, head=2, title="Top head's layer")
    assert len(fig.data) == n_heads
    for h, trace in enumerate(fig.data):
        np.testing.assert_array_equal(trace.z, patterns[h].numpy())  # head h's pattern, exactly
        assert list(trace.x) == list(trace.y) == ["<|endoftext|>|0", " A|1", " B|2", " A|3", " B|4"]
        assert trace.name == f"L1H{h}" and (trace.zmin, trace.zmax) == (0, 1)
        assert "destination %{y}" in trace.hovertemplate and "source %{x}" in trace.hovertemplate
        assert "attention %{z:" in trace.hovertemplate
    assert [bool(t.visible) for t in fig.data] == [False, False, True]  # opens on the requested head
    (menu,) = fig.layout.updatemenus
    assert len(menu.buttons) == n_heads and menu.active == 2
    for h, button in enumerate(menu.buttons):  # each entry shows exactly its head
        assert button.label == f"L1H{h}"
        assert button.args[0]["visible"] == [g == h for g in range(n_heads)]
    assert fig.layout.title.text == "Top head's layer: L1H2"


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"heatmap takes a 2-D tensor, got shape \(2, 2, 2\)"):
        interactive.heatmap(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="3 column labels for 2 columns"):
        interactive.heatmap(torch.zeros(2, 2), x_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"patterns of shape \(2, 3, 3\) and 2 tokens"):
        interactive.attention_patterns(torch.zeros(2, 3, 3), ["a", "b"])
    with pytest.raises(ValueError, match=r"head=2: the patterns have heads 0 \.\. 1"):
        interactive.attention_patterns(torch.zeros(2, 3, 3), ["a", "b", "c"], head=2)


def test_missing_plotly_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)  # import plotly.graph_objects -> ImportError
    with pytest.raises(ImportError, match=r"pip install hooklens\[plot\]"):
        interactive.heatmap(torch.zeros(2, 2))
    assert not interactive.available()


def test_importing_hooklens_does_not_import_plotly():
    code = "import sys, hooklens, hooklens.interactive, hooklens.report, hooklens.cli; print('plotly' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_save_html_is_offline(tmp_path):
    path = interactive.save_html(interactive.heatmap(torch.eye(2)), tmp_path / "fig.html")
    page = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page)  # no script from a CDN (or anywhere else)
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs()[:2000] in page  # plotly.js itself is in the page


def _png(tmp_path, name):
    plotting.heatmap(torch.randn(3, 4), tmp_path / name, title=name)
    return name


def test_report_embeds_plotly_once_and_every_figure(tmp_path):
    from plotly.offline import get_plotlyjs

    figures = [report.ReportFigure("First", _png(tmp_path, "a.png"), interactive.heatmap(torch.eye(3)), "cap <1>"),
               report.ReportFigure("Second", None, interactive.line(torch.arange(4.0))),
               report.ReportFigure("Third", _png(tmp_path, "b.png"))]
    path = report.write_report(tmp_path, "hooklens test", [("model", "<tiny>"), ("seconds", "1.0")], figures)
    page = path.read_text()
    assert path.name == "report.html"
    assert page.count(get_plotlyjs()[:2000]) == 1  # plotly.js embedded once, for every figure
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert page.count('class="plotly-graph-div"') == 2
    assert len(re.findall(r'<img class="png" alt="[ab]\.png" src="data:image/png;base64,', page)) == 2
    assert "<td>model</td><td>&lt;tiny&gt;</td>" in page and "cap &lt;1&gt;" in page  # text is escaped
    assert re.findall(r"<h2>(\w+)</h2>", page) == ["First", "Second", "Third"]


def test_report_without_plotly_keeps_pngs_and_says_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    _png(tmp_path, "faithfulness.png"), _png(tmp_path, "circuit.png")
    page = report.circuit_report(tmp_path, {}, [("model", "m")]).read_text()
    assert "pip install hooklens[plot]" in page
    assert "plotly-graph-div" not in page and page.count('<img class="png"') == 2


def test_matplotlib_figures_unchanged():
    """The PNG functions still return matplotlib figures (the interactive ones are separate)."""
    assert isinstance(plotting.heatmap(torch.zeros(2, 2)), matplotlib.figure.Figure)
