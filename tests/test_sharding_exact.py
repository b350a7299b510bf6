"""hooklens.circuits.exact by work units (`shard=`, `results_dir=`, a process group): shards and a merge run, a
resumed run and two gloo processes give the scores of one process; units of another model or data are refused."""
from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from test_circuits_evaluate import SHAPES, batches, logit_diff, make_model, mean_logit_diff

from hooklens import sharding
from hooklens.circuits.exact import exact
from hooklens.circuits.graph import Graph

pytestmark = pytest.mark.usefixtures("single_thread")

UNIT = 16  # edges per unit: the 2-layer model's edges make several units
KEY = "circuits-exact-patching"
exact_module = importlib.import_module("hooklens.circuits.exact")  # the package binds the name to the function


def _scores(model, **kwargs):
    graph = Graph.from_model(model)
    exact(model, graph, batches(2), logit_diff, quiet=True, unit_size=UNIT, **kwargs)
    return graph


@pytest.fixture(scope="module")
def setup():
    model = make_model(**SHAPES["2l4h"])
    whole = Graph.from_model(model)
    exact(model, whole, batches(2), logit_diff, quiet=True)
    return model, whole, _scores(model, shard=(0, 1))


@pytest.fixture
def count_units(monkeypatch):
    """The units this process computes (exact runs `_EdgeRunner.edges` once per unit), by their sizes."""
    calls = []
    real = exact_module._EdgeRunner.edges

    def counting(self, part):
        calls.append(len(part))
        return real(self, part)

    monkeypatch.setattr(exact_module._EdgeRunner, "edges", counting)
    return calls


def _n_units(graph) -> int:
    return -(-int(graph.real_edge_mask.sum()) // UNIT)


def test_units_equal_the_whole_run(setup):
    model, whole, by_units = setup
    real = whole.real_edge_mask
    assert _n_units(whole) >= 4
    torch.testing.assert_close(by_units.scores, whole.scores, rtol=1e-5, atol=1e-5)  # other chunks: reordered sums
    assert not by_units.scores[real].isnan().any() and bool((by_units.scores[~real] == 0).all())
    assert bool(by_units.in_graph[real].all())


def test_two_shards_then_a_merge_run_equal_one_process(setup, tmp_path, count_units):
    model, _, by_units = setup
    real, n_units = by_units.real_edge_mask, _n_units(by_units)
    parts = []
    for i in range(2):
        with pytest.warns(UserWarning, match=f"Shard {i}/2: only this shard's"):
            parts.append(_scores(model, shard=(i, 2), results_dir=tmp_path))
    assert len(count_units) == n_units
    # Round robin over the units of the edges in receiver order: each shard fills its own edges and leaves the
    # others as a fresh graph has them (zero).
    order = torch.cat([group for *_, group in exact_module._receiver_groups(real.nonzero(), model.cfg)])
    for i, part in enumerate(parts):
        mine = torch.zeros_like(real)
        owned = order[(torch.arange(len(order)) // UNIT) % 2 == i]
        mine[owned[:, 0], owned[:, 1]] = True
        assert torch.equal(part.scores[mine], by_units.scores[mine])
        assert bool((part.scores[real & ~mine] == 0).all())
    assert len(list((tmp_path / KEY).glob("unit-*.pt"))) == n_units
    merged = _scores(model, results_dir=tmp_path)
    assert len(count_units) == n_units, "the merge run computed units"
    assert torch.equal(merged.scores, by_units.scores)


def test_a_merge_run_makes_no_forward(setup, tmp_path, monkeypatch):
    # Every unit finished: the merge run loads them without the baseline or the clean / corrupted runs.
    model, _, by_units = setup
    _scores(model, results_dir=tmp_path)
    monkeypatch.setattr(exact_module, "evaluate_baseline", _no_forward)
    monkeypatch.setattr(exact_module, "_Batch", _no_forward)
    merged = _scores(model, results_dir=tmp_path)
    assert torch.equal(merged.scores, by_units.scores)
    (tmp_path / KEY / "unit-00001.pt").unlink()  # one unit missing: the forwards are needed again
    with pytest.raises(AssertionError, match="a forward"):
        _scores(model, results_dir=tmp_path)


def _no_forward(*args, **kwargs):
    raise AssertionError("a forward in a run that needed none")


def test_an_interrupted_run_resumes_with_only_the_missing_units(setup, tmp_path, count_units):
    model, _, by_units = setup
    n_units, calls = _n_units(by_units), [0]

    def flaky(logits, clean_logits, input_lengths, labels):  # raises in the 4th unit (2 batches per chunk)
        calls[0] += 1
        if calls[0] > 7 + 2 * 3:
            raise KeyboardInterrupt
        return logit_diff(logits, clean_logits, input_lengths, labels)

    flaky.__qualname__ = logit_diff.__qualname__  # the same metric by name: its units are this run's
    flaky.__module__ = logit_diff.__module__
    graph = Graph.from_model(model)
    with pytest.raises(KeyboardInterrupt) as info:
        exact(model, graph, batches(2), flaky, quiet=True, unit_size=UNIT, results_dir=tmp_path,
              metric_positions="last", metric_columns="all")
    finished = len(list((tmp_path / KEY).glob("unit-*.pt")))
    assert 0 < finished < n_units
    done = info.value.done
    assert int(done.sum()) >= finished * UNIT
    torch.testing.assert_close(info.value.partial_result[done], by_units.scores[done], rtol=1e-5, atol=1e-5)
    count_units.clear()
    resumed = Graph.from_model(model)
    exact(model, resumed, batches(2), logit_diff, quiet=True, unit_size=UNIT, results_dir=tmp_path,
          metric_positions="last", metric_columns="all")
    assert len(count_units) == n_units - finished
    torch.testing.assert_close(resumed.scores, by_units.scores, rtol=1e-5, atol=1e-5)


def test_units_of_another_model_or_data_are_refused(setup, tmp_path, monkeypatch):
    model, _, _ = setup
    _scores(model, results_dir=tmp_path)

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran before the results directory was checked")

    monkeypatch.setattr(exact_module, "evaluate_baseline", no_forward)  # the first forward exact runs
    other = make_model(**SHAPES["2l4h"])  # same config, one weight changed
    with torch.no_grad():
        other.blocks[1].mlp.W_out[3, 7] += 1e-3
    with pytest.raises(sharding.ResultsMismatchError, match="another model: its weights"):
        _scores(other, results_dir=tmp_path)
    graph = Graph.from_model(model)
    with pytest.raises(sharding.ResultsMismatchError, match="another sweep: its data"):
        exact(model, graph, batches(2)[:1], logit_diff, quiet=True, unit_size=UNIT, results_dir=tmp_path)
    with pytest.raises(sharding.ResultsMismatchError, match="another sweep: its metric"):
        exact(model, graph, batches(2), mean_logit_diff, quiet=True, unit_size=UNIT, results_dir=tmp_path)


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))
    try:
        graph = _scores(make_model(**SHAPES["2l4h"]))
        torch.save(graph.scores, f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process(setup, tmp_path):
    *_, by_units = setup
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt"), by_units.scores), rank
