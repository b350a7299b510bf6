"""`hooklens patch --shard I/N --results-dir DIR` and `torchrun ... -m hooklens patch`: shards meeting in one
results directory, then a merge run, and a 2-process torchrun (gloo on the CPU), each give exactly the summary of a
plain single-process run; `--shard` alone is a clear error before any work."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from hooklens import sharding
from hooklens.cli import main

# One intra-op thread, as torchrun gives each of its processes (OMP_NUM_THREADS=1): the single-process reference
# then runs the same float32 sums as the workers, and their summaries can be compared exactly.
pytestmark = pytest.mark.usefixtures("single_thread")

SWEEP_KEYS = ("resid_pre_patching", "head_out_patching")
# Everything in a patch summary but the wall time and the recorded command line.
RESULT_KEYS = ("model", "clean", "corrupted", "answer", "wrong", "str_tokens", "clean_logit_diff",
               "corrupted_logit_diff", *SWEEP_KEYS, "top_head")


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _assert_same_results(summary, expected):
    for key in RESULT_KEYS:
        assert summary[key] == expected[key], key


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The summary of `hooklens patch` in one process, without shards or a results directory."""
    out = tmp_path_factory.mktemp("plain") / "out"
    assert main(["patch", "--out", str(out), "--quiet"]) == 0
    return _summary(out)


@pytest.fixture
def count_units(monkeypatch):
    """The work units this process computes (sharding runs `run_sweep` once per unit)."""
    calls = []
    real = sharding.run_sweep

    def counting(*args, **kwargs):
        calls.append(len(args[4].indices))
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "run_sweep", counting)
    return calls


def _units(results_dir):
    return sorted(p.relative_to(results_dir).as_posix() for p in results_dir.glob("*/unit-*.pt"))


def test_two_shards_then_a_merge_run_equal_a_plain_run(plain, tmp_path, count_units, capsys):
    results_dir, out = tmp_path / "units", tmp_path / "out"
    per_shard = []
    for i in range(2):
        shard = ["--shard", f"{i}/2", "--results-dir", str(results_dir)]
        assert main(["patch", "--out", str(out), "--quiet", *shard]) == 0
        assert f"shard {i}/2 done" in capsys.readouterr().out
        assert not out.exists(), "a shard wrote --out"
        per_shard.append(len(count_units))
        count_units.clear()
    units = _units(results_dir)
    # The embedded model's IOI sweeps: resid_pre 2 layers x 15 positions = 30 variants (4 units of 8), head_out
    # 2 layers x 4 heads = 8 variants (1 unit); round robin gives shard 0 units 0, 2 (+ the head unit), shard 1 1, 3.
    assert len(units) == 5 and per_shard == [3, 2], (units, per_shard)
    assert main(["patch", "--out", str(out), "--quiet", "--results-dir", str(results_dir)]) == 0
    assert count_units == [], "the merge run computed units the shards had written"
    _assert_same_results(_summary(out), plain)
    assert _units(results_dir) == units


def test_a_missing_shard_is_computed_by_the_merge_run(plain, tmp_path, count_units):
    """A merge run after only some shards finished computes the rest (a resumed run), not NaN."""
    results_dir, out = tmp_path / "units", tmp_path / "out"
    assert main(["patch", "--out", str(out), "--quiet", "--shard", "1/2", "--results-dir", str(results_dir)]) == 0
    assert len(count_units) == 2
    assert main(["patch", "--out", str(out), "--quiet", "--results-dir", str(results_dir)]) == 0
    assert len(count_units) == 2 + 3
    _assert_same_results(_summary(out), plain)


def test_shard_flags_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("hooklens.cli.load_model", no_model)
    out = tmp_path / "out"
    assert main(["patch", "--out", str(out), "--quiet", "--shard", "0/2"]) == 2
    err = capsys.readouterr().err
    assert "--shard 0/2 needs --results-dir DIR" in err, err
    for bad, says in [("2/2", "index must be in 0..count-1"), ("1of2", "INDEX/COUNT"), ("0/0", "count at least 1")]:
        assert main(["patch", "--out", str(out), "--quiet", "--shard", bad, "--results-dir", str(tmp_path)]) == 2
        assert says in capsys.readouterr().err, bad
    assert not out.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(tmp_path) -> dict:
    """The environment of a torchrun child: no launcher variables of ours, and a sitecustomize on the workers' path
    that shows hooklens.sharding's INFO line (what each rank ran)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import logging\nlogging.basicConfig(level=logging.WARNING)\n"
        "logging.getLogger('hooklens.sharding').setLevel(logging.INFO)\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("with_results_dir", [False, True])
def test_torchrun_two_processes_write_one_output_equal_to_one_process(plain, tmp_path, with_results_dir):
    runs, results_dir = tmp_path / "runs", tmp_path / "units"
    out = runs / "torchrun"
    extra = ["--results-dir", str(results_dir)] if with_results_dir else []
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "hooklens", "patch", "--out", str(out), "--quiet", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_torchrun_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("strongest head") == 1, "one summary table (rank 0's), not one per rank"
    assert sorted(p.name for p in runs.iterdir()) == ["torchrun"], "one output directory, no other rank's staging"
    _assert_same_results(_summary(out), plain)
    # Each rank computed its own units (round robin over resid_pre's 4 and head_out's 1), none twice.
    for rank, resid_units, head_units in [(0, 2, 1), (1, 2, 0)]:
        for key, n, total in [("resid_pre-layer_pos", resid_units, 4), ("z-layer_head", head_units, 1)]:
            line = f"{key}: shard {rank}/2 (torch.distributed): {n} units of {total}, 0 found in results_dir, " \
                   f"{n} computed."
            assert line in result.stderr, (line, result.stderr)
    if with_results_dir:  # both ranks' units are kept: a later single-process run only merges them
        assert len(_units(results_dir)) == 5
        values, done = sharding.merge(results_dir, "resid_pre-layer_pos")
        assert done.all() and values.tolist() == torch.tensor(plain["resid_pre_patching"]).reshape(-1).tolist()


# -- hooklens circuit --method exact ----------------------------------------------------------------------------------
CIRCUIT_ARGS = ["circuit", "--method", "exact", "--quiet", "--n-prompts", "6", "--batch", "3", "--seed", "3"]
RUN_KEYS = {"timings", "seconds", "command_line"}  # wall times and the recorded command line differ between runs


def _assert_same_circuit(out, expected_out):
    summary, expected = _summary(out), _summary(expected_out)
    assert summary.keys() == expected.keys()
    for key in expected.keys() - RUN_KEYS:
        assert summary[key] == expected[key], key
    assert (out / "importances.json").read_text() == (expected_out / "importances.json").read_text()


@pytest.fixture(scope="module")
def circuit_by_units(tmp_path_factory):
    """`hooklens circuit --method exact` in one process with a fresh --results-dir (every unit computed), and the
    same without --results-dir (the unsharded exact)."""
    base = tmp_path_factory.mktemp("circuit")
    assert main([*CIRCUIT_ARGS, "--out", str(base / "units"), "--results-dir", str(base / "units-dir")]) == 0
    assert main([*CIRCUIT_ARGS, "--out", str(base / "plain")]) == 0
    return base / "units", base / "plain"


@pytest.fixture
def count_edge_units(monkeypatch):
    """The units of edges this process scores (exact runs `_EdgeRunner.edges` once per unit)."""
    import importlib

    runner = importlib.import_module("hooklens.circuits.exact")._EdgeRunner
    calls = []
    real = runner.edges

    def counting(self, part):
        calls.append(len(part))
        return real(self, part)

    monkeypatch.setattr(runner, "edges", counting)
    return calls


def test_circuit_shards_then_a_merge_run_equal_one_process(circuit_by_units, tmp_path, count_edge_units, capsys):
    units_out, plain_out = circuit_by_units
    results_dir, out = tmp_path / "units", tmp_path / "out"
    per_shard = []
    for i in range(2):
        assert main([*CIRCUIT_ARGS, "--out", str(out), "--shard", f"{i}/2", "--results-dir", str(results_dir)]) == 0
        assert f"shard {i}/2 done" in capsys.readouterr().out and not out.exists()
        per_shard.append(len(count_edge_units))
        count_edge_units.clear()
    # the embedded model's 110 edges: 14 units of 8 (sharding.default_unit_size), 7 per shard
    assert per_shard == [7, 7] and len(list((results_dir / "circuits-exact-patching").glob("unit-*.pt"))) == 14
    assert main([*CIRCUIT_ARGS, "--out", str(out), "--results-dir", str(results_dir)]) == 0
    assert count_edge_units == [], "the merge run scored edges the shards had written"
    _assert_same_circuit(out, units_out)
    # Units chunk the edges differently from the unsharded exact: the same scores up to float32 reordering.
    merged, plain = _summary(out), _summary(plain_out)
    assert merged["cpr"] == pytest.approx(plain["cpr"], abs=1e-4)
    assert merged["cmd"] == pytest.approx(plain["cmd"], abs=1e-4)


def test_circuit_shard_flags_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("hooklens.cli.load_model", no_model)
    out = tmp_path / "out"
    assert main([*CIRCUIT_ARGS, "--out", str(out), "--shard", "0/2"]) == 2
    assert "--shard 0/2 needs --results-dir DIR" in capsys.readouterr().err
    eap = ["circuit", "--method", "EAP", "--quiet", "--out", str(out)]
    assert main([*eap, "--shard", "0/2", "--results-dir", str(tmp_path)]) == 2
    assert "--method EAP is a few passes over the data" in capsys.readouterr().err
    assert main([*eap, "--results-dir", str(tmp_path)]) == 2
    assert "use --method exact" in capsys.readouterr().err
    assert not out.exists()


def test_circuit_under_torchrun_writes_one_output_equal_to_one_process(circuit_by_units, tmp_path):
    units_out, _ = circuit_by_units
    runs = tmp_path / "runs"
    out = runs / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "hooklens", *CIRCUIT_ARGS, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_torchrun_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("CPR (signed ranking") == 1, "one summary table (rank 0's), not one per rank"
    for rank in range(2):  # each rank scored its 7 of the 14 units of edges
        line = f"circuits-exact-patching: shard {rank}/2 (torch.distributed): 7 units of 14, 0 found in " \
               "results_dir, 7 computed."
        assert line in result.stderr, (line, result.stderr)
    assert sorted(p.name for p in runs.iterdir()) == ["torchrun"]
    _assert_same_circuit(out, units_out)  # the two ranks' units, gathered: the one-process units' scores exactly


def test_circuit_in_a_slurm_array_task_runs_its_shard(circuit_by_units, tmp_path, monkeypatch, capsys):
    """Without --shard, SLURM_ARRAY_TASK_ID / _COUNT pick the shard (the env fallback): the task writes its units,
    not an --out holding its share of the scores only; the merge run outside the array writes --out."""
    units_out, _ = circuit_by_units
    results_dir, out = tmp_path / "units", tmp_path / "out"
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in range(2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert main([*CIRCUIT_ARGS, "--out", str(out), "--results-dir", str(results_dir)]) == 0
        assert f"shard {task}/2 done" in capsys.readouterr().out and not out.exists()
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert main([*CIRCUIT_ARGS, "--out", str(out), "--results-dir", str(results_dir)]) == 0
    _assert_same_circuit(out, units_out)


def test_patch_in_a_slurm_array_task_runs_its_shard(plain, tmp_path, monkeypatch, capsys):
    """Without --shard, SLURM_ARRAY_TASK_ID / _COUNT pick the shard (the env fallback): each task writes its units
    and no --out (which would hold NaN for the other task's share); the merge run outside the array writes --out,
    equal to a plain run."""
    results_dir, out = tmp_path / "units", tmp_path / "out"
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in range(2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert main(["patch", "--out", str(out), "--quiet", "--results-dir", str(results_dir)]) == 0
        assert f"shard {task}/2 done" in capsys.readouterr().out and not out.exists()
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert main(["patch", "--out", str(out), "--quiet", "--results-dir", str(results_dir)]) == 0
    _assert_same_results(_summary(out), plain)
