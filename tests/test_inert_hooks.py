"""A hook filter whose hook can never run warns, naming what it selected and the switch to turn on."""
import warnings

import pytest
import torch
from conftest import make_tiny_model


@pytest.fixture(scope="module")
def model():
    return make_tiny_model().eval()


TOKENS = torch.tensor([[1, 2, 3, 4]])


def nothing(activation, hook):
    return None


def test_filter_on_switched_off_points_warns_with_the_switch(model):
    with pytest.warns(UserWarning, match=r"switched-off hook points \(blocks\.0\.attn\.hook_result, blocks\.1\.attn"
                                         r"\.hook_result\).*set_use_attn_result\(True\)") as record:
        model.run_with_hooks(TOKENS, fwd_hooks=[(lambda name: name.endswith("attn.hook_result"), nothing)])
    assert record[0].filename == __file__  # points at the caller's line


def test_filter_selecting_nothing_warns(model):
    with pytest.warns(UserWarning, match="selected no hook point"):
        with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_typo"), nothing)]):
            pass


def test_active_filters_and_caching_do_not_warn(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.run_with_hooks(TOKENS, fwd_hooks=[(lambda name: name.endswith(("hook_pattern", "hook_result")),
                                                 nothing)])
        model.run_with_cache(TOKENS)
        model.set_use_attn_result(True)
        try:
            model.run_with_hooks(TOKENS, fwd_hooks=[(lambda name: name.endswith("attn.hook_result"), nothing)])
        finally:
            model.set_use_attn_result(False)
