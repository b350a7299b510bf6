"""hooklens.head_detector against transformer_lens.head_detector (3.9) on the same weights."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from hooklens import HookedTransformer
from hooklens import head_detector as hd

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import head_detector as tl_hd

pytestmark = pytest.mark.usefixtures("no_grad")

PROMPT = "The cat sat on the mat. The cat sat on the mat again, and the dog sat too."


@pytest.fixture(scope="module")
def models(hf_dirs):
    from conftest import tl_model_from_hf

    return HookedTransformer.from_pretrained(hf_dirs["odd"]), tl_model_from_hf(hf_dirs["odd"])


@pytest.mark.parametrize("name", hd.HEAD_NAMES)
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude", [(False, False), (True, False), (False, True), (True, True)])
def test_named_patterns_match_transformer_lens(models, name, error_measure, exclude):
    model, tl = models
    kwargs = dict(exclude_bos=exclude[0], exclude_current_token=exclude[1], error_measure=error_measure)
    ours = hd.detect_head(model, PROMPT, name, **kwargs)
    theirs = tl_hd.detect_head(tl, PROMPT, name, **kwargs)
    assert ours.shape == (3, 3) and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, atol=2e-3 if error_measure == "abs" else 1e-5, rtol=0)


def test_heads_cache_lists_and_custom_patterns_match_transformer_lens(models):
    model, tl = models
    tokens = model.to_tokens(PROMPT)
    for name in hd.HEAD_NAMES:
        assert torch.equal(getattr(hd, f"get_{name}_detection_pattern")(tokens),
                           getattr(tl_hd, f"get_{name}_detection_pattern")(tokens))
    heads = [(0, 1), (2, 0), (2, 2)]
    torch.testing.assert_close(hd.detect_head(model, PROMPT, "induction_head", heads=heads),
                               tl_hd.detect_head(tl, PROMPT, "induction_head", heads=heads))
    as_dict = {0: [1], 2: [0, 2]}
    torch.testing.assert_close(hd.detect_head(model, PROMPT, "induction_head", heads=as_dict),
                               hd.detect_head(model, PROMPT, "induction_head", heads=heads))
    prompts = [PROMPT, "one two three one two three"]
    torch.testing.assert_close(hd.detect_head(model, prompts, "previous_token_head"),
                               tl_hd.detect_head(tl, prompts, "previous_token_head"))
    _, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    _, tl_cache = tl.run_with_cache(tokens, remove_batch_dim=True)
    custom = torch.tril(torch.rand(tokens.shape[1], tokens.shape[1], generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(hd.detect_head(model, PROMPT, custom, cache=cache, error_measure="abs"),
                               tl_hd.detect_head(tl, PROMPT, custom, cache=tl_cache, error_measure="abs"),
                               atol=2e-3, rtol=0)
    before = cache["pattern", 0].clone()
    hd.detect_head(model, PROMPT, "induction_head", cache=cache, exclude_bos=True, exclude_current_token=True)
    assert torch.equal(cache["pattern", 0], before)  # the caller's cache is not edited


def test_bad_input_is_explained(models, caplog):
    model, _ = models
    with pytest.raises(ValueError, match="one of head names"):
        hd.detect_head(model, PROMPT, "induction")
    with pytest.raises(ValueError, match="error_measure"):
        hd.detect_head(model, PROMPT, "induction_head", error_measure="l2")
    with pytest.raises(ValueError, match="lower triangular matrix of shape"):
        hd.detect_head(model, PROMPT, torch.ones(5, 5))
    with pytest.raises(ValueError, match="pass one string"):
        hd.detect_head(model, [PROMPT, PROMPT], torch.eye(3))
    with pytest.raises(ValueError, match="more than one token"):
        hd.detect_head(model, "", "induction_head")
    with caplog.at_level(logging.WARNING):
        n = model.to_tokens(PROMPT).shape[1]
        hd.detect_head(model, PROMPT, 0.5 * torch.tril(torch.ones(n, n)))
    assert "other than 0 or 1" in caplog.text
