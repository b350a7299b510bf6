"""TL 3.9's utilities (init functions, fan in/out, library check, BOS tokenizer, logits DataFrame), their
`transformer_lens.utilities` import paths, `get_token_position`'s errors, `loading_from_pretrained` and the
`ActivationCache` type name, each against TransformerLens 3.9 itself on the same inputs."""
from __future__ import annotations

import importlib
import pickle
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import hooklens.loading_from_pretrained as hl_loading
from hooklens import HookedTransformer
from hooklens import utils as hl

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens.loading_from_pretrained as tl_loading
    import transformer_lens.utilities as tl

from conftest import tl_model_from_hf

ASSETS = Path(__file__).resolve().parents[1] / "hooklens" / "assets" / "gpt2-tokenizer"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(ASSETS), local_files_only=True)


# ---------------------------------------------------------------------------
# initialization (TL's tests: seeded fills compared value for value)
# ---------------------------------------------------------------------------

SHAPES = [(7,), (16, 24), (24, 16), (4, 32, 8)]
INIT_CASES = [
    ("init_xavier_uniform_", {}),
    ("init_xavier_uniform_", {"gain": 0.5}),
    ("init_xavier_normal_", {}),
    ("init_xavier_normal_", {"gain": 2.0}),
    ("init_kaiming_uniform_", {}),
    ("init_kaiming_uniform_", {"nonlinearity": "leaky_relu", "a": 0.2}),
    ("init_kaiming_uniform_", {"nonlinearity": "tanh", "gain": 0.7, "mode": "fan_out"}),
    ("init_kaiming_normal_", {}),
    ("init_kaiming_normal_", {"nonlinearity": "linear", "mode": "fan_out"}),
    ("init_kaiming_normal_", {"nonlinearity": "leaky_relu", "a": 0.1, "gain": 1.5}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fn_name, kwargs", INIT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_functions_match_tl(fn_name, kwargs, shape, dtype):
    results = []
    for library in (hl, tl):
        param = torch.empty(shape, dtype=dtype)
        torch.manual_seed(1234)
        returned = getattr(library, fn_name)(param, **kwargs)
        assert returned is param  # in place, and returned, as TL
        results.append(param)
    assert torch.equal(results[0], results[1])


def test_init_on_parameter_keeps_grad_and_identity():
    param = torch.nn.Parameter(torch.empty(8, 4))
    assert hl.init_kaiming_uniform_(param) is param and param.requires_grad


@pytest.mark.parametrize("shape", [(3,), (5, 9), (9, 5), (2, 6, 3), (12, 768, 64)], ids=str)
def test_calc_fan_in_and_fan_out_matches_tl(shape):
    tensor = torch.empty(shape)
    assert hl.calc_fan_in_and_fan_out(tensor) == tl.calc_fan_in_and_fan_out(tensor)


@pytest.mark.parametrize("shape", [(), (2, 3, 4, 5)], ids=str)
def test_calc_fan_in_and_fan_out_errors_match_tl(shape):
    tensor = torch.empty(shape)
    with pytest.raises(ValueError) as tl_error:
        tl.calc_fan_in_and_fan_out(tensor)
    with pytest.raises(ValueError) as hl_error:
        hl.calc_fan_in_and_fan_out(tensor)
    assert str(hl_error.value) == str(tl_error.value)


@pytest.mark.parametrize("name", ["torch", "pandas", "sys", "os.path", "definitely_not_a_library_xyz"])
def test_is_library_available_matches_tl(name):
    assert hl.is_library_available(name) == tl.is_library_available(name)


# ---------------------------------------------------------------------------
# tokenizers and logits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_get_tokenizer_with_bos_matches_tl(tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    try:
        ours, theirs = hl.get_tokenizer_with_bos(tokenizer), tl.get_tokenizer_with_bos(tokenizer)
        assert (ours is tokenizer) == (theirs is tokenizer)
        assert ours.padding_side == theirs.padding_side == padding_side
        for text in ["Hello world", ["a b", "The cat sat on the mat"], ""]:
            assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    finally:
        tokenizer.padding_side = "right"


def test_get_tokenizer_with_bos_without_bos_token_returns_it():
    class NoBos:
        bos_token = None

    tokenizer = NoBos()
    assert hl.get_tokenizer_with_bos(tokenizer) is tokenizer is tl.get_tokenizer_with_bos(tokenizer)


@pytest.mark.parametrize("top_k", [None, 1, 5, 50])
@pytest.mark.parametrize("with_tokenizer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logits_to_df_matches_tl(tokenizer, top_k, with_tokenizer, dtype):
    logits = (torch.randn(50257, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    tok = tokenizer if with_tokenizer else None
    ours, theirs = hl.logits_to_df(logits, tok, top_k), tl.logits_to_df(logits, tok, top_k)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    assert list(ours.columns) == (["token_index"] + ["token_string"] * with_tokenizer
                                  + ["logit", "log_prob", "probability"])


# ---------------------------------------------------------------------------
# import paths: every name hooklens mirrors sits in the same `utilities` submodule as in TL, and is one object
# ---------------------------------------------------------------------------

UTILITIES_SUBMODULES = [
    "activation_functions", "attribute_utils", "components_utils", "defaults_utils", "devices",
    "exploratory_utils", "hf_utils", "initialization_utils", "library_utils", "lm_utils", "logits_utils", "matrix",
    "slice", "tensors", "tokenize_utils",
]


@pytest.mark.parametrize("submodule", UTILITIES_SUBMODULES)
def test_utilities_submodules_mirror_tl(submodule):
    ours = importlib.import_module(f"hooklens.utilities.{submodule}")
    theirs = importlib.import_module(f"transformer_lens.utilities.{submodule}")
    import hooklens.utilities as hl_utilities

    assert ours.__all__
    for name in ours.__all__:
        assert hasattr(theirs, name), f"TL 3.9 has no transformer_lens.utilities.{submodule}.{name}"
        assert getattr(ours, name) is getattr(hl, name) is getattr(hl_utilities, name)


@pytest.mark.parametrize("name", [
    "init_kaiming_uniform_", "init_kaiming_normal_", "init_xavier_uniform_", "init_xavier_normal_",
    "calc_fan_in_and_fan_out", "is_library_available", "get_tokenizer_with_bos", "logits_to_df", "sample_logits",
])
def test_issue_names_at_utils_and_utilities(name):
    import hooklens.utilities as hl_utilities

    assert callable(getattr(hl, name)) and getattr(hl_utilities, name) is getattr(hl, name)
    assert name in hl.__all__ and name in hl_utilities.__all__


# ---------------------------------------------------------------------------
# get_token_position (TL's test_tokenization_methods / test_prepend_bos cases, on identical weights)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_dir):
    return HookedTransformer.from_pretrained(tiny_dir), tl_model_from_hf(tiny_dir)


PROMPT = "There were some biomolecules"
POSITION_CASES = [
    (" some", PROMPT, {}),
    (" some", PROMPT, {"prepend_bos": False}),
    (" some", PROMPT, {"prepend_bos": True}),
    (" cat", "The cat sat on the mat. The mat sat on the cat.", {"mode": "first"}),
    (" cat", "The cat sat on the mat. The mat sat on the cat.", {"mode": "last"}),
    (2, torch.tensor([2.0, 3, 4]), {}),
    (2, torch.tensor([2.0, 3, 4]), {"prepend_bos": False}),
    (2, torch.tensor([2.0, 3, 4, 2, 5]), {"mode": "last"}),
    (2, torch.tensor([[2.0, 3, 4]]), {}),
    (torch.tensor(4), torch.tensor([2, 3, 4]), {}),
    (50256, PROMPT, {}),
    (50256, PROMPT, {"prepend_bos": True}),
    (50256, PROMPT, {"padding_side": "left"}),
]


@pytest.mark.parametrize("single_token, prompt, kwargs", POSITION_CASES)
def test_get_token_position_matches_tl(models, single_token, prompt, kwargs):
    model, tl_model = models
    position = model.get_token_position(single_token, prompt, **kwargs)
    assert type(position) is int and position == tl_model.get_token_position(single_token, prompt, **kwargs)


ERROR_CASES = [
    ("biomolecules", PROMPT, {}),  # not one token in GPT-2: to_single_token's assertion
    (" cat", PROMPT, {}),  # one token, absent from the prompt
    (50256, PROMPT, {"prepend_bos": False}),  # BOS only occurs when it is prepended
    (7, torch.tensor([[1, 2], [3, 4]]), {}),  # rank 2 with a batch of 2
]


@pytest.mark.parametrize("single_token, prompt, kwargs", ERROR_CASES)
def test_get_token_position_errors_match_tl(models, single_token, prompt, kwargs):
    model, tl_model = models
    with pytest.raises(AssertionError) as tl_error:
        tl_model.get_token_position(single_token, prompt, **kwargs)
    with pytest.raises(AssertionError) as hl_error:
        model.get_token_position(single_token, prompt, **kwargs)
    assert isinstance(hl_error.value, ValueError)
    assert str(hl_error.value).startswith(str(tl_error.value))  # TL's words, then hooklens's advice


def test_token_not_in_prompt_message_is_tls_with_advice_as_note(models):
    model, tl_model = models
    with pytest.raises(AssertionError) as tl_error:
        tl_model.get_token_position(" cat", PROMPT)
    with pytest.raises(AssertionError) as hl_error:
        model.get_token_position(" cat", PROMPT)
    # TL's own test compares the text exactly: `str(exc) == "The token does not occur in the prompt"`
    assert str(hl_error.value) == str(tl_error.value) == "The token does not occur in the prompt"
    assert any("prepend_bos" in note for note in getattr(hl_error.value, "__notes__", ["prepend_bos"]))


def test_get_token_position_with_default_prepend_bos_false_matches_tl(tiny_dir):
    """TL's test_prepend_bos_with_get_token_position, with cfg.default_prepend_bos switched off."""
    for model in (HookedTransformer.from_pretrained(tiny_dir), tl_model_from_hf(tiny_dir)):
        bos = model.tokenizer.bos_token_id
        assert model.get_token_position(bos, "Hello world!") == 0
        with pytest.raises(AssertionError):
            model.get_token_position(bos, "Hello world!", prepend_bos=False)
        model.cfg.default_prepend_bos = False
        with pytest.raises(AssertionError):
            model.get_token_position(bos, "Hello world!")
        assert model.get_token_position(bos, "Hello world!", prepend_bos=True) == 0


def test_get_token_position_bad_mode_matches_tl(models):
    model, tl_model = models
    with pytest.raises(ValueError) as tl_error:
        tl_model.get_token_position(" some", PROMPT, mode="middle")
    with pytest.raises(ValueError) as hl_error:
        model.get_token_position(" some", PROMPT, mode="middle")
    assert str(hl_error.value) == str(tl_error.value)


# ---------------------------------------------------------------------------
# the ActivationCache type name, and loading_from_pretrained
# ---------------------------------------------------------------------------

def test_cache_type_prints_as_tls(models):
    model, tl_model = models
    _, cache = model.run_with_cache("Hello world")
    _, tl_cache = tl_model.run_with_cache("Hello world")
    assert str(type(cache)) == str(type(tl_cache)).replace("transformer_lens", "hooklens")
    assert str(type(cache)) == "<class 'hooklens.ActivationCache.ActivationCache'>"
    assert importlib.import_module("hooklens.cache").ActivationCache is type(cache)  # the old path still works


def test_activation_cache_pickles_by_tls_path():
    from hooklens.ActivationCache import ActivationCache

    cache = ActivationCache({"hook_embed": torch.ones(1, 2, 3)}, model=None)
    payload = pickle.dumps(cache)
    assert b"hooklens.ActivationCache" in payload
    restored = pickle.loads(payload)
    assert type(restored) is ActivationCache and torch.equal(restored["hook_embed"], cache["hook_embed"])


ALIASES = [name for official in hl_loading.OFFICIAL_MODEL_NAMES
           for name in [official, official.upper()] + hl_loading.MODEL_ALIASES.get(official, [])]


@pytest.mark.parametrize("name", ALIASES)
def test_official_model_name_and_checkpoint_labels_match_tl(name):
    assert hl_loading.get_official_model_name(name) == tl_loading.get_official_model_name(name)
    official = tl_loading.get_official_model_name(name)
    if official.startswith("stanford-crfm/"):
        assert hl_loading.get_checkpoint_labels(name) == tl_loading.get_checkpoint_labels(name)
    else:
        with pytest.raises(ValueError) as tl_error:
            tl_loading.get_checkpoint_labels(name)
        with pytest.raises(ValueError) as hl_error:
            hl_loading.get_checkpoint_labels(name)
        assert str(hl_error.value) == str(tl_error.value)


def test_gpt2_family_is_tls():
    tl_gpt2 = [name for name in tl_loading.OFFICIAL_MODEL_NAMES if "gpt2" in name.lower()]
    assert hl_loading.OFFICIAL_MODEL_NAMES == tl_gpt2
    for name in tl_gpt2:
        assert set(hl_loading.MODEL_ALIASES.get(name, [])) == set(tl_loading.MODEL_ALIASES.get(name, []))
    assert hl_loading.STANFORD_CRFM_CHECKPOINTS == tl_loading.STANFORD_CRFM_CHECKPOINTS


@pytest.mark.parametrize("name", ["attn-only-2l", "solu-12l", "pythia-70m", "not-a-model"])
def test_non_gpt2_names_raise_clear_errors(name):
    for function in (hl_loading.get_official_model_name, hl_loading.get_checkpoint_labels):
        with pytest.raises(ValueError, match="not found.*GPT-2 family only"):
            function(name)
