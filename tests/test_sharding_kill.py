"""A sweep whose process is SIGKILLed after some work units resumes from its results directory: the rerun computes
only the missing units (counted) and returns what one uninterrupted process returns.

The killed run is a real child process (`python -c` importing this module), killed with SIGKILL once a few unit
files exist: nothing in it gets to clean up, as after a preemption or an out-of-memory kill.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from hooklens import patching, sharding

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

SWEEP = patching.get_act_patch_attn_head_out_by_pos  # 2 layers x 8 positions x 4 heads = 64 variants: 8 units
KEY = "z-layer_pos_head"
N_UNITS = 8
KILL_AFTER = 2  # unit files present when the child is killed
UNIT_DELAY_S = 0.5  # the child's extra time per unit, so the kill lands between units 2 and 8 even on a busy machine


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=g)
    corrupted = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=g)
    _, cache = model.run_with_cache(clean)
    return corrupted, cache


def metric(logits):
    # Module-level: the child and the test both see it as `test_sharding_kill.metric`, so the units are one sweep's.
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


def _child(results_dir: str) -> None:
    """The run that gets killed: the same sweep into `results_dir`, each unit slowed by UNIT_DELAY_S (outside the
    sweep's fingerprint, which sees only the model, the prompts, the patches and the metric's name)."""
    torch.set_num_threads(1)  # as the test's single_thread fixture: the same float32 sums, bit for bit
    real = sharding.run_sweep

    def slow(*args, **kwargs):
        result = real(*args, **kwargs)
        time.sleep(UNIT_DELAY_S)
        return result

    sharding.run_sweep = slow
    model = make_tiny_model().eval()
    with torch.no_grad():
        corrupted, cache = _inputs(model)
        SWEEP(model, corrupted, cache, metric, progress=False, results_dir=results_dir)
    raise SystemExit("the child finished its sweep before it was killed")


def _unit_files(results_dir: Path):
    return sorted((results_dir / KEY).glob("unit-*.pt"))


@pytest.fixture(scope="module")
def killed_dir(tmp_path_factory):
    """A results directory left by a child SIGKILLed after KILL_AFTER units (and before the last)."""
    results_dir = tmp_path_factory.mktemp("killed")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_sharding_kill as t; "
            f"t._child({str(results_dir)!r})")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180  # the child's imports take seconds on a loaded machine
        while len(_unit_files(results_dir)) < KILL_AFTER:
            if child.poll() is not None:
                pytest.fail(f"the child exited ({child.returncode}) before writing {KILL_AFTER} units:\n"
                            f"{child.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the child wrote no {KILL_AFTER} units in 180 s")
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    present = len(_unit_files(results_dir))
    assert KILL_AFTER <= present < N_UNITS, present
    return results_dir


@pytest.fixture(scope="module")
def uninterrupted():
    model = make_tiny_model().eval()
    corrupted, cache = _inputs(model)
    with torch.no_grad():
        return model, corrupted, cache, SWEEP(model, corrupted, cache, metric, progress=False, shard=(0, 1))


@pytest.fixture
def count_units(monkeypatch):
    """The units `run_sweep` computes in this process (sharding calls it once per unit), by their sizes."""
    calls = []
    real = sharding.run_sweep

    def counting(*args, **kwargs):
        calls.append(len(args[4].indices))
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "run_sweep", counting)
    return calls


def _copy(killed_dir: Path, tmp_path: Path) -> Path:
    """A test's own copy of the killed run's directory (each test resumes it once)."""
    shutil.copytree(killed_dir, tmp_path / "results")
    return tmp_path / "results"


def test_killed_run_resumes_with_only_the_missing_units(killed_dir, uninterrupted, tmp_path, count_units):
    model, corrupted, cache, expected = uninterrupted
    results_dir = _copy(killed_dir, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in _unit_files(results_dir)}
    # A kill during a unit's write leaves its temporary file, never a half unit file: the resume ignores it.
    (results_dir / KEY / f".unit-{N_UNITS - 1:05d}.pt.killed.tmp").write_bytes(b"half a unit")
    resumed = SWEEP(model, corrupted, cache, metric, progress=False, results_dir=results_dir)
    assert len(count_units) == N_UNITS - len(before), (len(count_units), sorted(before))
    assert torch.equal(resumed, expected)
    after = {p.name: p.stat().st_mtime_ns for p in _unit_files(results_dir)}
    assert len(after) == N_UNITS
    assert all(after[name] == mtime for name, mtime in before.items()), "the resume rewrote a finished unit"
    # The directory is now complete: a third run only loads.
    again = SWEEP(model, corrupted, cache, metric, progress=False, results_dir=results_dir)
    assert len(count_units) == N_UNITS - len(before) and torch.equal(again, expected)


def test_killed_run_resumes_with_another_number_of_workers(killed_dir, uninterrupted, tmp_path, count_units):
    """Two shards finish what one killed process started: each computes only its missing units, the merge none."""
    model, corrupted, cache, expected = uninterrupted
    results_dir = _copy(killed_dir, tmp_path)
    present = {int(p.stem.split("-")[1]) for p in _unit_files(results_dir)}
    for i in range(2):
        with pytest.warns(UserWarning, match=f"Shard {i}/2"):
            SWEEP(model, corrupted, cache, metric, progress=False, shard=(i, 2), results_dir=results_dir)
        missing = [u for u in range(N_UNITS) if u % 2 == i and u not in present]
        assert len(count_units) == len(missing), (i, sorted(present))
        count_units.clear()
    merged = SWEEP(model, corrupted, cache, metric, progress=False, results_dir=results_dir)
    assert count_units == [] and torch.equal(merged, expected)
