"""Sharded, resumable sweeps (`hooklens.sharding`): shards, process groups and results directories give the result
of one process running the whole sweep."""
from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_tiny_model
from tolerances import tolerance

from hooklens import patching, sharding

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

SWEEP = patching.get_act_patch_attn_head_out_by_pos  # 2 layers x 8 positions x 4 heads = 64 variants: 8 units
KEY = "z-layer_pos_head"


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=g)
    corrupted = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=g)
    _, cache = model.run_with_cache(clean)
    return corrupted, cache


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model().eval()
    corrupted, cache = _inputs(model)
    with torch.no_grad():
        whole = SWEEP(model, corrupted, cache, metric, progress=False)
        by_units = SWEEP(model, corrupted, cache, metric, progress=False, shard=(0, 1))
    return model, corrupted, cache, whole, by_units


@pytest.fixture
def count_units(monkeypatch):
    """How many units `run_sweep` computes (sharding calls it once per unit)."""
    calls = []
    real = sharding.run_sweep

    def counting(*args, **kwargs):
        calls.append(len(args[4].indices))
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "run_sweep", counting)
    return calls


def test_units_equal_the_whole_sweep(setup):
    model, corrupted, cache, whole, by_units = setup
    assert sharding.default_unit_size(64) == 8
    torch.testing.assert_close(by_units, whole, **tolerance("reordered_sum"))


def test_two_shards_then_a_merge_run_equal_one_process(setup, tmp_path, count_units):
    model, corrupted, cache, _, by_units = setup
    parts = []
    for i in range(2):
        with pytest.warns(UserWarning, match=f"Shard {i}/2: only this shard's 4 of 8"):
            parts.append(SWEEP(model, corrupted, cache, metric, progress=False, shard=(i, 2), results_dir=tmp_path))
    assert count_units == [8] * 8
    # Round robin: shard 0 owns units 0, 2, 4, 6 (variants 0-7, 16-23, ...), NaN elsewhere.
    owner = (torch.arange(64) // 8) % 2
    for i, part in enumerate(parts):
        assert torch.equal(part.reshape(-1)[owner == i], by_units.reshape(-1)[owner == i])
        assert part.reshape(-1)[owner != i].isnan().all()
    merged = SWEEP(model, corrupted, cache, metric, progress=False, results_dir=tmp_path)
    assert count_units == [8] * 8, "the merge run computed units"
    assert torch.equal(merged, by_units)
    values, done = sharding.merge(tmp_path, KEY)
    assert done.all() and torch.equal(values.view_as(by_units), by_units)


def test_interrupted_run_resumes_with_only_the_missing_units(setup, tmp_path, count_units):
    model, corrupted, cache, _, by_units = setup
    calls = [0]

    def failing(logits):  # a crash after a few units: the metric raises on its 5th call (the process checks it once,
        calls[0] += 1  # then each unit calls it once, vmapped)
        if calls[0] == 5:
            raise KeyboardInterrupt
        return metric(logits)

    failing.__qualname__ = metric.__qualname__  # the same metric, by name: its units are this sweep's
    with pytest.raises(KeyboardInterrupt) as info:
        SWEEP(model, corrupted, cache, failing, progress=False, results_dir=tmp_path)
    finished = len(list((tmp_path / KEY).glob("unit-*.pt")))
    assert 0 < finished < 8
    done = info.value.done
    assert done.shape == by_units.shape and int(done.sum()) >= 8 * finished
    assert torch.equal(info.value.partial_result[done], by_units[done])
    before = len(count_units)
    resumed = SWEEP(model, corrupted, cache, metric, progress=False, results_dir=tmp_path)
    assert len(count_units) - before == 8 - finished
    assert torch.equal(resumed, by_units)


def test_units_of_another_model_or_sweep_are_refused(setup, tmp_path):
    model, corrupted, cache, _, _ = setup
    with pytest.warns(UserWarning, match="Shard 0/4"):
        SWEEP(model, corrupted, cache, metric, progress=False, shard=(0, 4), results_dir=tmp_path)
    other = make_tiny_model().eval()  # same config, one weight changed
    other.blocks[1].mlp.W_out.data[3, 7] += 1e-3
    with pytest.raises(sharding.ResultsMismatchError, match="another model: its weights .* another results_dir"):
        SWEEP(other, corrupted, cache, metric, progress=False, results_dir=tmp_path)
    with pytest.raises(sharding.ResultsMismatchError, match="another sweep: its tokens"):
        SWEEP(model, corrupted.flip(-1), cache, metric, progress=False, results_dir=tmp_path)
    # A unit file copied in from another run is refused too, not only the manifest.
    manifest = tmp_path / KEY / "sweep.json"
    meta = json.loads(manifest.read_text())
    meta["model"]["weights"] = "0" * 16
    (tmp_path / "copy" / KEY).mkdir(parents=True)
    (tmp_path / "copy" / KEY / "sweep.json").write_text(json.dumps(meta))
    os.replace(tmp_path / KEY / "unit-00000.pt", tmp_path / "copy" / KEY / "unit-00000.pt")
    with pytest.raises(sharding.ResultsMismatchError, match="unit-00000.pt holds results of another model"):
        sharding.merge(tmp_path / "copy", KEY)


def test_shard_is_checked():
    with pytest.raises(ValueError, match="index must be in 0..count-1"):
        sharding.resolve_shard((2, 2))
    with pytest.raises(ValueError, match="INDEX/COUNT"):
        sharding.parse_shard("1of2")
    assert sharding.parse_shard("1/2") == (1, 2)


def test_launcher_variables_choose_the_shard(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.resolve_shard() == (0, 1, "default")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert sharding.resolve_shard()[:2] == (2, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sharding.resolve_shard()[:2] == (1, 2)  # torchrun's variables come before SLURM's
    assert sharding.resolve_shard((0, 1))[:2] == (0, 1)


def test_launcher_variables_alone_do_not_shard_a_run_without_results_dir(setup, monkeypatch):
    model, corrupted, cache, whole, _ = setup
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torch.equal(SWEEP(model, corrupted, cache, metric, progress=False), whole)


# -- two processes with a gloo process group -------------------------------------------------------------------------
def _worker(rank: int, world: int, rendezvous: str, out: str, leave_early: bool) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                                         timeout=timedelta(seconds=20))
    try:
        if leave_early and rank == 1:
            return  # a rank that never reaches the sweep
        model = make_tiny_model().eval()
        with torch.no_grad():
            corrupted, cache = _inputs(model)
            try:
                result = SWEEP(model, corrupted, cache, metric, progress=False)
            except Exception as err:  # the parent checks the message
                torch.save({"error": str(err)}, f"{out}/{rank}.pt")
                return
        torch.save({"result": result}, f"{out}/{rank}.pt")
    finally:
        if not (leave_early and rank == 1):
            torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process(setup, tmp_path):
    *_, by_units = setup
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path), False), nprocs=2)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt")["result"], by_units), rank


def test_a_missing_rank_is_named_after_the_timeout(tmp_path):
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path), True), nprocs=2, join=True)
    error = torch.load(tmp_path / "0.pt")["error"]
    assert "not every rank arrived" in error and "1" in error


def test_clean_activations_are_compared_with_a_tolerance(setup, tmp_path, count_units):
    """A merge run whose clean cache differs in the last bits (another device's kernels) takes the units; a clean
    cache of another prompt is refused."""
    model, corrupted, cache, _, by_units = setup
    SWEEP(model, corrupted, cache, metric, progress=False, results_dir=tmp_path)
    g = torch.Generator().manual_seed(1)
    last_bits = {name: act * (1 + 1e-6 * torch.randn(act.shape, generator=g)) for name, act in cache.items()}
    before = len(count_units)
    assert torch.equal(SWEEP(model, corrupted, last_bits, metric, progress=False, results_dir=tmp_path), by_units)
    assert len(count_units) == before, "units were recomputed"
    other_prompt = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=g)
    _, other_cache = model.run_with_cache(other_prompt)
    with pytest.raises(sharding.ResultsMismatchError, match="another sweep: its clean_activations"):
        SWEEP(model, corrupted, other_cache, metric, progress=False, results_dir=tmp_path)
    clean = _inputs(model)[1]
    # the setup's clean prompt (the generator's first draw) with its last token changed: still refused
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    tokens[:, -1] = (tokens[:, -1] + 1) % model.cfg.d_vocab
    _, one_token = model.run_with_cache(tokens)
    assert not torch.equal(one_token["blocks.0.hook_resid_pre"], clean["blocks.0.hook_resid_pre"])
    with pytest.raises(sharding.ResultsMismatchError, match="clean_activations"):
        SWEEP(model, corrupted, one_token, metric, progress=False, results_dir=tmp_path)
