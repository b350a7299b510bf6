"""hooklens.circuits.faithfulness (MIB's faithfulness curve, CPR, CMD) against MIB's algorithm run literally.

The reference is MIB's `evaluate_area_under_curve` transcribed as a slow loop: the graph itself is cut to each size
with `apply_topn(int(k * E), absolute, prune=True)` and evaluated with one `evaluate_graph` call per size, the
baseline comes from `evaluate_baseline` and the empty circuit from `apply_topn(0)`; areas by the trapezoid rule.
"""
from __future__ import annotations

import math

import pytest
import torch
from tolerances import tolerance

from hooklens.circuits import faithfulness as fm
from hooklens.circuits.evaluate import evaluate_baseline, evaluate_graph
from hooklens.circuits.faithfulness import MIB_KS, curve_areas, faithfulness_curve, faithfulness_curves, mib_scores
from hooklens.circuits.graph import Graph
from hooklens.circuits.ioi import IOIDataset, logit_diff, logit_diff_per_prompt

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = {"2l4h": dict(n_layers=2, d_model=32, n_heads=4, d_head=8),
          "3l3h": dict(n_layers=3, d_model=24, n_heads=3, d_head=8, d_mlp=40)}


def make_model(n_layers, d_model, n_heads, d_head, d_mlp=None, seed=0, dtype=torch.float32):
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens import HookedTransformer, HookedTransformerConfig

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp,
                                  n_ctx=64, d_vocab=50257, act_fn="gelu_new", seed=seed, device="cpu", dtype=dtype)
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():  # non-zero biases and LN parameters, and logits large enough for clear logit differences
        for name, param in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", ".w", ".b")):
                param.add_(0.2 * torch.randn_like(param))
        model.unembed.W_U.mul_(20)
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    return make_model(**SHAPES[request.param])


def ioi_batches(model, n=6, batch=3, seed=0):
    # two batches of prompts of mixed templates (so of mixed lengths: right padding matters)
    return list(IOIDataset(n, seed=seed, tokenizer=model.tokenizer).to_dataloader(batch))


def scored_graph(model, seed=0):
    """A graph with random signed edge scores (so the signed and the absolute rankings differ)."""
    graph = Graph.from_model(model)
    gen = torch.Generator().manual_seed(seed)
    graph.scores[:] = torch.randn(graph.scores.shape, generator=gen) * graph.real_edge_mask
    return graph


def mib_reference(model, graph, data, metric, ks, absolute, intervention="patching"):
    """MIB's evaluate_area_under_curve, literally: one evaluate_graph per circuit size on the (mutated) graph."""
    kwargs = dict(quiet=True, intervention=intervention, intervention_dataloader=data)
    baseline = evaluate_baseline(model, data, metric, quiet=True).mean().item()
    graph.apply_topn(0, True)
    corrupted = evaluate_graph(model, graph, data, metric, **kwargs).mean().item()
    n = len(graph.edges)
    scores, kept, f = [], [], []
    for k in ks:
        graph.apply_topn(int(k * n), absolute, prune=True)
        kept.append(graph.count_included_edges())
        m = evaluate_graph(model, graph, data, metric, **kwargs).mean().item()
        scores.append(m)
        f.append((m - corrupted) / (baseline - corrupted))
    area_under = area_from_1 = 0.0
    for i in range(len(ks) - 1):
        area_under += (ks[i + 1] - ks[i]) * (f[i] + f[i + 1]) / 2
        area_from_1 += (ks[i + 1] - ks[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
    return dict(baseline=baseline, corrupted=corrupted, scores=scores, kept=kept, f=f, cpr=area_under,
                cmd=area_from_1)


def assert_curve_matches(curve, ref, dtype=torch.float32):
    tol = tolerance("reordered_sum" if dtype == torch.float32 else "same_dtype", dtype)
    assert curve.edges_kept == ref["kept"]
    torch.testing.assert_close(torch.tensor(curve.scores, dtype=torch.float64),
                               torch.tensor(ref["scores"], dtype=torch.float64), **tol)
    torch.testing.assert_close(torch.tensor([curve.full_score, curve.empty_score], dtype=torch.float64),
                               torch.tensor([ref["baseline"], ref["corrupted"]], dtype=torch.float64), **tol)
    torch.testing.assert_close(torch.tensor(curve.faithfulness, dtype=torch.float64),
                               torch.tensor(ref["f"], dtype=torch.float64), **tol)
    torch.testing.assert_close(torch.tensor([curve.cpr, curve.cmd], dtype=torch.float64),
                               torch.tensor([ref["cpr"], ref["cmd"]], dtype=torch.float64), **tol)


@pytest.mark.parametrize("absolute", [False, True])
def test_curve_equals_mibs_per_size_loop(model, absolute):
    data = ioi_batches(model)
    graph = scored_graph(model)
    curve = faithfulness_curve(model, graph, data, logit_diff_per_prompt, absolute=absolute, quiet=True)
    ref = mib_reference(model, graph, data, logit_diff_per_prompt, MIB_KS, absolute)
    n = len(graph.edges)
    assert curve.ks == list(MIB_KS) and curve.n_edges == [int(k * n) for k in MIB_KS] and curve.absolute is absolute
    assert abs(ref["baseline"] - ref["corrupted"]) > 0.1  # the data moves the metric: f is well conditioned
    assert_curve_matches(curve, ref)
    assert curve.average == pytest.approx(sum(curve.faithfulness) / len(MIB_KS))


def test_float64_curve_equals_the_loop_tightly():
    model = make_model(**SHAPES["2l4h"], dtype=torch.float64)
    data = ioi_batches(model)
    graph = scored_graph(model, seed=1)
    curve = faithfulness_curve(model, graph, data, logit_diff_per_prompt, ks=(0.05, 0.1, 0.3, 0.6, 1), quiet=True)
    ref = mib_reference(model, graph, data, logit_diff_per_prompt, (0.05, 0.1, 0.3, 0.6, 1), True)
    assert_curve_matches(curve, ref, dtype=torch.float64)


def test_zero_intervention_and_scalar_metric_equal_the_loop(model):
    # a metric that returns one mean per batch: m is the mean of those, as MIB's .mean() of evaluate_graph's output
    data = ioi_batches(model)
    graph = scored_graph(model, seed=2)
    ks = (0.01, 0.1, 0.5, 1)
    curve = faithfulness_curve(model, graph, data, logit_diff, ks=ks, absolute=False, intervention="zero",
                               intervention_dataloader=data, quiet=True)
    assert_curve_matches(curve, mib_reference(model, graph, data, logit_diff, ks, False, intervention="zero"))


def test_full_circuit_is_1_and_empty_circuit_is_0(model):
    data = ioi_batches(model)
    graph = scored_graph(model)
    curve = faithfulness_curve(model, graph, data, logit_diff_per_prompt, ks=(0, 1), quiet=True)
    assert curve.n_edges == [0, len(graph.edges)] and curve.edges_kept == [0, len(graph.edges)]
    torch.testing.assert_close(torch.tensor(curve.faithfulness), torch.tensor([0.0, 1.0]),
                               **tolerance("reordered_sum", torch.float32))
    # ... and the two ends are the model itself: the clean run, and (every edge patched) the corrupted run
    clean = evaluate_baseline(model, data, logit_diff_per_prompt, quiet=True).mean()
    corrupted = evaluate_baseline(model, data, logit_diff_per_prompt, run_corrupted=True, quiet=True).mean()
    torch.testing.assert_close(torch.tensor([curve.full_score, curve.empty_score]), torch.stack([clean, corrupted]),
                               **tolerance("reordered_sum", torch.float32))
    assert curve.cpr == pytest.approx(0.5) and curve.cmd == pytest.approx(0.5)  # f = k on [0, 1]


def test_areas_by_hand():
    assert curve_areas((0, 0.5, 1), (0, 0.5, 1)) == pytest.approx((0.5, 0.5))
    # widths .1, .3, .5; f .2 .6 1.2 1.0 -> .1*.4 + .3*.9 + .5*1.1; |1-f| .8 .4 .2 0 -> .1*.6 + .3*.3 + .5*.1
    assert curve_areas((0.1, 0.2, 0.5, 1), (0.2, 0.6, 1.2, 1.0)) == pytest.approx((0.86, 0.20))
    assert curve_areas((0.1, 1), (0.0, 1.0), log_scale=True) == pytest.approx((math.log(10) / 2, math.log(10) / 2))


def test_constructed_curve_areas_by_hand(model):
    # three sizes, areas written out from the curve's own f values
    data = ioi_batches(model)
    graph = scored_graph(model, seed=3)
    curve = faithfulness_curve(model, graph, data, logit_diff_per_prompt, ks=(0.1, 0.4, 1), quiet=True)
    f1, f2, f3 = curve.faithfulness
    assert curve.cpr == pytest.approx(0.3 * (f1 + f2) / 2 + 0.6 * (f2 + f3) / 2)
    assert curve.cmd == pytest.approx(0.3 * (abs(1 - f1) + abs(1 - f2)) / 2 + 0.6 * (abs(1 - f2) + abs(1 - f3)) / 2)
    assert f3 == pytest.approx(1.0, abs=1e-4)


def test_mib_scores_pick_signed_cpr_and_absolute_cmd(model):
    data = ioi_batches(model)
    graph = scored_graph(model)
    ks = (0.02, 0.1, 0.5, 1)
    scores = mib_scores(model, graph, data, logit_diff_per_prompt, ks=ks, quiet=True)
    signed = faithfulness_curve(model, graph, data, logit_diff_per_prompt, ks=ks, absolute=False, quiet=True)
    absolute = faithfulness_curve(model, graph, data, logit_diff_per_prompt, ks=ks, absolute=True, quiet=True)
    tol = tolerance("reordered_sum", torch.float32)
    torch.testing.assert_close(torch.tensor([scores.cpr, scores.cmd]), torch.tensor([signed.cpr, absolute.cmd]), **tol)
    torch.testing.assert_close(torch.tensor(scores.signed.faithfulness), torch.tensor(signed.faithfulness), **tol)
    torch.testing.assert_close(torch.tensor(scores.absolute.faithfulness), torch.tensor(absolute.faithfulness), **tol)
    assert scores.signed.edges_kept != scores.absolute.edges_kept or scores.signed.scores != scores.absolute.scores
    mib = scores.signed.to_mib_dict()
    assert set(mib) == {"weighted_edge_counts", "area_under", "area_from_1", "average", "faithfulnesses"}


def test_one_stacked_evaluation_and_identical_circuits_once(model, monkeypatch):
    data = ioi_batches(model)
    graph = scored_graph(model)
    calls = []
    real = fm.evaluate_graphs

    def counting(model_, graphs, *args, **kwargs):
        calls.append(len(graphs))
        return real(model_, graphs, *args, **kwargs)

    monkeypatch.setattr(fm, "evaluate_graphs", counting)
    faithfulness_curves(model, graph, data, logit_diff_per_prompt, quiet=True)
    masks = set()  # the distinct circuits: empty, full, each size of each ranking
    for absolute in (False, True):
        for n in [0, len(graph.edges)] + [int(k * len(graph.edges)) for k in MIB_KS]:
            circuit = scored_graph(model)
            circuit.apply_topn(n, absolute, prune=True)
            masks.add(circuit.in_graph.numpy().tobytes())
    assert calls == [len(masks)]  # empty + full + 10 sizes x 2 rankings, each distinct circuit once, in one call
    assert len(masks) < 2 + 2 * len(MIB_KS)  # small k give 0 edges here: deduplication is exercised


def test_graph_is_left_unchanged(model):
    data = ioi_batches(model)
    graph = scored_graph(model)
    graph.apply_topn(7, absolute=True)
    in_graph, nodes, scores = graph.in_graph.clone(), graph.nodes_in_graph.clone(), graph.scores.clone()
    mib_scores(model, graph, data, logit_diff_per_prompt, ks=(0.1, 1), quiet=True)
    assert torch.equal(graph.in_graph, in_graph) and torch.equal(graph.nodes_in_graph, nodes)
    assert torch.equal(graph.scores, scores)


def test_plot_writes_png(model, tmp_path):
    data = ioi_batches(model)
    scores = mib_scores(model, scored_graph(model), data, logit_diff_per_prompt, ks=(0.1, 0.5, 1), quiet=True)
    scores.plot(tmp_path / "both.png")
    scores.signed.plot(tmp_path / "one.png")
    for name in ("both.png", "one.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("ks, message", [((0.5,), "at least 2"), ((0.5, 0.2), "strictly increasing"),
                                         ((0.1, 1.5), r"in \[0, 1\]"), ((True, 1), r"in \[0, 1\]"),
                                         (0.5, "sequence")])
def test_bad_ks_are_clear_errors_before_any_work(model, ks, message, monkeypatch):
    monkeypatch.setattr(fm, "evaluate_graphs", lambda *a, **k: pytest.fail("evaluated despite bad input"))
    with pytest.raises(ValueError, match=message):
        faithfulness_curve(model, scored_graph(model), [], logit_diff_per_prompt, ks=ks)


def test_bad_graphs_are_clear_errors_before_any_work(model, monkeypatch):
    monkeypatch.setattr(fm, "evaluate_graphs", lambda *a, **k: pytest.fail("evaluated despite bad input"))
    with pytest.raises(ValueError, match="attribute"):
        faithfulness_curve(model, Graph.from_model(model), [], logit_diff_per_prompt)  # never attributed
    graph = scored_graph(model)
    graph.scores[graph.real_edge_mask.nonzero()[0].tolist()] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        faithfulness_curve(model, graph, [], logit_diff_per_prompt)
    with pytest.raises(ValueError, match="log_scale"):
        faithfulness_curve(model, scored_graph(model), [], logit_diff_per_prompt, ks=(0, 1), log_scale=True)
    with pytest.raises(ValueError, match="absolute"):
        faithfulness_curve(model, scored_graph(model), [], logit_diff_per_prompt, absolute="yes")
    with pytest.raises(TypeError, match="Graph"):
        faithfulness_curve(model, object(), [], logit_diff_per_prompt)


def test_data_that_does_not_move_the_metric_is_a_clear_error(model):
    dataset = IOIDataset(3, seed=0, tokenizer=model.tokenizer)
    data = [(dataset.clean, dataset.clean, dataset.labels)]  # counterfactual = the clean prompt itself
    with pytest.raises(ValueError, match="undefined"):
        faithfulness_curve(model, scored_graph(model), data, logit_diff_per_prompt, ks=(0.1, 1), quiet=True)
