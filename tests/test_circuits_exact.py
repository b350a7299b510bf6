"""hooklens.circuits.exact: EAP-IG's 'exact' edge scores, batched, against evaluate_graph and the unbatched loop."""
from __future__ import annotations

import pytest
import torch
from test_circuits_evaluate import LABELS, SHAPES, batches, logit_diff, make_model, mean_logit_diff

from hooklens.circuits.evaluate import evaluate_baseline, evaluate_graph
from hooklens.circuits.exact import exact
from hooklens.circuits.graph import Graph

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    return make_model(**SHAPES[request.param])


def loop_scores(model, metric, data, edge_names, intervention="patching", means_data=None):
    """EAP-IG's get_scores_exact, unbatched: one evaluate_graph of the full graph minus the edge, per edge."""
    baseline = evaluate_baseline(model, data, metric, quiet=True).mean()
    scores = {}
    for name in edge_names:
        graph = Graph.from_model(model)
        graph.in_graph |= graph.real_edge_mask
        graph.edges[name].in_graph = False
        scores[name] = evaluate_graph(model, graph, data, metric, quiet=True, intervention=intervention,
                                      intervention_dataloader=means_data).mean() - baseline
    return scores


def sample_edges(graph, n, seed=0):
    names = list(graph.edges)
    gen = torch.Generator().manual_seed(seed)
    picked = [names[i] for i in torch.randperm(len(names), generator=gen)[:n].tolist()]
    # always one edge into q, k, v, an MLP and the logits, and the last layer's MLP -> logits
    for tag in ("<q>", "<k>", "<v>", "->m0", "->logits"):
        picked.append(next(n for n in names if tag in n))
    picked.append(names[-1])
    return sorted(set(picked))


@pytest.mark.parametrize("intervention", ["patching", "zero", "mean"])
def test_exact_scores_equal_differences_of_evaluate_graph(model, intervention):
    data = batches(2)  # padded batches of 2 and 1
    graph = Graph.from_model(model)
    scores = exact(model, graph, data, logit_diff, intervention=intervention, intervention_dataloader=data,
                   quiet=True, memory_budget=2**20)
    names = sample_edges(graph, 12)
    expected = loop_scores(model, logit_diff, data, names, intervention, data)
    actual = torch.stack([graph.edges[n].score for n in names])
    torch.testing.assert_close(actual, torch.stack([expected[n] for n in names]), rtol=1e-4, atol=1e-4)
    assert scores is graph.scores and bool(graph.in_graph[graph.real_edge_mask].all())
    assert not torch.isnan(graph.scores).any() and bool((graph.scores[~graph.real_edge_mask] == 0).all())
    assert graph.scores[graph.real_edge_mask].abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["all", "last"])
def test_batched_exact_equals_one_edge_per_chunk(model, positions):
    data = batches(3)
    whole = Graph.from_model(model)
    exact(model, whole, data, mean_logit_diff, quiet=True, metric_positions=positions)
    one = Graph.from_model(model)
    exact(model, one, data, mean_logit_diff, quiet=True, metric_positions="all", memory_budget=1)  # 1 edge a chunk
    torch.testing.assert_close(whole.scores, one.scores, rtol=1e-5, atol=1e-5)


def test_interrupted_exact_keeps_finished_scores(model):
    calls = {"n": 0}

    def flaky(logits, clean_logits, input_lengths, labels):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return logit_diff(logits, clean_logits, input_lengths, labels)

    graph = Graph.from_model(model)
    with pytest.raises(KeyboardInterrupt) as info:
        # positions and columns given: no probe calls the metric, so the 7th call is inside the chunk loop
        exact(model, graph, batches(3), flaky, quiet=True, metric_positions="last", metric_columns=LABELS.flatten(),
              memory_budget=2**18)
    partial, done = info.value.partial_result, info.value.done
    assert 0 < int(done.sum()) < int(graph.real_edge_mask.sum())
    full = Graph.from_model(model)
    exact(model, full, batches(3), logit_diff, quiet=True)
    torch.testing.assert_close(partial[done], full.scores[done], rtol=1e-5, atol=1e-5)
    assert torch.isnan(partial[~done]).all()


def every_position_diff(logits, clean_logits, input_lengths, labels):
    # reads the label columns at every real position: no last-token shortcut, but a column plan applies
    diff = logits[..., labels[:, 0]] - logits[..., labels[:, 1]]  # [b, p, b]
    real = torch.arange(logits.shape[1])[None, :] < input_lengths[:, None]  # [b, p]
    own = diff.diagonal(dim1=0, dim2=2).T  # [b, p]: each prompt's own labels
    return (own * real).sum(1)


@pytest.mark.parametrize("columns", [None, "all"])
def test_exact_with_a_metric_reading_every_position(model, columns):
    data = batches(2)
    graph = Graph.from_model(model)
    exact(model, graph, data, every_position_diff, quiet=True, metric_columns=columns, memory_budget=2**19)
    names = sample_edges(graph, 8)
    expected = loop_scores(model, every_position_diff, data, names)
    actual = torch.stack([graph.edges[n].score for n in names])
    torch.testing.assert_close(actual, torch.stack([expected[n] for n in names]), rtol=1e-4, atol=1e-4)


def test_column_plan_of_a_label_metric_equals_full_logits(model):
    data = batches(3)
    probed, full, hinted = Graph.from_model(model), Graph.from_model(model), Graph.from_model(model)
    exact(model, probed, data, logit_diff, quiet=True)
    exact(model, full, data, logit_diff, quiet=True, metric_columns="all")
    exact(model, hinted, data, logit_diff, quiet=True, metric_columns=LABELS.flatten().tolist())
    torch.testing.assert_close(probed.scores, full.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hinted.scores, full.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["LNPre_relu", "gelu"])
def test_exact_on_other_block_variants(variant):
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens import HookedTransformer, HookedTransformerConfig

    # the fast path's fused LayerNorm / GELU only cover LN and gelu_new: the other norms and activations too
    extra = {"LNPre_relu": dict(normalization_type="LNPre"), "gelu": dict(act_fn="gelu")}[variant]
    cfg = HookedTransformerConfig(**{**dict(n_layers=2, d_model=24, n_heads=3, d_head=8, n_ctx=64, d_vocab=50257,
                                            act_fn="relu", seed=1, device="cpu"), **extra})
    model = HookedTransformer(cfg, tokenizer=GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR)))
    model.eval()
    data = batches(2)
    graph = Graph.from_model(model)
    exact(model, graph, data, logit_diff, quiet=True, memory_budget=2**19)
    names = sample_edges(graph, 10)
    expected = loop_scores(model, logit_diff, data, names)
    actual = torch.stack([graph.edges[n].score for n in names])
    torch.testing.assert_close(actual, torch.stack([expected[n] for n in names]), rtol=1e-4, atol=1e-4)


def test_exact_skips_the_unchanged_prefix_and_keeps_every_metric_position(model):
    import importlib

    exact_module = importlib.import_module("hooklens.circuits.exact")  # the package binds `exact` to the function
    # the first pair is identical and short (its last token comes before the second pair's first difference)
    data = [(["The cat sat on the", "When Mary and John went to the store, John gave a drink to"],
             ["The cat sat on the", "When Mary and John went to the store, Carl gave a drink to"], LABELS[1:3])]
    with torch.inference_mode():
        batch = exact_module._Batch(model, *data[0], "patching", None, logit_diff, None, None)
        ioi = exact_module._Batch(model, *batches(3)[0], "patching", None, logit_diff, None, None)
    assert batch.p0 == int(batch.lengths.min()) - 1 and 0 < batch.p0 < 10
    assert ioi.p0 == 2  # CLEAN and CORRUPTED differ from the first name on
    for metric in (logit_diff, every_position_diff):
        graph = Graph.from_model(model)
        exact(model, graph, data, metric, quiet=True, memory_budget=2**19)
        names = sample_edges(graph, 8)
        expected = loop_scores(model, metric, data, names)
        actual = torch.stack([graph.edges[n].score for n in names])
        torch.testing.assert_close(actual, torch.stack([expected[n] for n in names]), rtol=1e-4, atol=1e-4)


def test_chunk_size_and_memory_plan_follow_the_budget():
    import importlib

    from hooklens import HookedTransformerConfig

    ex = importlib.import_module("hooklens.circuits.exact")
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                  d_vocab=50257, act_fn="gelu_new", device="cpu", init_weights=False)
    per_edge = ex.chunk_bytes(cfg, 100, 21, 19, "last", 32356)
    assert ex.edges_per_chunk(cfg, 100, 21, 1, 19, "last", 32356) == 1  # never fewer than one edge
    for budget in (2**26, 2**29, 2**31):
        edges = ex.edges_per_chunk(cfg, 100, 21, budget, 19, "last", 32356)
        assert edges == max(1, budget // per_edge) and edges * per_edge <= max(budget, per_edge)
        plan = ex.memory_plan(cfg, [(20, 21, 19)] * 5, budget, "last", 32356)
        assert plan["chunk"] <= max(budget, plan["chunk"] // plan["edges_per_chunk"])
        assert plan["peak"] == plan["weights"] + plan["batches"] + max(plan["build"], plan["chunk"])
    # GPT-2 small, 100 IOI prompts: a 24 GB machine holds the run at the default budget, however many edges
    assert ex.memory_plan(cfg, [(100, 21, 19)], ex.DEFAULT_MEMORY_BUDGET, "last", None)["peak"] < 12 * 2**30
