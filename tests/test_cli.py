"""The `hooklens` command: structure and properties of its summaries, equality with the library, clear errors."""
from __future__ import annotations

import json

import matplotlib.image as plt_image
import pytest
import torch
from tolerances import tolerance

from hooklens import HookedTransformer, patching
from hooklens.cli import IOI_CLEAN, IOI_CORRUPTED, main

INDUCTION_KEYS = {"model", "seq_len", "batch", "logprob_first_half", "logprob_second_half", "accuracy_second_half",
                  "induction_scores", "prev_token_scores", "top_induction_head", "top_prev_token_head",
                  "mlp_patching_loss_change", "mlp_patching_positions", "mlp_patching_metric",
                  "kcomp_top1", "ov_copying_scores", "seconds"}


@pytest.fixture(scope="module")
def induction_summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("induction")
    assert main(["induction", "--out", str(out), "--quiet", "--kcomp-rows", "500"]) == 0
    return json.loads((out / "summary.json").read_text()), out


def test_induction_summary_structure(induction_summary):
    summary, out = induction_summary
    assert INDUCTION_KEYS <= set(summary)
    n_layers = len(summary["induction_scores"])
    n_heads = len(summary["induction_scores"][0])
    for key in ("induction_scores", "prev_token_scores", "ov_copying_scores"):
        assert torch.tensor(summary[key]).shape == (n_layers, n_heads), key
    seq_len = summary["seq_len"]
    assert torch.tensor(summary["mlp_patching_loss_change"]).shape == (n_layers, seq_len)
    assert summary["mlp_patching_positions"] == list(range(1 + seq_len, 1 + 2 * seq_len))
    assert "mlp_patching" not in summary  # the old key held the patched metric itself, not an effect
    assert summary["model"] == "gpt2-embedded" and summary["seq_len"] == 50 and summary["batch"] == 4
    page = (out / "report.html").read_text()
    for figure in ("loss_by_position", "induction_scores", "prev_token_scores", "top_induction_head_pattern",
                   "mlp_patching", "ov_copying_scores"):
        assert (out / f"{figure}.png").stat().st_size > 1000, figure
        image = plt_image.imread(out / f"{figure}.png")  # [height, width, RGBA]: a real, drawn figure
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image[..., :3].std() > 0.05, figure
        assert f'alt="{figure}.png" src="data:image/png;base64,' in page, figure  # every PNG is in report.html
    # the interactive figures: loss, 2 score maps, 2 attention views, MLP patching, OV copying (tests/
    # test_report_browser.py opens the page in a browser)
    assert page.count('class="plotly-graph-div"') == 7
    assert "<td>MLP patching: loss change</td>" in page  # the printed table


def test_induction_summary_equals_the_library(induction_summary):
    """The scores are hooklens.head_scores on the seeded repeated-token prompt; the log-probs are the model's."""
    from hooklens import head_scores
    from hooklens.cli import induction_prompt
    from hooklens.embedded import load_embedded
    from hooklens.evals import repeated_random_tokens

    summary, _ = induction_summary
    model = load_embedded(device="cpu")
    seq_len, batch = summary["seq_len"], summary["batch"]
    tokens = induction_prompt(model, seq_len, batch, seed=0)
    assert torch.equal(tokens, repeated_random_tokens(batch, seq_len, bos_token_id=50256, seed=0))
    scores = head_scores(model, tokens, kinds=("induction", "previous_token"), seq_len=seq_len, progress=False)
    assert torch.equal(torch.tensor(summary["induction_scores"]), scores["induction"])
    assert torch.equal(torch.tensor(summary["prev_token_scores"]), scores["previous_token"])
    with torch.no_grad():
        log_probs = model(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(torch.tensor(summary["loss_by_position"]), -log_probs.mean(0), **tolerance())
    assert summary["logprob_second_half"] == pytest.approx(float(log_probs[:, seq_len:].mean()), abs=1e-4)


def test_induction_mlp_patching_equals_the_library(induction_summary):
    from hooklens.cli import induction_prompt
    from hooklens.embedded import load_embedded
    from hooklens.mlp_patching import repeated_token_mlp_patching

    summary, _ = induction_summary
    model = load_embedded(device="cpu")
    tokens = induction_prompt(model, summary["seq_len"], summary["batch"], seed=0)
    want = repeated_token_mlp_patching(model, tokens, progress=False)
    torch.testing.assert_close(torch.tensor(summary["mlp_patching_loss_change"]), want, **tolerance("same_dtype"))


def test_induction_mlp_patching_shows_the_seeds_finding(induction_summary):
    """MLPs barely matter for induction: swapping a repeated token's MLP output for its first occurrence's moves
    the second half's loss by far less than a nat, except at the first repeated token."""
    summary, _ = induction_summary
    effect = torch.tensor(summary["mlp_patching_loss_change"])  # [layers, seq_len]
    assert float(effect.abs().median()) < 0.01
    assert int(effect.abs().max(0).values.argmax()) == 0  # the largest change is at the first repeated token
    assert float(effect.abs().max()) > 10 * float(effect.abs().median())


def test_induction_finds_the_circuit_on_the_embedded_model(induction_summary):
    summary, _ = induction_summary
    induction = torch.tensor(summary["induction_scores"])
    prev = torch.tensor(summary["prev_token_scores"])
    assert induction.max() >= 0.5
    assert prev.max() >= 0.5
    assert summary["logprob_second_half"] >= summary["logprob_first_half"] + 3
    ind_layer, ind_head = summary["top_induction_head"]
    prev_layer, prev_head = summary["top_prev_token_head"]
    assert induction[ind_layer, ind_head] == induction.max() and prev[prev_layer, prev_head] == prev.max()
    assert ind_layer > prev_layer, "an induction head needs a previous-token head in an earlier layer"


def _patch_summary(tmp_path, *extra):
    out = tmp_path / "patch"
    assert main(["patch", "--out", str(out), "--quiet", *extra]) == 0
    page = (out / "report.html").read_text()
    assert page.count('class="plotly-graph-div"') == 2 and page.count('<img class="png"') == 2
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("which", ["embedded", "random_hf"])
def test_patch_equals_the_library(tmp_path, tiny_dir, which):
    extra = [] if which == "embedded" else ["--model", str(tiny_dir)]
    summary = _patch_summary(tmp_path, *extra)
    if which == "embedded":
        from hooklens.embedded import load_embedded

        model = load_embedded(device="cpu")
    else:
        model = HookedTransformer.from_pretrained(tiny_dir, device="cpu")
    clean, corrupted = model.to_tokens(IOI_CLEAN), model.to_tokens(IOI_CORRUPTED)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)

    def diff(logits):
        return (logits[:, -1, mary] - logits[:, -1, john]).mean()

    clean_diff, corrupted_diff = diff(clean_logits), diff(corrupted_logits)

    def metric(logits):
        return (diff(logits) - corrupted_diff) / (clean_diff - corrupted_diff)

    resid = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, progress=False)
    torch.testing.assert_close(torch.tensor(summary["resid_pre_patching"]), resid, **tolerance("reordered_short_sum"))
    torch.testing.assert_close(torch.tensor(summary["head_out_patching"]), heads, **tolerance("reordered_short_sum"))
    assert summary["clean_logit_diff"] == pytest.approx(float(clean_diff), abs=1e-5)


def test_clear_errors(tmp_path, capsys):
    assert main(["patch", "--out", str(tmp_path), "--model", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["patch", "--out", str(tmp_path), "--corrupted", "When John and Mary went", "--quiet"]) == 2
    assert "equal lengths" in capsys.readouterr().err
    assert main(["patch", "--out", str(tmp_path), "--answer", " Maryland and", "--quiet"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["patch", "--out", str(tmp_path), "--device", "gpu", "--quiet"]) == 2
    assert "--device gpu: not a device name" in capsys.readouterr().err


def test_unusable_cuda_device_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["induction", "--out", str(tmp_path), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this torch" in err and "Use --device cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["patch", "--out", str(tmp_path), "--device", "cuda:3", "--quiet"]) == 2
    assert "only 1 GPU(s) visible (cuda:0 .. cuda:0)" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hooklens", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "induction" in result.stdout and "patch" in result.stdout


def test_top_1_accuracy_matches_the_dense_chunk_loop():
    from hooklens import FactoredMatrix
    from hooklens.cli import top_1_accuracy

    g = torch.Generator().manual_seed(0)
    # A circuit whose diagonal wins in about half the rows: identity-like plus noise, deferred outer factors.
    W = torch.randn(1500, 16, generator=g)
    low_rank = 0.3 * torch.randn(16, 4, generator=g) @ torch.randn(4, 16, generator=g)
    circuit = W @ FactoredMatrix(3 * torch.eye(16) + low_rank, torch.eye(16)) @ W.T
    dense = circuit.AB
    rows = torch.arange(1500)
    expected = (dense.argmax(-1) == rows).float().mean().item()
    assert 0.05 < expected < 0.95
    assert top_1_accuracy(circuit, None, seed=0) == pytest.approx(expected, abs=1e-6)
    sampled = torch.randperm(1500, generator=torch.Generator().manual_seed(3))[:200].sort().values
    assert top_1_accuracy(circuit, 200, seed=3) == pytest.approx(
        (dense[sampled].argmax(-1) == sampled).float().mean().item(), abs=1e-6)


QUICK = ["--seq-len", "6", "--batch", "1", "--kcomp-rows", "20", "--device", "cpu"]


@pytest.mark.parametrize("how", ["bars", "TQDM_DISABLE", "--quiet"])
def test_progress_bars_honour_tqdm_disable_and_quiet(tmp_path, capsys, monkeypatch, how):
    """Progress bars show by default and not with TQDM_DISABLE=1 (tqdm ignores it for bars given an explicit
    `disable=`) or --quiet; the long steps are named on stderr unless --quiet."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if how == "TQDM_DISABLE":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(["induction", "--out", str(tmp_path / "out"), *QUICK, *(["--quiet"] if how == "--quiet" else [])]) == 0
    err = capsys.readouterr().err
    bars = ("head_scores" in err and "it/s" in err, "patching mlp_out" in err)
    assert bars == ((True, True) if how == "bars" else (False, False)), err
    steps = [line for line in err.splitlines() if line.startswith("hooklens induction: ")]
    want = [] if how == "--quiet" else ["head scores", "MLP patching", "K-composition", "writing report.html"]
    assert len(steps) == len(want) and all(w in step for w, step in zip(want, steps)), steps
