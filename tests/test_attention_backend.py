"""End to end through `attention_backend`: the Triton and torch backends give the same logits, caches and hook
semantics on a tiny random model; the dispatch picks the op the active hooks need.

Without CUDA the "triton" backend runs the real kernels in Triton's interpreter (switched on in conftest.py).
Triton-dependent tests skip when Triton is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    INTERPRETER_ENV_VAR,
    WIDE_TINY_MODEL,
    in_place_scores,
    in_place_shift,
    make_tiny_model,
    zero_head_0,
)
from tolerances import tolerance

import hooklens.attention as A
from hooklens.attention import attention_backend, get_attention_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = A.triton_available()
KERNELS_RUN = HAS_TRITON and A._load_kernels().kernels_runnable_on(DEVICE)
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="Triton missing, or no CUDA and the interpreter is off")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(**WIDE_TINY_MODEL).to(DEVICE)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (3, 19), generator=torch.Generator().manual_seed(0)).to(DEVICE)


@pytest.fixture(scope="module")
def left_pad_mask(tokens):
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :11] = 0
    return mask


class Counter:
    """Wraps a function (looked up as a module attribute at call time) and counts calls."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = 0
        self.results = []
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.calls += 1
            out = original(*args, **kwargs)
            self.results.append(out)
            return out

        monkeypatch.setattr(owner, name, wrapped)


def run_both(fn):
    with attention_backend("torch"):
        ref = fn()
    with attention_backend("triton"):
        got = fn()
    return ref, got


def assert_close(a, b):
    """Fused (triton) against torch-backend activations: same infinities, finite entries within the table."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(a)
    torch.testing.assert_close(a[finite], b[finite], **tolerance("fused_vs_eager"))


# -- the context manager ----------------------------------------------------------------------------------------
def test_backend_context_manager_nests_and_validates():
    assert get_attention_backend() == "auto"
    with attention_backend("torch"):
        assert get_attention_backend() == "torch"
        with attention_backend("triton"):
            assert get_attention_backend() == "triton"
        assert get_attention_backend() == "torch"
    assert get_attention_backend() == "auto"
    with pytest.raises(ValueError, match="one of"):
        with attention_backend("cuda"):
            pass
    with pytest.raises(RuntimeError):
        with attention_backend("torch"):
            raise RuntimeError("boom")
    assert get_attention_backend() == "auto"


# Run first in a subprocess: records, in `importers`, the file that issued each import of triton.
TRITON_IMPORT_SPY = (
    "import os, sys, traceback, importlib.abc\n"
    "importers = []\n"
    "class Spy(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'triton':\n"
    "            frames = [f for f in traceback.extract_stack() if '<frozen' not in f.filename]\n"
    "            importers.append(frames[-2].filename)\n"
    "        return None\n"
    "sys.meta_path.insert(0, Spy())\n"
)


def test_import_hooklens_does_not_import_triton():
    # hooklens's own code must not import Triton (or hooklens.kernels) on import or on a CPU forward (the model is
    # put on the CPU explicitly: on a GPU machine the default device is CUDA, where the kernels are meant to run).
    # A dependency may (on a CUDA machine, torch 2.11 + transformers 5.17 did), so the check fails only when the
    # file that imported triton belongs to hooklens.
    code = TRITON_IMPORT_SPY + (
        "import torch, hooklens\n"
        "from hooklens import HookedTransformer, HookedTransformerConfig\n"
        "cfg = HookedTransformerConfig(n_layers=1, d_model=32, d_head=8, n_ctx=16, d_vocab=11, act_fn='relu',\n"
        "                              device='cpu')\n"
        "m = HookedTransformer(cfg)\n"
        "m(torch.zeros(1, 5, dtype=torch.long)); m.run_with_cache(torch.zeros(1, 5, dtype=torch.long))\n"
        "package = os.path.dirname(hooklens.__file__)\n"
        "ours = [f for f in importers if f.startswith(package)]\n"
        "assert not ours and 'hooklens.kernels' not in sys.modules, f'triton imported from {ours}'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != INTERPRETER_ENV_VAR}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_triton_import_check_can_fail():
    # The spy must see an import that hooklens issues: importing hooklens.kernels from hooklens code does.
    if not HAS_TRITON:
        pytest.skip("needs Triton")
    code = TRITON_IMPORT_SPY + (
        "import hooklens.attention\n"
        "hooklens.attention.triton_available()\n"
        "package = os.path.dirname(hooklens.__file__)\n"
        "print([f for f in importers if f.startswith(package)])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "hooklens" in result.stdout and "_common.py" in result.stdout, result.stdout


def test_auto_uses_torch_on_cpu(model, tokens, monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU-only behaviour")
    sdpa = Counter(monkeypatch, A, "sdpa_attention")
    model(tokens)
    assert sdpa.calls == model.cfg.n_layers
    assert not A.uses_triton(torch.device("cpu"), torch.float32, 16)


def test_forced_triton_rejects_unsupported_inputs():
    if not HAS_TRITON:
        with attention_backend("triton"), pytest.raises(RuntimeError, match="needs Triton"):
            A.uses_triton(torch.device("cpu"), torch.float32, 16)
        return
    with attention_backend("triton"), pytest.raises(ValueError, match="d_head"):
        A.uses_triton(torch.device(DEVICE), torch.float64, 16)
    with attention_backend("triton"), pytest.raises(ValueError, match="d_head"):
        A.uses_triton(torch.device(DEVICE), torch.float32, 256)


# -- same numbers -----------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("padded", [False, True])
def test_same_logits_and_cache_for_every_hook(model, tokens, left_pad_mask, padded):
    mask = left_pad_mask if padded else None
    with torch.no_grad():
        (logits_ref, cache_ref), (logits, cache) = run_both(lambda: model.run_with_cache(tokens, attention_mask=mask))
        plain_ref, plain = run_both(lambda: model(tokens, attention_mask=mask))
    assert_close(logits_ref, logits)
    assert_close(plain_ref, plain)
    assert_close(logits, plain)
    assert set(cache_ref.keys()) == set(cache.keys())
    assert {"blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_z"} <= set(cache)
    for name in cache_ref.keys():
        assert_close(cache_ref[name], cache[name])


@needs_kernels
def test_gradients_match(model, tokens):
    def grads():
        model.zero_grad()
        model(tokens, return_type="loss").backward()
        return [p.grad.clone() for p in model.parameters()]

    ref, got = run_both(grads)
    model.zero_grad()
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, **tolerance("fused_vs_eager_grads"))


@needs_kernels
def test_generate_with_kv_cache_matches(model, tokens):
    ref, got = run_both(lambda: model.generate(tokens[:2, :6], max_new_tokens=4, do_sample=False, verbose=False,
                                               stop_at_eos=False))
    assert torch.equal(ref, got)


# -- dispatch ---------------------------------------------------------------------------------------------------
@needs_kernels
def test_no_pattern_hooks_runs_flash(model, tokens, monkeypatch):
    kernels = A._load_kernels()
    flash = Counter(monkeypatch, kernels, "flash_attention")
    fused = Counter(monkeypatch, kernels, "pattern_attention")
    with attention_backend("triton"), torch.no_grad():
        model.run_with_cache(tokens, names_filter=lambda n: "pattern" not in n and "attn_scores" not in n)
    assert flash.calls == model.cfg.n_layers and fused.calls == 0


def test_auto_runs_sdpa_when_no_hook_reads_the_pattern(model, tokens, monkeypatch):
    # The policy on CUDA, checked on any device by pretending the kernels apply: un-hooked attention goes to SDPA
    # under "auto" and to the flash kernel only under "triton"; a pattern hook still gets the fused kernel.
    monkeypatch.setattr(A, "uses_triton", lambda device, dtype, d_head: True)
    sdpa = Counter(monkeypatch, A, "sdpa_attention")
    flash_calls = []
    monkeypatch.setattr(A, "triton_flash_attention", lambda q, *rest: flash_calls.append(1) or q.clone())
    fused_calls = []

    def fake_pattern_kernel(q, k, v, attn_scale, pos_offset, attention_mask, with_scores):
        # What the kernel writes, from the reference steps.
        fused_calls.append(1)
        scores = A.attention_scores(q, k, attn_scale, pos_offset, attention_mask)
        pattern = A.softmax_pattern(scores)
        return A.PatternKernelOutputs(q, k, v, attn_scale, pos_offset, attention_mask,
                                      scores if with_scores else None, pattern, A.z_from_pattern(pattern, v))

    monkeypatch.setattr(A, "triton_pattern_attention", fake_pattern_kernel)
    with torch.no_grad():
        model(tokens)
        assert sdpa.calls == model.cfg.n_layers and not flash_calls
        with attention_backend("triton"):
            model(tokens)
        assert sdpa.calls == model.cfg.n_layers and len(flash_calls) == model.cfg.n_layers
        model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        assert len(fused_calls) == model.cfg.n_layers and sdpa.calls == model.cfg.n_layers


@needs_kernels
def test_cache_holds_the_kernels_buffers(model, tokens, monkeypatch):
    """Zero-copy handoff: the cached pattern / scores are the very tensors the fused kernel wrote."""
    kernels = A._load_kernels()
    fused = Counter(monkeypatch, kernels, "pattern_attention")
    flash = Counter(monkeypatch, kernels, "flash_attention")
    recompute = Counter(monkeypatch, A, "z_from_pattern")
    with attention_backend("triton"), torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    assert fused.calls == model.cfg.n_layers and flash.calls == 0 and recompute.calls == 0
    for layer, (scores, pattern, _z) in enumerate(fused.results):
        assert cache[f"blocks.{layer}.attn.hook_pattern"].data_ptr() == pattern.data_ptr()
        assert cache[f"blocks.{layer}.attn.hook_attn_scores"].data_ptr() == scores.data_ptr()


@needs_kernels
def test_read_only_hooks_do_not_recompute(model, tokens, monkeypatch):
    recompute = Counter(monkeypatch, A, "z_from_pattern")
    softmax = Counter(monkeypatch, A, "softmax_pattern")
    reference = Counter(monkeypatch, A, "attention_scores")
    seen = []

    def read(act, hook):
        seen.append(float(act.sum()))  # reads, returns None

    def read_and_return_same(act, hook):
        return act

    hooks = [(lambda n: n.endswith("hook_pattern"), read),
             (lambda n: n.endswith("hook_attn_scores"), read_and_return_same)]
    with attention_backend("triton"), torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert len(seen) == model.cfg.n_layers
    assert recompute.calls == 0 and softmax.calls == 0 and reference.calls == 0


def ablate_scores(scores, hook):
    out = scores.clone()
    out[:, :, 3:, 1] = float("-inf")
    return out


@needs_kernels
@pytest.mark.parametrize("edit", [zero_head_0, in_place_shift, ablate_scores, in_place_scores],
                         ids=lambda f: f.__name__)
def test_editing_hooks_match_torch_backend(model, tokens, left_pad_mask, monkeypatch, edit):
    recompute = Counter(monkeypatch, A, "z_from_pattern")
    point = "hook_pattern" if "scores" not in edit.__name__ else "hook_attn_scores"
    name = f"blocks.0.attn.{point}"

    def run():
        cache, fwd, _ = model.get_caching_hooks()
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, edit)]):
            with model.hooks(fwd_hooks=fwd, _check=False):  # caching hooks run after the edit
                return model(tokens, attention_mask=left_pad_mask), cache

    with attention_backend("torch"):
        logits_ref, cache_ref = run()
    recompute.calls = 0
    with attention_backend("triton"):
        logits, cache = run()
    assert recompute.calls == 1  # only the edited layer recomputes z; layer 1 has read-only (caching) hooks
    assert_close(logits_ref, logits)
    for key in ("blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z",
                "blocks.1.attn.hook_pattern"):
        assert_close(cache_ref[key], cache[key])
    with torch.no_grad():
        clean = model(tokens, attention_mask=left_pad_mask)
    assert not torch.allclose(clean, logits)  # the edit mattered


def test_torch_backend_pattern_edit_matches_transformer_lens(model, tokens):
    """The torch backend (which the triton backend is compared with above) matches TransformerLens 3.9."""
    tl = pytest.importorskip("transformer_lens")
    cfg = model.cfg
    tl_cfg = tl.HookedTransformerConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, d_head=cfg.d_head,
                                        n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab, act_fn=cfg.act_fn, seed=0,
                                        device=DEVICE)
    tl_model = tl.HookedTransformer(tl_cfg)
    tl_model.load_state_dict(model.state_dict(), strict=False)
    hooks = [("blocks.0.attn.hook_pattern", zero_head_0), ("blocks.1.attn.hook_attn_scores", ablate_scores)]
    with torch.no_grad(), attention_backend("torch"):
        ours = model.run_with_hooks(tokens, fwd_hooks=hooks)
        theirs = tl_model.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(ours, theirs, **tolerance("same_dtype"))


@needs_kernels
def test_inference_mode_detects_edits(model, tokens, monkeypatch):
    """Inference tensors have no version counter; the hooks' buffers are allocated as normal tensors."""
    recompute = Counter(monkeypatch, A, "z_from_pattern")

    def run(hook):
        with torch.inference_mode():
            return model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", hook)])

    with attention_backend("torch"):
        ref = run(in_place_shift)
    recompute.calls = 0
    with attention_backend("triton"):
        got = run(in_place_shift)
        assert recompute.calls == 1
        run(lambda pattern, hook: None)
        assert recompute.calls == 1
    assert_close(ref, got)


@needs_kernels
def test_fused_path_under_autograd_matches_torch(model, tokens, left_pad_mask, monkeypatch):
    """Grad enabled (the default in notebooks): run_with_cache still uses the fused kernel, and parameter
    gradients and the gradients seen by backward hooks on hook_attn_scores / hook_pattern are TL's."""
    kernels = A._load_kernels()
    fused = Counter(monkeypatch, kernels, "pattern_attention")

    def run():
        model.zero_grad()
        seen = {}

        def save_grad(grad, hook):
            seen[hook.name] = grad.detach().clone()

        bwd = [("blocks.0.attn.hook_attn_scores", save_grad), ("blocks.0.attn.hook_pattern", save_grad),
               ("blocks.1.attn.hook_pattern", save_grad)]
        with model.hooks(bwd_hooks=bwd):
            names = lambda n: "blocks.1.attn" in n or "blocks.0.attn.hook_pattern" in n  # noqa: E731
            loss, cache = model.run_with_cache(tokens, attention_mask=left_pad_mask, return_type="loss",
                                               names_filter=names)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()], seen, cache

    (grads_ref, seen_ref, cache_ref), (grads, seen, cache) = run_both(run)
    model.zero_grad()
    assert fused.calls == model.cfg.n_layers
    for a, b in zip(grads_ref, grads):
        torch.testing.assert_close(a, b, **tolerance("fused_vs_eager_grads"))
    assert set(seen_ref) == set(seen) == {"blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern",
                                          "blocks.1.attn.hook_pattern"}
    for name in seen:
        # rows of a left-pad query have NaN score gradients in TL too (softmax backward of an all -inf row)
        torch.testing.assert_close(seen_ref[name], seen[name], **tolerance("fused_vs_eager_hook_grads"), equal_nan=True,
                                   msg=name)
    for name in cache_ref:
        assert_close(cache_ref[name], cache[name])


@needs_kernels
@pytest.mark.parametrize("edit", [in_place_shift, in_place_scores, zero_head_0], ids=lambda f: f.__name__)
def test_editing_hooks_under_autograd(model, tokens, edit):
    point = "hook_pattern" if "scores" not in edit.__name__ else "hook_attn_scores"

    def run():
        model.zero_grad()
        loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(f"blocks.0.attn.{point}", edit)])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (loss_ref, grads_ref), (loss, grads) = run_both(run)
    model.zero_grad()
    torch.testing.assert_close(loss_ref, loss, **tolerance("same_dtype"))
    for a, b in zip(grads_ref, grads):
        torch.testing.assert_close(a, b, **tolerance("fused_vs_eager_grads"))


@needs_kernels
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_pattern_stats_match_torch_backend(model, tokens, left_pad_mask, grad):
    """`pattern_stats` without pattern hooks: the stats kernel (no autograd) or, while autograd records, the pattern
    kernel's pattern; the line sums and the loss's gradients are the torch backend's (reference pattern)."""
    specs = [("diagonal", -1), ("diagonal", 0), ("column", 0)]

    def run():
        model.zero_grad()
        with torch.set_grad_enabled(grad), A.pattern_stats(specs) as stats:
            loss = model(tokens, attention_mask=left_pad_mask, return_type="loss")
        if grad:
            loss.backward()
        return stats, loss.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    (stats_ref, loss_ref, grads_ref), (stats, loss, grads) = run_both(run)
    model.zero_grad()
    assert set(stats.sums) == set(stats_ref.sums) == set(range(model.cfg.n_layers))
    assert all(stats.from_kernel[layer] == (not grad) for layer in stats.sums)
    assert not any(stats_ref.from_kernel.values())
    for layer in stats.sums:
        torch.testing.assert_close(stats.sums[layer], stats_ref.sums[layer], **tolerance("same_dtype"))
    torch.testing.assert_close(loss_ref, loss, **tolerance("same_dtype"))
    for a, b in zip(grads_ref, grads):
        assert (a is None) == (not grad) and (b is None) == (not grad)
        if grad:
            torch.testing.assert_close(a, b, **tolerance("fused_vs_eager_grads"))
