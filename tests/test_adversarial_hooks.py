"""Adversarial hooks: replacements of the wrong dtype or device, cache keys for layers the model does not have, and
cached activations that a later hook edits in place. Each must give a clear error or keep the cache's values."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import in_place_shift, make_tiny_model

from hooklens.errors import InvalidInputError
from hooklens.hook_points import CACHED_ALIASES_ATTR

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model().eval()


@pytest.fixture(autouse=True)
def _no_hooks_left(model):
    yield
    model.reset_hooks(including_permanent=True)
    assert not model.list_hooks()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))


def to_float64(activation, hook):
    return activation.double()


def to_meta(activation, hook):
    return activation.to("meta")


def to_half(activation, hook):
    return activation.half()


# -- replacements of another dtype / device ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_attn_scores",
                                  "blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post", "unembed.hook_out"])
@pytest.mark.parametrize("fn, expected", [(to_float64, "torch.float64 tensor.*torch.float32"),
                                          (to_half, "torch.float16 tensor.*torch.float32"),
                                          (to_meta, "device meta.*no values.*on cpu")])
def test_replacement_of_another_dtype_or_device_names_hook_point_and_fix(model, tokens, name, fn, expected):
    with pytest.raises(InvalidInputError, match=expected) as error:
        model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])
    message = str(error.value)
    assert fn.__name__ in message and repr(name) in message and "result.to(activation." in message
    assert not model.list_hooks()


def test_backward_hook_returning_another_dtype_names_the_gradient(model, tokens):
    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", to_float64)]):
        loss = model(tokens, return_type="loss")
        with pytest.raises(InvalidInputError, match="to_float64 on 'blocks.0.hook_resid_post'.*gradient"):
            loss.backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second real device")
def test_replacement_on_another_real_device_is_refused():
    cuda_model = make_tiny_model(device="cuda").eval()
    with pytest.raises(InvalidInputError, match="device cpu.*on cuda"):
        cuda_model.run_with_hooks(torch.tensor([[1, 2, 3]], device="cuda"),
                                  fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x.cpu())])


def test_token_ids_of_another_integer_width_are_accepted(tokens):
    model = make_tiny_model().eval()
    model.set_use_hook_tokens(True)
    expected = model(tokens)
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[("hook_tokens", lambda x, hook: x.int())]), expected)
    with pytest.raises(InvalidInputError, match="torch.uint8 tensor.*torch.int64"):  # uint8 would index as a mask
        model.run_with_hooks(tokens, fwd_hooks=[("hook_tokens", lambda x, hook: x.to(torch.uint8))])


def test_float_replacement_of_another_dtype_is_accepted_under_autocast(model, tokens):
    """Autocast casts the next op's inputs itself, so a hook returning float32 for a bfloat16 activation works there
    (as in TL)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = {}

        def widen(activation, hook):
            seen["dtype"] = activation.dtype
            return activation.float()

        out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", widen)])
    assert seen["dtype"] == torch.bfloat16 and out.shape == (2, 10, 97)


# -- cache keys for layers that do not exist -----------------------------------------------------------------------
@pytest.mark.parametrize("key, layer", [("blocks.99.hook_resid_pre", "99"), (("resid_pre", 99), "99"),
                                        (("pattern", 2, "attn"), "2"), ("pre5", "5"), (("resid_post", -3), "-3")])
def test_cache_key_for_a_missing_layer_says_the_layer_does_not_exist(model, tokens, key, layer):
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError) as error:
        cache[key]
    message = str(error.value)
    assert f"layer {layer} does not exist" in message and "n_layers=2" in message and "names_filter" not in message


def test_cache_key_filtered_out_still_points_at_names_filter(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(KeyError, match="names_filter"):
        cache["resid_pre", 1]
    assert torch.equal(cache["resid_pre", -2], cache["blocks.0.hook_resid_pre"])


# -- cached activations and later in-place edits -------------------------------------------------------------------
def zero_in_place(activation, hook):
    activation.zero_()


def zero_through_data(activation, hook):
    activation.data[:] = 0  # bumps no version counter


def zero_through_numpy(activation, hook):
    activation.detach().numpy()[...] = 0


EDITS = [zero_in_place, zero_through_data, zero_through_numpy]


@torch.no_grad()
@pytest.mark.parametrize("edit", EDITS)
def test_cache_keeps_values_a_later_hook_edits_at_the_next_hook_point(model, tokens, edit):
    """blocks.0.hook_resid_post and blocks.1.hook_resid_pre receive the same tensor; an edit at the second must not
    rewrite what the cache stored at the first (TL's cache shows the zeros), and the edit still reaches the output."""
    _, clean = model.run_with_cache(tokens)
    edited_out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", edit)])
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", edit)]):
        out, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    assert torch.equal(out, edited_out)
    assert torch.equal(cache["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"])
    assert torch.equal(cache["blocks.1.hook_resid_pre"], torch.zeros_like(clean["blocks.1.hook_resid_pre"]))


@torch.no_grad()
@pytest.mark.parametrize("edit", EDITS)
def test_caching_hook_before_an_editing_hook_on_the_same_point_keeps_its_values(model, tokens, edit):
    name = "blocks.0.hook_mlp_out"
    _, clean = model.run_with_cache(tokens, names_filter=[name])
    cache, caching, _ = model.get_caching_hooks([name])
    with model.hooks(fwd_hooks=caching + [(name, edit)]):
        out = model(tokens)
    assert torch.equal(cache[name], clean[name])
    assert torch.equal(out, model.run_with_hooks(tokens, fwd_hooks=[(name, edit)]))


@torch.no_grad()
def test_cache_keeps_the_pattern_an_in_place_pattern_hook_edits(model, tokens):
    name = "blocks.0.attn.hook_pattern"
    _, clean = model.run_with_cache(tokens, names_filter=[name])
    cache, caching, _ = model.get_caching_hooks([name])
    with model.hooks(fwd_hooks=caching + [(name, in_place_shift)]):
        model(tokens)
    assert torch.equal(cache[name], clean[name])


@torch.no_grad()
def test_caching_without_editing_hooks_stores_no_copy(model, tokens):
    """Copy on write only: with read-only hooks the cache shares memory with the activations, as in TL."""
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    assert cache["blocks.0.hook_resid_post"].data_ptr() == cache["blocks.1.hook_resid_pre"].data_ptr()


@torch.no_grad()
def test_no_cache_bookkeeping_stays_on_returned_tensors(model, tokens):
    """The returned logits were cached (unembed.hook_out): after the run they carry nothing extra, so pickling or
    deep-copying them does not drag the cache along, and torch.load(weights_only=True) reads them back."""
    logits, cache = model.run_with_cache(tokens, names_filter=["unembed.hook_out"])
    assert CACHED_ALIASES_ATTR not in logits.__dict__ and logits.__dict__ == {}
    buffer = io.BytesIO()
    torch.save(logits, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True), logits)
    assert torch.equal(copy.deepcopy(logits), logits) and torch.equal(pickle.loads(pickle.dumps(logits)), logits)
