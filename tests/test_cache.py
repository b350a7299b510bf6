"""hooklens.ActivationCache against transformer_lens 3.9's ActivationCache.

Phase 1 wraps the very same activation dict (from TL's own run_with_cache) in both classes, with TL's model,
and checks that every helper gives the same tensors, shapes and labels. Phase 2 (further down) runs hooklens's
own HookedTransformer and compares its cache with TL's.
"""
import logging
import warnings

import pytest
import torch
from tolerances import tolerance

transformer_lens = pytest.importorskip("transformer_lens")
transformers = pytest.importorskip("transformers")

from transformer_lens import ActivationCache as TLCache  # noqa: E402
from transformer_lens import HookedTransformer as TLModel  # noqa: E402
from transformer_lens import HookedTransformerConfig as TLConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights  # noqa: E402
from transformer_lens.utilities import Slice as TLSlice  # noqa: E402

from hooklens.cache import ActivationCache  # noqa: E402
from hooklens.utils import Slice  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

N_LAYERS, D_MODEL, N_HEADS, N_CTX, D_VOCAB, D_MLP = 2, 64, 4, 64, 1000, 48
BATCH, SEQ = 2, 7


def _random_hf_gpt2():
    """A small random GPT-2 with non-trivial LN weights and biases (so fold_ln / biases matter)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, n_inner=D_MLP, n_positions=N_CTX, vocab_size=D_VOCAB
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return hf


def _tl_model(hf, fold_ln=True, use_attn_result=False):
    cfg = TLConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        d_head=D_MODEL // N_HEADS,
        d_mlp=D_MLP,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        act_fn="gelu_new",
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
        use_attn_result=use_attn_result,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TLModel(cfg)
        model.load_and_process_state_dict(
            convert_gpt2_weights(hf, cfg),
            fold_ln=fold_ln,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    return _random_hf_gpt2()


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, D_VOCAB, (BATCH, SEQ))


@pytest.fixture(scope="module")
def runs(hf_model, tokens):
    """name -> (TL model, cache dict) for folded LN (LNPre), unfolded LN, and use_attn_result models."""
    out = {}
    for name, kwargs in {
        "folded": {},
        "unfolded": {"fold_ln": False},
        "attn_result": {"use_attn_result": True},
    }.items():
        model = _tl_model(hf_model, **kwargs)
        with torch.no_grad():
            _, cache_dict = model.run_with_cache(tokens, return_cache_object=False)
        out[name] = (model, cache_dict)
    return out


def _pair(run, batch1=False):
    """(ours, TL's) caches over independent shallow copies of one activation dict."""
    model, cache_dict = run
    if batch1:
        cache_dict = {k: v[:1] for k, v in cache_dict.items()}
    return ActivationCache(dict(cache_dict), model), TLCache(dict(cache_dict), model)


def assert_same(ours, ref):
    """Recursive equality: tensors (shape, dtype, values to rtol 1e-5), label lists exactly."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor)
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, **tolerance())
    elif isinstance(ref, (tuple, list)) and ref and isinstance(ref[0], str):
        assert list(ours) == list(ref)
    elif isinstance(ref, (tuple, list)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for a, b in zip(ours, ref):
            assert_same(a, b)
    else:
        assert ours == ref


# (method, args, kwargs); run on every model variant, with and without a batch dim.
POS_SLICES = [-1, (1, 5), [0, 2, 3], slice(2, None)]
# Directions for project_output_onto (e.g. a logit difference direction, or several at once).
PROJECT_1D = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))
PROJECT_2D = torch.randn(D_MODEL, 3, generator=torch.Generator().manual_seed(4))
METHOD_CASES = [
    ("accumulated_resid", (), {}),
    ("accumulated_resid", (), {"return_labels": True}),
    ("accumulated_resid", (), {"layer": 0, "return_labels": True}),
    ("accumulated_resid", (), {"layer": 1, "incl_mid": True, "return_labels": True}),
    ("accumulated_resid", (), {"incl_mid": True, "return_labels": True}),
    ("accumulated_resid", (), {"layer": 1, "mlp_input": True, "return_labels": True}),
    ("accumulated_resid", (), {"apply_ln": True}),
    ("accumulated_resid", (), {"layer": 1, "apply_ln": True}),
    ("accumulated_resid", (), {"layer": 1, "apply_ln": True, "mlp_input": True, "incl_mid": True}),
    ("accumulated_resid", (), {"layer": -1, "incl_mid": True, "apply_ln": True, "return_labels": True}),
    *[("accumulated_resid", (), {"apply_ln": True, "pos_slice": ps}) for ps in POS_SLICES],
    *[("accumulated_resid", (), {"layer": 1, "apply_ln": True, "pos_slice": ps}) for ps in POS_SLICES],
    ("decompose_resid", (), {}),
    ("decompose_resid", (), {"return_labels": True}),
    ("decompose_resid", (), {"mode": "attn", "return_labels": True}),
    ("decompose_resid", (), {"mode": "mlp", "return_labels": True}),
    ("decompose_resid", (), {"layer": 0, "return_labels": True}),
    ("decompose_resid", (), {"layer": 1, "mlp_input": True, "apply_ln": True, "return_labels": True}),
    ("decompose_resid", (), {"layer": 1, "mlp_input": True, "mode": "mlp", "return_labels": True}),
    ("decompose_resid", (), {"incl_embeds": False, "return_labels": True}),
    ("decompose_resid", (), {"apply_ln": True}),
    *[("decompose_resid", (), {"apply_ln": True, "pos_slice": ps}) for ps in POS_SLICES],
    ("stack_head_results", (), {}),
    ("stack_head_results", (), {"return_labels": True, "incl_remainder": True}),
    ("stack_head_results", (), {"layer": 1, "return_labels": True, "incl_remainder": True, "apply_ln": True}),
    ("stack_head_results", (), {"layer": 0, "return_labels": True}),
    ("stack_head_results", (), {"layer": 0, "return_labels": True, "incl_remainder": True}),
    ("stack_head_results", (), {"layer": None, "apply_ln": True}),
    *[("stack_head_results", (), {"apply_ln": True, "incl_remainder": True, "pos_slice": ps}) for ps in POS_SLICES],
    ("stack_activation", ("pattern",), {}),
    ("stack_activation", ("resid_pre", 1), {}),
    ("stack_activation", ("scale", -1, "ln1"), {}),
    ("stack_activation", ("normalized", None, "ln2"), {}),
    ("stack_activation", ("q", 2, "attn"), {}),
    ("get_neuron_results", (0,), {}),
    ("get_neuron_results", (1,), {"neuron_slice": (0, 10)}),
    ("get_neuron_results", (1,), {"neuron_slice": [1, 5, 7], "pos_slice": -1}),
    ("get_neuron_results", (1,), {"neuron_slice": 3, "pos_slice": (2, 4)}),
    ("stack_neuron_results", (2,), {}),
    ("stack_neuron_results", (1,), {"return_labels": True, "incl_remainder": True, "apply_ln": True}),
    ("stack_neuron_results", (-1,), {"neuron_slice": (0, 8), "pos_slice": -1, "return_labels": True}),
    ("stack_neuron_results", (2,), {"neuron_slice": [3, 1], "apply_ln": True, "return_labels": True}),
    ("stack_neuron_results", (2,), {"neuron_slice": torch.tensor([4, 0]), "incl_remainder": True}),
    ("stack_neuron_results", (0,), {"return_labels": True}),
    ("stack_neuron_results", (0,), {"return_labels": True, "incl_remainder": True, "pos_slice": (0, 3)}),
    ("get_full_resid_decomposition", (), {}),
    ("get_full_resid_decomposition", (), {"return_labels": True}),
    ("get_full_resid_decomposition", (), {"expand_neurons": False, "return_labels": True}),
    ("get_full_resid_decomposition", (), {"apply_ln": True}),
    ("get_full_resid_decomposition", (), {"layer": 0, "return_labels": True}),
    ("get_full_resid_decomposition", (), {"layer": 0, "mlp_input": True, "return_labels": True}),
    ("get_full_resid_decomposition", (), {"layer": 1, "mlp_input": True, "apply_ln": True, "return_labels": True}),
    (
        "get_full_resid_decomposition",
        (),
        {"layer": 1, "mlp_input": True, "expand_neurons": False, "apply_ln": True, "return_labels": True},
    ),
    *[("get_full_resid_decomposition", (), {"apply_ln": True, "pos_slice": ps}) for ps in POS_SLICES],
    # project_output_onto: [d_model] (squeezed) and [d_model, n_outs] directions, with and without LN.
    *[
        case
        for direction in (PROJECT_1D, PROJECT_2D)
        for case in [
            ("get_neuron_results", (1,), {"project_output_onto": direction}),
            ("get_neuron_results", (0,), {"neuron_slice": [1, 5], "pos_slice": -1, "project_output_onto": direction}),
            ("stack_neuron_results", (2,), {"project_output_onto": direction, "return_labels": True}),
            ("stack_neuron_results", (1,),
             {"project_output_onto": direction, "incl_remainder": True, "apply_ln": True}),
            ("stack_neuron_results", (2,), {"project_output_onto": direction, "apply_ln": True, "pos_slice": (1, 5)}),
            ("stack_neuron_results", (0,), {"project_output_onto": direction, "incl_remainder": True}),
            ("get_full_resid_decomposition", (), {"project_output_onto": direction, "return_labels": True}),
            ("get_full_resid_decomposition", (), {"project_output_onto": direction, "apply_ln": True}),
            ("get_full_resid_decomposition", (), {"project_output_onto": direction, "apply_ln": True, "pos_slice": -1}),
            ("get_full_resid_decomposition", (), {"project_output_onto": direction, "expand_neurons": False,
                                                  "apply_ln": True}),
            ("get_full_resid_decomposition", (), {"layer": 1, "project_output_onto": direction}),
        ]
    ],
]


def _case_id(case):
    name, args, kwargs = case
    if "project_output_onto" in kwargs:
        kwargs = {**kwargs, "project_output_onto": f"{kwargs['project_output_onto'].ndim}d"}
    return f"{name}{args}{kwargs}".replace(" ", "")


@pytest.mark.parametrize("batch1", [False, True], ids=["batch", "no_batch_dim"])
@pytest.mark.parametrize("variant", ["folded", "unfolded", "attn_result"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=_case_id)
def test_methods_match_transformer_lens(runs, variant, batch1, case, caplog):
    name, args, kwargs = case
    ours, ref = _pair(runs[variant], batch1=batch1)
    if batch1:
        ours.remove_batch_dim()
        ref.remove_batch_dim()
    with caplog.at_level(logging.ERROR):
        assert_same(getattr(ours, name)(*args, **kwargs), getattr(ref, name)(*args, **kwargs))


def test_getitem_and_dict_protocol(runs):
    model, cache_dict = runs["folded"]
    ours, ref = _pair(runs["folded"])
    for key in [
        "blocks.0.hook_resid_pre",
        "embed",
        "pos_embed",
        "pre1",
        "scale1ln2",
        "resid_post",
        ("pattern", 0, "attn"),
        ("pattern", 1),
        ("resid_pre", -1),
        ("resid_pre", -2),
        ("scale", 1, "ln1"),
        ("normalized", 0, "ln2"),
        ("z", 0, "a"),
        ("post", 1, "mlp"),
        ("mlp_out", 0),
        ("attn_out", -1),
        ("scale",),
    ]:
        if key in ("resid_post",):
            with pytest.raises(KeyError):
                ours[key]
            continue
        assert ours[key] is ref[key], key
    assert ours["scale"] is cache_dict["ln_final.hook_scale"]
    assert len(ours) == len(ref) == len(cache_dict)
    assert list(ours) == list(ref) == list(cache_dict)
    assert list(ours.keys()) == list(cache_dict.keys())
    assert all(a is b for a, b in zip(ours.values(), cache_dict.values()))
    assert list(ours.items()) == list(cache_dict.items())
    assert "blocks.1.attn.hook_pattern" in ours and "nope" not in ours
    assert repr(ours) == repr(ref)
    assert ours.has_embed and ours.has_pos_embed and ours.has_batch_dim
    assert ours.model is model


def test_remove_batch_dim(runs, caplog):
    ours, ref = _pair(runs["folded"], batch1=True)
    assert ours.remove_batch_dim() is ours
    ref.remove_batch_dim()
    assert not ours.has_batch_dim
    for key in ref.keys():
        assert ours[key].shape == ref[key].shape
    with caplog.at_level(logging.WARNING):
        ours.remove_batch_dim()  # second call only warns
    assert "already" in caplog.text
    full, _ = _pair(runs["folded"])
    with pytest.raises(AssertionError):
        full.remove_batch_dim()


@pytest.mark.parametrize("batch_slice", [0, (0, 1), [1], None])
def test_apply_slice_to_batch_dim(runs, batch_slice):
    ours, ref = _pair(runs["unfolded"])
    ours_sliced, ref_sliced = ours.apply_slice_to_batch_dim(batch_slice), ref.apply_slice_to_batch_dim(batch_slice)
    assert isinstance(ours_sliced, ActivationCache)
    assert ours_sliced.has_batch_dim == ref_sliced.has_batch_dim
    for key in ref_sliced.keys():
        assert_same(ours_sliced[key], ref_sliced[key])
    assert_same(
        ours_sliced.decompose_resid(apply_ln=True, pos_slice=-1),
        ref_sliced.decompose_resid(apply_ln=True, pos_slice=-1),
    )


def test_to_and_toggle_autodiff(runs):
    ours, _ = _pair(runs["folded"])
    assert ours.to("cpu") is ours
    assert ours.to(torch.device("cpu"), move_model=True) is ours
    assert all(v.device.type == "cpu" for v in ours.values())
    was_enabled = torch.is_grad_enabled()
    try:
        ours.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
        ours.toggle_autodiff(True)
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(was_enabled)


def test_compute_head_results(runs, caplog):
    ours, ref = _pair(runs["unfolded"])
    ours.compute_head_results()
    ref.compute_head_results()
    for l in range(N_LAYERS):
        key = f"blocks.{l}.attn.hook_result"
        assert_same(ours[key], ref[key])
        # Heads plus b_O give attn_out.
        b_O = runs["unfolded"][0].blocks[l].attn.b_O
        torch.testing.assert_close(ours[key].sum(-2) + b_O, ours["attn_out", l], **tolerance("reordered_short_sum"))
    # use_attn_result=True caches hook_result itself; computing is then a no-op with a warning.
    cached, _ = _pair(runs["attn_result"])
    before = cached["result", 0, "attn"]
    with caplog.at_level(logging.WARNING):
        cached.compute_head_results()
    assert "already cached" in caplog.text
    assert cached["result", 0, "attn"] is before
    computed, _ = _pair(runs["attn_result"])
    del computed.cache_dict["blocks.0.attn.hook_result"], computed.cache_dict["blocks.1.attn.hook_result"]
    computed.compute_head_results()
    torch.testing.assert_close(computed["result", 1, "attn"], cached["result", 1, "attn"])


@pytest.mark.parametrize("variant", ["folded", "unfolded"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer": 0},
        {"layer": 1, "mlp_input": True},
        {"layer": -1},
        {"layer": 2, "pos_slice": -1},
        {"layer": 1, "pos_slice": (1, 4)},
        {"layer": None, "pos_slice": [0, 6], "batch_slice": 1},
        {"layer": 0, "batch_slice": (0, 1)},
        {"recompute_ln": True},
        {"recompute_ln": True, "pos_slice": -1},
        {"recompute_ln": True, "layer": 1},
    ],
    ids=str,
)
def test_apply_ln_to_stack(runs, variant, kwargs):
    ours, ref = _pair(runs[variant])
    torch.manual_seed(2)
    stack = torch.randn(3, BATCH, SEQ, D_MODEL)
    stack = Slice(kwargs.get("pos_slice")).apply(stack, dim=-2)
    assert_same(ours.apply_ln_to_stack(stack, **kwargs), ref.apply_ln_to_stack(stack, **kwargs))
    # has_batch_dim=False: the stack is not batch-sliced (the cached scale still is).
    if "batch_slice" not in kwargs:
        assert_same(
            ours.apply_ln_to_stack(stack, has_batch_dim=False, **kwargs),
            ref.apply_ln_to_stack(stack, has_batch_dim=False, **kwargs),
        )


def test_apply_ln_to_stack_without_normalization(runs):
    model, cache_dict = runs["folded"]
    ours = ActivationCache(dict(cache_dict), model)
    stack = torch.randn(2, BATCH, SEQ, D_MODEL)
    original = model.cfg.normalization_type
    try:
        model.cfg.normalization_type = None
        assert ours.apply_ln_to_stack(stack) is stack
    finally:
        model.cfg.normalization_type = original


@pytest.mark.parametrize("variant", ["folded", "unfolded"])
def test_logit_attrs(runs, tokens, variant):
    ours, ref = _pair(runs[variant])
    answers, wrong = tokens[:, -1], tokens[:, 0]

    stack = ref.decompose_resid(pos_slice=-1)
    for args, kwargs in [
        ((answers,), {"pos_slice": -1}),
        ((answers, wrong), {"pos_slice": -1}),
        ((5,), {"pos_slice": -1}),
        ((5, 7), {"pos_slice": -1}),
        ((torch.tensor(5),), {"pos_slice": -1}),
    ]:
        assert_same(ours.logit_attrs(stack, *args, **kwargs), ref.logit_attrs(stack, *args, **kwargs))

    full = ref.accumulated_resid()
    assert_same(ours.logit_attrs(full, tokens), ref.logit_attrs(full, tokens))
    assert_same(ours.logit_attrs(full, tokens, tokens.flip(0)), ref.logit_attrs(full, tokens, tokens.flip(0)))

    # Batch slice: stack keeps its batch dim, only the chosen row's scale is used.
    kwargs = {"pos_slice": -1, "batch_slice": 1}
    assert_same(ours.logit_attrs(stack, 11, **kwargs), ref.logit_attrs(stack, 11, **kwargs))
    kwargs = {"pos_slice": (2, 5), "batch_slice": [1]}
    part = Slice((2, 5)).apply(full, dim=-2)
    assert_same(ours.logit_attrs(part, 11, 3, **kwargs), ref.logit_attrs(part, 11, 3, **kwargs))

    with pytest.raises(ValueError):
        ours.logit_attrs(stack, answers, 3, pos_slice=-1)


def test_logit_attrs_no_batch_dim(runs, tokens):
    ours, ref = _pair(runs["folded"], batch1=True)
    ours.remove_batch_dim()
    ref.remove_batch_dim()
    stack = ref.get_full_resid_decomposition(pos_slice=-1)
    assert_same(ours.logit_attrs(stack, 9, has_batch_dim=False, pos_slice=-1),
                ref.logit_attrs(stack, 9, has_batch_dim=False, pos_slice=-1))
    stack = ref.accumulated_resid()
    toks = tokens[0]
    assert_same(ours.logit_attrs(stack, toks, has_batch_dim=False), ref.logit_attrs(stack, toks, has_batch_dim=False))


def test_decomposition_sums_to_resid(runs):
    """Sanity: the full decomposition adds up to the final residual stream (TL's semantics, not just TL's code)."""
    ours, _ = _pair(runs["folded"])
    total = ours.get_full_resid_decomposition().sum(0)
    torch.testing.assert_close(total, ours["resid_post", -1], **tolerance("reordered_sum"))
    total = ours.get_full_resid_decomposition(layer=1, mlp_input=True, expand_neurons=False).sum(0)
    torch.testing.assert_close(total, ours["resid_mid", 1], **tolerance("reordered_sum"))


def test_slice_matches_transformer_lens():
    x = torch.arange(5 * 5 * 3).reshape(5, 5, 3)
    for s in [None, 2, -1, (1, 4), (0, 5, 2), slice(1, None), [0, 3], torch.tensor([4, 1])]:
        ours, ref = Slice(s), TLSlice(s)
        assert ours.mode == ref.mode
        assert torch.equal(ours.apply(x, dim=-2), ref.apply(x, dim=-2))
        assert torch.equal(ours.apply(x, dim=0), ref.apply(x, dim=0))
    with pytest.raises(ValueError):
        Slice("nope")


def test_accepts_transformer_lens_slice_objects(runs):
    ours, ref = _pair(runs["folded"])
    assert_same(
        ours.accumulated_resid(apply_ln=True, pos_slice=TLSlice((1, 3))),
        ref.accumulated_resid(apply_ln=True, pos_slice=(1, 3)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: hooklens's own HookedTransformer.run_with_cache against TL's, from the same saved HF checkpoint.
# ---------------------------------------------------------------------------------------------------------------

VARIANT_KWARGS = {"folded": {}, "unfolded": {"fold_ln": False}, "attn_result": {"use_attn_result": True}}
CASES_BY_METHOD = {}
for _case in METHOD_CASES:
    CASES_BY_METHOD.setdefault(_case[0], []).append(_case)


@pytest.fixture(scope="module")
def hooklens_models(hf_model, tmp_path_factory):
    """variant -> hooklens.HookedTransformer loaded with from_pretrained from the saved HF model."""
    from hooklens import HookedTransformer

    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            name: HookedTransformer.from_pretrained(str(path), device="cpu", **kwargs).eval()
            for name, kwargs in VARIANT_KWARGS.items()
        }


def _hooklens_pair(hooklens_models, runs, tokens, variant, remove_batch_dim=False):
    """(hooklens cache from hooklens's model, TL cache from TL's model) for the same tokens."""
    if remove_batch_dim:
        tokens = tokens[:1]
    with torch.no_grad():
        _, ours = hooklens_models[variant].run_with_cache(tokens, remove_batch_dim=remove_batch_dim)
        _, ref = runs[variant][0].run_with_cache(tokens, remove_batch_dim=remove_batch_dim)
    return ours, ref


@pytest.mark.parametrize("remove_batch_dim", [False, True], ids=["batch", "no_batch_dim"])
@pytest.mark.parametrize("variant", ["folded", "unfolded", "attn_result"])
def test_hooklens_run_with_cache_matches_transformer_lens(hooklens_models, runs, tokens, variant, remove_batch_dim):
    ours, ref = _hooklens_pair(hooklens_models, runs, tokens, variant, remove_batch_dim)
    assert isinstance(ours, ActivationCache)
    assert ours.has_batch_dim == ref.has_batch_dim == (not remove_batch_dim)
    assert ours.model is hooklens_models[variant]
    assert sorted(ours.keys()) == sorted(ref.keys())
    for key in ref.keys():
        assert_same(ours[key], ref[key])
    assert_same(ours["pattern", 0, "attn"], ref["pattern", 0, "attn"])
    assert_same(ours["scale", -1, "ln1"], ref["scale", -1, "ln1"])


@pytest.mark.parametrize("remove_batch_dim", [False, True], ids=["batch", "no_batch_dim"])
@pytest.mark.parametrize("variant", ["folded", "unfolded", "attn_result"])
@pytest.mark.parametrize("method", list(CASES_BY_METHOD))
def test_hooklens_methods_match_transformer_lens(
    hooklens_models, runs, tokens, variant, remove_batch_dim, method, caplog
):
    ours, ref = _hooklens_pair(hooklens_models, runs, tokens, variant, remove_batch_dim)
    with caplog.at_level(logging.ERROR):
        for name, args, kwargs in CASES_BY_METHOD[method]:
            try:
                assert_same(getattr(ours, name)(*args, **kwargs), getattr(ref, name)(*args, **kwargs))
            except AssertionError as error:
                raise AssertionError(f"{name}{args}{kwargs}: {error}") from error


@pytest.mark.parametrize("variant", ["folded", "unfolded", "attn_result"])
def test_hooklens_logit_attrs_and_head_results(hooklens_models, runs, tokens, variant, caplog):
    ours, ref = _hooklens_pair(hooklens_models, runs, tokens, variant)
    with caplog.at_level(logging.ERROR):
        ours.compute_head_results()
        ref.compute_head_results()
    for l in range(N_LAYERS):
        assert_same(ours["result", l, "attn"], ref["result", l, "attn"])

    stack, labels = ours.get_full_resid_decomposition(pos_slice=-1, return_labels=True)
    ref_stack, ref_labels = ref.get_full_resid_decomposition(pos_slice=-1, return_labels=True)
    assert labels == ref_labels
    answers, wrong = tokens[:, -1], tokens[:, 0]
    assert_same(ours.logit_attrs(stack, answers, pos_slice=-1), ref.logit_attrs(ref_stack, answers, pos_slice=-1))
    assert_same(
        ours.logit_attrs(stack, answers, wrong, pos_slice=-1, batch_slice=[1]),
        ref.logit_attrs(ref_stack, answers, wrong, pos_slice=-1, batch_slice=[1]),
    )
    full = ours.accumulated_resid()
    assert_same(ours.logit_attrs(full, tokens), ref.logit_attrs(ref.accumulated_resid(), tokens))
    if variant == "unfolded":
        return  # with LN weights left in ln_final, residual directions don't give exact logits (TL warns so too)
    # Direct logit attribution of the full decomposition (through the final LN scale) is the logit minus b_U.
    with torch.no_grad():
        logits = hooklens_models[variant](tokens)
    dla = ours.logit_attrs(stack, answers, pos_slice=-1).sum(0)
    expected = logits[torch.arange(BATCH), -1, answers] - hooklens_models[variant].b_U[answers]
    torch.testing.assert_close(dla, expected, **tolerance("reordered_sum"))


def test_hooklens_logit_attrs_string_tokens(hooklens_models, runs, tokens):
    """String tokens go through the model's tokenizer (TL's test model has none, so compare with the int id)."""
    ours, _ = _hooklens_pair(hooklens_models, runs, tokens, "folded")
    model = hooklens_models["folded"]
    stack = ours.decompose_resid(pos_slice=-1)
    the, a = model.to_single_token(" the"), model.to_single_token(" a")
    assert_same(ours.logit_attrs(stack, " the", pos_slice=-1), ours.logit_attrs(stack, the, pos_slice=-1))
    assert_same(ours.logit_attrs(stack, " the", " a", pos_slice=-1), ours.logit_attrs(stack, the, a, pos_slice=-1))
    with pytest.raises(ValueError):
        ours.logit_attrs(stack, " the", tokens[:, 0], pos_slice=-1)


def test_transformer_lens_quirks_kept(runs):
    """Errors TL 3.9 raises, kept as is."""
    ours, ref = _pair(runs["folded"])
    # An int neuron_slice can't be stacked (TL iterates a 0-d tensor for the labels).
    for cache in (ours, ref):
        with pytest.raises(TypeError):
            cache.stack_neuron_results(2, neuron_slice=3)
    # Slicing the batch dim of a cache without one.
    ours, ref = _pair(runs["folded"], batch1=True)
    for cache in (ours, ref):
        cache.remove_batch_dim()
        with pytest.raises(AssertionError):
            cache.apply_slice_to_batch_dim(0)


@pytest.mark.parametrize("remove_batch_dim", [False, True], ids=["batch", "no_batch_dim"])
@pytest.mark.parametrize("pos_slice", [-1, 2, (1, 4), [0, 3], "Slice(-1)", "TLSlice(-1)"])
def test_run_with_cache_pos_slice_matches_transformer_lens(hooklens_models, runs, tokens, pos_slice, remove_batch_dim):
    """A bare int keeps the position dim (TL's Slice.unwrap); Slice objects of either library are accepted."""
    ours_slice = eval(pos_slice) if isinstance(pos_slice, str) else pos_slice
    ref_slice = TLSlice(-1) if isinstance(pos_slice, str) else pos_slice
    batch = tokens[:1] if remove_batch_dim else tokens
    with torch.no_grad():
        _, ours = hooklens_models["folded"].run_with_cache(batch, pos_slice=ours_slice,
                                                           remove_batch_dim=remove_batch_dim)
        _, ref = runs["folded"][0].run_with_cache(batch, pos_slice=ref_slice, remove_batch_dim=remove_batch_dim)
    assert sorted(ours.keys()) == sorted(ref.keys())
    for key in ref.keys():
        assert_same(ours[key], ref[key])


def test_missing_entries_say_what_to_do(hooklens_models, tokens):
    """A names_filter cache lacking an LN scale: apply_ln explains what is missing and how to get it."""
    with torch.no_grad():
        _, cache = hooklens_models["folded"].run_with_cache(tokens, names_filter=lambda name: "resid" in name)
    with pytest.raises(KeyError, match=r"blocks.1.ln1.hook_scale' is not in this cache.*LayerNorm scale.*names_filter"):
        cache.accumulated_resid(layer=1, apply_ln=True)
    with pytest.raises(KeyError, match=r"blocks.0.attn.hook_pattern' is not in this cache.*include"):
        cache["pattern", 0]
    assert cache["resid_pre", -1].shape == (BATCH, SEQ, D_MODEL)


@pytest.mark.parametrize("mlp_input", [False, True])
@pytest.mark.parametrize("apply_ln", [False, True])
def test_projected_decomposition_equals_projecting_the_full_one(runs, mlp_input, apply_ln):
    """project_output_onto is the full decomposition @ direction, for ln2 inputs too (TL 3.9 divides the neurons by
    ln1's scale there; hooklens uses the scale of the LN the stack feeds, as the unprojected stack does)."""
    ours, _ = _pair(runs["unfolded"])
    kwargs = dict(layer=1, mlp_input=mlp_input, apply_ln=apply_ln, return_labels=True)
    full, labels = ours.get_full_resid_decomposition(**kwargs)
    projected, projected_labels = ours.get_full_resid_decomposition(project_output_onto=PROJECT_2D, **kwargs)
    assert projected_labels == labels
    torch.testing.assert_close(projected, full @ PROJECT_2D, **tolerance())
    with pytest.raises(ValueError, match=r"\[d_model\] or \[d_model, n_outs\]"):
        ours.stack_neuron_results(1, project_output_onto=torch.zeros(2, D_MODEL, 1))
