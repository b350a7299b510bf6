"""The `hooklens` command under bad input and interruption: one-line errors before any work, strict JSON, and an
--out directory that only ever holds complete runs (an interrupted run leaves the previous one as it was)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import hooklens.cli as cli
from hooklens import HookedTransformer
from hooklens.cli import main

# Small, quick runs on the random tiny checkpoint (n_ctx 128, GPT-2 vocabulary).
QUICK_INDUCTION = ["--seq-len", "6", "--batch", "1", "--kcomp-rows", "20", "--quiet", "--device", "cpu"]
LONG_PROMPT = " ".join(["the cat sat on the mat"] * 30)  # about 180 tokens


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command loads a model: the error under test must come first."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_model", load_model)


def _files(directory: Path) -> dict:
    """{relative path: bytes} of everything under `directory`, hidden entries included."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _no_partial_runs_beside(out: Path) -> None:
    leftovers = [p for p in (*out.parent.iterdir(), *(out.iterdir() if out.is_dir() else ())) if
                 p.name.endswith(".partial")]
    assert not leftovers, leftovers


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith(f"hooklens {command}: error: "), err
    return last


# ---- numeric flags: argparse usage errors (exit 2) before anything is loaded ----

@pytest.mark.parametrize("command,flag,value,expected", [
    ("induction", "--batch", "0", "'0' is not an integer >= 1"),
    ("induction", "--batch", "-2", "'-2' is not an integer >= 1"),
    ("induction", "--seq-len", "0", "'0' is not an integer >= 2"),
    ("induction", "--seq-len", "1", "'1' is not an integer >= 2"),
    ("induction", "--kcomp-rows", "0", "'0' is not an integer >= 1 or 'all'"),
    ("induction", "--kcomp-rows", "-3", "'-3' is not an integer >= 1 or 'all'"),
    ("induction", "--kcomp-rows", "many", "'many' is not an integer >= 1 or 'all'"),
    ("induction", "--seed", str(2 ** 64), "is not an integer in"),
    ("patch", "--seed", str(-2 ** 63 - 1), "is not an integer in"),
    ("patch", "--seed", "1.5", "'1.5' is not an integer in"),
])
def test_bad_numeric_flags_are_usage_errors(tmp_path, capsys, no_work, command, flag, value, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--out", str(out), flag, value])
    assert exit_info.value.code == 2
    last = _one_line_error(capsys, command)
    assert f"argument {flag}: " in last and expected in last
    assert not out.exists()


def test_valid_numeric_edge_values_parse():
    parser = cli.build_parser()
    args = parser.parse_args(["induction", "--seq-len", "2", "--batch", "1", "--kcomp-rows", "all", "--seed", "-1"])
    assert (args.seq_len, args.batch, args.kcomp_rows, args.seed) == (2, 1, None, -1)
    assert parser.parse_args(["induction"]).seq_len is None  # the default fits itself to the model's context
    assert parser.parse_args(["patch", "--seed", str(2 ** 64 - 2)]).seed == 2 ** 64 - 2


# ---- --device and --out: CLIError (exit 2) before anything is loaded or written ----

@pytest.mark.parametrize("device,expected", [
    ("meta", "--device meta: meta tensors hold no values"),
    ("mps", "--device mps: this torch"),
])
def test_unusable_device_types(tmp_path, capsys, no_work, device, expected):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    out = tmp_path / "out"
    assert main(["induction", "--out", str(out), "--device", device, "--quiet"]) == 2
    assert expected in _one_line_error(capsys, "induction")
    assert not out.exists()


def test_out_that_is_a_file(tmp_path, capsys, no_work):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    assert main(["patch", "--out", str(target), "--quiet"]) == 2
    assert f"--out {target} is an existing file, not a directory" in _one_line_error(capsys, "patch")
    assert target.read_text() == "mine"


def test_out_that_is_a_dangling_link(tmp_path, capsys, no_work):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    assert main(["induction", "--out", str(link), "--quiet"]) == 2
    assert "is a symbolic link to nothing" in _one_line_error(capsys, "induction")
    assert link.is_symlink()


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in: chmod'ed for a normal user; root ignores permissions, so
    there a read-only file system (sysfs) stands in."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    try:
        (Path("/sys") / "hooklens-probe").mkdir()
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only directory found")


@pytest.mark.parametrize("inside", [True, False], ids=["existing_dir", "new_dir_in_it"])
def test_out_that_cannot_be_written(tmp_path, capsys, no_work, inside):
    locked = _unwritable_dir(tmp_path)
    out = locked if inside else locked / "hooklens-out"
    assert main(["induction", "--out", str(out), "--quiet"]) == 2
    assert f"--out {out}: cannot write there" in _one_line_error(capsys, "induction")


def test_out_holding_other_files_of_the_same_names_is_never_overwritten(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "own data"}')
    (out / "head_out_patching.png").write_bytes(b"not ours")
    before = _files(out)
    assert main(["patch", "--out", str(out), "--quiet"]) == 2
    last = _one_line_error(capsys, "patch")
    assert "already holds head_out_patching.png, summary.json" in last and "not the files of a previous" in last
    assert _files(out) == before


def test_out_holding_the_other_commands_run_is_refused(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"command": "hooklens patch", "seconds": 1.0}))
    assert main(["induction", "--out", str(out), "--quiet"]) == 2
    assert "previous `hooklens induction` run" in _one_line_error(capsys, "induction")


# ---- patch: prompts longer than the context ----

@pytest.mark.parametrize("which", ["clean", "corrupted"])
def test_patch_prompt_longer_than_the_context(tmp_path, capsys, tiny_dir, monkeypatch, which):
    """Prompts that differ only after token n_ctx used to be cut silently, then blamed for giving 'the same logit
    difference'. Now the length is reported before any forward pass."""
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the prompt length was checked")

    monkeypatch.setattr(HookedTransformer, "run_with_cache", no_forward)
    prompts = {"clean": LONG_PROMPT + " John gave it to", "corrupted": LONG_PROMPT + " Mary gave it to"}
    if which == "corrupted":
        prompts["clean"] = "When John and Mary went"
    out = tmp_path / "out"
    assert main(["patch", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--device", "cpu",
                 "--clean", prompts["clean"], "--corrupted", prompts["corrupted"]]) == 2
    last = _one_line_error(capsys, "patch")
    assert f"--{which} prompt too long: " in last and "n_ctx=128" in last and "Shorten the prompt" in last
    assert not out.exists()
    _no_partial_runs_beside(out)


def test_patch_prompt_of_exactly_n_ctx_tokens_is_accepted(tiny_dir):
    model = HookedTransformer.from_pretrained(tiny_dir, device="cpu")
    text = " a" * (model.cfg.n_ctx - 1)  # + BOS = n_ctx tokens
    args = Namespace(clean=text, corrupted=text, answer=" Mary", wrong=" John")
    clean, corrupted, _, _ = cli._patch_inputs(model, args)
    assert clean.shape == corrupted.shape == (1, model.cfg.n_ctx)
    with pytest.raises(cli.CLIError, match="n_ctx=128"):
        cli._patch_inputs(model, Namespace(**{**vars(args), "clean": text + " a"}))


def test_induction_seq_len_that_does_not_fit(tmp_path, capsys, tiny_dir, monkeypatch):
    monkeypatch.setattr(cli, "head_scores", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "out"
    assert main(["induction", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--seq-len", "64"]) == 2
    last = _one_line_error(capsys, "induction")
    assert "--seq-len 64: the prompt would be 1 + 2 x 64 = 129 tokens" in last and "--seq-len 63 or less" in last
    assert not out.exists()


# ---- strict summary.json ----

def test_summary_json_is_strict_json(tmp_path):
    path = tmp_path / "summary.json"
    summary = {"a": 1.5, "nested": {"x": [[0.0, float("nan")], [float("inf"), -2.0]]}, "b": float("-inf"),
               "name": "m", "n": 3}
    with pytest.warns(RuntimeWarning, match=r"3 non-finite value\(s\) written as null \(nested\.x\[0\]\[1\], "
                                            r"nested\.x\[1\]\[0\], b\)"):
        cli.save_summary(path, summary)

    def reject(token):
        raise AssertionError(f"non-JSON token {token}")

    loaded = json.loads(path.read_text(), parse_constant=reject)
    assert loaded == {"a": 1.5, "nested": {"x": [[0.0, None], [None, -2.0]]}, "b": None, "name": "m", "n": 3}


def test_finite_summary_writes_without_warning(tmp_path, recwarn):
    cli.save_summary(tmp_path / "summary.json", {"x": [1.0, 2.0], "y": math.pi})
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"x": [1.0, 2.0], "y": math.pi}


# ---- --out holds complete runs only ----

def _run_patch(out: Path, tiny_dir: Path, *extra: str) -> dict:
    assert main(["patch", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--device", "cpu", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_rerun_replaces_the_previous_run_and_keeps_other_files(tmp_path, tiny_dir):
    out = tmp_path / "out"
    first = _run_patch(out, tiny_dir)
    assert first["command"] == "hooklens patch"
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.OUTPUT_FILES["patch"])
    (out / "notes.txt").write_text("my notes")
    figure_before = (out / "resid_pre_patching.png").read_bytes()
    second = _run_patch(out, tiny_dir, "--clean", "When Anna and Paul went to the shops, Anna gave the bag to",
                        "--corrupted", "When Anna and Paul went to the shops, Paul gave the bag to",
                        "--answer", " Paul", "--wrong", " Anna")
    assert second["clean"].startswith("When Anna") and second["resid_pre_patching"] != first["resid_pre_patching"]
    assert (out / "resid_pre_patching.png").read_bytes() != figure_before
    assert (out / "notes.txt").read_text() == "my notes"
    _no_partial_runs_beside(out)


def test_a_summary_from_before_summaries_named_their_command_counts_as_a_previous_run(tmp_path, tiny_dir):
    out = tmp_path / "out"
    _run_patch(out, tiny_dir)
    legacy = json.loads((out / "summary.json").read_text())
    del legacy["command"]
    (out / "summary.json").write_text(json.dumps(legacy))
    assert _run_patch(out, tiny_dir)["command"] == "hooklens patch"


def test_moving_into_place_drops_figures_the_new_run_did_not_draw(tmp_path):
    out, stage = tmp_path / "out", tmp_path / "stage"
    out.mkdir()
    stage.mkdir()
    for name in cli.OUTPUT_FILES["induction"]:
        (out / name).write_text("old")
    (out / "mine.txt").write_text("mine")
    for name in ("induction_scores.png", "summary.json"):
        (stage / name).write_text("new")
    cli._move_into_place(stage, out, "induction")
    assert _files(out) == {"induction_scores.png": b"new", "summary.json": b"new", "mine.txt": b"mine"}


def test_ctrl_c_is_held_while_the_run_is_moved_into_place():
    # Python's default handler, as under a terminal (a backgrounded test run may start with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _deliver_ctrl_c_inside_the_deferred_block()
    finally:
        signal.signal(signal.SIGINT, previous)


def _deliver_ctrl_c_inside_the_deferred_block():
    delivered = []
    with pytest.raises(KeyboardInterrupt):
        with cli._sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            delivered.append("the block finished")
    assert delivered == ["the block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("command", ["patch", "induction"])
def test_interrupted_run_leaves_the_previous_run_intact(tmp_path, tiny_dir, monkeypatch, capsys, command):
    """KeyboardInterrupt after the new run drew its first figure: --out keeps the previous run byte for byte and
    no half-written run is left anywhere."""
    out = tmp_path / "out"
    common = ["--model", str(tiny_dir), "--out", str(out), "--quiet", "--device", "cpu"]
    args = [command, *common, *(QUICK_INDUCTION if command == "induction" else [])]
    assert main(args) == 0
    before = _files(out)
    drawn = []
    original = cli.plotting.heatmap

    def heatmap_then_ctrl_c(values, path, *rest, **kwargs):
        original(values, path, *rest, **kwargs)
        drawn.append(Path(path))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.plotting, "heatmap", heatmap_then_ctrl_c)
    assert main(args) == 130
    assert drawn and drawn[0].parent != out  # a figure of the new run was written (into the staging directory)
    assert "interrupted" in capsys.readouterr().err
    assert _files(out) == before
    _no_partial_runs_beside(out)


def test_interrupted_first_run_creates_no_out(tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "new" / "out"
    monkeypatch.setattr(cli, "_patch_figures", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["patch", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--device", "cpu"]) == 130
    assert not out.exists()
    _no_partial_runs_beside(out)


# A real Ctrl-C (SIGINT) delivered to `hooklens induction` in its own process. The run is held (sleeping) right
# after its first figures, so the signal lands mid-run every time; the sleep is the only change to the command.
SLOW_INDUCTION = """
import signal, sys, time
import hooklens.cli as cli
# A terminal's Ctrl-C reaches a process whose SIGINT handler is Python's default; a test run launched in the
# background of a non-interactive shell starts with SIGINT ignored, which the child would inherit.
signal.signal(signal.SIGINT, signal.default_int_handler)
original = cli._repeated_token_losses
def slow(*args, **kwargs):
    result = original(*args, **kwargs)
    print("FIGURES-DRAWN", flush=True)
    time.sleep(120)
    return result
cli._repeated_token_losses = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_in_a_real_process(tmp_path, tiny_dir):
    out = tmp_path / "out"
    args = ["induction", "--model", str(tiny_dir), "--out", str(out), *QUICK_INDUCTION]
    assert main(args) == 0
    before = _files(out)
    process = subprocess.Popen([sys.executable, "-c", SLOW_INDUCTION, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "FIGURES-DRAWN" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
        assert "FIGURES-DRAWN" in line, process.stderr.read() if process.poll() is not None else "timed out"
        staged = [p for p in out.iterdir() if p.name.endswith(".partial")]
        assert len(staged) == 1 and (staged[0] / "induction_scores.png").exists()  # the new run is half-written
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert _files(out) == before
    _no_partial_runs_beside(out)


def test_kcomp_rows_reports_the_rows_really_scored(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(cli, "top_1_accuracy", lambda circuit, rows, seed: 0.5)  # scoring 50257 rows is slow here
    out = tmp_path / "out"
    args = ["induction", "--model", str(tiny_dir), "--out", str(out), *QUICK_INDUCTION, "--kcomp-rows", "10000000"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kcomp_rows"] == 50257 and summary["command"] == "hooklens induction"
