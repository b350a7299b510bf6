"""hooklens.circuits.evaluate against a literal, per-edge-hook transcription of EAP-IG's evaluate_graph.

The reference runs the model with TL's split q/k/v inputs, per-head results and MLP-input hooks; it fills
EAP-IG's `[batch, pos, n_forward, d_model]` difference tensor (corrupted - in-flight sender outputs) with hooks and
adds one sender's difference per absent edge at the edge's receiver hook, edge by edge.
"""
from __future__ import annotations

import pytest
import torch

from hooklens.circuits.evaluate import evaluate_baseline, evaluate_graph, evaluate_graphs
from hooklens.circuits.graph import Graph
from hooklens.utils import get_attention_mask

pytestmark = pytest.mark.usefixtures("single_thread")

CLEAN = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the",
         "Then, Anna and Tom had a long argument, and afterwards Tom said to"]
CORRUPTED = ["When Alice and Bob went to the store, Carl gave a drink to", "The dog sat on the",
             "Then, Lisa and Sam had a long argument, and afterwards Mark said to"]
LABELS = torch.tensor([[5335, 1757], [262, 257], [11735, 4186]])
SHAPES = {"2l4h": dict(n_layers=2, d_model=32, n_heads=4, d_head=8), "3l3h": dict(n_layers=3, d_model=24, n_heads=3,
                                                                                  d_head=8, d_mlp=40)}


def make_model(n_layers, d_model, n_heads, d_head, d_mlp=None, seed=0):
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens import HookedTransformer, HookedTransformerConfig

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp,
                                  n_ctx=64, d_vocab=50257, act_fn="gelu_new", seed=seed, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():  # non-zero biases and LN parameters, so every term of the decomposition matters
        for name, param in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", ".w", ".b")):
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    return make_model(**SHAPES[request.param])


def batches(n_per_batch=2):
    return [(CLEAN[i:i + n_per_batch], CORRUPTED[i:i + n_per_batch], LABELS[i:i + n_per_batch])
            for i in range(0, len(CLEAN), n_per_batch)]


def logit_diff(logits, clean_logits, input_lengths, labels):
    last = logits[torch.arange(logits.shape[0]), input_lengths - 1]  # [b, v]
    return last.gather(-1, labels[:, :1])[:, 0] - last.gather(-1, labels[:, 1:])[:, 0]


def mean_logit_diff(logits, clean_logits, input_lengths, labels):
    return logit_diff(logits, clean_logits, input_lengths, labels).mean()


def all_positions(logits, clean_logits, input_lengths, labels):
    # reads every position (and the clean logits): no last-token shortcut applies
    return (logits.log_softmax(-1) - clean_logits.log_softmax(-1)).abs().mean(dim=(1, 2))


def random_circuit(model, fraction, seed):
    graph = Graph.from_model(model)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(graph.in_graph.shape, generator=gen) < fraction
    graph.in_graph[:] = keep & graph.real_edge_mask
    return graph


def eap_tokens(model, texts):
    tokens = model.to_tokens(texts, prepend_bos=True, padding_side="right")
    mask = get_attention_mask(model.tokenizer, tokens, True, padding_side="right")
    return tokens, mask, mask.sum(1)


def reference_means(model, graph, data, per_position):
    """EAP-IG's compute_mean_activations, transcribed with hooks (its last-token-over-length 'mean' included)."""
    cfg = model.cfg
    total, means = 0, None
    for clean, _, _ in data:
        tokens, mask, lengths = eap_tokens(model, clean)
        total += len(clean)
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
        senders = [cache["hook_embed"]]
        for layer in range(cfg.n_layers):
            senders += list(cache[f"blocks.{layer}.attn.hook_result"].unbind(2))
            senders.append(cache[f"blocks.{layer}.hook_mlp_out"])
        acts = torch.stack(senders, 2)  # [b, p, n_forward, d]
        if per_position:
            means = acts.sum(0) if means is None else means + acts.sum(0)
        else:
            item = acts[torch.arange(len(clean)), lengths - 1] / lengths[:, None, None]
            means = item.sum(0) if means is None else means + item.sum(0)
    means = means / total
    return means.unsqueeze(0) if per_position else means.mean(0)


def reference_evaluate(model, graph, data, metric, intervention="patching", skip_clean=True, means_data=None):
    cfg = model.cfg
    H = cfg.n_heads
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        means = None
        if "mean" in intervention:
            means = reference_means(model, graph, means_data, intervention == "mean-positional")
        graph.prune()
        absent = [(s, r) for s, r in (~graph.in_graph & graph.real_edge_mask).nonzero().tolist()]
        out = []
        for clean, corrupted, labels in data:
            tokens, mask, lengths = eap_tokens(model, clean)
            corrupted_tokens, _, _ = eap_tokens(model, corrupted)
            diff = torch.zeros(tokens.shape[0], tokens.shape[1], graph.n_forward, cfg.d_model)

            def sender_hooks(sign):
                def make(index, head=None):
                    def hook(act, hook):
                        diff[:, :, index] += sign * (act if head is None else act[:, :, head])
                    return hook
                hooks = [("hook_embed", make(0))]
                for layer in range(cfg.n_layers):
                    first = 1 + layer * (H + 1)
                    hooks += [(f"blocks.{layer}.attn.hook_result", make(first + h, h)) for h in range(H)]
                    hooks.append((f"blocks.{layer}.hook_mlp_out", make(first + H)))
                return hooks

            def receiver_hook(s, head=None):
                def hook(act, hook):
                    if head is None:
                        act += diff[:, :, s]
                    else:
                        act[:, :, head] += diff[:, :, s]
                    return act
                return hook

            receivers = []
            for s, r in absent:  # one hook per absent edge
                layer, rem = divmod(r, 3 * H + 1)
                if r == graph.n_backward - 1:
                    receivers.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", receiver_hook(s)))
                elif rem == 3 * H:
                    receivers.append((f"blocks.{layer}.hook_mlp_in", receiver_hook(s)))
                else:
                    letter = "qkv"[rem // H]
                    receivers.append((f"blocks.{layer}.hook_{letter}_input", receiver_hook(s, rem % H)))
            with torch.no_grad():
                if intervention == "patching":
                    with model.hooks(fwd_hooks=sender_hooks(+1)):
                        model(corrupted_tokens, attention_mask=mask)
                elif means is not None:
                    diff += means
                clean_logits = None if skip_clean else model(tokens, attention_mask=mask)
                with model.hooks(fwd_hooks=sender_hooks(-1) + receivers):
                    logits = model(tokens, attention_mask=mask)
            out.append(torch.as_tensor(metric(logits, clean_logits, lengths, labels)).reshape(-1))
        return torch.cat(out)
    finally:
        model.set_use_attn_result(False)
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("intervention", ["patching", "zero", "mean", "mean-positional"])
@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_evaluate_graph_equals_per_edge_hook_reference(model, intervention, fraction):
    # batches of 1: mean-positional needs one token length per batch; batches of 2 (padded) for the rest
    data = batches(1 if intervention == "mean-positional" else 2)
    n_pos = model.to_tokens(data[0][0][0]).shape[1]
    means_data = [(c, x, y) for c, x, y in data if model.to_tokens(c[0]).shape[1] == n_pos]
    if intervention == "mean-positional":
        data = means_data
    expected = reference_evaluate(model, random_circuit(model, fraction, 1), data, logit_diff, intervention,
                                  means_data=means_data)
    actual = evaluate_graph(model, random_circuit(model, fraction, 1), data, logit_diff, quiet=True,
                            intervention=intervention, intervention_dataloader=means_data)
    assert_close(actual, expected)


def test_full_circuit_is_clean_and_empty_is_corrupted(model):
    full = Graph.from_model(model)
    full.in_graph |= full.real_edge_mask
    empty = Graph.from_model(model)
    clean = evaluate_baseline(model, batches(), logit_diff, quiet=True)
    corrupted = evaluate_baseline(model, batches(), logit_diff, run_corrupted=True, quiet=True)
    assert not torch.allclose(clean, corrupted, atol=1e-3)
    assert_close(evaluate_graph(model, full, batches(), logit_diff, quiet=True), clean)
    assert_close(evaluate_graph(model, empty, batches(), logit_diff, quiet=True), corrupted)


def test_metric_reading_every_position_and_clean_logits(model):
    data = batches(2)
    expected = reference_evaluate(model, random_circuit(model, 0.6, 2), data, all_positions, skip_clean=False)
    actual = evaluate_graph(model, random_circuit(model, 0.6, 2), data, all_positions, quiet=True, skip_clean=False)
    assert_close(actual, expected)


def test_scalar_and_multiple_metrics(model):
    data = batches(2)
    expected = reference_evaluate(model, random_circuit(model, 0.5, 3), data, mean_logit_diff)
    per_batch, per_example = evaluate_graph(model, random_circuit(model, 0.5, 3), data, [mean_logit_diff, logit_diff],
                                            quiet=True)
    assert per_batch.shape == (len(data),) and per_example.shape == (len(CLEAN),)
    assert_close(per_batch, expected)


@pytest.mark.parametrize("positions", [None, "all"])
def test_evaluate_graphs_equals_one_by_one_when_chunked(model, positions):
    graphs = [random_circuit(model, f, 10 + i) for i, f in enumerate([0.0, 0.2, 0.5, 0.8, 1.0])]
    separate = [evaluate_graph(model, g, batches(), logit_diff, quiet=True) for g in graphs]
    together = evaluate_graphs(model, [random_circuit(model, f, 10 + i) for i, f in enumerate([0.0, 0.2, 0.5, 0.8,
                                                                                                  1.0])],
                               batches(), logit_diff, quiet=True, metric_positions=positions, memory_budget=1)
    for a, b in zip(together, separate):
        assert_close(a, b)


def test_bad_inputs_raise_clear_errors(model):
    graph = Graph.from_model(model)
    with pytest.raises(ValueError, match="Invalid intervention"):
        evaluate_graph(model, graph, batches(), logit_diff, quiet=True, intervention="resample")
    with pytest.raises(ValueError, match="intervention_dataloader"):
        evaluate_graph(model, graph, batches(), logit_diff, quiet=True, intervention="mean")
    with pytest.raises(ValueError, match="same token length"):
        evaluate_graph(model, graph, [(["The cat sat"], ["The big dog sat down"], LABELS[:1])], logit_diff, quiet=True)
    with pytest.raises(ValueError, match="metric_positions"):
        evaluate_graph(model, graph, batches(), logit_diff, quiet=True, metric_positions="first")


def test_columns_plan_finds_the_columns_a_metric_reads():
    from hooklens.circuits.evaluate import columns_plan

    V = 50257
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(3, 1, V, generator=gen), torch.randn(3, 1, V, generator=gen)]
    ones = torch.ones(3, dtype=torch.long)
    cols = columns_plan(logit_diff, probes, ones, LABELS, None, V)
    assert cols.tolist() == sorted(set(LABELS.flatten().tolist()))

    def log_prob(logits, clean_logits, input_lengths, labels):  # reads every column (the normalizer)
        return logits[:, -1].log_softmax(-1).gather(-1, labels[:, :1])[:, 0]

    def hidden_column(logits, clean_logits, input_lengths, labels):  # no gradient, a column outside the labels
        return (logits[:, -1, 7] > 0).float()

    def top1(logits, clean_logits, input_lengths, labels):  # no gradient; the label columns alone don't decide
        return (logits[:, -1].argmax(-1) == labels[:, 0]).float()

    for metric in (log_prob, hidden_column, top1):
        assert columns_plan(metric, probes, ones, LABELS, None, V) is None, metric.__name__
    with torch.inference_mode():  # probes made under inference_mode, as exact makes them
        frozen = [p.clone() for p in probes]
        assert columns_plan(logit_diff, frozen, ones, LABELS, None, V).tolist() == cols.tolist()
    assert columns_plan(logit_diff, probes, ones, LABELS, "all", V) is None
    assert columns_plan(logit_diff, [], ones, LABELS, [5, 3, 5], V).tolist() == [3, 5]
    for bad in ("last", [V], [-1], [0.5], []):
        with pytest.raises(ValueError, match="metric_columns"):
            columns_plan(logit_diff, probes, ones, LABELS, bad, V)


def test_width_plan_cuts_the_vocabulary_only_where_the_metric_cannot_tell():
    from hooklens.circuits.evaluate import width_plan

    V = 50257
    probes = [torch.randn(3, 1, V, generator=torch.Generator().manual_seed(1))]
    ones = torch.ones(3, dtype=torch.long)
    columns = LABELS.flatten().unique()
    assert width_plan(logit_diff, probes, ones, LABELS, columns) == int(columns.max()) + 1

    def minus_last_column(logits, clean_logits, input_lengths, labels):  # reads the vocabulary's last entry
        return logit_diff(logits, clean_logits, input_lengths, labels) - logits[:, -1, -1]

    def checks_size(logits, clean_logits, input_lengths, labels):
        assert logits.shape[-1] == V
        return logit_diff(logits, clean_logits, input_lengths, labels)

    for metric in (minus_last_column, checks_size):  # given only the label columns, the cut is caught
        assert width_plan(metric, probes, ones, LABELS, columns) == V, metric.__name__
