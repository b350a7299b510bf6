"""Shared fixtures: random-weight GPT-2 checkpoints saved in HF format, and TransformerLens 3.9 twins of them.

No weights are downloaded: each checkpoint is `GPT2LMHeadModel(GPT2Config(...))` with a fixed seed, saved with
`save_pretrained` and loaded back through hooklens's real loading code.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict

import pytest
import torch

# The one tolerance table lives in tests/tolerances.py; re-exported here for `from conftest import ...`.
from tolerances import TOLERANCES, tolerance  # noqa: F401

# Without CUDA the Triton kernels run in Triton's interpreter, which is chosen when a kernel is decorated, i.e. when
# hooklens.kernels is first imported. Setting it here, before any test module is imported, makes the kernel mode the
# same whichever test file is collected first. The switch's name is INTERPRETER_ENV_VAR (subprocess tests drop it).
INTERPRETER_ENV_VAR = "TRITON_INTERPRET"
if not torch.cuda.is_available():
    os.environ.setdefault(INTERPRETER_ENV_VAR, "1")

# Where models built without an explicit device go during tests (hooklens's and TL's). Both libraries default to
# "cuda" when PyTorch sees a GPU; the suite's references (HF models, TL twins, hand-written loops) are built on the
# CPU, so on a GPU machine the default is pinned to the CPU as in CI. Tests of CUDA paths ask for "cuda"
# explicitly (the kernel, attention-backend and head-score tests). HOOKLENS_TEST_DEVICE=cuda lifts the pin
# (exploration only: CPU-built references then meet CUDA models).
TEST_DEFAULT_DEVICE = os.environ.get("HOOKLENS_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True, scope="session")
def _pin_default_device():
    # Session scope: module- and session-scoped model fixtures are built before any function-scoped fixture runs.
    if TEST_DEFAULT_DEVICE == "cuda":
        yield
        return
    import hooklens.config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hooklens.config, "default_device", lambda: TEST_DEFAULT_DEVICE)
        try:  # TL 3.9's configs pick "cuda" the same way; its models are references here, so they stay beside ours
            import transformer_lens.config.hooked_transformer_config as tl_config
        except ImportError:
            pass
        else:
            patch.setattr(tl_config, "get_device", lambda: TEST_DEFAULT_DEVICE)
        yield


# CUDA twins of CPU tests: parametrize a test over DEVICES; the "cuda" case is skipped where CUDA is absent.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA twin of a CPU test: needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# The random tiny model of the analysis-tool tests (ablation, attribution, path patching, head scores, attention
# backends). `make_tiny_model(**overrides)` changes single fields; the seed fixes the weights, so every module that
# builds it with the same fields gets the same model.
TINY_MODEL_CONFIG = dict(n_layers=2, d_model=32, d_head=8, n_ctx=32, d_vocab=97, act_fn="gelu_new", seed=0)
# Overrides for the wider variant (4 heads of 16) that the attention-backend and head-score tests use.
WIDE_TINY_MODEL = dict(d_model=64, d_head=16, n_ctx=64)


def make_tiny_model(**overrides):
    """A fresh `HookedTransformer(HookedTransformerConfig(**TINY_MODEL_CONFIG, **overrides))` (train mode, CPU
    unless `device` is given), so callers can `.eval()`, `.double()` or `.to(device)` it as before."""
    # imported here, not at the top: conftest sets TRITON_INTERPRET before anything imports hooklens
    from hooklens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**{**TINY_MODEL_CONFIG, **overrides}))


@pytest.fixture(scope="module")
def tiny_model():
    """The default tiny model in eval mode, one per test module (modules may add hooks or gradients to it)."""
    return make_tiny_model().eval()


# Small configs that still exercise every code path; "gpt2-small-shape" is only used where it matters.
HF_CONFIGS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257),
    "odd": dict(n_layer=3, n_embd=96, n_head=3, n_positions=64, vocab_size=50257, n_inner=200),
    "gelu": dict(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=50257, activation_function="gelu"),
}


@pytest.fixture
def no_grad():
    """Inference only, scoped to one test (modules opt in with `pytestmark = pytest.mark.usefixtures("no_grad")`)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: one intra-op thread is as fast, and immune to OpenMP spin-waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_hf_gpt2(seed: int = 0, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_config = GPT2Config(**config)
    hf_config._attn_implementation = "eager"
    model = GPT2LMHeadModel(hf_config).eval()
    # Random (not zero) biases and LN parameters, so weight processing is really exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_hf_gpt2(directory: Path, seed: int = 0, **config) -> Path:
    model = make_hf_gpt2(seed, **config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_gpt2")
    return {name: save_hf_gpt2(root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(HF_CONFIGS.items())}


@pytest.fixture(scope="session")
def tiny_dir(hf_dirs) -> Path:
    return hf_dirs["tiny"]


def load_hf(directory: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()


def tl_model_from_hf(directory: Path, fold_ln=True, center_writing_weights=True, center_unembed=True,
                     fold_value_biases=True, **cfg_overrides):
    """TransformerLens 3.9's HookedTransformer built offline from the same HF checkpoint."""
    from transformers import GPT2TokenizerFast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    import hooklens.tokenizer as tok

    hf = load_hf(directory)
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn=c.activation_function,
        normalization_type="LN", original_architecture="GPT2LMHeadModel", device="cpu", **cfg_overrides,
    )
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=fold_ln, center_writing_weights=center_writing_weights,
        center_unembed=center_unembed, fold_value_biases=fold_value_biases,
    )
    return model.eval()


# Hooks that edit attention scores / patterns (returning a new tensor or in place), shared by the tests that check
# every edit reaches z on every backend.
def zero_head_0(pattern, hook):
    out = pattern.clone()
    out[:, 0] = 0
    return out


def in_place_shift(pattern, hook):
    pattern[:, 1, :, 0] += 0.25


def in_place_scores(scores, hook):
    scores.mul_(0.5)
