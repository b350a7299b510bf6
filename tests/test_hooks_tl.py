"""Hook introspection (TL 3.9's `list_hooks`, `LensHandle.user_hook`, `HookPoint.__repr__`) and the hook errors TL
users catch, compared with TransformerLens 3.9 itself: the same calls on a TL model and a hooklens model built on
the same weights, and on the same toy `HookedRootModule` subclass written against each library."""
from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn

transformer_lens = pytest.importorskip("transformer_lens")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import HookedRootModule as TLRootModule  # noqa: E402
    from transformer_lens.hook_points import HookPoint as TLHookPoint  # noqa: E402

from conftest import tl_model_from_hf  # noqa: E402

from hooklens import HookedRootModule, HookedTransformer, HookPoint  # noqa: E402
from hooklens.errors import InvalidInputError  # noqa: E402
from hooklens.hook_points import HookIntrospectionMixin, LensHandle  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models(tiny_dir):
    """(hooklens, TL) on identical weights."""
    return HookedTransformer.from_pretrained(tiny_dir, device="cpu"), tl_model_from_hf(tiny_dir)


@pytest.fixture(autouse=True)
def _no_hooks_left(request):
    yield
    if "models" in request.fixturenames:
        for model in request.getfixturevalue("models"):
            model.reset_hooks(including_permanent=True)


def read(activation, hook):
    return None


def other_read(activation, hook):
    return None


def summary(listing):
    """list_hooks' answer without the library-specific `hook` field: name -> [(user_hook, permanent, level)]."""
    return {name: [(h.user_hook, h.is_permanent, h.context_level) for h in handles] for name, handles in
            listing.items()}


def attach_mixture(model):
    """Permanent and temporary, forward and backward hooks, by name and by filter (the same calls on each library)."""
    model.add_perma_hook("hook_embed", read)
    model.add_hook("hook_embed", other_read)
    model.add_hook("hook_embed", read, prepend=True)
    model.add_hook("blocks.0.hook_resid_pre", other_read, dir="bwd")
    model.add_perma_hook("blocks.0.hook_resid_pre", read, dir="bwd")
    model.add_hook(lambda name: name.endswith("attn.hook_z"), read)
    model.add_hook("blocks.1.mlp.hook_post", read, level=3)


NAME_FILTERS = {
    "all": None,
    "one_name": "hook_embed",
    "name_without_hooks": "blocks.1.hook_resid_post",
    "list": ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"],
    "tuple": ("blocks.0.attn.hook_z",),
    "predicate": lambda name: name.startswith("blocks.0"),
    "predicate_none": lambda name: False,
}


# -- list_hooks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("including_permanent", [True, False])
@pytest.mark.parametrize("direction", ["fwd", "bwd", "both"])
@pytest.mark.parametrize("name_filter", list(NAME_FILTERS.values()), ids=list(NAME_FILTERS))
def test_list_hooks_matches_tl(models, name_filter, direction, including_permanent):
    listings = []
    for model in models:
        attach_mixture(model)
        listings.append(model.list_hooks(name_filter, dir=direction, including_permanent=including_permanent))
    ours, theirs = listings
    assert summary(ours) == summary(theirs)
    assert list(ours) == list(theirs)  # same order: hook_dict order
    assert all(isinstance(h, LensHandle) for handles in ours.values() for h in handles)


def test_list_hooks_defaults_and_empty_model(models):
    for model in models:
        assert model.list_hooks() == {}
    for model in models:
        attach_mixture(model)
    ours, theirs = [model.list_hooks() for model in models]
    assert summary(ours) == summary(theirs)
    assert [h.user_hook for h in ours["hook_embed"]] == [read, read, other_read]


def test_list_hooks_inside_hooks_context_shows_levels(models):
    pairs = [("blocks.0.attn.hook_pattern", read), (lambda name: name.endswith("hook_resid_mid"), other_read)]
    inside = []
    for model in models:
        with model.hooks(fwd_hooks=pairs, bwd_hooks=[("hook_pos_embed", read)]):
            with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", other_read)]):
                inside.append(summary(model.list_hooks()))
        assert model.list_hooks() == {}
    assert inside[0] == inside[1]
    assert inside[0]["blocks.0.attn.hook_pattern"] == [(read, False, 1), (other_read, False, 2)]


def test_list_hooks_during_run_with_cache(models, tokens):
    seen = []
    for model in models:
        def peek(activation, hook, model=model):
            seen.append(sorted(model.list_hooks(including_permanent=False)))
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", peek)]):
            model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert seen[0] == seen[1] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_list_hooks_unknown_name_raises_with_suggestion(models):
    ours, theirs = models
    assert theirs.list_hooks("blocks.0.hook_rsid_pre") == {}  # TL: a typo reads as "no hooks attached"
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        ours.list_hooks("blocks.0.hook_rsid_pre")
    with pytest.raises(KeyError, match="Unknown hook name"):
        ours.list_hooks(["hook_embed", "nonsense"])
    with pytest.raises(ValueError, match="dir"):
        ours.list_hooks(dir="forward")


# -- LensHandle.user_hook -----------------------------------------------------------------------------------------
USER_HOOKS = {
    "function": read,
    "lambda": lambda activation, hook: None,
    "partial": partial(lambda activation, hook, scale: None, scale=2.0),
    "callable_object": type("Reader", (), {"__call__": lambda self, activation, hook: None})(),
}


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("fn", list(USER_HOOKS.values()), ids=list(USER_HOOKS))
def test_user_hook_is_the_callable_passed(models, fn, direction):
    for model in models:
        model.add_hook("blocks.0.hook_mlp_out", fn, dir=direction)
        (handle,) = model.list_hooks("blocks.0.hook_mlp_out")["blocks.0.hook_mlp_out"]
        assert handle.user_hook is fn
        hook_point = model.hook_dict["blocks.0.hook_mlp_out"]
        assert (hook_point.fwd_hooks if direction == "fwd" else hook_point.bwd_hooks)[0].user_hook is fn


def test_user_hook_on_hook_point_directly():
    for point in (HookPoint(), TLHookPoint()):
        point.add_hook(read)
        point.add_perma_hook(other_read, dir="bwd")
        assert [h.user_hook for h in point.fwd_hooks + point.bwd_hooks] == [read, other_read]
        assert [h.is_permanent for h in point.fwd_hooks + point.bwd_hooks] == [False, True]


# -- HookPoint.__repr__ -------------------------------------------------------------------------------------------
REPR_STATES = {
    "unnamed": (None, 0, 0),
    "unnamed_1_bwd": (None, 0, 1),
    "unnamed_2_fwd": (None, 2, 0),
    "named": ("blocks.0.attn.hook_z", 0, 0),
    "named_2_fwd_1_bwd": ("hook_embed", 2, 1),
    "named_0_fwd_3_bwd": ("ln_final.hook_scale", 0, 3),
}


@pytest.mark.parametrize("name, n_fwd, n_bwd", list(REPR_STATES.values()), ids=list(REPR_STATES))
def test_hook_point_repr_matches_tl(name, n_fwd, n_bwd):
    reprs = []
    for point in (HookPoint(), TLHookPoint()):
        point.name = name
        for _ in range(n_fwd):
            point.add_hook(read)
        for _ in range(n_bwd):
            point.add_hook(read, dir="bwd")
        reprs.append(repr(point))
    assert reprs[0] == reprs[1]
    assert HookPoint().__repr__() == "HookPoint()"


def test_model_hook_point_reprs_match_tl(models):
    for model in models:
        model.add_hook("hook_embed", read)
        model.add_hook("hook_embed", read)
        model.add_hook("blocks.1.ln2.hook_scale", read, dir="bwd")
    ours, theirs = models
    for name in ("hook_embed", "blocks.1.ln2.hook_scale", "blocks.0.attn.hook_pattern"):
        assert repr(ours.hook_dict[name]) == repr(theirs.hook_dict[name])
    assert repr(ours.hook_dict["hook_embed"]) == "HookPoint(name='hook_embed', 2 fwd)"
    assert "(hook_z): HookPoint(name='blocks.0.attn.hook_z')" in str(ours.blocks[0].attn)  # print(model) as TL's


# -- errors TL users catch ----------------------------------------------------------------------------------------
SWITCHED_OFF = [
    ("blocks.0.attn.hook_result", "set_use_attn_result"),
    ("blocks.1.attn.hook_result", "set_use_attn_result"),
    ("blocks.0.hook_q_input", "set_use_split_qkv_input"),
    ("blocks.0.hook_k_input", "set_use_split_qkv_input"),
    ("blocks.1.hook_v_input", "set_use_split_qkv_input"),
    ("blocks.0.hook_mlp_in", "set_use_hook_mlp_in"),
    ("blocks.1.hook_attn_in", "set_use_attn_in"),
]


@pytest.mark.parametrize("is_permanent", [False, True])
@pytest.mark.parametrize("hook_name, setter", SWITCHED_OFF)
def test_hook_on_switched_off_point_is_an_assertion_error(models, hook_name, setter, is_permanent):
    messages = []
    for model in models:
        with pytest.raises(AssertionError) as err:
            model.add_hook(hook_name, read, is_permanent=is_permanent)
        messages.append(str(err.value))
        assert model.list_hooks() == {}
    ours, theirs = messages
    assert isinstance(err.value, AssertionError)
    assert theirs in ours and f"model.{setter}(True)" in ours  # TL's words, then hooklens's advice
    with pytest.raises(InvalidInputError):
        models[0].add_hook(hook_name, read)


@pytest.mark.parametrize("hook_name, setter", SWITCHED_OFF)
def test_switched_on_point_accepts_hooks_as_tl(models, hook_name, setter):
    for model in models:
        getattr(model, setter)(True)
        try:
            model.add_hook(hook_name, read)
        finally:
            getattr(model, setter)(False)
    assert summary(models[0].list_hooks()) == summary(models[1].list_hooks()) == {hook_name: [(read, False, None)]}


def test_filter_matching_a_switched_off_point_raises_as_tl(models):
    for model in models:
        with pytest.raises(AssertionError, match="Cannot add hook blocks.0.attn.hook_result"):
            model.add_hook(lambda name: name.endswith(("hook_z", "hook_result")), read)
    ours, theirs = models
    assert ours.list_hooks() == {}  # hooklens adds nothing; TL keeps what it added before the failing point
    assert list(theirs.list_hooks()) == ["blocks.0.attn.hook_z"]


def test_filters_in_run_with_hooks_skip_the_check_as_tl(models, tokens):
    """TL's `hooks()` never checks; a filter may match switched-off points (their hooks never run)."""
    listed, calls = [], []
    for model in models:
        def count(activation, hook):
            calls.append(hook.name)
        with model.hooks(fwd_hooks=[(lambda name: name.endswith(("hook_result", "hook_z")), count)]):
            listed.append(sorted(model.list_hooks()))
            model(tokens)
    assert listed[0] == listed[1]
    assert "blocks.0.attn.hook_result" in listed[0]
    assert calls == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"] * 2


def test_named_switched_off_point_in_run_with_hooks_raises(models, tokens):
    """A deliberate difference: TL attaches a hook that never runs; hooklens refuses it with the fix."""
    ours, theirs = models
    theirs.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", read)])
    with pytest.raises(AssertionError, match="set_use_attn_result"):
        ours.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", read)])
    assert ours.list_hooks() == {}


def test_module_that_is_not_a_hook_point(models, tokens):
    for model in models:
        with pytest.raises(AssertionError):
            model.add_hook("blocks.0.attn", read)
        with pytest.raises(TypeError):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp", read)])
        model.reset_hooks()
    with pytest.raises(KeyError, match=r"not a HookPoint.*'blocks\.0\.attn\.hook_q'"):
        models[0].add_hook("blocks.0.attn", read)


def test_unknown_name_is_a_key_error_as_tl(models):
    for model in models:
        with pytest.raises(KeyError):
            model.add_hook("blocks.0.hook_rsid_pre", read)
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        models[0].add_hook("blocks.0.hook_rsid_pre", read)


@pytest.fixture
def tokens():
    return torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(0))


# -- custom HookedRootModule subclasses ---------------------------------------------------------------------------
def make_toy(root_cls, point_cls, variant):
    """The same toy model written against either library; `variant` says how it exposes its hook points."""

    class Toy(root_cls):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 4)
            self.hook_in = point_cls()
            self.hook_out = point_cls()
            if variant == "attribute":
                self.setup()
            else:  # names by hand, registries computed on each access
                for name, module in self.named_modules():
                    module.name = name

        def forward(self, x):
            return self.hook_out(self.linear(self.hook_in(x)))

    if variant == "property":
        Toy.hook_dict = property(lambda self: {n: m for n, m in self.named_modules() if isinstance(m, point_cls)})
        Toy.mod_dict = property(lambda self: {n: m for n, m in self.named_modules() if n})
    return Toy()


@pytest.mark.parametrize("variant", ["attribute", "property"])
def test_custom_subclass_matches_tl(variant):
    ours = make_toy(HookedRootModule, HookPoint, variant)
    theirs = make_toy(TLRootModule, TLHookPoint, variant)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    double = lambda t, hook: 2 * t  # noqa: E731
    for toy in (ours, theirs):
        assert isinstance(toy, HookIntrospectionMixin) or toy is theirs
        assert toy.list_hooks() == {}
        toy.add_hook("hook_in", read)
        toy.add_perma_hook("hook_out", double)
        toy.add_hook(lambda name: name.startswith("hook_"), other_read, dir="bwd")
    assert summary(ours.list_hooks()) == summary(theirs.list_hooks())
    for toy in (ours, theirs):
        temporary = summary(toy.list_hooks("hook_out", including_permanent=False))
        assert temporary == {"hook_out": [(other_read, False, None)]}
    assert [repr(p) for p in ours.hook_dict.values()] == [repr(p) for p in theirs.hook_dict.values()]
    assert repr(ours.hook_in) == "HookPoint(name='hook_in', 1 fwd, 1 bwd)"
    assert torch.equal(ours(x), theirs(x))
    outs = [toy.run_with_hooks(x, fwd_hooks=[("hook_in", lambda t, hook: t + 1)]) for toy in (ours, theirs)]
    assert torch.equal(outs[0], outs[1])
    (_, cache), (_, tl_cache) = ours.run_with_cache(x), theirs.run_with_cache(x)
    assert sorted(cache) == sorted(tl_cache) == ["hook_in", "hook_out"]
    assert all(torch.equal(cache[k], tl_cache[k]) for k in cache)
    for toy in (ours, theirs):
        toy.reset_hooks(including_permanent=True)
        assert toy.list_hooks() == {}
