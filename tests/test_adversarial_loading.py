"""Adversarial loading: checkpoints and configs that cannot form a model, or would make loading hang, exhaust memory
or produce NaN logits without a word, must fail (or warn) clearly, naming the problem and the fix.

Probes that could hang the interpreter or read without end (a FIFO, a link to /dev/zero) run in a subprocess
with a timeout.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_hf_gpt2

from hooklens import HookedTransformer, HookedTransformerConfig, loading
from hooklens.errors import InvalidInputError
from hooklens.loading import CheckpointError

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

HF_SMALL = dict(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=50257)
TL_SMALL = dict(n_layers=2, d_model=32, d_head=8, n_ctx=16, d_vocab=61, act_fn="gelu_new", seed=5)
NON_FINITE = "NaN or inf"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_gpt2(tmp_path_factory.mktemp("adv_hf") / "gpt2", seed=3, **HF_SMALL)


@pytest.fixture(scope="module")
def tl_dir(tmp_path_factory) -> Path:
    """A TL-format checkpoint (TL field names in config.json, a TL state dict with its -inf IGNORE buffers)."""
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("adv_tl")
    model = HookedTransformer(HookedTransformerConfig(**TL_SMALL, device="cpu"))
    (directory / "config.json").write_text(json.dumps(TL_SMALL))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def copy_with_config(src: Path, dst: Path, **changes) -> Path:
    """`src` copied to `dst` with config.json's fields updated by `changes` (a value of ... deletes the field)."""
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return dst


def save_edited_weights(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    return dst


def key_ending(state, suffix):
    return next(k for k in state if k.endswith(suffix))


def non_finite_warnings(record):
    return [str(w.message) for w in record if NON_FINITE in str(w.message)]


# -- non-finite weights ----------------------------------------------------------------------------------------------
def test_intact_checkpoints_load_without_a_non_finite_warning(hf_dir, tl_dir):
    # TL's IGNORE buffer is -inf on purpose: it is not a weight, so it must not trigger the warning.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        HookedTransformer.from_pretrained(hf_dir, device="cpu")
        HookedTransformer.from_pretrained(tl_dir, device="cpu")
        HookedTransformer.from_pretrained_no_processing(hf_dir, device="cpu", dtype=torch.float16)
    assert non_finite_warnings(record) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_find_non_finite_finds_every_kind_anywhere(dtype):
    for value in (float("nan"), float("inf"), -float("inf")):
        for index in (0, 7, -1):
            bad = torch.randn(4, 6, dtype=dtype)
            bad.view(-1)[index] = value
            state = {"ok": torch.randn(3, dtype=dtype), "bad": bad, "bad_view": bad.T[1:], "empty": torch.empty(0, 5),
                     "ids": torch.arange(3), "blocks.0.attn.IGNORE": torch.tensor(-torch.inf, dtype=dtype)}
            # bad.T[1:] leaves out column 0 of bad, which holds flat index 0
            expected = ["bad"] if index == 0 else ["bad", "bad_view"]
            assert loading.find_non_finite(state) == expected, (value, index)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hf_weights_warn_naming_the_file_tensor(hf_dir, tmp_path, value):
    def poison(state):
        state[key_ending(state, "h.1.ln_2.weight")][3] = value

    bad = save_edited_weights(hf_dir, tmp_path / "bad", poison)
    with pytest.warns(UserWarning, match=NON_FINITE) as record:
        model = HookedTransformer.from_pretrained(bad, device="cpu")
    (message,) = non_finite_warnings(record)
    assert "h.1.ln_2.weight" in message and str(bad) in message and "h.0." not in message
    assert not model(torch.tensor([[1, 2, 3]])).isfinite().all()  # loaded as it is: the warning is the point


def test_non_finite_tl_weights_warn_naming_the_tensors(tl_dir, tmp_path):
    def poison(state):
        state["blocks.0.mlp.W_in"][0, 0] = float("nan")
        state["unembed.W_U"][1, 1] = float("inf")

    bad = save_edited_weights(tl_dir, tmp_path / "bad", poison)
    with pytest.warns(UserWarning, match=NON_FINITE) as record:
        HookedTransformer.from_pretrained(bad, device="cpu")
    (message,) = non_finite_warnings(record)
    assert "blocks.0.mlp.W_in" in message and "unembed.W_U" in message and "IGNORE" not in message


def test_non_finite_state_dict_warns_in_load_and_process_state_dict():
    model = HookedTransformer(HookedTransformerConfig(**TL_SMALL, device="cpu"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.1.attn.W_V"][0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"state dict holds NaN or inf in blocks\.1\.attn\.W_V"):
        model.load_and_process_state_dict(state)


def test_hf_model_with_non_finite_weights_warns(hf_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir)
    with torch.no_grad():
        hf.transformer.h[0].attn.c_proj.bias[0] = float("nan")
    with pytest.warns(UserWarning, match=r"hf_model holds NaN or inf in transformer\.h\.0\.attn\.c_proj\.bias"):
        HookedTransformer.from_pretrained("gpt2", hf_model=hf, device="cpu")


def test_overflow_in_the_cast_to_float16_warns(hf_dir, tmp_path):
    # Finite in the file, beyond float16's range (65504) once cast: the loaded model would hold inf silently.
    def huge(state):
        state[key_ending(state, "h.0.mlp.c_proj.bias")][0] = 1e6

    big = save_edited_weights(hf_dir, tmp_path / "big", huge)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        HookedTransformer.from_pretrained_no_processing(big, device="cpu")  # float32 holds it: no warning
    assert non_finite_warnings(record) == []
    with pytest.warns(UserWarning, match=r"cast to torch\.float16.*blocks\.0\.mlp\.b_out"):
        HookedTransformer.from_pretrained_no_processing(big, device="cpu", dtype=torch.float16)


# -- HF config.json values that cannot form a model ------------------------------------------------------------------
@pytest.mark.parametrize("changes, match", [
    (dict(n_head=5), r"n_head=5 does not divide n_embd=32.*Set n_head to a divisor"),
    (dict(n_embd=0), r"n_embd=0 cannot form a model: set it to a positive integer"),
    (dict(n_head=-4), r"n_head=-4 cannot form a model"),
    (dict(n_layer=-1), r"n_layer=-1 cannot form a model: set it to an integer >= 0"),
    (dict(n_positions=0), r"n_positions=0 cannot form a model"),
    (dict(vocab_size=-1), r"vocab_size=-1 cannot form a model"),
    (dict(n_inner=0), r"n_inner=0 cannot form a model"),
    # transformers 5 refuses wrong types itself (naming the field), older versions leave them to hooklens
    (dict(n_embd=32.0), r"n_embd.*(=32\.0 is not an integer|expected int)"),
    (dict(n_layer="2"), r"n_layer.*(='2' is not an integer|expected int)"),
    (dict(layer_norm_epsilon=0), r"layer_norm_epsilon=0 cannot form a model.*1e-5"),
    (dict(layer_norm_epsilon=-1e-5), r"layer_norm_epsilon=-1e-05 cannot form a model"),
    (dict(layer_norm_epsilon=float("nan")), r"layer_norm_epsilon=nan cannot form a model"),
    (dict(layer_norm_epsilon=None), r"layer_norm_epsilon.*(=None is not a number|expected float)"),
])
def test_hf_config_values_that_cannot_form_a_model(hf_dir, tmp_path, changes, match):
    bad = copy_with_config(hf_dir, tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=match) as info:
        HookedTransformer.from_pretrained(bad, device="cpu")
    assert str(bad / "config.json") in str(info.value)  # names the file to fix


@pytest.mark.parametrize("changes, match", [
    (dict(n_positions=10**9), r"wpe\.weight: \(16, 32\) \(expected \(1000000000, 32\)\).*config\.json"),
    (dict(vocab_size=10**8), r"wte\.weight.*expected \(100000000, 32\)"),
    (dict(n_layer=10**6), r"n_layer=1000000, but the checkpoint holds 2 blocks.*set n_layer to 2"),
    (dict(n_positions=10**12), r"3\.2e\+13 weights.*n_ctx \(position embedding\)"),
])
def test_hf_config_sizes_far_from_the_checkpoint_fail_before_allocating(hf_dir, tmp_path, monkeypatch, changes,
                                                                        match):
    def allocates(*args, **kwargs):
        raise AssertionError("the model was being built before the config was checked against the checkpoint")

    monkeypatch.setattr(loading, "fill_missing_biases", allocates)
    monkeypatch.setattr(HookedTransformer, "__init__", allocates)
    bad = copy_with_config(hf_dir, tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=match):
        HookedTransformer.from_pretrained(bad, device="cpu")


# -- TL-format config.json values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, match", [
    # 1e9 positions x 32 = 3.2e10 float32 weights (128 GB): under the absolute cap, refused by the checkpoint check.
    (dict(n_ctx=10**9), r"n_ctx=1000000000, but pos_embed\.W_pos has shape \(16, 32\); set n_ctx to 16"),
    (dict(d_mlp=10**8), r"d_mlp=100000000, but blocks\.0\.mlp\.W_in has shape \(32, 128\); set d_mlp to 128"),
    (dict(d_vocab=10**8), r"d_vocab=100000000, but embed\.W_E has shape \(61, 32\); set d_vocab to 61"),
    (dict(d_vocab_out=7), r"d_vocab_out=7, but unembed\.W_U has shape \(32, 61\); set d_vocab_out to 61"),
    (dict(n_layers=10**7), r"n_layers=10000000, but the checkpoint holds 2 blocks; set n_layers to 2"),
    (dict(n_heads=8, d_head=4), r"n_heads=8, but blocks\.0\.attn\.W_Q has shape \(4, 32, 8\); set n_heads to 4"),
    (dict(n_ctx=10**12), r"3\.2e\+13 weights.*n_ctx \(position embedding\)"),
    (dict(n_ctx=0), r"n_ctx=0 cannot form a model: set it to a positive integer"),
    (dict(d_model=-32), r"d_model=-32 cannot form a model"),
    (dict(n_layers=2.5), r"n_layers=2\.5 is not an integer"),
    (dict(eps=0), r"eps=0 cannot form a model"),
    (dict(eps=-1e-5), r"eps=-1e-05 cannot form a model"),
])
def test_tl_config_values_fail_before_allocating(tl_dir, tmp_path, monkeypatch, changes, match):
    def allocates(*args, **kwargs):
        raise AssertionError("the model was being built before the config was checked against the checkpoint")

    monkeypatch.setattr(loading, "fill_missing_biases", allocates)
    monkeypatch.setattr(HookedTransformer, "__init__", allocates)
    bad = copy_with_config(tl_dir, tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=match):
        HookedTransformer.from_pretrained(bad, device="cpu")


def test_tl_checkpoint_missing_a_sizing_weight_is_named(tl_dir, tmp_path):
    bad = save_edited_weights(tl_dir, tmp_path / "bad", lambda state: state.pop("pos_embed.W_pos"))
    with pytest.raises(CheckpointError, match=r"has no pos_embed\.W_pos"):
        HookedTransformer.from_pretrained(bad, device="cpu")
    odd = save_edited_weights(tl_dir, tmp_path / "odd", lambda s: s.update({"blocks.x.w": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"blocks\.x\.w.*blocks\.<layer>\.<weight>"):
        HookedTransformer.from_pretrained(odd, device="cpu")


def test_from_pretrained_overrides_and_truncation_are_checked(hf_dir):
    with pytest.raises(InvalidInputError, match=r"eps=-1\.0 cannot form a model"):
        HookedTransformer.from_pretrained(hf_dir, device="cpu", eps=-1.0)
    with pytest.raises(TypeError, match=r"first_n_layers=1\.5 is not an integer"):
        HookedTransformer.from_pretrained(hf_dir, device="cpu", first_n_layers=1.5)
    with pytest.raises(TypeError, match=r"n_ctx=True is not an integer"):
        HookedTransformer.from_pretrained(hf_dir, device="cpu", n_ctx=True)
    with pytest.raises(InvalidInputError, match="pass 1 to 16"):
        HookedTransformer.from_pretrained(hf_dir, device="cpu", n_ctx=17)


# -- config.json that is not a small JSON object in a regular file ---------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("[1, 2, 3]", "holds a JSON list, not an object"),
    ("42", "holds a JSON int, not an object"),
    ('"gpt2"', "holds a JSON str, not an object"),
    ("null", "holds a JSON NoneType, not an object"),
    ('{"n_layer": 2,', "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[" * 100_000, "is not valid JSON"),  # nesting deep enough to overflow the parser's recursion
    (b'{"n_layer": "\xff\xfe"}', "is not valid JSON"),  # not UTF-8
])
def test_config_json_that_is_not_a_json_object(hf_dir, tmp_path, text, match):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=match):
        HookedTransformer.from_pretrained(bad, device="cpu")


def test_oversized_config_json_is_refused_without_reading_it(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").write_text("{" + " " * (loading.MAX_CONFIG_BYTES + 10) + "}")
    with pytest.raises(CheckpointError, match=f"larger than {loading.MAX_CONFIG_BYTES} bytes"):
        HookedTransformer.from_pretrained(bad, device="cpu")


def test_config_json_that_is_a_directory(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").unlink()
    (bad / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a file"):
        HookedTransformer.from_pretrained(bad, device="cpu")


# Run in a fresh interpreter: if the refusal regressed, reading a FIFO blocks forever and /dev/zero never ends.
_SPECIAL_FILE_PROBE = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    from hooklens import HookedTransformer
    from hooklens.loading import CheckpointError

    src, work, kind, target = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    shutil.copytree(src, work)
    (work / target).unlink()
    if kind == "fifo":
        os.mkfifo(work / target)
    else:
        os.symlink("/dev/zero", work / target)
    try:
        HookedTransformer.from_pretrained(work, device="cpu")
    except CheckpointError as err:
        print("REFUSED:", err)
    else:
        print("LOADED")
""")


@pytest.mark.skipif(not (hasattr(os, "mkfifo") and Path("/dev/zero").exists()), reason="needs POSIX FIFOs")
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
@pytest.mark.parametrize("target", ["config.json", "model.safetensors"])
def test_fifo_or_device_in_place_of_a_checkpoint_file_is_refused(hf_dir, tmp_path, kind, target):
    try:
        result = subprocess.run(
            [sys.executable, "-c", _SPECIAL_FILE_PROBE, str(hf_dir), str(tmp_path / "work"), kind, target],
            capture_output=True, text=True, timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading with {target} as a {kind} hung (it must be refused before it is read)")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "a FIFO" if kind == "fifo" else "a device"
    assert f"REFUSED: {tmp_path / 'work' / target} is {expected}, not a file" in result.stdout, result.stdout


def test_pickled_code_in_a_tl_format_pth_is_never_run(tl_dir, tmp_path):
    import pickle

    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(tl_dir / "config.json", evil / "config.json")
    with open(evil / "model_final.pth", "wb") as f:
        pickle.dump({"embed.W_E": RunsCode()}, f)
    with pytest.raises(CheckpointError, match="never runs pickled code"):
        HookedTransformer.from_pretrained(evil, device="cpu")
    assert not (tmp_path / "pwned").exists()


# -- HookedTransformerConfig built directly --------------------------------------------------------------------------
@pytest.mark.parametrize("changes, error, match", [
    (dict(n_layers=-1), InvalidInputError, r"n_layers=-1 cannot form a model: set it to an integer >= 0"),
    (dict(d_model=0), InvalidInputError, r"d_model=0 cannot form a model.*residual stream width"),
    (dict(n_ctx=-5), InvalidInputError, r"n_ctx=-5 cannot form a model"),
    (dict(d_head=0), InvalidInputError, r"d_head=0 cannot form a model"),
    (dict(n_heads=0), InvalidInputError, r"n_heads=0 cannot form a model.*or to -1, which derives it"),
    (dict(d_mlp=-3), InvalidInputError, r"d_mlp=-3 cannot form a model"),
    (dict(d_vocab=0), InvalidInputError, r"d_vocab=0 cannot form a model.*takes it from the tokenizer"),
    (dict(d_vocab_out=-2), InvalidInputError, r"d_vocab_out=-2 cannot form a model"),
    (dict(n_layers=2.0), TypeError, r"n_layers=2\.0 is not an integer"),
    (dict(d_model="32"), TypeError, r"d_model='32' is not an integer"),
    (dict(n_ctx=True), TypeError, r"n_ctx=True is not an integer"),
    (dict(d_model=30), InvalidInputError, r"d_model=30 is not a multiple of d_head=8"),
    (dict(eps=0.0), InvalidInputError, r"eps=0\.0 cannot form a model"),
    (dict(eps=-1e-5), InvalidInputError, r"eps=-1e-05 cannot form a model"),
    (dict(eps=math.inf), InvalidInputError, r"eps=inf cannot form a model"),
    (dict(eps="1e-5"), TypeError, r"eps='1e-5' is not a number"),
    (dict(attn_scale=0.0), InvalidInputError, r"attn_scale=0\.0 cannot form a model"),
    (dict(attn_scale=-8.0), InvalidInputError, r"attn_scale=-8\.0 cannot form a model"),
    (dict(dtype="float33"), TypeError, r"dtype='float33' is not a torch dtype"),
    (dict(n_ctx=10**12), InvalidInputError, r"3\.2e\+13 weights.*most of them come from n_ctx"),
    (dict(d_vocab=10**11), InvalidInputError, r"most of them come from d_vocab \(embedding\)"),
    (dict(n_layers=10**9), InvalidInputError, r"most of them come from n_layers"),
])
def test_config_values_that_cannot_form_a_model_raise(changes, error, match):
    with pytest.raises(error, match=match):
        HookedTransformerConfig(**{**TL_SMALL, **changes})


def test_config_errors_are_value_and_assertion_errors():
    # Code written against TL catches AssertionError or ValueError; both catch the new errors.
    with pytest.raises(AssertionError):
        HookedTransformerConfig(**{**TL_SMALL, "d_model": 0})
    with pytest.raises(ValueError):
        HookedTransformerConfig(**{**TL_SMALL, "eps": -1.0})


def test_transformer_lens_valid_configs_still_build():
    zero_layers = HookedTransformer(HookedTransformerConfig(**{**TL_SMALL, "n_layers": 0}, device="cpu"))
    assert zero_layers(torch.tensor([[1, 2, 3]])).shape == (1, 3, 61)  # the zero-layer (bigram) model
    cfg = HookedTransformerConfig(**{**TL_SMALL, "n_layers": np.int64(3), "d_mlp": np.int32(40)})
    assert (cfg.n_layers, cfg.d_mlp) == (3, 40) and type(cfg.n_layers) is int
    wide = HookedTransformerConfig(**{**TL_SMALL, "n_heads": 5, "d_head": 16})  # n_heads * d_head != d_model
    assert wide.n_heads * wide.d_head == 80
    assert HookedTransformerConfig(**{**TL_SMALL, "attn_only": True, "d_mlp": 0}).d_mlp == 0  # no MLP to size
    assert HookedTransformerConfig(**{**TL_SMALL, "d_vocab": -1}).d_vocab == -1  # set later by the tokenizer
    assert HookedTransformerConfig(**TL_SMALL, dtype="torch.float64").dtype == torch.float64
    assert HookedTransformerConfig(**TL_SMALL, use_attn_scale=False).attn_scale == 1.0
    assert HookedTransformerConfig(**TL_SMALL, attn_scale=4.0).attn_scale == 4.0


def test_official_model_name_of_a_non_string_is_a_type_error():
    from hooklens.loading_from_pretrained import get_official_model_name

    with pytest.raises(TypeError, match="model_name=None is not a string"):
        get_official_model_name(None)
    assert get_official_model_name("GPT2-Small") == "gpt2"
