"""The packed sweep forward (hooklens.sweep_engine) against one forward per patch, its op count, and memory
handling (budget chunking, out-of-memory retry)."""
from __future__ import annotations

import logging

import pytest
import torch
from tolerances import tolerance
from torch.utils._python_dispatch import TorchDispatchMode

import hooklens.sweeps as sweeps
from hooklens.sweeps import index_mask, index_sweep, run_sweep
from hooklens.utils import get_act_name

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

# activation, index axes of the activation (without batch), the index columns' ranges: "pos", "head" or "pos_k"
CASES = {
    "resid_pre": ("resid_pre", (0,), ("pos",)),
    "resid_mid": ("resid_mid", (0,), ("pos",)),
    "resid_post": ("resid_post", (0,), ("pos",)),
    "attn_out": ("attn_out", (0,), ("pos",)),
    "mlp_out": ("mlp_out", (0,), ("pos",)),
    "pre": ("pre", (0,), ("pos",)),
    "post": ("post", (0,), ("pos",)),
    "z_by_pos": ("z", (0, 1), ("pos", "head")),
    "q_by_pos": ("q", (0, 1), ("pos", "head")),
    "k_by_pos": ("k", (0, 1), ("pos", "head")),
    "v_by_pos": ("v", (0, 1), ("pos", "head")),
    "z_all_pos": ("z", (1,), ("head",)),
    "k_all_pos": ("k", (1,), ("head",)),
    "pattern_all_pos": ("pattern", (0,), ("head",)),
    "pattern_by_dest": ("pattern", (0, 1), ("head", "pos")),
    "pattern_dest_src": ("pattern", (0, 1, 2), ("head", "pos", "pos_k")),
    "scores_by_dest": ("attn_scores", (0, 1), ("head", "pos")),
}


@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_model

    return make_tiny_model(n_layers=3).eval()


def make_prompts(model, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, length), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, length), generator=g)
    _, cache = model.run_with_cache(clean)
    return corrupted, cache


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


def grid(model, ranges, length, layers=None):
    sizes = {"pos": length, "head": model.cfg.n_heads, "pos_k": length}
    layers = range(model.cfg.n_layers) if layers is None else layers
    axes = [torch.tensor(list(layers))] + [torch.arange(sizes[r]) for r in ranges]
    return torch.cartesian_prod(*axes).view(-1, len(axes))


def naive(model, corrupted, cache, metric, activation, indices, axes):
    """One full forward per patch: the hook takes the clean activation where `index_mask` says."""
    out = []
    for index in indices:
        name = get_act_name(activation, int(index[0]))
        clean = cache[name]

        def hook(act, hook, index=index, clean=clean):
            mask = index_mask(index[None], tuple(act.shape[1:]), axes)[0]
            return torch.where(mask, clean, act)

        out.append(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])))
    return torch.stack(out).float()


def sweep_values(model, corrupted, cache, metric, activation, indices, axes, **kwargs):
    sweep = index_sweep(model, activation, indices, axes)
    return run_sweep(model, corrupted, cache, metric, sweep, progress=False, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch, length", [(1, 7), (3, 4), (2, 1)])
def test_packed_forward_equals_one_forward_per_patch(model, case, batch, length):
    """Every hook point the packed forward patches, odd / one-token lengths, batches: equal to the loop, with the
    metric reading the last position (only it computed), several positions, or all of them."""
    activation, axes, ranges = CASES[case]
    corrupted, cache = make_prompts(model, batch, length)
    indices = grid(model, ranges, length)
    assert sweeps.packed_kind(model, activation, 0) is not None
    expected = naive(model, corrupted, cache, metric, activation, indices, axes)
    for positions in (None, [-1], [0, -1] if length > 1 else [0]):
        def reads(logits):  # the metric also reads position 0 when it is given [0, -1]
            extra = logits[:, 0, 7].mean() if positions is not None and 0 in positions else 0.0
            return metric(logits) + extra
        reference = expected if positions is None or 0 not in positions else \
            naive(model, corrupted, cache, reads, activation, indices, axes)
        for budget in (None, 1):  # every variant in one chunk; one per chunk
            actual = sweep_values(model, corrupted, cache, reads, activation, indices, axes,
                                  metric_positions=positions, memory_budget=budget)
            torch.testing.assert_close(actual, reference, **tolerance())


def test_packed_equals_hook_based_path_on_mixed_layers_and_orders(model):
    """Unsorted indices of mixed layers and starts, chunks of 5 (a chunk spans layers): the packed forward equals
    the hook-based path (and the loop) in the caller's order."""
    corrupted, cache = make_prompts(model, 2, 6, seed=1)
    indices = grid(model, ("pos", "head"), 6)
    indices = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))]
    per_variant = sweeps._variant_bytes(model, 2, 6, 1, 6 * model.cfg.d_model)
    packed = sweep_values(model, corrupted, cache, metric, "z", indices, (0, 1), metric_positions=[-1],
                          memory_budget=5 * per_variant)
    hooked = sweep_values(model, corrupted, cache, metric, "z", indices, (0, 1), metric_positions=[-1],
                          packed=False)
    torch.testing.assert_close(packed, hooked, **tolerance())
    torch.testing.assert_close(packed[:20], naive(model, corrupted, cache, metric, "z", indices[:20], (0, 1)),
                               **tolerance())


def test_left_padded_prompts_on_the_packed_path(tmp_path_factory):
    from conftest import save_hf_gpt2

    from hooklens import HookedTransformer

    directory = save_hf_gpt2(tmp_path_factory.mktemp("left") / "m", seed=3, n_layer=2, n_embd=32, n_head=2,
                             n_positions=64)
    left = HookedTransformer.from_pretrained(directory, default_padding_side="left")
    clean = left.to_tokens(["When John and Mary went to the shops, John gave", "Then Mary gave"])
    corrupted = left.to_tokens(["When John and Mary went to the shops, Mary gave", "Then John gave"])
    assert (corrupted == left.tokenizer.pad_token_id).any()
    _, cache = left.run_with_cache(clean)

    def naive_masked(activation, indices, axes):
        out = []
        for index in indices:
            name = get_act_name(activation, int(index[0]))

            def hook(act, hook, index=index, clean=cache[name]):
                return torch.where(index_mask(index[None], tuple(act.shape[1:]), axes)[0], clean, act)

            logits = left.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])
            out.append(logits[:, -1, 1000].mean())
        return torch.stack(out)

    def last(logits):
        return logits[:, -1, 1000].mean()

    length = corrupted.shape[1]
    for activation, axes, ranges in (CASES["resid_pre"], CASES["mlp_out"], CASES["pattern_by_dest"],
                                     CASES["z_all_pos"]):
        indices = grid(left, ranges, length)
        expected = naive_masked(activation, indices, axes)
        for positions in (None, [-1]):
            actual = sweep_values(left, corrupted, cache, last, activation, indices, axes, metric_positions=positions)
            torch.testing.assert_close(actual, expected, **tolerance())


# -- the op count: a fixed number of ops per block and chunk, none per variant ------------------------------------
class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, corrupted, cache, activation, indices, axes, **kwargs):
    """Ops of the sweep's second run: the first also allocates its chunk structures' static buffers (once per
    structure, see hooklens.sweep_graphs)."""
    sweep = index_sweep(model, activation, indices, axes)
    run_sweep(model, corrupted, cache, metric, sweep, metric_positions=[-1], progress=False, **kwargs)
    with CountOps() as counter:
        run_sweep(model, corrupted, cache, metric, sweep, metric_positions=[-1], progress=False, **kwargs)
    return counter.count


@pytest.mark.parametrize("activation, axes, ranges", [CASES["resid_pre"], CASES["z_by_pos"], CASES["pattern_all_pos"]])
def test_op_count_grows_with_layers_and_chunks_not_variants(model, activation, axes, ranges):
    """The dispatched ATen ops of a whole sweep (checks, corrupted run, plan, packed forward, logits, vmapped
    metric): the same for 8 or 16 patched positions (4x the variants at 4 vs 16 positions per layer), more with
    more layers or more chunks."""
    length = 16
    corrupted, cache = make_prompts(model, 2, length)
    full = grid(model, ranges, length)
    few = full[full[:, 1] < 4] if ranges[0] == "pos" else full[full[:, 1] < 2]  # a quarter / half of the variants
    assert len(few) < len(full)
    act_numel = cache[get_act_name(activation, 0)][0].numel()
    per_variant = sweeps._variant_bytes(model, 2, length, 1, act_numel)
    ops_few = count_ops(model, corrupted, cache, activation, few, axes)
    ops_full = count_ops(model, corrupted, cache, activation, full, axes)
    assert ops_few == ops_full, (ops_few, ops_full)
    one_layer = full[full[:, 0] == model.cfg.n_layers - 1]
    assert count_ops(model, corrupted, cache, activation, one_layer, axes) < ops_full
    # Two chunks (one per layer of layers 1 and 2) instead of one: more ops; and the same for the smaller sweep.
    def two_chunks(indices):
        indices = indices[indices[:, 0] > 0]
        per_layer = len(indices) // 2
        return count_ops(model, corrupted, cache, activation, indices, axes, memory_budget=per_layer * per_variant)

    later = full[full[:, 0] > 0]
    assert two_chunks(full) > count_ops(model, corrupted, cache, activation, later, axes)
    assert two_chunks(few) == two_chunks(full)


# -- memory ---------------------------------------------------------------------------------------------------------
def test_default_memory_budget_is_bounded():
    budget = sweeps.default_memory_budget(torch.device("cpu"))
    assert 64 * 1024**2 <= budget <= sweeps.CPU_BUDGET_CAP


def test_out_of_memory_retries_smaller_chunks(model, monkeypatch, caplog):
    """A chunk of more than 3 variants raises torch.OutOfMemoryError (twice): retried as halves, logged once,
    the results equal the unconstrained run's; finished chunks are not rerun."""
    corrupted, cache = make_prompts(model, 2, 9)
    indices = grid(model, ("pos",), 9)
    expected = sweep_values(model, corrupted, cache, metric, "resid_pre", indices, (0,), metric_positions=[-1])
    forward, sizes, failures = sweeps.packed_forward, [], []

    def flaky(model_, plan, *args):
        if plan.n > 3 and len(failures) < 2:
            failures.append(plan.n)
            raise torch.OutOfMemoryError("simulated")
        sizes.append(plan.n)
        return forward(model_, plan, *args)

    monkeypatch.setattr(sweeps, "packed_forward", flaky)
    with caplog.at_level(logging.WARNING, logger="hooklens.sweeps"):
        actual = sweep_values(model, corrupted, cache, metric, "resid_pre", indices, (0,), metric_positions=[-1])
    torch.testing.assert_close(actual, expected, **tolerance())
    assert failures == [27, 14] and max(sizes) <= 7 and sum(sizes) == 27
    assert caplog.text.count("Out of memory") == 1


def test_out_of_memory_of_one_variant_keeps_finished_work(model, monkeypatch):
    corrupted, cache = make_prompts(model, 1, 5)
    indices = grid(model, ("pos",), 5)
    forward, calls = sweeps.packed_forward, []

    def fails_later(model_, plan, *args):
        calls.append(plan.n)
        if len(calls) > 2:
            raise torch.OutOfMemoryError("simulated")
        return forward(model_, plan, *args)

    monkeypatch.setattr(sweeps, "packed_forward", fails_later)
    with pytest.raises(torch.OutOfMemoryError) as info:
        sweep_values(model, corrupted, cache, metric, "resid_pre", indices, (0,), memory_budget=1)
    assert int(info.value.done.sum()) == 2 and info.value.partial_result[~info.value.done].isnan().all()


def test_tiny_budget_equals_unconstrained(model):
    corrupted, cache = make_prompts(model, 2, 6)
    indices = grid(model, ("head",), 6)
    free = sweep_values(model, corrupted, cache, metric, "v", indices, (1,))
    for budget in (1, 3 * sweeps._variant_bytes(model, 2, 6, 6, 6 * model.cfg.d_model)):
        torch.testing.assert_close(sweep_values(model, corrupted, cache, metric, "v", indices, (1,),
                                                memory_budget=budget), free, **tolerance())


# -- static buffers and CUDA graphs (hooklens.sweep_graphs) ---------------------------------------------------------
def test_static_buffers_take_each_runs_values(model):
    """The same chunk structure on other prompts, another clean cache and edited weights: each run equals the loop
    (no stale static buffer, plan or weights; an in-place weight edit drops the model's entries)."""
    from hooklens.sweep_graphs import cached_entries

    indices = grid(model, ("pos", "head"), 5)
    for seed in (0, 1):
        corrupted, cache = make_prompts(model, 2, 5, seed=seed)
        actual = sweep_values(model, corrupted, cache, metric, "z", indices, (0, 1), metric_positions=[-1],
                              capture=False)
        torch.testing.assert_close(actual, naive(model, corrupted, cache, metric, "z", indices, (0, 1)),
                                   **tolerance())
    entries = cached_entries(model)
    assert entries and max(entry.runs for entry in entries.values()) >= 2
    weight = model.blocks[1].mlp.W_in
    original = weight.clone()
    try:
        weight.mul_(1.5)
        actual = sweep_values(model, corrupted, cache, metric, "z", indices, (0, 1), metric_positions=[-1],
                              capture=False)
        assert all(entry.runs == 1 for entry in cached_entries(model).values())
        torch.testing.assert_close(actual, naive(model, corrupted, cache, metric, "z", indices, (0, 1)),
                                   **tolerance())
    finally:
        weight.copy_(original)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA twin of the static-buffer test: graph capture")
@pytest.mark.parametrize("case", ["resid_pre", "z_all_pos", "mlp_out", "pattern_by_dest"])
def test_cuda_graph_replay_equals_eager(case):
    """On CUDA: the second run of a structure is captured and replayed from then on; every run, on other prompts
    each time, equals the eager static-buffer path and the loop."""
    from conftest import make_tiny_model

    from hooklens.sweep_graphs import cached_entries

    cuda_model = make_tiny_model(n_layers=3, device="cuda").eval()
    activation, axes, ranges = CASES[case]
    indices = grid(cuda_model, ranges, 6)
    for seed in range(3):
        corrupted, cache = make_prompts(cuda_model, 2, 6, seed=seed)
        graphed = sweep_values(cuda_model, corrupted, cache, metric, activation, indices, axes,
                               metric_positions=[-1], capture=True)
        eager = sweep_values(cuda_model, corrupted, cache, metric, activation, indices, axes,
                             metric_positions=[-1], capture=False)
        torch.testing.assert_close(graphed, eager, **tolerance())
        torch.testing.assert_close(graphed, naive(cuda_model, corrupted, cache, metric, activation, indices, axes),
                                   **tolerance("fused_vs_eager"))
    captured = [entry.graph is not None for entry in cached_entries(cuda_model).values()]
    assert any(captured) == (activation not in ("pattern", "attn_scores"))


@pytest.mark.parametrize("case", ["pattern_by_dest", "pattern_dest_src", "scores_by_dest", "z_by_pos"])
def test_mask_sweeps_equal_index_sweeps(model, case):
    """A sweep given only masks (no axes: patterns patched by mask, not by index_patch_) equals the index sweep."""
    from dataclasses import replace

    activation, axes, ranges = CASES[case]
    corrupted, cache = make_prompts(model, 2, 5)
    indices = grid(model, ranges, 5)
    by_index = index_sweep(model, activation, indices, axes)
    by_mask = replace(by_index, axes=None)
    for positions in (None, [2]):
        expected = run_sweep(model, corrupted, cache, metric if positions is None else
                             (lambda logits: logits[:, 2, 3].mean()), by_index, metric_positions=positions,
                             progress=False)
        actual = run_sweep(model, corrupted, cache, metric if positions is None else
                           (lambda logits: logits[:, 2, 3].mean()), by_mask, metric_positions=positions,
                           progress=False)
        torch.testing.assert_close(actual, expected, **tolerance())


@pytest.mark.parametrize("overrides", [dict(attn_only=True), dict(normalization_type="LNPre"),
                                       dict(normalization_type=None), dict(act_fn="solu_ln", d_mlp=40),
                                       dict(use_attn_result=True, act_fn="relu")])
def test_packed_forward_on_config_variants(overrides):
    from conftest import make_tiny_model

    variant = make_tiny_model(**overrides).eval()
    corrupted, cache = make_prompts(variant, 2, 5)
    for activation, axes, ranges in (CASES["resid_pre"], CASES["z_by_pos"], CASES["resid_post"]):
        assert sweeps.packed_kind(variant, activation, 0) is not None
        indices = grid(variant, ranges, 5)
        torch.testing.assert_close(
            sweep_values(variant, corrupted, cache, metric, activation, indices, axes, metric_positions=[-1]),
            naive(variant, corrupted, cache, metric, activation, indices, axes), **tolerance())


def test_models_the_packed_forward_does_not_cover_run_on_the_hook_based_path():
    """Split q/k/v inputs: the hook-based path (its own exactness is tests/test_patching.py's), equal to the loop."""
    from conftest import make_tiny_model

    split = make_tiny_model(use_split_qkv_input=True).eval()
    assert sweeps.packed_kind(split, "resid_pre", 0) is None
    corrupted, cache = make_prompts(split, 2, 4)
    for activation, axes, ranges in (CASES["resid_pre"], CASES["z_all_pos"]):
        indices = grid(split, ranges, 4)
        torch.testing.assert_close(sweep_values(split, corrupted, cache, metric, activation, indices, axes),
                                   naive(split, corrupted, cache, metric, activation, indices, axes), **tolerance())


def test_one_layer_one_clean_prompt_and_a_metric_at_position_zero():
    """One block (first block = last block), one clean prompt for three corrupted ones (TL broadcasts it), and a
    metric at position 0, where every variant starting later has no live token (its corrupted logits)."""
    from conftest import make_tiny_model

    one = make_tiny_model(n_layers=1).eval()
    corrupted, cache = make_prompts(one, 3, 6)
    single = {name: value[:1] for name, value in cache.items()}
    broadcast = {name: value.expand(3, *value.shape[1:]) for name, value in single.items()}

    def first(logits):
        return logits[:, 0, 3].mean()

    for activation, axes, ranges in (CASES["resid_pre"], CASES["pattern_dest_src"], CASES["k_by_pos"]):
        indices = grid(one, ranges, 6)
        for fn, positions in ((first, [0]), (metric, [-1]), (first, None)):
            torch.testing.assert_close(
                sweep_values(one, corrupted, single, fn, activation, indices, axes, metric_positions=positions),
                naive(one, corrupted, broadcast, fn, activation, indices, axes), **tolerance())


def test_sweeps_of_one_shape_on_other_axes_do_not_share_a_plan(model):
    """Two pattern sweeps of one chunk structure (index tensors of one shape, every start 0) on different axes,
    each head whole and each key position whole: the second must not run with the first's axes from the static
    buffers."""
    corrupted, cache = make_prompts(model, 1, 4)
    indices = grid(model, ("head",), 4)  # coordinates 0..3: valid heads and key positions alike
    for axes in ((0,), (2,)):
        actual = sweep_values(model, corrupted, cache, metric, "pattern", indices, axes, capture=False)
        torch.testing.assert_close(actual, naive(model, corrupted, cache, metric, "pattern", indices, axes),
                                   **tolerance())


# -- the metric's logits buffer: a few variants per call on CPU ----------------------------------------------------
@pytest.mark.parametrize("variants_per_call", [1, 3])
def test_metric_on_a_reused_buffer_equals_one_call_per_chunk(model, monkeypatch, variants_per_call):
    """A small METRIC_BUFFER_BYTES makes the packed path run the metric on `variants_per_call` variants at a time
    (an uneven last call too), on one reused NaN buffer: the values equal one call per chunk and the naive loop,
    the metric still sees NaN at every position it does not read, and a metric that writes into its logits does
    not leak into the next call's variants."""
    length = 5
    corrupted, cache = make_prompts(model, 2, length)
    indices = grid(model, ("pos",), length)  # 15 variants: starts before and at the metric's position
    whole = sweep_values(model, corrupted, cache, metric, "resid_pre", indices, (0,), metric_positions=[2, -1])

    def nan_checking(logits):
        # 1 where the unread positions are all NaN and the read ones finite (0 on check_metric's full logits).
        return (logits[:, [0, 1, 3]].isnan().all() & logits[:, [2, 4]].isfinite().all()).float()

    def writing(logits):
        value = metric(logits)
        logits.zero_()  # a metric mutating its input: the next call must see NaN again
        return value

    variant_bytes = 2 * length * model.cfg.d_vocab * 4  # [b, p, v] float32 logits of one variant
    monkeypatch.setattr(sweeps, "METRIC_BUFFER_BYTES", variants_per_call * variant_bytes)
    small = sweep_values(model, corrupted, cache, metric, "resid_pre", indices, (0,), metric_positions=[2, -1])
    assert torch.equal(small, whole)
    torch.testing.assert_close(small, naive(model, corrupted, cache, metric, "resid_pre", indices, (0,)),
                               **tolerance())
    flags = sweep_values(model, corrupted, cache, nan_checking, "resid_pre", indices, (0,), metric_positions=[2, -1])
    assert torch.equal(flags, torch.ones(len(indices))), flags
    torch.testing.assert_close(sweep_values(model, corrupted, cache, writing, "resid_pre", indices, (0,),
                                            metric_positions=[2, -1]), whole, rtol=0, atol=0)
