"""Adversarial but realistic use of the sweeps (patching, ablation, attribution, path patching): metrics that read
logits a sweep never computed, out-of-range positions and layers, interrupted sweeps, metrics of the wrong kind and
tokens of the wrong shape. Each must raise a clear error before any work, or keep the work already done."""
from __future__ import annotations

import contextlib

import pytest
import torch
from tolerances import tolerance

import hooklens.patching as patching
from hooklens.ablation import head_ablation
from hooklens.attribution import attribution_patching, exact_top_entries, neuron_integrated_gradients
from hooklens.errors import InvalidInputError
from hooklens.path_patching import path_patch, path_patch_senders

SEQ_LEN = 15  # 2 layers x 15 positions = 30 resid_pre patches


@pytest.fixture(scope="module")
def data(tiny_model):
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 97, (1, SEQ_LEN), generator=g)
    corrupted = torch.randint(0, 97, (1, SEQ_LEN), generator=g)
    with torch.no_grad():
        _, clean_cache = tiny_model.run_with_cache(clean)
        corrupted_logits = tiny_model(corrupted)
    return clean, corrupted, clean_cache, corrupted_logits


def last_logit_diff(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


def no_hooks_left(model) -> bool:
    return not any(point.has_hooks() for point in model.hook_dict.values())


@contextlib.contextmanager
def count_forwards(model):
    """Counts forward passes that reach the embedding (any run of the model on tokens)."""
    calls = []
    handle = model.embed.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


# -- a metric that reads logits outside metric_positions ----------------------------------------------------------
def accuracy_at(position, targets):
    """The argmax accuracy at `position` (1.0 on the unpatched corrupted run, by construction of `targets`)."""
    def metric(logits):
        return (logits[:, position].argmax(-1) == targets).float().mean()
    return metric


def test_argmax_metric_reading_another_position_raises(tiny_model, data):
    """The issue's case: with metric_positions=[-1] an accuracy at position 3 saw NaN and reported 0.0 for every
    patch instead of 1.0."""
    _, corrupted, clean_cache, corrupted_logits = data
    metric = accuracy_at(3, corrupted_logits[:, 3].argmax(-1))
    assert float(metric(corrupted_logits)) == 1.0
    with pytest.raises(InvalidInputError, match="metric_positions") as info:
        patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache, metric, metric_positions=[-1],
                                         progress=False)
    assert "[14]" in str(info.value) and "metric_positions=None" in str(info.value)
    with pytest.raises(InvalidInputError, match="metric_positions"):
        head_ablation(tiny_model, corrupted, metric, metric_positions=[-1], progress=False)
    # Asked for every position it reads, the same metric works and finds the unpatched accuracy for late patches.
    values = patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache, metric, metric_positions=[3, -1],
                                              progress=False)
    assert torch.equal(values, patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache, metric,
                                                                progress=False))
    assert torch.equal(values[:, 4:], torch.ones(2, SEQ_LEN - 4))  # patches after position 3 cannot change it
    assert no_hooks_left(tiny_model)


def test_metric_turned_nan_by_unread_positions_raises(tiny_model, data):
    """A value-independent read (x - x) still turns NaN on NaN logits: caught by the NaN sign."""
    _, corrupted, clean_cache, _ = data

    def metric(logits):
        return last_logit_diff(logits) + 0.0 * (logits[:, 0, 3] - logits[:, 0, 3]).mean()

    with pytest.raises(InvalidInputError, match="metric_positions"):
        patching.get_act_patch_attn_out(tiny_model, corrupted, clean_cache, metric, metric_positions=[-1],
                                        progress=False)


def test_attribution_metric_reading_another_position_raises_before_the_backward_pass(tiny_model, data):
    clean, corrupted, _, _ = data

    def metric(logits):  # a differentiable read of position 2
        return last_logit_diff(logits) + logits[:, 2, 7].mean()

    with count_forwards(tiny_model) as forwards:
        with pytest.raises(InvalidInputError, match="metric_positions"):
            attribution_patching(tiny_model, clean, corrupted, metric, metric_positions=[-1])
    assert len(forwards) == 1  # the clean run only
    with pytest.raises(InvalidInputError, match="metric_positions"):
        exact_top_entries(tiny_model, clean, corrupted, metric, {"resid_pre": torch.ones(2, SEQ_LEN)}, k=2,
                          metric_positions=[-1])
    # reading only the last position is fine, and equals the run without metric_positions
    got = attribution_patching(tiny_model, clean, corrupted, last_logit_diff, metric_positions=[-1])
    full = attribution_patching(tiny_model, clean, corrupted, last_logit_diff)
    for name in full:
        torch.testing.assert_close(got[name], full[name], **tolerance())
    assert no_hooks_left(tiny_model)


@pytest.mark.parametrize("positions, error, match", [
    ([44], IndexError, r"metric_positions \[44\] are out of range for prompts of 15 tokens"),
    ([-16], IndexError, "out of range"),
    ([3, 15], IndexError, r"\[15\]"),
    ([], InvalidInputError, "metric_positions is empty"),
    ([1.5], TypeError, "list of int positions"),
    ("last", TypeError, "list of int positions"),
])
def test_bad_metric_positions_raise_before_any_forward(tiny_model, data, positions, error, match):
    clean, corrupted, clean_cache, _ = data
    with count_forwards(tiny_model) as forwards:
        with pytest.raises(error, match=match):
            patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache, last_logit_diff,
                                             metric_positions=positions, progress=False)
        with pytest.raises(error, match=match):
            head_ablation(tiny_model, corrupted, last_logit_diff, metric_positions=positions, progress=False)
        with pytest.raises(error, match=match):
            attribution_patching(tiny_model, clean, corrupted, last_logit_diff, metric_positions=positions)
    assert forwards == []


def test_one_int_metric_position_is_a_list_of_one(tiny_model, data):
    _, corrupted, clean_cache, _ = data
    one = patching.get_act_patch_mlp_out(tiny_model, corrupted, clean_cache, last_logit_diff, metric_positions=-1,
                                         progress=False)
    listed = patching.get_act_patch_mlp_out(tiny_model, corrupted, clean_cache, last_logit_diff,
                                            metric_positions=[-1], progress=False)
    assert torch.equal(one, listed)


# -- interrupted sweeps keep their finished work ------------------------------------------------------------------
class CountingMetric:
    """`last_logit_diff`, counting its calls; raises `error` from call number `fail_at` (1-based) on, when given
    (every time: an error vmap raised once would be retried per variant, as for a metric vmap cannot run)."""

    def __init__(self, fail_at=None, error=KeyboardInterrupt):
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def __call__(self, logits):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.error()
        return last_logit_diff(logits)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_sweep_keeps_the_finished_patches(tiny_model, data, error):
    """Interrupted after 10 of 30 patches: the same exception type, carrying the 10 results (equal to the full
    sweep's) and NaN for the other 20; no hook is left on the model."""
    _, corrupted, clean_cache, _ = data
    kwargs = dict(memory_budget=1, progress=False)  # one patch per chunk
    counting = CountingMetric()
    full = patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache, counting, **kwargs)
    checks = counting.calls - 30  # the metric's calls before the first patch (the once-per-sweep check)
    assert checks >= 1

    with pytest.raises(error) as info:
        patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache,
                                         CountingMetric(fail_at=checks + 11, error=error), **kwargs)
    partial, done = info.value.partial_result, info.value.done
    assert partial.shape == done.shape == (2, SEQ_LEN) and done.dtype == torch.bool
    assert int(done.sum()) == 10
    torch.testing.assert_close(partial[done], full[done], **tolerance())
    assert partial[~done].isnan().all()
    assert any("partial_result" in note for note in info.value.__notes__)
    assert no_hooks_left(tiny_model)
    # and the model runs the next sweep as before
    assert torch.equal(patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache, last_logit_diff,
                                                        **kwargs), full)


def test_interrupted_head_ablation_is_shaped_layer_by_head(tiny_model, data):
    _, corrupted, _, _ = data
    counting = CountingMetric()
    full = head_ablation(tiny_model, corrupted, counting, memory_budget=1, progress=False)
    checks = counting.calls - full.numel()
    with pytest.raises(KeyboardInterrupt) as info:
        head_ablation(tiny_model, corrupted, CountingMetric(fail_at=checks + 6), memory_budget=1, progress=False)
    partial, done = info.value.partial_result, info.value.done
    assert partial.shape == done.shape == full.shape == (2, 4) and int(done.sum()) == 5
    torch.testing.assert_close(partial[done], full[done], **tolerance())
    assert partial[~done].isnan().all() and no_hooks_left(tiny_model)


def test_interrupted_stack_of_sweeps_keeps_the_finished_ones(tiny_model, data):
    """get_act_patch_block_every interrupted in its second sweep: the first whole, the second partly, the third
    not started; get_act_patch_attn_head_by_pos_every interrupted in its (transposed) pattern sweep."""
    _, corrupted, clean_cache, _ = data
    counting = CountingMetric()
    full = patching.get_act_patch_block_every(tiny_model, corrupted, clean_cache, counting, memory_budget=1,
                                              progress=False)
    per_sweep = counting.calls // 3
    with pytest.raises(KeyboardInterrupt) as info:
        patching.get_act_patch_block_every(tiny_model, corrupted, clean_cache,
                                           CountingMetric(fail_at=per_sweep + per_sweep // 2), memory_budget=1,
                                           progress=False)
    partial, done = info.value.partial_result, info.value.done
    assert partial.shape == done.shape == full.shape == (3, 2, SEQ_LEN)
    assert done[0].all() and 0 < int(done[1].sum()) < done[1].numel() and not done[2].any()
    torch.testing.assert_close(partial[done], full[done], **tolerance())
    assert partial[~done].isnan().all()

    short = corrupted[:, :4]
    _, short_cache = tiny_model.run_with_cache(data[0][:, :4])
    counting = CountingMetric()
    full = patching.get_act_patch_attn_head_by_pos_every(tiny_model, short, short_cache, counting, memory_budget=1,
                                                         progress=False)
    per_sweep = counting.calls // 5
    with pytest.raises(KeyboardInterrupt) as info:
        patching.get_act_patch_attn_head_by_pos_every(tiny_model, short, short_cache,
                                                      CountingMetric(fail_at=4 * per_sweep + 9), memory_budget=1,
                                                      progress=False)
    partial, done = info.value.partial_result, info.value.done
    assert partial.shape == done.shape == full.shape == (5, 2, 4, 4)
    assert done[:4].all() and 0 < int(done[4].sum()) < done[4].numel()
    torch.testing.assert_close(partial[done], full[done], **tolerance())
    assert partial[~done].isnan().all() and no_hooks_left(tiny_model)


# -- metrics of the wrong kind ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    (lambda logits: None, TypeError, "must return a scalar tensor.*NoneType"),
    (lambda logits: "0.5", TypeError, "must return a scalar tensor.*str"),
    (lambda logits: logits[:, -1, :2].mean(0), ValueError, "one number per run"),
])
def test_sweep_metric_of_the_wrong_kind_raises(tiny_model, data, bad, error, match):
    _, corrupted, clean_cache, _ = data
    with pytest.raises(error, match=match):
        patching.get_act_patch_resid_pre(tiny_model, corrupted, clean_cache, bad, progress=False)
    with pytest.raises(error, match=match):
        head_ablation(tiny_model, corrupted, bad, progress=False)
    assert no_hooks_left(tiny_model)


def test_sweep_metric_returning_a_python_number_still_works(tiny_model, data):
    _, corrupted, clean_cache, _ = data
    values = patching.get_act_patch_attn_out(tiny_model, corrupted, clean_cache,
                                             lambda logits: float(last_logit_diff(logits)), progress=False)
    torch.testing.assert_close(values, patching.get_act_patch_attn_out(tiny_model, corrupted, clean_cache,
                                                                        last_logit_diff, progress=False),
                               **tolerance())


@pytest.mark.parametrize("bad, error, match", [
    (lambda logits: float(last_logit_diff(logits)), TypeError, "differentiable torch ops.*float"),
    (lambda logits: last_logit_diff(logits).detach(), InvalidInputError, "does not require grad"),
    (lambda logits: (logits[:, -1].argmax(-1) == 3).float().mean(), InvalidInputError, "does not require grad"),
    (lambda logits: logits[:, -1, 3], ValueError, r"\(a scalar\).*shape \(2,\)"),
])
def test_attribution_metric_must_be_a_differentiable_scalar(tiny_model, data, bad, error, match):
    clean, corrupted, _, _ = data
    with pytest.raises(error, match=match):
        attribution_patching(tiny_model, clean.expand(2, -1), corrupted.expand(2, -1), bad)
    assert no_hooks_left(tiny_model)


def test_attribution_float_metric_raises_before_the_backward_pass(tiny_model, data):
    clean, corrupted, _, _ = data
    with count_forwards(tiny_model) as forwards:
        with pytest.raises(TypeError, match="metric"):
            attribution_patching(tiny_model, clean, corrupted, lambda logits: 1.0)
    assert len(forwards) == 1  # the clean run only


# -- integrated gradients' arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layer=2), IndexError, r"layer \[2\] is out of range for a model of 2 layers"),
    (dict(layer=[0, -3]), IndexError, r"layer \[-3\]"),
    (dict(layer=[]), InvalidInputError, "layer is empty"),
    (dict(layer=0.5), TypeError, "layer must be None, an int"),
    (dict(position=SEQ_LEN), IndexError, "position 15 is out of range for prompts of 15 tokens"),
    (dict(position=-SEQ_LEN - 1), IndexError, "position -16"),
    (dict(steps=0), InvalidInputError, "steps must be >= 1"),
    (dict(steps=-4), InvalidInputError, "steps must be >= 1"),
    (dict(target_token=97), IndexError, "vocabulary of 97"),
    (dict(target_token=-1), IndexError, "out of range"),
    (dict(target_token=3.0), TypeError, "target_token must be an int"),
])
def test_integrated_gradients_arguments_do_not_wrap(tiny_model, data, kwargs, error, match):
    _, corrupted, _, _ = data
    kwargs = {"target_token": 3, **kwargs}
    with count_forwards(tiny_model) as forwards:
        with pytest.raises(error, match=match):
            neuron_integrated_gradients(tiny_model, corrupted, steps=kwargs.pop("steps", 2), **kwargs)
    assert forwards == [] and no_hooks_left(tiny_model)


def test_integrated_gradients_negative_layer_and_position_count_from_the_end(tiny_model, data):
    _, corrupted, _, _ = data
    negative = neuron_integrated_gradients(tiny_model, corrupted, 3, layer=-1, position=-2, steps=2)
    positive = neuron_integrated_gradients(tiny_model, corrupted, 3, layer=1, position=SEQ_LEN - 2, steps=2)
    assert torch.equal(negative, positive) and negative[1].abs().sum() > 0 and negative[0].abs().sum() == 0


# -- tokens of the wrong shape or type ----------------------------------------------------------------------------
def _every_sweep(model, data, tokens):
    """Each sweep entry point, called with `tokens` as its (corrupted) tokens."""
    clean, _, clean_cache, _ = data
    return [
        lambda: patching.get_act_patch_resid_pre(model, tokens, clean_cache, last_logit_diff, progress=False),
        lambda: head_ablation(model, tokens, last_logit_diff, progress=False),
        lambda: attribution_patching(model, clean, tokens, last_logit_diff),
        lambda: exact_top_entries(model, clean, tokens, last_logit_diff, {"resid_pre": torch.ones(2, SEQ_LEN)}),
        lambda: neuron_integrated_gradients(model, tokens, 3, steps=2),
        lambda: path_patch(model, clean, tokens, [(0, 0)], [("blocks.1.attn.hook_v", 0)], last_logit_diff),
        lambda: path_patch_senders(model, clean, tokens, [("blocks.1.attn.hook_v", 0)], last_logit_diff),
    ]


@pytest.mark.parametrize("make_tokens, error, match", [
    (lambda t: t[None], InvalidInputError, r"token ids \[batch, pos\].*shape \(1, 1, 15\)"),
    (lambda t: t.float(), TypeError, "integer token ids"),
    (lambda t: t[:, :0], InvalidInputError, "is empty"),
    (lambda t: t.tolist(), TypeError, "must be a tensor of token ids"),
])
def test_every_sweep_checks_its_tokens_before_any_forward(tiny_model, data, make_tokens, error, match):
    tokens = make_tokens(data[1])
    for call in _every_sweep(tiny_model, data, tokens):
        with count_forwards(tiny_model) as forwards:
            with pytest.raises(error, match=match):
                call()
        assert forwards == []
    assert no_hooks_left(tiny_model)


def test_small_integer_token_dtypes_are_token_ids(tiny_model, data):
    """int8 / uint8 ids (uint8 would index as a boolean mask) sweep like int64 ones."""
    _, corrupted, clean_cache, _ = data
    expected = patching.get_act_patch_mlp_out(tiny_model, corrupted, clean_cache, last_logit_diff, progress=False)
    for dtype in (torch.uint8, torch.int8, torch.int32):
        got = patching.get_act_patch_mlp_out(tiny_model, corrupted.to(dtype), clean_cache, last_logit_diff,
                                             progress=False)
        assert torch.equal(got, expected), dtype
