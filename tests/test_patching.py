"""hooklens.patching against TransformerLens 3.9's patching module and against the naive one-forward-per-patch loop."""
from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
from tolerances import tolerance

import hooklens.patching as patching
from hooklens import HookedTransformer
from hooklens.utils import get_act_name

pytestmark = pytest.mark.usefixtures("no_grad")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens.patching as tl_patching


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import save_hf_gpt2, tl_model_from_hf

    directory = save_hf_gpt2(tmp_path_factory.mktemp("patch") / "m", seed=11, n_layer=2, n_embd=32, n_head=2,
                             n_positions=64)
    return HookedTransformer.from_pretrained(directory), tl_model_from_hf(directory)


IOI = ("When John and Mary went to the shops, John gave the bag to",
       "When John and Mary went to the shops, Mary gave the bag to")


@pytest.fixture(scope="module", params=["ioi", "repeated"])
def setup(request, models):
    model, tl = models
    if request.param == "ioi":
        clean, corrupted = model.to_tokens(list(IOI)).split(1)
    else:
        g = torch.Generator().manual_seed(0)
        seq = torch.randint(100, 20000, (2, 5), generator=g)
        bos = torch.full((2, 1), 50256)
        clean = torch.cat([bos, seq, seq], dim=1)
        corrupted = torch.cat([bos, seq, torch.randint(100, 20000, (2, 5), generator=g)], dim=1)
    _, clean_cache = model.run_with_cache(clean)
    _, tl_clean_cache = tl.run_with_cache(clean)
    answer, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[:, -1, answer].mean() - logits[:, -1, wrong].mean()

    return model, tl, corrupted, clean_cache, tl_clean_cache, metric


def run_tl(fn_name, tl, corrupted, cache, metric):
    with contextlib.redirect_stderr(io.StringIO()):  # TL's tqdm bars
        return getattr(tl_patching, fn_name)(tl, corrupted, cache, metric)


FUNCTIONS = [
    "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out", "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_head_pattern_all_pos",
]


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_matches_transformerlens(setup, fn_name):
    model, tl, corrupted, clean_cache, tl_clean_cache, metric = setup
    ours = getattr(patching, fn_name)(model, corrupted, clean_cache, metric, progress=False)
    theirs = run_tl(fn_name, tl, corrupted, tl_clean_cache, metric)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **tolerance("reordered_sum"))
    assert ours.abs().max() > 0, "the sweep must measure something"


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_packed_paths_match_the_checked_default(setup, fn_name, monkeypatch):
    """Every get_act_patch_* with the metric's position only (the packed forward stops at it and unembeds only
    there), one variant per chunk, and on the hook-based path: equal to the default run that
    test_matches_transformerlens checks against TransformerLens."""
    from hooklens.sweeps import run_sweep

    model, _, corrupted, clean_cache, _, metric = setup
    fn = getattr(patching, fn_name)
    default = fn(model, corrupted, clean_cache, metric, progress=False)
    for kwargs in (dict(metric_positions=[-1]), dict(metric_positions=[-1, 0], memory_budget=1)):
        torch.testing.assert_close(fn(model, corrupted, clean_cache, metric, progress=False, **kwargs), default,
                                   **tolerance())
    monkeypatch.setattr(patching, "run_sweep", lambda *args, **kwargs: run_sweep(*args, packed=False, **kwargs))
    torch.testing.assert_close(fn(model, corrupted, clean_cache, metric, progress=False), default, **tolerance())


@pytest.mark.parametrize("fn_name", ["get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every"])
def test_every_functions_match_transformerlens(setup, fn_name):
    model, tl, corrupted, clean_cache, tl_clean_cache, metric = setup
    ours = getattr(patching, fn_name)(model, corrupted, clean_cache, metric, progress=False)
    theirs = run_tl(fn_name, tl, corrupted, tl_clean_cache, metric)
    torch.testing.assert_close(ours, theirs, **tolerance("reordered_sum"))


def test_dest_src_pattern_patching_matches_transformerlens(models):
    model, tl = models
    clean, corrupted = model.to_tokens(["The cat sat on the mat", "The dog sat on the rug"]).split(1)
    _, cache = model.run_with_cache(clean)
    _, tl_cache = tl.run_with_cache(clean)
    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 13].mean()
    ours = patching.get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted, cache, metric, progress=False)
    theirs = run_tl("get_act_patch_attn_head_pattern_dest_src_pos", tl, corrupted, tl_cache, metric)
    torch.testing.assert_close(ours, theirs, **tolerance("reordered_sum"))


def naive_loop(model, corrupted, clean_cache, metric, setter, activation_name, indices):
    """One full forward pass per patch, exactly as TransformerLens does it."""
    out = []
    for index in indices.tolist():
        name = get_act_name(activation_name, index[0])
        def hook(act, hook, index=index):
            return setter(act.clone(), index, clean_cache[name])
        out.append(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])))
    return torch.stack(out)


def test_each_optimization_is_exact(setup):
    """Layer reuse and the causal suffix (any chunking), partial logits, and the vmap'd metric all equal the loop."""
    model, _, corrupted, clean_cache, _, metric = setup
    setter = patching.layer_pos_head_vector_patch_setter
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    grid = torch.tensor([[l, p, h] for l in range(n_layers) for p in range(corrupted.shape[1]) for h in range(n_heads)])
    expected = naive_loop(model, corrupted, clean_cache, metric, setter, "z", grid).view(n_layers, -1, n_heads)
    for budget in (1, 200_000, None):  # one variant per chunk, mixed-start chunks, everything at once
        for positions in (None, [-1]):
            actual = patching.get_act_patch_attn_head_out_by_pos(
                model, corrupted, clean_cache, metric, memory_budget=budget, metric_positions=positions, progress=False)
            torch.testing.assert_close(actual, expected, **tolerance())


def test_partial_logits_leave_unread_positions_nan(setup):
    model, _, corrupted, clean_cache, _, _ = setup

    def metric(logits):  # 2.0 exactly when the last position is computed and position 1 was left NaN
        return torch.isfinite(logits[:, -1]).float().mean() + torch.isnan(logits[:, 1]).float().mean()

    values = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, metric_positions=[-1],
                                              progress=False)
    assert torch.equal(values, torch.full_like(values, 2.0))
    # Many small chunks share one logits buffer: still NaN at unread positions in every chunk, even when a
    # metric scribbles over the positions it does not read.
    def scribbling_metric(logits):
        value = metric(logits)
        logits[:, 1] = 0.0
        return value

    values = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, scribbling_metric,
                                              metric_positions=[-1], memory_budget=1, progress=False)
    assert torch.equal(values, torch.full_like(values, 2.0))


def test_custom_setter_and_index_df(setup):
    pandas = pytest.importorskip("pandas")
    model, _, corrupted, clean_cache, _, metric = setup

    def double_pos_setter(corrupted_activation, index, clean_activation):
        layer, pos = index
        corrupted_activation[:, pos:pos + 2] = clean_activation[:, pos:pos + 2]
        return corrupted_activation

    grid = torch.tensor([[l, p] for l in range(model.cfg.n_layers) for p in range(0, corrupted.shape[1] - 1, 3)])
    expected = naive_loop(model, corrupted, clean_cache, metric, double_pos_setter, "resid_mid", grid)
    df = pandas.DataFrame(grid.numpy(), columns=["layer", "pos"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual, returned_df = patching.generic_activation_patch(
            model, corrupted, clean_cache, metric, double_pos_setter, "resid_mid", index_df=df,
            return_index_df=True, progress=False)
    assert not [w for w in caught if "not writable" in str(w.message)]  # pandas' read-only arrays are copied
    assert returned_df is df and actual.shape == (len(df),)
    torch.testing.assert_close(actual, expected, **tolerance())


def test_metric_that_is_not_vmappable_still_works(setup):
    model, _, corrupted, clean_cache, _, metric = setup
    def python_metric(logits):
        return torch.tensor(float(metric(logits).item()))
    torch.testing.assert_close(
        patching.get_act_patch_attn_out(model, corrupted, clean_cache, python_metric, progress=False),
        patching.get_act_patch_attn_out(model, corrupted, clean_cache, metric, progress=False))


def test_bad_arguments(setup):
    model, _, corrupted, clean_cache, _, metric = setup
    with pytest.raises(ValueError, match="index_axis_names"):
        patching.generic_activation_patch(model, corrupted, clean_cache, metric, patching.layer_pos_patch_setter,
                                          "resid_pre")
    with pytest.raises(ValueError, match="Unknown index axis"):
        patching.generic_activation_patch(model, corrupted, clean_cache, metric, patching.layer_pos_patch_setter,
                                          "resid_pre", index_axis_names=("layer", "position"))


# -- regressions: cases where the batched engine once disagreed with TransformerLens ----------------------------------
def _tl_generic(tl, corrupted, cache, metric, setter, name, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()):
        return tl_patching.generic_activation_patch(tl, corrupted, cache, metric, setter, name, **kwargs)


def _zero_setter(act, index, clean):
    act[:, index[1]] = 0.0
    return act


def _interpolate_setter(act, index, clean):
    return 0.3 * act + 0.7 * clean  # not in place, every position


def _second_row_setter(act, index, clean):
    act[1, index[1]] = clean[0, index[1]]  # rows of the batch are the user's to pick
    return act


@pytest.mark.parametrize("setter", [_zero_setter, _interpolate_setter, _second_row_setter])
def test_user_setters_run_as_written(setup, setter):
    """A user's setter that zeroes, interpolates or picks batch rows runs as TL runs it (not as a copy of clean)."""
    model, tl, corrupted, clean_cache, tl_clean_cache, metric = setup
    corrupted = corrupted.expand(2, -1)  # two rows, so the row-picking setter has a row 1
    axes = ("layer", "pos")
    ours = patching.generic_activation_patch(model, corrupted, clean_cache, metric, setter, "resid_mid",
                                             index_axis_names=axes, progress=False)
    theirs = _tl_generic(tl, corrupted, tl_clean_cache, metric, setter, "resid_mid", index_axis_names=axes)
    torch.testing.assert_close(ours, theirs, **tolerance())


def test_left_padded_prompts_keep_their_mask(tmp_path_factory):
    from conftest import save_hf_gpt2, tl_model_from_hf

    directory = save_hf_gpt2(tmp_path_factory.mktemp("left") / "m", seed=3, n_layer=2, n_embd=32, n_head=2,
                             n_positions=64)
    model = HookedTransformer.from_pretrained(directory, default_padding_side="left")
    tl = tl_model_from_hf(directory)
    tl.tokenizer.padding_side = "left"
    prompts = ["When John and Mary went to the shops, John gave", "Then Mary gave"]
    clean = model.to_tokens(prompts)
    corrupted = model.to_tokens(["When John and Mary went to the shops, Mary gave", "Then John gave"])
    assert (clean == model.tokenizer.pad_token_id).any()
    _, clean_cache = model.run_with_cache(clean)
    _, tl_clean_cache = tl.run_with_cache(clean)
    def metric(logits):
        return logits[:, -1, 1000].mean()
    for fn_name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
        ours = getattr(patching, fn_name)(model, corrupted, clean_cache, metric, progress=False)
        theirs = run_tl(fn_name, tl, corrupted, tl_clean_cache, metric)
        torch.testing.assert_close(ours, theirs, **tolerance())


@pytest.mark.parametrize("hook_name", ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid", "hook_embed"])
def test_hooks_already_on_the_model_apply_once(setup, hook_name, caplog):
    """A steering hook left on the model acts as in TL's per-patch forwards (once, on [batch, pos, ...])."""
    model, tl, corrupted, clean_cache, tl_clean_cache, metric = setup
    def steer(act, hook):
        return act + 0.5
    model.add_hook(hook_name, steer)
    tl.add_hook(hook_name, steer)
    try:
        for fn_name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos"):
            ours = getattr(patching, fn_name)(model, corrupted, clean_cache, metric, progress=False)
            theirs = run_tl(fn_name, tl, corrupted, tl_clean_cache, metric)
            torch.testing.assert_close(ours, theirs, **tolerance())
    finally:
        model.reset_hooks()
        tl.reset_hooks()
    assert "Hooks are attached" in caplog.text


def test_index_df_extras_match_transformerlens(setup):
    """Negative positions, a cache holding only the patched layer, return_index_df, one clean prompt for many."""
    pandas = pytest.importorskip("pandas")
    model, tl, corrupted, clean_cache, tl_clean_cache, metric = setup
    df = pandas.DataFrame({"layer": [1, 1, 0], "pos": [-1, -2, 3]})
    ours = patching.generic_activation_patch(model, corrupted, clean_cache, metric, patching.layer_pos_patch_setter,
                                             "resid_pre", index_df=df, progress=False)
    theirs = _tl_generic(tl, corrupted, tl_clean_cache, metric, tl_patching.layer_pos_patch_setter, "resid_pre",
                         index_df=df)
    torch.testing.assert_close(ours, theirs, **tolerance())

    only_layer_1 = {"blocks.1.hook_resid_pre": clean_cache["blocks.1.hook_resid_pre"]}
    ours = patching.generic_activation_patch(model, corrupted, only_layer_1, metric, patching.layer_pos_patch_setter,
                                             "resid_pre", index_df=df.iloc[:2], progress=False)
    torch.testing.assert_close(ours, theirs[:2], **tolerance())

    values, index_df = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, return_index_df=True,
                                                        progress=False)
    _, tl_index_df = tl_patching.get_act_patch_resid_pre(tl, corrupted, tl_clean_cache, metric, return_index_df=True)
    assert index_df.equals(tl_index_df) and list(index_df.columns) == ["layer", "pos"]
    ranges = ([2, 3], ["layer", "pos"])
    assert patching.make_df_from_ranges(*ranges).equals(tl_patching.make_df_from_ranges(*ranges))

    many = corrupted[:1].expand(3, -1)
    one_clean = {name: value[:1] for name, value in clean_cache.items()}
    tl_one_clean = {name: value[:1] for name, value in tl_clean_cache.items()}
    ours = patching.get_act_patch_attn_out(model, many, one_clean, metric, progress=False)
    theirs = run_tl("get_act_patch_attn_out", tl, many, tl_one_clean, metric)
    torch.testing.assert_close(ours, theirs, **tolerance())


def test_results_are_float32_as_in_transformerlens(setup):
    model, _, corrupted, clean_cache, _, metric = setup
    model64 = HookedTransformer(model.cfg, tokenizer=model.tokenizer)
    model64.load_state_dict(model.state_dict())
    model64 = model64.to(torch.float64)
    _, cache64 = model64.run_with_cache(corrupted)
    values = patching.get_act_patch_resid_pre(model64, corrupted, cache64, metric, progress=False)
    assert values.dtype == torch.float32
    model.to(torch.float32)


def test_inputs_that_cannot_match_are_refused(setup, caplog):
    model, _, corrupted, clean_cache, _, metric = setup
    longer = torch.cat([corrupted, corrupted[:, :2]], dim=1)
    _, long_cache = model.run_with_cache(longer)
    with pytest.raises(ValueError, match="same number of tokens"):
        patching.get_act_patch_attn_head_out_all_pos(model, corrupted, long_cache, metric, progress=False)
    with pytest.raises(IndexError, match="pos=99 is out of range"):
        patching.generic_activation_patch(model, corrupted, clean_cache, metric, patching.layer_pos_patch_setter,
                                          "resid_pre", index_df=pytest.importorskip("pandas").DataFrame(
                                              {"layer": [0], "pos": [99]}), progress=False)
    with pytest.raises(ValueError, match="one number per run"):
        patching.get_act_patch_attn_out(model, corrupted, clean_cache, lambda logits: logits[:, -1, 5], progress=False)
    def python_metric(logits):
        return torch.tensor(float(metric(logits).item()))
    patching.get_act_patch_attn_out(model, corrupted, clean_cache, python_metric, memory_budget=1, progress=False)
    assert caplog.text.count("not vmap-compatible") == 1  # reported once per sweep, not per chunk


@pytest.mark.parametrize("setter, shape", [
    (patching.layer_pos_patch_setter, (5, 3)),
    (patching.layer_pos_head_vector_patch_setter, (5, 2, 3)),
    (patching.layer_head_vector_patch_setter, (5, 2, 3)),
    (patching.layer_head_pattern_patch_setter, (2, 5, 5)),
    (patching.layer_head_pos_pattern_patch_setter, (2, 5, 5)),
    (patching.layer_head_dest_src_pos_pattern_patch_setter, (2, 5, 5)),
])
def test_index_masks_are_the_setters(setter, shape):
    """Each vectorized mask (sweeps.index_mask over the setter's axes) is exactly where TL's setter writes."""
    from hooklens.sweeps import index_mask

    axes, _ = patching._KNOWN_SETTERS[setter]
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.zeros(12, dtype=torch.long)] +
                          [torch.randint(0, shape[axis], (12,), generator=g) for axis in axes], dim=1)
    masks = index_mask(indices, shape, axes)
    assert masks.shape == (12,) + shape and masks.dtype == torch.bool
    for mask, index in zip(masks, indices.tolist()):
        written = setter(torch.zeros((1,) + shape), index, torch.ones((1,) + shape))[0]
        assert torch.equal(mask, written.bool()), index
