"""Opt-in lower-precision sweeps (hooklens.sweep_precision): the default stays exact, bf16 / fp16 sweeps are as
accurate as the same computation done naively (one forward per patch) in that precision, the model is never
touched, the TF32 flag is restored, bad requests are refused before any forward."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import requires_cuda

import hooklens.patching as patching
import hooklens.sweep_precision as sweep_precision
from hooklens.ablation import head_ablation
from hooklens.embedded import load_embedded
from hooklens.sweep_precision import SweepPrecision
from hooklens.utils import get_act_name

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

IOI = ("When John and Mary went to the shops, John gave the bag to",
       "When John and Mary went to the shops, Mary gave the bag to")

# function -> (activation name, setter): what the naive loop patches, exactly as TransformerLens does.
SWEEPS = {
    "get_act_patch_resid_pre": ("resid_pre", patching.layer_pos_patch_setter),
    "get_act_patch_mlp_out": ("mlp_out", patching.layer_pos_patch_setter),
    "get_act_patch_attn_head_out_all_pos": ("z", patching.layer_head_vector_patch_setter),
    "get_act_patch_attn_head_pattern_all_pos": ("pattern", patching.layer_head_pattern_patch_setter),
}


@pytest.fixture(scope="module")
def model():
    # The trained embedded model, not a random one: a random model's patch effects sit below bf16's resolution of
    # its logits, so comparing errors there compares single rounding flips; here patches move the metric.
    return load_embedded().eval()


@pytest.fixture(scope="module", params=["ioi", "repeated"])
def setup(request, model):
    if request.param == "ioi":
        clean, corrupted = model.to_tokens(list(IOI)).split(1)
        answer, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")

        def metric(logits):
            return logits[:, -1, answer].mean() - logits[:, -1, wrong].mean()

        return corrupted, model.run_with_cache(clean)[1], metric
    # induction: the clean prompt repeats its random first half, the corrupted one continues with other tokens; the
    # metric is the mean logit of the repeated token at the second half's positions
    g = torch.Generator().manual_seed(0)
    first, other = torch.randint(1000, 20000, (2, 2, 6), generator=g)
    bos = torch.full((2, 1), model.tokenizer.bos_token_id)
    clean, corrupted = torch.cat([bos, first, first], dim=1), torch.cat([bos, first, other], dim=1)  # [2, 13]
    positions = torch.arange(7, 12)
    targets = clean[:, positions + 1]  # [2, 5]: what each position predicts in the clean prompt

    def metric(logits):
        return logits.index_select(1, positions).gather(-1, targets.unsqueeze(-1)).mean()

    return corrupted, model.run_with_cache(clean)[1], metric


def naive_sweep(model, corrupted, clean_cache, metric, activation, setter, shape):
    """TransformerLens's loop: one full forward per patch, the setter applied to the activation."""
    indices = torch.cartesian_prod(*[torch.arange(s) for s in shape]).view(-1, len(shape)).tolist()
    out = torch.empty(len(indices))
    for i, index in enumerate(indices):
        name = get_act_name(activation, index[0])

        def hook(act, hook, index=index, clean=clean_cache[name]):
            return setter(act.clone(), index, clean)

        out[i] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])).float()
    return out.view(shape)


def sweep(fn_name, model, setup, **kwargs):
    corrupted, clean_cache, metric = setup
    return getattr(patching, fn_name)(model, corrupted, clean_cache, metric, progress=False, **kwargs)


def params_snapshot(model):
    return [(name, p, p.data_ptr(), p._version, p.detach().clone()) for name, p in model.named_parameters()]


def assert_untouched(model, snapshot):
    now = dict(model.named_parameters())
    assert list(now) == [name for name, *_ in snapshot]
    for name, p, ptr, version, values in snapshot:
        assert now[name] is p, name
        assert p.dtype == values.dtype and p.data_ptr() == ptr and p._version == version, name
        assert torch.equal(p, values), name
    assert not torch.is_autocast_enabled("cpu")


# -- the default stays exact ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn_name", ["get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"])
def test_default_precision_is_bitwise_the_float32_sweep(model, setup, fn_name, monkeypatch):
    plain = sweep(fn_name, model, setup)

    def no_autocast(*args, **kwargs):
        raise AssertionError("the default sweep must not enter an autocast region")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    assert torch.equal(sweep(fn_name, model, setup, dtype=None), plain)
    assert torch.equal(sweep(fn_name, model, setup, dtype=torch.float32), plain)
    # TF32 is a CUDA format: on the CPU allow_tf32 changes nothing.
    assert torch.equal(sweep(fn_name, model, setup, dtype=torch.float32, allow_tf32=True), plain)
    assert SweepPrecision(model).is_default and SweepPrecision(model, torch.float32, True).is_default


# -- lower precision: as accurate as the naive loop in that precision ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn_name", list(SWEEPS))
def test_low_precision_sweep_is_as_accurate_as_the_naive_loop(model, setup, fn_name, dtype):
    corrupted, clean_cache, metric = setup
    activation, setter = SWEEPS[fn_name]
    exact = sweep(fn_name, model, setup)
    shape = tuple(exact.shape)
    with torch.autocast("cpu", dtype):
        naive = naive_sweep(model, corrupted, clean_cache, metric, activation, setter, shape)
    ours = sweep(fn_name, model, setup, dtype=dtype)
    assert ours.dtype == torch.float32 and ours.shape == exact.shape
    assert torch.isfinite(ours).all()
    naive_error = (naive - exact).abs().max()
    our_error = (ours - exact).abs().max()
    assert naive_error > 0, "the naive loop must really have run in lower precision"
    assert our_error <= 2 * naive_error, (our_error, naive_error)
    assert not torch.equal(ours, exact), "the sweep must really have run in lower precision"


def test_stacked_sweeps_pass_the_precision_on(model, setup):
    corrupted, clean_cache, metric = setup
    every = patching.get_act_patch_block_every(model, corrupted, clean_cache, metric, progress=False,
                                               dtype=torch.bfloat16)
    parts = [sweep(fn, model, setup, dtype=torch.bfloat16) for fn in
             ("get_act_patch_resid_pre", "get_act_patch_attn_out", "get_act_patch_mlp_out")]
    assert torch.equal(every, torch.stack(parts))
    assert not torch.equal(every, patching.get_act_patch_block_every(model, corrupted, clean_cache, metric,
                                                                     progress=False))


def test_low_precision_head_ablation(model, setup):
    corrupted, _, metric = setup
    exact = head_ablation(model, corrupted, metric, progress=False)
    assert torch.equal(head_ablation(model, corrupted, metric, progress=False, dtype=None), exact)
    low = head_ablation(model, corrupted, metric, progress=False, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and not torch.equal(low, exact)
    # bf16 keeps 8 significant bits: a few roundings of values of this size stay within a few percent.
    assert (low - exact).abs().max() <= 0.05 * exact.abs().max()


# -- the model is never touched -------------------------------------------------------------------------------------
def test_bf16_sweep_leaves_the_model_untouched(model, setup):
    snapshot = params_snapshot(model)
    before = model(setup[0])
    sweep("get_act_patch_resid_pre", model, setup, dtype=torch.bfloat16)
    assert_untouched(model, snapshot)
    assert torch.equal(model(setup[0]), before)  # and the model still runs in float32


def test_interrupted_bf16_sweep_leaves_the_model_untouched_and_keeps_its_work(model, setup):
    corrupted, clean_cache, metric = setup
    calls = []

    def failing(logits):
        calls.append(logits.dtype)
        if len(calls) > 4:  # past check_metric's calls, inside a chunk
            raise RuntimeError("metric failed")
        return metric(logits)

    snapshot = params_snapshot(model)
    with pytest.raises(RuntimeError, match="metric failed") as info:
        patching.get_act_patch_resid_pre(model, corrupted, clean_cache, failing, progress=False,
                                         dtype=torch.bfloat16, memory_budget=1)
    assert calls[-1] == torch.bfloat16  # the sweep did run in bf16
    assert info.value.partial_result.shape == info.value.done.shape and info.value.done.any()
    assert_untouched(model, snapshot)


def test_other_threads_see_the_float32_model_during_a_bf16_sweep(model, setup):
    corrupted, clean_cache, metric = setup
    expected = model(corrupted)
    seen = {}

    def other_thread():
        seen["logits"] = model(corrupted)
        seen["autocast"] = torch.is_autocast_enabled("cpu")

    def metric_running_another_thread(logits):
        if not seen:  # first call: the sweep is inside its autocast region now
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
        return metric(logits)

    patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric_running_another_thread, progress=False,
                                     dtype=torch.bfloat16)
    assert seen["autocast"] is False
    assert seen["logits"].dtype == torch.float32 and torch.equal(seen["logits"], expected)


# -- TF32 -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def matmul_precision():
    saved = sweep_precision.cuda_matmul_precision()
    yield
    sweep_precision._set_matmul_precision(saved)


@pytest.mark.parametrize("before", ["ieee", "tf32"])
def test_tf32_flag_set_and_restored_also_on_exceptions(matmul_precision, before):
    sweep_precision._set_matmul_precision(before)
    with pytest.raises(KeyboardInterrupt):
        sweep_precision._tf32_enter()
        try:
            assert sweep_precision.cuda_matmul_precision() == "tf32"
            raise KeyboardInterrupt
        finally:
            sweep_precision._tf32_exit()
    assert sweep_precision.cuda_matmul_precision() == before


def test_tf32_flag_stays_on_until_the_last_concurrent_sweep_ends(matmul_precision):
    sweep_precision._set_matmul_precision("ieee")
    sweep_precision._tf32_enter()  # sweep 1
    sweep_precision._tf32_enter()  # sweep 2, e.g. another thread
    sweep_precision._tf32_exit()  # sweep 1 ends first
    assert sweep_precision.cuda_matmul_precision() == "tf32"
    sweep_precision._tf32_exit()
    assert sweep_precision.cuda_matmul_precision() == "ieee"


def test_allow_tf32_leaves_the_flag_alone_on_cpu(model, setup, matmul_precision):
    corrupted, clean_cache, metric = setup
    sweep_precision._set_matmul_precision("ieee")
    seen = []

    def reading_flag(logits):
        seen.append(sweep_precision.cuda_matmul_precision())
        return metric(logits)

    patching.get_act_patch_resid_pre(model, corrupted, clean_cache, reading_flag, progress=False, allow_tf32=True)
    assert set(seen) == {"ieee"} and sweep_precision.cuda_matmul_precision() == "ieee"


@requires_cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_tf32_and_bf16_sweeps(dtype, matmul_precision):
    model = load_embedded(device="cuda").eval()
    clean, corrupted = model.to_tokens(list(IOI)).split(1)
    _, clean_cache = model.run_with_cache(clean)
    answer, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")
    seen = []

    def metric(logits):
        seen.append(sweep_precision.cuda_matmul_precision())
        return logits[:, -1, answer].mean() - logits[:, -1, wrong].mean()

    sweep_precision._set_matmul_precision("ieee")
    exact = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False)
    snapshot = params_snapshot(model)
    seen.clear()
    fast = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False, dtype=dtype,
                                            allow_tf32=True)
    assert set(seen) == {"tf32"} and sweep_precision.cuda_matmul_precision() == "ieee"
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert (fast - exact).abs().max() <= 0.05 * exact.abs().max()
    assert_untouched(model, snapshot)
    assert not torch.is_autocast_enabled("cuda")


# -- refused requests: a clear error before any forward -------------------------------------------------------------
@pytest.mark.parametrize("dtype, allow_tf32, error, words", [
    (torch.float64, False, ValueError, ["float64", "copy.deepcopy(model).to(torch.float64)", "torch.bfloat16"]),
    (torch.int8, False, ValueError, ["torch.int8", "torch.bfloat16 or torch.float16"]),
    ("bfloat16", False, TypeError, ["torch.dtype", "torch.bfloat16"]),
    (None, "yes", TypeError, ["allow_tf32", "True or False"]),
])
def test_bad_precision_requests_raise_before_any_forward(model, setup, dtype, allow_tf32, error, words):
    corrupted, clean_cache, _ = setup
    calls = []
    with pytest.raises(error) as info:
        patching.get_act_patch_resid_pre(model, corrupted, clean_cache, lambda logits: calls.append(1),
                                         progress=False, dtype=dtype, allow_tf32=allow_tf32)
    for word in words:
        assert word in str(info.value)
    assert not calls
    with pytest.raises(error):
        head_ablation(model, corrupted, lambda logits: calls.append(1), dtype=dtype, allow_tf32=allow_tf32)
    assert not calls


def test_lower_precision_needs_a_float32_model():
    half = load_embedded(dtype=torch.bfloat16)
    assert SweepPrecision(half, torch.bfloat16).is_default  # its own dtype: nothing to do
    with pytest.raises(ValueError, match="copy.deepcopy"):
        SweepPrecision(half, torch.float32)
    with pytest.raises(ValueError, match="start from a float32 model"):
        SweepPrecision(half, torch.float16)


@requires_cuda
def test_cuda_bf16_sweeps_replayed_in_later_sweeps_stay_correct():
    # The engine captures a chunk structure's forward as a CUDA graph and replays it in later sweeps; a graph must
    # not read low-precision weight copies that an earlier sweep's autocast region owned and freed. Freed memory is
    # refilled with NaN between sweeps, so a replay reading it would show.
    model = load_embedded(device="cuda").eval()
    clean, corrupted = model.to_tokens(list(IOI)).split(1)
    _, clean_cache = model.run_with_cache(clean)
    answer, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[:, -1, answer].mean() - logits[:, -1, wrong].mean()

    results = []
    for _ in range(4):
        results.append(patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False,
                                                        dtype=torch.bfloat16))
        junk = [torch.full_like(p, float("nan"), dtype=torch.bfloat16) for p in model.parameters()]
        del junk
    for result in results[1:]:  # eager (first run of a structure) and replayed graphs run the same kernels
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result, results[0], rtol=0, atol=1e-2 * float(results[0].abs().max()))
