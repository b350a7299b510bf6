"""`hooklens circuit`: its outputs, equality with the library (attribute + MIB faithfulness), clear errors."""
from __future__ import annotations

import json

import matplotlib.image as plt_image
import pytest
import torch
from tolerances import tolerance

from hooklens.circuits.attribute import attribute
from hooklens.circuits.faithfulness import MIB_KS, curve_areas, mib_scores
from hooklens.circuits.graph import Graph
from hooklens.circuits.ioi import IOIDataset, logit_diff_loss, logit_diff_per_prompt
from hooklens.cli import main
from hooklens.embedded import load_embedded

pytestmark = pytest.mark.usefixtures("single_thread")

FILES = ("faithfulness.png", "circuit.png", "importances.json", "report.html", "summary.json")
ARGS = ["--quiet", "--n-prompts", "6", "--batch", "3", "--seed", "3"]


def strict_json(path):
    def reject(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def eap_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("circuit") / "run"
    assert main(["circuit", "--out", str(out), "--method", "EAP", *ARGS]) == 0
    return strict_json(out / "summary.json"), out


def test_outputs_and_summary(eap_run):
    summary, out = eap_run
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # and no staging directory left behind
    for name in ("faithfulness.png", "circuit.png"):
        assert plt_image.imread(out / name).ndim == 3
    model = load_embedded()
    n_edges = len(Graph.from_model(model).edges)
    assert summary["command"] == "hooklens circuit" and summary["model"] == model.cfg.model_name
    assert summary["command_line"].startswith("hooklens circuit --out ")
    assert (summary["method"], summary["ig_steps"], summary["intervention"]) == ("EAP", None, "patching")
    assert (summary["n_prompts"], summary["batch"], summary["seed"], summary["n_edges"]) == (6, 3, 3, n_edges)
    assert summary["ks"] == list(MIB_KS)
    for ranking in ("signed", "absolute"):
        curve = summary["faithfulness"][ranking]
        assert curve["ks"] == list(MIB_KS) and curve["n_edges"] == [int(k * n_edges) for k in MIB_KS]
        assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)  # the full circuit
        assert curve["full_score"] == summary["baselines"]["clean_logit_diff"]
        assert curve["empty_score"] == summary["baselines"]["corrupted_logit_diff"]
    assert summary["cpr"] == pytest.approx(curve_areas(MIB_KS, summary["faithfulness"]["signed"]["faithfulness"])[0])
    assert summary["cmd"] == pytest.approx(curve_areas(MIB_KS, summary["faithfulness"]["absolute"]["faithfulness"])[1])
    top = summary["top_circuit"]
    assert top["top_n"] == 10 and 0 <= top["edges"] <= 10  # default: 1% of 110 edges, at least 10
    assert set(summary["timings"]) == {"load", "attribute", "faithfulness", "figures"}


def test_equals_the_library(eap_run):
    summary, out = eap_run
    model = load_embedded()
    data = IOIDataset(6, seed=3, tokenizer=model.tokenizer).to_dataloader(3)
    graph = Graph.from_model(model)
    attribute(model, graph, data, logit_diff_loss, method="EAP", quiet=True)
    saved = Graph.from_json(out / "importances.json")  # EAP-IG's format, read back
    assert list(saved.edges) == list(graph.edges)
    torch.testing.assert_close(saved.scores, graph.scores, **tolerance("same_dtype", torch.float32))
    scores = mib_scores(model, graph, data, logit_diff_per_prompt, quiet=True)
    tol = tolerance("same_dtype", torch.float32)
    torch.testing.assert_close(torch.tensor([summary["cpr"], summary["cmd"]]), torch.tensor([scores.cpr, scores.cmd]),
                               **tol)
    for ranking, curve in (("signed", scores.signed), ("absolute", scores.absolute)):
        torch.testing.assert_close(torch.tensor(summary["faithfulness"][ranking]["faithfulness"]),
                                   torch.tensor(curve.faithfulness), **tol)
    graph.apply_topn(10, absolute=True, prune=True)
    assert summary["top_circuit"]["edges"] == graph.count_included_edges()


def test_default_method_is_eap_ig_inputs(tmp_path):
    out = tmp_path / "ig"
    assert main(["circuit", "--out", str(out), "--ig-steps", "2", "--top-n", "5", *ARGS]) == 0
    summary = strict_json(out / "summary.json")
    assert (summary["method"], summary["ig_steps"], summary["top_circuit"]["top_n"]) == ("EAP-IG-inputs", 2, 5)
    # a second run into the same --out replaces the first
    assert main(["circuit", "--out", str(out), "--method", "EAP", "--top-n", "5", *ARGS]) == 0
    assert strict_json(out / "summary.json")["method"] == "EAP"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


@pytest.mark.parametrize("extra, message", [
    (["--method", "EAP-IG-inputs", "--intervention", "zero"], "takes --intervention patching only"),
    (["--seed", "-1"], "--seed -1: the IOI generator"),
])
def test_flag_errors_come_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    import hooklens.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("loaded a model despite bad flags"))
    out = tmp_path / "never"
    assert main(["circuit", "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hooklens circuit: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_model_dependent_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["circuit", "--out", str(out), "--quiet", "--top-n", "111"]) == 2
    assert "--top-n 111: the model's graph has 110 edges" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing staged is left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text('{"command": "hooklens patch"}')
    (tmp_path / "other" / "circuit.png").write_text("not ours")
    assert main(["circuit", "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "circuit.png" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--method", "ACDC"], ["--n-prompts", "0"], ["--ig-steps", "0"],
                                  ["--batch", "x"], ["--counterfactual", "baba"]])
def test_argparse_rejects_bad_values(tmp_path, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["circuit", "--out", str(tmp_path / "x"), *argv])
    assert exit_info.value.code == 2


def test_help_lists_the_circuit_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "circuit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["circuit", "--help"])
    text = capsys.readouterr().out
    assert "--method" in text and "--n-prompts" in text and "--top-n" in text
