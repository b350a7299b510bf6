"""Bit-for-bit consistency, the way TL 3.9's own tests check it (`torch.allclose` at default tolerances, where a
hooklens difference in the last bit already fails):

* `model(x)`, `run_with_hooks(x, <read-only hooks>)` and `run_with_cache(x)` give identical logits and activations
  on CPU, whatever the hooks read ("auto" and "torch" backends): read-only hooks never change which op makes z.
* `attention_backend("eager")` is TL 3.9's computation on every path: logits and every cached activation equal TL's
  bit for bit in float32 on CPU, on identical weights.

The TL twin's processed weights are loaded into the hooklens model, so both run on the very same float32 numbers
(hooklens's own weight processing may round the folded weights differently in the last bit).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import in_place_scores, in_place_shift, tl_model_from_hf, zero_head_0
from tolerances import tolerance

import hooklens.patching as patching
from hooklens import HookedTransformer
from hooklens.attention import attention_backend

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = {
    "one_token": ["The"],
    "sentence": ["Hello there, my friend, how are you doing today?"],
    "left_padded_batch": ["A", "The quick brown fox jumps over the lazy dog.", "Mary and John went to the store"],
}
# Switches that change which attention / projection formulas run (each parametrized case sets them on both).
SWITCHES = {
    "default": {},
    "attn_result": dict(use_attn_result=True),
    "split_qkv_input": dict(use_split_qkv_input=True),
    "attn_in": dict(use_attn_in=True),
    "hook_mlp_in": dict(use_hook_mlp_in=True),
}


@pytest.fixture(scope="module")
def twins(tiny_dir):
    """(hooklens model, TL 3.9 model) on identical float32 weights: the TL twin's processed state dict."""
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(str(tiny_dir), device="cpu").eval()
    model.load_state_dict(tl.state_dict(), strict=True)
    return model, tl


@pytest.fixture
def switched(twins, request):
    """The twins with `SWITCHES[request.param]` set on both, reset afterwards."""
    model, tl = twins
    flags = SWITCHES[request.param]
    for name, value in flags.items():
        getattr(model, f"set_{name}")(value)
        getattr(tl, f"set_{name}")(value)
    yield model, tl
    for name in flags:
        getattr(model, f"set_{name}")(False)
        getattr(tl, f"set_{name}")(False)


def run_kwargs(prompt_name):
    return dict(padding_side="left") if prompt_name == "left_padded_batch" else {}


def assert_caches_equal(cache, reference, what):
    assert set(cache.keys()) == set(reference.keys()), what
    differing = [name for name in reference.keys() if not torch.equal(cache[name], reference[name])]
    assert not differing, f"{what}: activations differ in {differing}"


# -- (a) model(x) == run_with_hooks(x, read-only hooks) == run_with_cache(x), bit for bit ------------------------
def read_only_hooks(names_filter, seen):
    """A read-only hook (stores a copy, returns None) for every point `names_filter` accepts: a filter hook, so it
    lands on the hook points the model's current switches enable, as `run_with_cache`'s do."""

    def record(activation, hook):
        seen[hook.name] = activation.detach().clone()

    return [(names_filter, record)]


def attention_pattern_point(name):
    return name.endswith(("hook_pattern", "hook_attn_scores"))


HOOK_SETS = {
    "every_hook_point": lambda name: True,
    "patterns_only": attention_pattern_point,
    "no_pattern_point": lambda name: not attention_pattern_point(name),
}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("hooks", list(HOOK_SETS))
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_forward_run_with_hooks_and_run_with_cache_agree_bitwise(twins, backend, hooks, prompt, grad):
    model, _ = twins
    kwargs = run_kwargs(prompt)
    seen = {}
    with attention_backend(backend), torch.set_grad_enabled(grad):
        logits = model(PROMPTS[prompt], **kwargs)
        hooked_logits = model.run_with_hooks(PROMPTS[prompt], fwd_hooks=read_only_hooks(HOOK_SETS[hooks], seen),
                                             **kwargs)
        cached_logits, cache = model.run_with_cache(PROMPTS[prompt], **kwargs)
        # Only non-pattern points cached: un-hooked attention takes the fused op; every activation must agree.
        _, fused_cache = model.run_with_cache(PROMPTS[prompt], names_filter=HOOK_SETS["no_pattern_point"], **kwargs)
    assert torch.equal(logits, hooked_logits) and torch.equal(logits, cached_logits)
    assert torch.allclose(logits, hooked_logits) and torch.allclose(logits, cached_logits)  # TL's own check
    assert seen and set(seen) <= set(cache.keys())
    for name, activation in seen.items():
        assert torch.equal(activation, cache[name]), name
    for name in fused_cache.keys():
        assert torch.equal(fused_cache[name], cache[name]), name


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_kv_cached_generation_agrees_with_cached_run(twins, backend):
    """Generation's incremental forwards (q shorter than k) take the same op with and without read-only hooks."""
    model, _ = twins
    tokens = model.to_tokens("The quick brown fox")
    with attention_backend(backend), torch.no_grad():
        plain = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
        with model.hooks(fwd_hooks=read_only_hooks(attention_pattern_point, {})):
            hooked = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("edit", [zero_head_0, in_place_shift, in_place_scores], ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["no_grad", "grad", "inference_mode"])
def test_edits_of_scores_or_pattern_are_applied(twins, edit, mode):
    """The torch backend takes z from the fused op only while the scores / pattern are unedited: an edit (a new
    tensor, or in place, also under inference_mode) makes z TL's `pattern @ v` of the edited pattern."""
    model, tl = twins
    point = "hook_attn_scores" if "scores" in edit.__name__ else "hook_pattern"
    hooks = [(f"blocks.0.attn.{point}", edit)]
    context = {"no_grad": torch.no_grad, "grad": torch.enable_grad, "inference_mode": torch.inference_mode}[mode]
    tokens = model.to_tokens(PROMPTS["sentence"])
    with context():
        with attention_backend("torch"):
            logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
            with model.hooks(fwd_hooks=hooks):
                edited, edited_cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
        with attention_backend("eager"):
            with model.hooks(fwd_hooks=hooks):
                eager, eager_cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
        theirs = tl.run_with_hooks(tokens, fwd_hooks=hooks)
    assert not torch.allclose(logits, edited)  # the edit mattered
    assert torch.equal(edited_cache["blocks.0.attn.hook_z"], eager_cache["blocks.0.attn.hook_z"])
    assert torch.equal(eager, theirs)
    torch.testing.assert_close(edited, theirs, **tolerance("same_dtype"))


# -- (b) attention_backend("eager") == TL 3.9, bit for bit -------------------------------------------------------
@pytest.mark.parametrize("switched", list(SWITCHES), indirect=True)
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_eager_backend_equals_transformer_lens_bitwise(switched, prompt):
    model, tl = switched
    kwargs = run_kwargs(prompt)
    with torch.no_grad():
        with attention_backend("eager"):
            logits = model(PROMPTS[prompt], **kwargs)
            cached_logits, cache = model.run_with_cache(PROMPTS[prompt], **kwargs)
        tl_logits = tl(PROMPTS[prompt], **kwargs)
        tl_cached_logits, tl_cache = tl.run_with_cache(PROMPTS[prompt], **kwargs)
    assert torch.equal(logits, tl_logits)
    assert torch.equal(cached_logits, tl_cached_logits)
    assert_caches_equal(cache, tl_cache, f"{prompt}, {SWITCHES}")


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_eager_backend_gradients_equal_transformer_lens(twins, prompt):
    """Under autograd too (TL's tests run with grad enabled): the loss and every parameter gradient."""
    model, tl = twins
    kwargs = run_kwargs(prompt)
    model.zero_grad()
    tl.zero_grad()
    with attention_backend("eager"):
        loss = model(PROMPTS[prompt], return_type="loss", **kwargs)
        loss.backward()
    tl_loss = tl(PROMPTS[prompt], return_type="loss", **kwargs)
    tl_loss.backward()
    assert torch.equal(loss, tl_loss)
    tl_params = dict(tl.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, tl_params[name].grad), name
    model.zero_grad()
    tl.zero_grad()


def test_eager_backend_kv_cached_generation_equals_transformer_lens(twins):
    model, tl = twins
    tokens = model.to_tokens(["The quick brown fox", "Hi"], padding_side="left")
    kwargs = dict(max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False, padding_side="left")
    with torch.no_grad():
        with attention_backend("eager"):
            ours = model.generate(tokens, **kwargs)
        theirs = tl.generate(tokens, **kwargs)
    assert torch.equal(ours, theirs)


def test_eager_backend_runs_tl_steps_and_fires_ln1_hooks_like_tl(twins, monkeypatch):
    """No fused op under "eager", even without hooks; ln1's hooks fire once per q / k / v input, as in TL."""
    import hooklens.attention as A

    model, tl = twins
    assert "eager" in A.BACKENDS
    sdpa_calls = []
    monkeypatch.setattr(A, "sdpa_attention", lambda *args: sdpa_calls.append(1))
    fired = {"ours": 0, "theirs": 0}

    def count(who):
        def hook(activation, hook):
            fired[who] += 1
        return hook

    tokens = model.to_tokens(PROMPTS["sentence"])
    with torch.no_grad(), attention_backend("eager"):
        model(tokens)
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_normalized", count("ours"))])
    with torch.no_grad():
        tl.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_normalized", count("theirs"))])
    assert not sdpa_calls
    assert fired["ours"] == fired["theirs"] == 3


@pytest.mark.parametrize("sweep", ["get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"])
def test_patching_sweeps_under_eager_equal_transformer_lens_bitwise(tiny_dir, sweep):
    """The seeds' IOI patching numbers: from_pretrained weights + the eager backend give TL's results exactly,
    although the sweep engine batches many patches per forward."""
    with warnings.catch_warnings():  # TL's import-time deprecation notices
        warnings.simplefilter("ignore")
        import transformer_lens.patching as tl_patching

        tl = tl_model_from_hf(tiny_dir)
    ours = HookedTransformer.from_pretrained(str(tiny_dir), device="cpu")
    clean = ours.to_tokens("When John and Mary went to the shops, John gave the bag to")
    corrupted = ours.to_tokens("When John and Mary went to the shops, Mary gave the bag to")
    mary, john = ours.to_single_token(" Mary"), ours.to_single_token(" John")

    def logit_diff(logits):
        return logits[:, -1, mary].mean() - logits[:, -1, john].mean()

    _, tl_cache = tl.run_with_cache(clean)
    want = getattr(tl_patching, sweep)(tl, corrupted, tl_cache, logit_diff)
    with attention_backend("eager"):
        _, cache = ours.run_with_cache(clean)
        got = getattr(patching, sweep)(ours, corrupted, cache, logit_diff, progress=False)
    assert torch.equal(got, want)
