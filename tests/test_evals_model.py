"""hooklens.evals.induction_loss and hooklens.utils.test_prompt on real (tiny) models, against TL 3.9's twins."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tl_model_from_hf
from tolerances import tolerance

from hooklens import HookedTransformer
from hooklens import evals as hl_evals
from hooklens import utils as hl_utils

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens.evals as tl_evals
    from transformer_lens.utilities.exploratory_utils import test_prompt as tl_test_prompt

tl_test_prompt.__test__ = False  # a library function, not a test


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """hooklens's default (processed, float32) model and TL's twin: logits agree to ~1e-7."""
    return HookedTransformer.from_pretrained(tiny_dir), tl_model_from_hf(tiny_dir)


@pytest.fixture(scope="module")
def pair64(tiny_dir):
    """Unprocessed float64 twins (logits agree to ~1e-15), so printed ranks of mid-distribution tokens of a random
    model cannot flip between the two on float noise. (TL processes weights in float32 even for float64 models.)"""
    off = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return (HookedTransformer.from_pretrained(tiny_dir, dtype=torch.float64, **off),
            tl_model_from_hf(tiny_dir, dtype=torch.float64, **off))


@pytest.mark.parametrize("prepend_bos", [None, False, True])
def test_induction_loss_matches_transformerlens(pair, prepend_bos):
    model, tl = pair
    torch.manual_seed(123)
    ours = hl_evals.induction_loss(model, batch_size=2, subseq_len=20, prepend_bos=prepend_bos)
    torch.manual_seed(123)
    theirs = tl_evals.induction_loss(tl, batch_size=2, subseq_len=20, prepend_bos=prepend_bos, device="cpu")
    assert ours.shape == theirs.shape == ()
    torch.testing.assert_close(ours, theirs, **tolerance())
    # A random model has no induction heads: the loss is about log(d_vocab), not near zero.
    assert 0.5 * torch.log(torch.tensor(50257.0)) < ours < 2 * torch.log(torch.tensor(50257.0))


def test_induction_loss_depends_on_the_seed_like_transformerlens(pair):
    model, tl = pair
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(hl_evals.induction_loss(model, batch_size=2, subseq_len=20))
    assert not torch.equal(losses[0], losses[1])
    torch.manual_seed(1)
    torch.testing.assert_close(losses[1], tl_evals.induction_loss(tl, batch_size=2, subseq_len=20, device="cpu"),
                               **tolerance())


@pytest.mark.parametrize(
    "prompt, answer, kwargs",
    [
        ("The capital of France is", " Paris", {}),
        ("The capital of France is", "Paris", dict(prepend_space_to_answer=True, top_k=3)),
        ("The capital of France is", " Paris, the city of light", {}),  # a multi-token answer
        ("The capital of France is", [" Paris", " London", " Rome"], {}),  # several single-token answers
        ("Hello world", " again", dict(prepend_bos=False)),
    ],
    ids=["basic", "no-space-top3", "multi-token", "list", "no-bos"],
)
def test_test_prompt_prints_the_same_as_transformerlens(pair64, capsys, prompt, answer, kwargs):
    model, tl = pair64
    capsys.readouterr()
    hl_utils.test_prompt(prompt, answer, model, **kwargs)
    ours = capsys.readouterr().out
    tl_test_prompt(prompt, answer, tl, **kwargs)
    theirs = capsys.readouterr().out
    assert "Tokenized prompt" in ours and "Ranks of the answer tokens" in ours
    assert ours == theirs


def test_test_prompt_on_default_models_prints_the_same_as_transformerlens(pair, capsys):
    model, tl = pair
    capsys.readouterr()
    hl_utils.test_prompt("The capital of France is", " Paris", model)
    ours = capsys.readouterr().out
    tl_test_prompt("The capital of France is", " Paris", tl)
    assert ours == capsys.readouterr().out
    assert ours.startswith("Tokenized prompt: ['<|endoftext|>', 'The', ' capital', ' of', ' France', ' is']\n")
    assert "Tokenized answer: [' Paris']" in ours and ours.count("th token.") == 10


def test_test_prompt_returns_none_and_can_be_quiet(pair, capsys):
    model, _ = pair
    assert hl_utils.test_prompt("The capital of France is", " Paris", model, print_details=False) is None
    out = capsys.readouterr().out
    assert "Tokenized prompt" not in out and "Ranks of the answer tokens" in out


def test_sanity_check_evaluate_and_ioi_eval_match_transformerlens(pair):
    import contextlib
    import io

    model, tl = pair
    torch.testing.assert_close(hl_evals.sanity_check(model), tl_evals.sanity_check(tl), **tolerance())

    tokens = torch.randint(0, 50000, (6, 12), generator=torch.Generator().manual_seed(0))
    loader = [{"tokens": tokens[i:i + 2]} for i in range(0, 6, 2)]
    with contextlib.redirect_stderr(io.StringIO()):
        theirs = tl_evals.evaluate_on_dataset(tl, loader, truncate=1, device="cpu")
    assert hl_evals.evaluate_on_dataset(model, loader, truncate=1) == pytest.approx(theirs, rel=1e-5)

    ours_ds = hl_evals.IOIDataset(model.tokenizer, num_samples=24, symmetric=True, seed=3)
    theirs_ds = tl_evals.IOIDataset(tl.tokenizer, num_samples=24, symmetric=True, seed=3)
    assert ours_ds.samples == theirs_ds.samples and torch.equal(ours_ds[5]["prompt"], theirs_ds[5]["prompt"])
    custom = dict(templates=["[A] met with [B]. [B] gave the [OBJECT] to [A]"], names=["Alice", "Bob", "Charlie"],
                  nouns={"OBJECT": ["ball", "book"]}, num_samples=10, seed=1)
    for ds_ours, ds_theirs in [(ours_ds, theirs_ds), (hl_evals.IOIDataset(model.tokenizer, **custom),
                                                      tl_evals.IOIDataset(tl.tokenizer, **custom))]:
        with contextlib.redirect_stderr(io.StringIO()):
            expected = tl_evals.ioi_eval(tl, dataset=ds_theirs, batch_size=5)
        got = hl_evals.ioi_eval(model, dataset=ds_ours, batch_size=5)
        assert got.keys() == expected.keys()
        assert got["Logit Difference"] == pytest.approx(expected["Logit Difference"], rel=1e-4, abs=1e-5)
        assert got["Accuracy"] == pytest.approx(expected["Accuracy"])
