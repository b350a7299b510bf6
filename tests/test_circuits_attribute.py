"""hooklens.circuits.attribute against a literal, per-node-hook transcription of EAP-IG 2.0's gradient methods.

The reference (`reference_scores`) runs the model with TL's split q/k/v inputs, per-head results and MLP-input hooks,
fills EAP-IG's `[batch, pos, n_forward, d_model]` activation-difference tensor with forward hooks on every sender,
and in backward hooks on every receiver input adds `einsum(difference[:, :, :prev_index], grad)` to the scores, one
backward per integration step / node, exactly as eap/attribute.py and eap/utils.py do.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from hooklens.circuits import interventions as iv
from hooklens.circuits.attribute import attribute
from hooklens.circuits.graph import Graph

pytestmark = pytest.mark.usefixtures("single_thread")

# different token lengths within a batch (right padding), equal lengths between each clean / corrupted pair
CLEAN = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the",
         "Then, Anna and Tom had a long argument, and afterwards Tom said to", "After lunch, Sarah and Mike"]
CORRUPTED = ["When Alice and Bob went to the store, Carl gave a drink to", "The dog sat on the",
             "Then, Lisa and Sam had a long argument, and afterwards Mark said to", "After lunch, Emma and Dave"]
LABELS = torch.tensor([[5335, 1757], [262, 257], [11735, 4186], [290, 11]])
SHAPES = {
    "2l4h": dict(n_layers=2, d_model=32, n_heads=4, d_head=8),
    "3l3h": dict(n_layers=3, d_model=24, n_heads=3, d_head=8, d_mlp=40),
    "1l2h_ln_pre": dict(n_layers=1, d_model=16, n_heads=2, d_head=8, normalization_type="LNPre"),
}
ATOL, RTOL = 2e-5, 2e-4  # float32: scores are sums of O(100) products; values are O(0.1..10)


def make_model(n_layers, d_model, n_heads, d_head, d_mlp=None, normalization_type="LN", seed=0):
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens import HookedTransformer, HookedTransformerConfig

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp,
                                  n_ctx=64, d_vocab=50257, act_fn="gelu_new", seed=seed, device="cpu",
                                  normalization_type=normalization_type)
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():  # non-zero biases and LN parameters, so every term of the decomposition matters
        for name, param in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", ".w", ".b")):
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    return make_model(**SHAPES[request.param])


def batches(n_per_batch=2, n=len(CLEAN)):
    return [(CLEAN[i:i + n_per_batch], CORRUPTED[i:i + n_per_batch], LABELS[i:i + n_per_batch])
            for i in range(0, n, n_per_batch)]


def mean_logit_diff(logits, clean_logits, input_lengths, labels):
    last = logits[torch.arange(logits.shape[0]), input_lengths - 1]  # [b, v]
    return (last.gather(-1, labels[:, :1])[:, 0] - last.gather(-1, labels[:, 1:])[:, 0]).mean()


def kl_all_positions(logits, clean_logits, input_lengths, labels):
    # reads every position and the clean logits, as EAP-IG's KL-style metrics do (not the KL itself: its gradient at
    # the clean run is zero, and so would be EAP's scores)
    return (logits[:, :, :50] * clean_logits[:, :, :50].softmax(-1)).sum(-1).mean()


# -- the reference: EAP-IG's algorithm, hook by hook --------------------------------------------------------------
@contextlib.contextmanager
def eap_ig_flags(model):
    """EAP-IG's asserts: per-head results, split q/k/v inputs, MLP-input hook."""
    cfg = model.cfg
    old = (cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_attn_result(old[0])
        model.set_use_split_qkv_input(old[1])
        model.set_use_hook_mlp_in(old[2])


def ref_hooks(model, graph, b, p, scores):
    """EAP-IG's make_hooks_and_matrices: (corrupted fwd hooks (+), clean fwd hooks (-), bwd hooks), difference."""
    cfg = model.cfg
    diff = torch.zeros(b, p, graph.n_forward, cfg.d_model)

    def act(index, sign):
        def hook(acts, hook):
            diff[:, :, index] += sign * acts.detach()
        return hook

    def grad_hook(prev, bwd):
        def hook(grads, hook):
            g = grads.detach()
            if g.ndim == 3:
                g = g.unsqueeze(2)
            s = torch.einsum("bpfd,bprd->fr", diff[:, :, :prev], g)
            scores[:prev, bwd] += s.squeeze(1)
        return hook

    senders = [("hook_embed", 0)]
    bwd = []
    for layer in range(cfg.n_layers):
        a0 = graph.nodes[f"a{layer}.h0"]
        senders.append((f"blocks.{layer}.attn.hook_result", graph.forward_index(a0)))
        for letter in "qkv":
            bwd.append((f"blocks.{layer}.hook_{letter}_input",
                        grad_hook(graph.prev_index(a0), graph.backward_index(a0, qkv=letter))))
        m = graph.nodes[f"m{layer}"]
        senders.append((f"blocks.{layer}.hook_mlp_out", graph.forward_index(m)))
        bwd.append((f"blocks.{layer}.hook_mlp_in", grad_hook(graph.prev_index(m), graph.backward_index(m))))
    logits_node = graph.nodes["logits"]
    bwd.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post",
                grad_hook(graph.prev_index(logits_node), graph.backward_index(logits_node))))
    fwd_plus = [(name, act(index, 1.0)) for name, index in senders]
    fwd_minus = [(name, act(index, -1.0)) for name, index in senders]
    return fwd_plus, fwd_minus, bwd, diff


def reference_scores(model, graph, data, metric, method, intervention="patching", ig_steps=None, means=None):
    cfg = model.cfg
    scores = torch.zeros(graph.n_forward, graph.n_backward)
    total_items, total_steps = 0, 1
    with eap_ig_flags(model):
        for clean, corrupted, labels in data:
            b = len(clean)
            total_items += b
            clean_tokens, mask, input_lengths, p = iv.tokenize_plus(model, clean)
            corrupted_tokens = iv.tokenize_plus(model, corrupted)[0]
            plus, minus, bwd, diff = ref_hooks(model, graph, b, p, scores)
            if method == "EAP":
                with torch.no_grad():
                    if intervention == "patching":
                        with model.hooks(fwd_hooks=plus):
                            model(corrupted_tokens, attention_mask=mask)
                    elif "mean" in intervention:
                        diff += means
                    clean_logits = model(clean_tokens, attention_mask=mask)
                with model.hooks(fwd_hooks=minus, bwd_hooks=bwd):
                    metric(model(clean_tokens, attention_mask=mask), clean_logits, input_lengths, labels).backward()
            elif method == "EAP-IG-inputs":
                with torch.no_grad():
                    with model.hooks(fwd_hooks=plus):
                        model(corrupted_tokens, attention_mask=mask)
                    corrupted_embed = diff[:, :, 0].clone()
                    with model.hooks(fwd_hooks=minus):
                        clean_logits = model(clean_tokens, attention_mask=mask)
                    clean_embed = corrupted_embed - diff[:, :, 0]
                total_steps = ig_steps
                for step in range(ig_steps):
                    def interp(acts, hook, step=step):
                        new = corrupted_embed + step / ig_steps * (clean_embed - corrupted_embed)
                        return new.requires_grad_(True)
                    with model.hooks(fwd_hooks=[("hook_embed", interp)], bwd_hooks=bwd):
                        logits = model(clean_tokens, attention_mask=mask)
                        metric(logits, clean_logits, input_lengths, labels).backward()
            elif method == "clean-corrupted":
                with torch.no_grad():
                    with model.hooks(fwd_hooks=plus):
                        model(corrupted_tokens, attention_mask=mask)
                    with model.hooks(fwd_hooks=minus):
                        clean_logits = model(clean_tokens, attention_mask=mask)
                total_steps = 2
                with model.hooks(bwd_hooks=bwd):
                    metric(model(clean_tokens, attention_mask=mask), clean_logits, input_lengths, labels).backward()
                    metric(model(corrupted_tokens, attention_mask=mask), clean_logits, input_lengths,
                           labels).backward()
            elif method == "EAP-IG-activations":
                # separate matrices of corrupted (or zero) and clean sender outputs, as EAP-IG makes them
                corr_plus, _, _, acts_corrupted = ref_hooks(model, graph, b, p, scores)
                clean_plus, _, _, acts_clean = ref_hooks(model, graph, b, p, scores)
                if intervention == "patching":
                    with model.hooks(fwd_hooks=corr_plus):
                        model(corrupted_tokens, attention_mask=mask)
                elif "mean" in intervention:
                    diff += means
                with model.hooks(fwd_hooks=clean_plus):
                    clean_logits = model(clean_tokens, attention_mask=mask).detach()
                diff += acts_corrupted - acts_clean
                nodes = [("hook_embed", graph.forward_index(graph.nodes["input"]))]
                for layer in range(cfg.n_layers):
                    nodes.append((f"blocks.{layer}.attn.hook_result", graph.forward_index(graph.nodes[f"a{layer}.h0"])))
                    nodes.append((f"blocks.{layer}.hook_mlp_out", graph.forward_index(graph.nodes[f"m{layer}"])))
                total_steps = 0
                for name, index in nodes:
                    for step in range(1, ig_steps + 1):
                        total_steps += 1
                        alpha = step / ig_steps
                        new = alpha * acts_clean[:, :, index] + (1 - alpha) * acts_corrupted[:, :, index]
                        with model.hooks(fwd_hooks=[(name, lambda acts, hook, new=new: new.clone())], bwd_hooks=bwd):
                            logits = model(clean_tokens, attention_mask=mask)
                            metric(logits, clean_logits, input_lengths, labels).backward(retain_graph=True)
            else:
                raise AssertionError(method)
    model.zero_grad(set_to_none=True)
    return scores / total_items / total_steps


def run_attribute(model, data, metric, method, **kwargs):
    graph = Graph.from_model(model)
    attribute(model, graph, data, metric, method, quiet=True, **kwargs)
    return graph


def assert_scores(graph, expected):
    got = graph.scores
    assert torch.isfinite(got).all()
    assert expected.abs().max() > 1e-3  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, expected, atol=ATOL * float(expected.abs().max()), rtol=RTOL)
    # nothing outside the graph's real edges
    assert (got[~graph.real_edge_mask] == 0).all()


# -- the methods --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", [mean_logit_diff, kl_all_positions])
def test_eap_equals_reference(model, metric):
    data = batches()
    graph = run_attribute(model, data, metric, "EAP")
    assert_scores(graph, reference_scores(model, graph, data, metric, "EAP"))


def test_eap_ig_inputs_equals_reference(model):
    data = batches()
    graph = run_attribute(model, data, mean_logit_diff, "EAP-IG-inputs", ig_steps=3)
    assert_scores(graph, reference_scores(model, graph, data, mean_logit_diff, "EAP-IG-inputs", ig_steps=3))


def test_eap_ig_inputs_chunked_steps_equal_one_pass(model):
    # max_batch_tokens so small that every step runs alone: the same scores as all steps in one pass
    data = batches(n=2)
    one = run_attribute(model, data, mean_logit_diff, "EAP-IG-inputs", ig_steps=4)
    chunked = run_attribute(model, data, mean_logit_diff, "EAP-IG-inputs", ig_steps=4, max_batch_tokens=1)
    torch.testing.assert_close(chunked.scores, one.scores, atol=1e-6, rtol=1e-5)


def test_clean_corrupted_equals_reference(model):
    data = batches()
    graph = run_attribute(model, data, kl_all_positions, "clean-corrupted")
    assert_scores(graph, reference_scores(model, graph, data, kl_all_positions, "clean-corrupted"))


@pytest.mark.parametrize("intervention", ["patching", "zero"])
def test_eap_ig_activations_equals_reference(model, intervention):
    data = batches(n=2)
    graph = run_attribute(model, data, mean_logit_diff, "EAP-IG-activations", ig_steps=2, intervention=intervention)
    expected = reference_scores(model, graph, data, mean_logit_diff, "EAP-IG-activations", intervention=intervention,
                                ig_steps=2)
    assert_scores(graph, expected)


@pytest.mark.parametrize("intervention", ["zero", "mean", "mean-positional"])
def test_eap_interventions_equal_reference(model, intervention):
    data = batches()
    means_data = [batch for batch in batches()]
    means = None
    if "mean" in intervention:
        # EAP-IG's means broadcast over [batch, pos, n_forward, d] ('mean': one [d] vector for every sender)
        if intervention == "mean-positional":
            # one token length for every prompt, as per-position means need
            data = [(["The cat sat on the", "The dog ran to the"], ["The dog sat on the", "A cat ran to a"],
                     LABELS[:2])]
            means_data = data
        means = iv.compute_means(model, means_data, per_position=intervention == "mean-positional")
        means = means.unsqueeze(0) if intervention == "mean-positional" else means.view(1, 1, 1, -1)
    graph = run_attribute(model, data, mean_logit_diff, "EAP", intervention=intervention,
                          intervention_dataloader=means_data if means is not None else None)
    expected = reference_scores(model, graph, data, mean_logit_diff, "EAP", intervention=intervention, means=means)
    assert_scores(graph, expected)


def test_eap_aggregation_mean_divides_by_d_model(model):
    data = batches(n=2)
    summed = run_attribute(model, data, mean_logit_diff, "EAP")
    mean = run_attribute(model, data, mean_logit_diff, "EAP", aggregation="mean")
    torch.testing.assert_close(mean.scores, summed.scores / model.cfg.d_model)


def test_padding_does_not_leak_between_prompts(model):
    # a prompt's contribution is the same alone as next to a longer (padded-against) prompt
    short = [(CLEAN[1:2], CORRUPTED[1:2], LABELS[1:2])]
    both = [(CLEAN[:2], CORRUPTED[:2], LABELS[:2])]
    long = [(CLEAN[:1], CORRUPTED[:1], LABELS[:1])]

    def summed(metric):
        def total(*args):
            return metric(*args) * args[0].shape[0]  # a sum over the batch, so examples add up
        return total

    g_short = run_attribute(model, short, summed(mean_logit_diff), "EAP")
    g_long = run_attribute(model, long, summed(mean_logit_diff), "EAP")
    g_both = run_attribute(model, both, summed(mean_logit_diff), "EAP")
    # scores are divided by the number of examples: 1, 1 and 2
    torch.testing.assert_close(g_both.scores * 2, g_short.scores + g_long.scores, atol=1e-5, rtol=1e-4)


def test_model_flags_do_not_change_scores(model):
    data = batches(n=2)
    plain = run_attribute(model, data, mean_logit_diff, "EAP")
    with eap_ig_flags(model):
        flagged = run_attribute(model, data, mean_logit_diff, "EAP")
    torch.testing.assert_close(flagged.scores, plain.scores)


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_exact_is_delegated_to_circuits_exact(model, aggregation):
    from hooklens.circuits.exact import exact

    data = batches(n=2)
    graph = run_attribute(model, data, mean_logit_diff, "exact", aggregation=aggregation)
    expected = Graph.from_model(model)
    exact(model, expected, data, mean_logit_diff, quiet=True)
    divisor = model.cfg.d_model if aggregation == "mean" else 1  # EAP-IG divides exact scores too
    torch.testing.assert_close(graph.scores, expected.scores / divisor)
    assert graph.scores.abs().max() > 0


def test_package_api_on_ioi_dataloader(model):
    # EAP-IG's usage after the import swap: a DataLoader of IOIDataset with collate_EAP, logit_diff(loss=True)
    from functools import partial

    from torch.utils.data import DataLoader

    from hooklens.circuits import Graph as PackageGraph
    from hooklens.circuits import IOIDataset, collate_EAP, logit_diff
    from hooklens.circuits import attribute as package_attribute

    loader = DataLoader(IOIDataset(4, seed=1, tokenizer=model.tokenizer), batch_size=2, collate_fn=collate_EAP)
    metric = partial(logit_diff, loss=True, mean=True)
    graph = PackageGraph.from_model(model)
    package_attribute(model, graph, loader, metric, method="EAP-IG-inputs", ig_steps=2, quiet=True)
    assert_scores(graph, reference_scores(model, graph, list(loader), metric, "EAP-IG-inputs", ig_steps=2))


def last_column_diff(logits, clean_logits, input_lengths, labels):
    # reads position -1 whatever input_lengths says: on a right-padded batch that is a pad position for short prompts
    return (logits[:, -1, :7] - clean_logits[:, -1, :7].softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("metric, last_only", [(mean_logit_diff, True), (kl_all_positions, False),
                                               (last_column_diff, False)])
def test_probe_finds_the_positions_a_metric_reads(model, metric, last_only):
    from hooklens.circuits.attribute import _reads_last_token_only

    tokens, mask, lengths, _ = iv.tokenize_plus(model, CLEAN[:2])
    with torch.no_grad():
        clean_logits = model(tokens, attention_mask=mask)
    assert _reads_last_token_only(metric, clean_logits, lengths, LABELS[:2]) is last_only


@pytest.mark.parametrize("method, kwargs", [("EAP", {}), ("EAP-IG-inputs", dict(ig_steps=2)),
                                            ("EAP-IG-activations", dict(ig_steps=2)), ("clean-corrupted", {})])
def test_metric_positions_last_all_and_probe_agree(model, method, kwargs):
    data = batches(n=2)
    probed = run_attribute(model, data, mean_logit_diff, method, **kwargs)
    for positions in ("last", "all"):
        given = run_attribute(model, data, mean_logit_diff, method, metric_positions=positions, **kwargs)
        torch.testing.assert_close(given.scores, probed.scores, atol=1e-6, rtol=1e-5)


def test_metric_reading_a_pad_position_gets_full_logits(model):
    data = batches(n=2)
    graph = run_attribute(model, data, last_column_diff, "EAP-IG-inputs", ig_steps=2)
    assert_scores(graph, reference_scores(model, graph, data, last_column_diff, "EAP-IG-inputs", ig_steps=2))


# -- errors before work -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(method="EAP-IG"), "method must be one of"),
    (dict(method="EAP", aggregation="max"), "aggregation"),
    (dict(method="EAP", intervention="resample"), "Invalid intervention"),
    (dict(method="EAP", intervention="mean"), "intervention_dataloader"),
    (dict(method="EAP-IG-inputs", intervention="zero", ig_steps=2), "must be 'patching'"),
    (dict(method="clean-corrupted", intervention="zero"), "must be 'patching'"),
    (dict(method="EAP-IG-inputs"), "ig_steps"),
    (dict(method="EAP-IG-activations", ig_steps=0), "ig_steps"),
    (dict(method="EAP", neuron=True), "neuron"),
    (dict(method="EAP", metric_positions="first"), "metric_positions"),
])
def test_bad_arguments_raise_before_any_forward(kwargs, match):
    model = make_model(**SHAPES["1l2h_ln_pre"])
    graph = Graph.from_model(model)

    def data():
        raise AssertionError("the dataloader was read before the arguments were checked")
        yield

    with pytest.raises(ValueError, match=match):
        attribute(model, graph, data(), mean_logit_diff, quiet=True, **kwargs)


def test_graph_of_another_model_is_refused():
    model = make_model(**SHAPES["1l2h_ln_pre"])
    other = Graph.from_model(make_model(**SHAPES["2l4h"]))
    with pytest.raises(ValueError, match="Graph.from_model"):
        attribute(model, other, batches(), mean_logit_diff, "EAP", quiet=True)


def test_non_scalar_metric_is_refused():
    model = make_model(**SHAPES["1l2h_ln_pre"])

    def per_example(logits, clean_logits, input_lengths, labels):
        return logits[:, 0, 0]

    with pytest.raises(ValueError, match="scalar"):
        attribute(model, Graph.from_model(model), batches(n=2), per_example, "EAP", quiet=True)


def test_mismatched_corrupted_lengths_are_refused():
    model = make_model(**SHAPES["1l2h_ln_pre"])
    data = [(["The cat sat on the"], ["The dog sat on the mat and"], LABELS[:1])]
    with pytest.raises(ValueError, match="positions must match"):
        attribute(model, Graph.from_model(model), data, mean_logit_diff, "EAP", quiet=True)
