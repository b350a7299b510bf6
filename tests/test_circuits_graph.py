"""hooklens.circuits.Graph against EAP-IG 2.0's graph (hannamw/EAP-IG, src/eap/graph.py): sizes, names, index
layouts, circuit selection (topn / threshold / greedy / prune), JSON / .pt files, drawing.

EAP-IG itself is not needed: the expectations are its formulas and hand-built score patterns, and the JSON fixture
below is written by hand from its `to_json`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hooklens.circuits.graph import AttentionNode, Graph, InputNode, LogitNode, MLPNode


def cfg(n_layers, n_heads, parallel=False, d_model=8):
    return dict(n_layers=n_layers, n_heads=n_heads, parallel_attn_mlp=parallel, d_model=d_model)


def expected_edge_count(n_layers, n_heads, parallel):
    """EAP-IG's graph, counted by hand: each receiver input reads every sender written before it."""
    n_forward = 1 + n_layers * (n_heads + 1)
    total = n_forward  # every sender -> logits
    for layer in range(n_layers):
        before_layer = 1 + layer * (n_heads + 1)
        total += 3 * n_heads * before_layer  # q, k, v of each head
        total += before_layer + (0 if parallel else n_heads)  # the MLP also reads its own layer's heads if sequential
    return total


SHAPES = [(1, 1, False), (2, 3, False), (3, 2, True), (4, 5, False), (6, 8, False)]


@pytest.mark.parametrize("n_layers,n_heads,parallel", SHAPES)
def test_sizes_match_eap_formulas(n_layers, n_heads, parallel):
    g = Graph.from_model(cfg(n_layers, n_heads, parallel))
    assert g.n_forward == 1 + n_layers * (n_heads + 1)
    assert g.n_backward == n_layers * (3 * n_heads + 1) + 1
    assert len(g.nodes) == 2 + n_layers * (n_heads + 1)
    assert len(g.edges) == expected_edge_count(n_layers, n_heads, parallel) == int(g.real_edge_mask.sum())
    assert g.scores.shape == g.in_graph.shape == g.real_edge_mask.shape == (g.n_forward, g.n_backward)
    assert g.scores.dtype == torch.float32 and g.in_graph.dtype == torch.bool
    # every real cell is some edge's cell, and no two edges share one
    cells = {edge.matrix_index[0] * g.n_backward + edge.matrix_index[1] % g.n_backward for edge in g.edges.values()}
    assert len(cells) == len(g.edges)


def test_known_edge_counts():
    assert len(Graph.from_model(cfg(6, 8)).edges) == 3628  # the benchmark model
    assert len(Graph.from_model(cfg(12, 12)).edges) == 32491  # GPT-2 small (MIB's count)


def test_from_model_accepts_models_and_configs():
    from conftest import make_tiny_model

    model = make_tiny_model()
    from_model = Graph.from_model(model)
    from_cfg = Graph.from_model(model.cfg)
    expected = {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32}
    assert dict(from_model.cfg) == dict(from_cfg.cfg) == expected
    assert from_model.cfg.n_heads == 4  # GraphConfig: keys are attributes too
    assert list(from_model.edges) == list(from_cfg.edges)
    with pytest.raises(ValueError, match="lacks"):
        Graph.from_model({"n_layers": 2, "n_heads": 2})
    with pytest.raises(ValueError, match="HookedTransformer"):
        Graph.from_model(42)
    with pytest.raises(ValueError, match="attention-only"):
        Graph.from_model(make_tiny_model(attn_only=True))


def test_names_nodes_and_hooks():
    g = Graph.from_model(cfg(3, 4))
    assert list(g.nodes)[:6] == ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0"]
    assert list(g.nodes)[-1] == "logits"
    assert isinstance(g.nodes["input"], InputNode) and isinstance(g.nodes["logits"], LogitNode)
    head, mlp = g.nodes["a2.h3"], g.nodes["m1"]
    assert isinstance(head, AttentionNode) and head.layer == 2 and head.head == 3
    assert head.in_hook == "blocks.2.hook_attn_in" and head.out_hook == "blocks.2.attn.hook_result"
    assert head.qkv_inputs == ["blocks.2.hook_q_input", "blocks.2.hook_k_input", "blocks.2.hook_v_input"]
    assert head.index == (slice(None), slice(None), 3)
    assert isinstance(mlp, MLPNode) and (mlp.in_hook, mlp.out_hook) == ("blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out")
    assert g.nodes["input"].out_hook == "hook_embed"
    assert g.nodes["logits"].in_hook == "blocks.2.hook_resid_post"

    edge = g.edges["a0.h1->a2.h3<q>"]
    assert edge.parent is g.nodes["a0.h1"] and edge.child is head and edge.qkv == "q"
    assert edge.hook == "blocks.2.hook_q_input" and edge.index == (slice(None), slice(None), 3)
    assert g.edges["a1.h0->m1"].hook == "blocks.1.hook_mlp_in"  # sequential: an MLP reads its own layer's heads
    assert g.edges["m2->logits"].hook == "blocks.2.hook_resid_post"
    for absent in ["a1.h0->a1.h2<q>", "m1->a1.h0<k>", "m1->m0", "a2.h0->a1.h0<v>", "input->a0.h0", "logits->m0"]:
        assert absent not in g.edges
    assert "a1.h0->m1" not in Graph.from_model(cfg(3, 4, parallel=True)).edges
    # parent/child bookkeeping
    senders = ["input", "m0", "m1"] + [f"a{layer}.h{h}" for layer in (0, 1) for h in range(4)]
    assert {e.name for e in head.parent_edges} == {f"{s}->a2.h3<{q}>" for q in "qkv" for s in senders}
    assert g.nodes["m2"].children == {g.nodes["logits"]}
    # EAP-IG's edge order: per layer, each sender's q/k/v edges into every head, then the MLP's edges; then logits
    assert list(g.edges)[:4] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->a0.h1<q>"]
    assert list(g.edges)[-1] == "m2->logits"


@pytest.mark.parametrize("parallel", [False, True])
def test_index_layouts(parallel):
    n_layers, n_heads = 3, 4
    g = Graph.from_model(cfg(n_layers, n_heads, parallel))
    forward = [g.forward_index(node, attn_slice=False) for node in g.nodes.values() if node.name != "logits"]
    assert forward == list(range(g.n_forward))  # nodes dict order is forward order
    assert g.forward_index(g.nodes["a1.h2"]) == slice(6, 10)  # attn_slice defaults to True on the method
    assert Graph._forward_index(g.cfg, "a1.h2") == 8  # ... and to False on the classmethod
    assert g.forward_index(g.nodes["m1"]) == 10 and g.forward_index(g.nodes["logits"]) == g.n_forward

    columns = []
    for dst in g.get_dst_nodes():
        name, _, qkv = dst.partition("<")
        columns.append(g.backward_index(g.nodes[name], qkv=qkv.rstrip(">") or None, attn_slice=False))
    assert columns[:-1] == list(range(g.n_backward - 1)) and columns[-1] == -1
    assert g.backward_index(g.nodes["a1.h2"], qkv="k") == slice(13 + 4, 13 + 8)
    assert g.backward_index(g.nodes["m0"]) == 12

    # forward_to_backward links each sender to its own input columns
    for node in g.nodes.values():
        if isinstance(node, (InputNode, LogitNode)):
            continue
        own = torch.nonzero(g.forward_to_backward[node._forward]).flatten().tolist()
        qkvs = "qkv" if isinstance(node, AttentionNode) else [None]
        assert own == sorted(g.backward_index(node, qkv=q, attn_slice=False) for q in qkvs)

    # the real edges are exactly the senders before each receiver's prev_index
    prev = torch.tensor([g.prev_index(g.nodes[dst.partition("<")[0]]) for dst in g.get_dst_nodes()])
    assert torch.equal(g.real_edge_mask, torch.arange(g.n_forward)[:, None] < prev[None, :])
    assert torch.equal(g._backward_prev_index(), prev)

    # edge score / in_graph views write into the matrices at their cell and nowhere else
    for i, edge in enumerate(g.edges.values()):
        edge.score = float(i + 1)
    assert torch.equal(g.scores[g.real_edge_mask].sort().values, torch.arange(1, len(g.edges) + 1).float())
    assert float(g.edges["a0.h1->a2.h3<v>"].score) == float(g.scores[2, 2 * 13 + 8 + 3])
    g.edges["m0->logits"].in_graph = True
    assert g.in_graph[g.forward_index(g.nodes["m0"]), -1] and g.count_included_edges() == 1
    g.nodes["a1.h1"].in_graph = True
    assert g.nodes_in_graph.nonzero().flatten().tolist() == [7] and g.count_included_nodes() == 1
    assert g.nodes["logits"].in_graph is True

    with pytest.raises(ValueError, match="qkv"):
        g.backward_index(g.nodes["a0.h0"])
    with pytest.raises(ValueError, match="no backward index"):
        g.backward_index(g.nodes["input"])
    for bad in ["a3.h0", "a0.h4", "m7", "x1", "a0h1", "mlp0"]:
        with pytest.raises(ValueError, match="(?i)node"):
            Graph._forward_index(g.cfg, bad)
    with pytest.raises(ValueError, match="logits"):
        g.nodes["logits"].in_graph = False


def chain_graph():
    """2 layers x 2 heads with a hand-set score pattern: a connected chain input -> a0.h1 -> m1 -> logits of big
    scores, plus one big-scored dangling edge input -> a1.h0<k> (a1.h0 sends nothing) that prune must drop."""
    g = Graph.from_model(cfg(2, 2))
    g.scores[:] = 0.0
    g.edges["input->a0.h1<v>"].score = 5.0
    g.edges["a0.h1->m1"].score = -4.0
    g.edges["m1->logits"].score = 3.0
    g.edges["input->a1.h0<k>"].score = 6.0  # strongest, but leads nowhere
    g.edges["a0.h0->logits"].score = 0.5
    return g


def test_topn_picks_highest_and_prunes_dangling():
    g = chain_graph()
    g.apply_topn(4, prune=False)
    assert {n for n, e in g.edges.items() if e.in_graph} == {"input->a0.h1<v>", "a0.h1->m1", "m1->logits",
                                                             "input->a1.h0<k>"}
    # without prune, reset adds nodes that both receive and send: a0.h1, m1 and the input
    assert {n for n, node in g.nodes.items() if node.in_graph} == {"input", "a0.h1", "m1", "logits"}
    g.prune()
    assert {n for n, e in g.edges.items() if e.in_graph} == {"input->a0.h1<v>", "a0.h1->m1", "m1->logits"}
    assert g.count_included_edges() == 3 and g.count_included_nodes() == 3

    g.apply_topn(4)  # prune=True by default
    assert g.count_included_edges() == 3
    g.apply_topn(3, absolute=False)  # signed: -4 falls out, so the chain breaks and only input->...->? remains
    assert {n for n, e in g.edges.items() if e.in_graph} == set()  # 6, 5, 3: none connects input to logits
    g.apply_topn(5, absolute=False)  # 6, 5, 3, 0.5 and a zero-score tie: the first real cell, input->a0.h0<q>
    assert {n for n, e in g.edges.items() if e.in_graph} == {"a0.h0->logits", "input->a0.h0<q>"}
    g.apply_topn(0)
    assert g.count_included_edges() == 0 and g.count_included_nodes() == 0
    g.apply_topn(len(g.edges))
    assert g.count_included_edges() == len(g.edges) and bool(g.nodes_in_graph.all())


def test_topn_ties_are_broken_by_layout_order():
    g = Graph.from_model(cfg(2, 3))
    g.scores[:] = 1.0  # every edge ties
    for n in (1, 7, 50):
        g.apply_topn(n, prune=False)
        expected = torch.nonzero(g.real_edge_mask.flatten()).flatten()[:n]  # row-major order of real cells
        assert torch.equal(torch.nonzero(g.in_graph.flatten()).flatten(), expected)
    # ties at the cut only: the strict winners, then the lowest-index tied cells
    g.scores[:] = 0.0
    g.edges["m1->logits"].score = 2.0
    g.apply_topn(3, prune=False)
    first_two = torch.nonzero(g.real_edge_mask.flatten()).flatten()[:2].tolist()
    chosen = torch.nonzero(g.in_graph.flatten()).flatten().tolist()
    m1_cell = g.forward_index(g.nodes["m1"]) * g.n_backward + g.n_backward - 1
    assert sorted(chosen) == sorted(first_two + [m1_cell])


def test_topn_errors():
    g = chain_graph()
    with pytest.raises(ValueError, match="n must be an integer in"):
        g.apply_topn(len(g.edges) + 1)
    with pytest.raises(ValueError, match="integer"):
        g.apply_topn(2.5)
    with pytest.raises(ValueError, match="level"):
        g.apply_topn(2, level="edges")
    with pytest.raises(ValueError, match="node_scores=True"):
        g.apply_topn(2, level="node")
    g.apply_topn(np.int64(4))  # NumPy integers count as integers (MIB passes computed sizes)
    assert g.count_included_edges() == 3
    g.edges["m0->logits"].score = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        g.apply_topn(2)


def test_topn_keeps_previous_state_without_reset():
    g = chain_graph()
    g.nodes["a1.h1"].in_graph = True
    g.apply_topn(4, reset=False, prune=False)
    # the edge selection is replaced, the nodes are untouched (EAP-IG adds nodes only after a reset)
    assert {n for n, node in g.nodes.items() if node.in_graph} == {"a1.h1", "logits"}
    assert g.count_included_edges() == 4
    g.prune()  # prune recomputes nodes from edges: the connected chain's nodes
    assert {n for n, node in g.nodes.items() if node.in_graph} == {"input", "a0.h1", "m1", "logits"}


def test_threshold():
    g = chain_graph()
    g.apply_threshold(3.0)
    assert {n for n, e in g.edges.items() if e.in_graph} == {"input->a0.h1<v>", "a0.h1->m1", "m1->logits"}
    g.apply_threshold(3.0, absolute=False)  # -4 is below 3: nothing connects any more
    assert g.count_included_edges() == 0
    g.apply_threshold(-100.0, absolute=False)  # everything real, never the non-edge cells
    assert torch.equal(g.in_graph, g.real_edge_mask)
    g.apply_threshold(0.5, prune=False)
    assert g.count_included_edges() == 5


def test_greedy_grows_from_the_logits():
    g = chain_graph()
    # greedy only sees edges into nodes already in the circuit: the dangling 6.0 edge is never a candidate, so
    # three picks give the chain (m1->logits 3.0, a0.h1->m1 4.0, input->a0.h1<v> 5.0)
    g.apply_greedy(3)
    assert {n for n, e in g.edges.items() if e.in_graph} == {"input->a0.h1<v>", "a0.h1->m1", "m1->logits"}
    g.apply_greedy(1)  # m1->logits alone: m1 has no incoming edge, so prune empties the graph
    assert g.count_included_edges() == 0
    g.apply_greedy(1, prune=False)
    assert {n for n, e in g.edges.items() if e.in_graph} == {"m1->logits"}
    assert {n for n, node in g.nodes.items() if node.in_graph} == {"m1", "logits"}
    g.apply_greedy(2, absolute=False, prune=False)  # signed: m1->logits 3.0, then a0.h0->logits 0.5 beats -4
    assert {n for n, e in g.edges.items() if e.in_graph} == {"m1->logits", "a0.h0->logits"}
    with pytest.raises(ValueError, match="n_edges"):
        g.apply_greedy(len(g.edges) + 1)


def test_greedy_ties_follow_edge_order():
    g = Graph.from_model(cfg(2, 2))
    g.scores[:] = 1.0
    g.apply_greedy(3, prune=False)
    # all tie: the first candidates are the edges into the logits in edge order (input->logits, a0.h0->logits,
    # a0.h1->logits); picking input's edge adds no candidates (the input has no parents)
    assert {n for n, e in g.edges.items() if e.in_graph} == {"input->logits", "a0.h0->logits", "a0.h1->logits"}


def test_prune_removes_cut_off_parts():
    g = Graph.from_model(cfg(2, 2))
    for name in ["input->a0.h0<q>", "a0.h0->a1.h1<v>", "a1.h1->logits",  # connected
                 "input->m0",  # m0 sends nothing
                 "m0->a1.h0<q>"]:  # a1.h0 sends nothing
        g.edges[name].in_graph = True
    g.prune()
    assert {n for n, e in g.edges.items() if e.in_graph} == {"input->a0.h0<q>", "a0.h0->a1.h1<v>", "a1.h1->logits"}
    assert {n for n, node in g.nodes.items() if node.in_graph} == {"input", "a0.h0", "a1.h1", "logits"}


def test_node_level_topn_keeps_unscored_nodes():
    g = Graph.from_model(cfg(2, 2), node_scores=True)
    assert torch.isnan(g.nodes_scores).all() and g.nodes["m0"].score is not None
    g.nodes_scores[:] = torch.tensor([9.0, 1.0, 2.0, 8.0, 0.5, -7.0, 0.1])  # input a0.h0 a0.h1 m0 a1.h0 a1.h1 m1
    g.nodes["a0.h1"].score = float("nan")  # unscored: always kept
    g.apply_topn(3, level="node", prune=False)  # |9|, |8|, |-7|: input, m0, a1.h1 (+ unscored a0.h1)
    assert {n for n, node in g.nodes.items() if node.in_graph} == {"input", "m0", "a1.h1", "a0.h1", "logits"}
    # each selected node's real outgoing edges, and no non-edge cells
    assert not bool((g.in_graph & ~g.real_edge_mask).any())
    assert g.count_included_edges() == sum(len(g.nodes[n].child_edges) for n in ["input", "m0", "a1.h1", "a0.h1"])
    g.prune()
    assert g.nodes["a1.h1"].in_graph and g.edges["m0->a1.h1<q>"].in_graph and not g.edges["input->m1"].in_graph
    with pytest.raises(ValueError, match="scored nodes"):
        g.apply_topn(7, level="node")


def test_neuron_level():
    g = Graph.from_model(cfg(1, 1, d_model=4), neuron_level=True)
    assert g.neurons_scores.shape == (g.n_forward, 4) and torch.isnan(g.neurons_scores).all()
    g.neurons_scores[:] = torch.arange(12.0).view(3, 4)
    g.apply_topn(2, level="neuron", prune=False)  # neurons 10, 11 of m0
    assert g.neurons_in_graph.nonzero().tolist() == [[2, 2], [2, 3]]
    assert g.count_included_neurons() == 2 and g.nodes["m0"].in_graph and not g.nodes["input"].in_graph
    assert g.weighted_edge_count() == pytest.approx(1 * 2 / 4)  # m0's one outgoing edge, half its neurons
    g.prune()  # m0 has no incoming edge: removed, with its neurons
    assert g.count_included_neurons() == 0


# EAP-IG's to_json for Graph.from_model({'n_layers': 1, 'n_heads': 1, 'parallel_attn_mlp': False, 'd_model': 4})
# after setting the scores below and apply_topn(3): written by hand from src/eap/graph.py::Graph.to_json
# (json.dump of {'cfg', 'nodes': {name: {'in_graph'}}, 'edges': {name: {'score', 'in_graph'}}} in insertion order).
EAP_JSON_FIXTURE = (
    '{"cfg": {"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": false, "d_model": 4}, '
    '"nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": true}, "m0": {"in_graph": false}, '
    '"logits": {"in_graph": true}}, '
    '"edges": {"input->a0.h0<q>": {"score": 0.5, "in_graph": true}, '
    '"input->a0.h0<k>": {"score": 0.0, "in_graph": false}, '
    '"input->a0.h0<v>": {"score": -2.0, "in_graph": true}, '
    '"input->m0": {"score": 0.25, "in_graph": false}, '
    '"a0.h0->m0": {"score": 0.0, "in_graph": false}, '
    '"input->logits": {"score": 0.0, "in_graph": false}, '
    '"a0.h0->logits": {"score": 1.5, "in_graph": true}, '
    '"m0->logits": {"score": 0.0, "in_graph": false}}}'
)


def fixture_graph():
    g = Graph.from_model({"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": False, "d_model": 4})
    g.edges["input->a0.h0<q>"].score = 0.5
    g.edges["input->a0.h0<v>"].score = -2.0
    g.edges["input->m0"].score = 0.25
    g.edges["a0.h0->logits"].score = 1.5
    g.apply_topn(3)
    return g


def test_json_matches_eap_format(tmp_path):
    g = fixture_graph()
    g.to_json(tmp_path / "g.json")
    assert (tmp_path / "g.json").read_text() == EAP_JSON_FIXTURE
    (tmp_path / "eap.json").write_text(EAP_JSON_FIXTURE)
    loaded = Graph.from_json(tmp_path / "eap.json")
    assert torch.equal(loaded.scores, g.scores) and torch.equal(loaded.in_graph, g.in_graph)
    assert torch.equal(loaded.nodes_in_graph, g.nodes_in_graph)
    assert loaded.nodes_scores is None and loaded.neurons_in_graph is None and loaded.neurons_scores is None
    assert dict(loaded.cfg) == dict(g.cfg)


def test_json_round_trip_with_scores_and_neurons(tmp_path):
    g = Graph.from_model(cfg(2, 3, d_model=4), neuron_level=True, node_scores=True)
    torch.manual_seed(0)
    g.scores[:] = torch.randn_like(g.scores) * g.real_edge_mask
    g.nodes_scores[:] = torch.randn(g.n_forward)
    g.neurons_scores[:] = torch.randn(g.n_forward, 4)
    g.apply_topn(20)
    g.neurons_in_graph[1, 2] = False
    g.to_json(tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    assert set(data["nodes"]["a0.h1"]) == {"in_graph", "score", "neurons", "neurons_scores"}
    assert data["nodes"]["logits"] == {"in_graph": True}
    back = Graph.from_json(tmp_path / "g.json")
    for name in ["scores", "in_graph", "nodes_in_graph", "nodes_scores", "neurons_in_graph", "neurons_scores"]:
        assert torch.equal(getattr(back, name), getattr(g, name)), name
    assert list(back.edges) == list(g.edges)

    (tmp_path / "bad.json").write_text('{"cfg": {}, "nodes": {}}')
    with pytest.raises(ValueError, match="missing keys"):
        Graph.from_json(tmp_path / "bad.json")
    data["edges"]["a1.h0->a0.h0<q>"] = {"score": 1.0, "in_graph": True}
    (tmp_path / "bad2.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not exist"):
        Graph.from_json(tmp_path / "bad2.json")


def test_pt_round_trip(tmp_path):
    g = Graph.from_model(cfg(2, 3), node_scores=True)
    torch.manual_seed(1)
    g.scores[:] = torch.randn_like(g.scores)
    g.nodes_scores[:] = torch.randn(g.n_forward)
    g.apply_topn(15)
    g.to_pt(tmp_path / "g.pt")
    raw = torch.load(tmp_path / "g.pt", weights_only=True)  # plain tensors, lists and strings only
    assert set(raw) == {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph",
                        "nodes_scores"}
    assert raw["src_nodes"] == [n for n in g.nodes if n != "logits"] and raw["dst_nodes"] == g.get_dst_nodes()
    back = Graph.from_pt(tmp_path / "g.pt")
    for name in ["scores", "in_graph", "nodes_in_graph", "nodes_scores"]:
        assert torch.equal(getattr(back, name), getattr(g, name)), name
    assert back.neurons_in_graph is None
    torch.save({"cfg": dict(g.cfg)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing keys"):
        Graph.from_pt(tmp_path / "bad.pt")


def test_reset_full_graph():
    g = Graph.from_model(cfg(2, 2), neuron_level=True)
    g.reset(empty=False)
    assert torch.equal(g.in_graph, g.real_edge_mask) and bool(g.nodes_in_graph.all())
    assert bool(g.neurons_in_graph.all())
    g.reset()
    assert g.count_included_edges() == 0 and g.count_included_nodes() == 0 and g.count_included_neurons() == 0


def test_draw(tmp_path):
    from matplotlib.collections import LineCollection

    g = chain_graph()
    g.apply_topn(4)
    fig = g.draw(tmp_path / "circuit.png")
    assert (tmp_path / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    collections = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert sum(len(c.get_segments()) for c in collections) == g.count_included_edges() == 3
    colors = {tuple(color) for c in collections for color in c.get_colors()}
    assert len(colors) == 2  # one negative edge (a0.h1->m1), two positive ones
    widths = sorted(w for c in collections for w in c.get_linewidths())
    assert widths[0] == pytest.approx(0.4) and widths[-1] == pytest.approx(5.0)  # |3| smallest, |5| largest
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert labels == {"input", "a0.h1", "m1", "logits"}
    g.to_image(tmp_path / "eap_style.png", seed=0)
    assert (tmp_path / "eap_style.png").stat().st_size > 0
    with pytest.raises(ValueError, match="layout"):
        g.to_image(tmp_path / "x.png", layout="neato")


def test_package_exports_eap_api():
    import importlib

    import hooklens.circuits as circuits

    importlib.import_module("hooklens.circuits.attribute")  # importing the submodule must not shadow the function
    from hooklens.circuits import Graph as exported_graph
    from hooklens.circuits import attribute, evaluate_baseline, evaluate_graph

    assert exported_graph is Graph
    for fn in (attribute, evaluate_graph, evaluate_baseline):
        assert callable(fn) and not hasattr(fn, "__path__") and fn.__name__ in circuits.__all__
