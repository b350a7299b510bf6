"""A sharded sweep prepares once per process (`hooklens.sweeps.prepare_sweep`): one corrupted forward and one metric
check, whatever the number of units, and each unit run against that preparation gives the same bits as the unit run
alone (its chunks depend on the unit only)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from hooklens import patching, sweeps
from hooklens.errors import InvalidInputError
from hooklens.sweeps import index_sweep, prepare_sweep, run_sweep

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

SWEEP = patching.get_act_patch_attn_head_out_by_pos  # 2 layers x 8 positions x 4 heads = 64 variants: 8 units


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(1, model.cfg.d_vocab, (2, 2, 8), generator=g)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    return model, corrupted, cache


@pytest.fixture
def corrupted_runs(monkeypatch):
    """The corrupted forwards the sweep engine runs (`sweeps._run_corrupted`), by the prompts' batch size."""
    calls = []
    real = sweeps._run_corrupted

    def counting(model, tokens, name):
        calls.append(tokens.shape[0])
        return real(model, tokens, name)

    monkeypatch.setattr(sweeps, "_run_corrupted", counting)
    return calls


def test_one_corrupted_forward_per_process_per_sweep(setup, tmp_path, corrupted_runs):
    model, corrupted, cache = setup
    whole = SWEEP(model, corrupted, cache, metric, progress=False)
    assert corrupted_runs == [2]
    corrupted_runs.clear()
    by_units = SWEEP(model, corrupted, cache, metric, progress=False, shard=(0, 1))  # 8 units in this process
    assert corrupted_runs == [2], "the units repeated the corrupted forward"
    torch.testing.assert_close(by_units, whole, rtol=1e-5, atol=1e-5)  # other chunks: other GEMM shapes
    for i in range(2):  # two shards of 4 units each, one process each (here: one after the other)
        corrupted_runs.clear()
        with pytest.warns(UserWarning, match=f"Shard {i}/2"):
            SWEEP(model, corrupted, cache, metric, progress=False, shard=(i, 2), results_dir=tmp_path)
        assert corrupted_runs == [2]
    corrupted_runs.clear()
    merged = SWEEP(model, corrupted, cache, metric, progress=False, results_dir=tmp_path)
    assert corrupted_runs == [], "a run whose units are all in results_dir ran the model"
    assert torch.equal(merged, by_units)


def test_the_metric_is_checked_once_per_process(setup):
    model, corrupted, cache = setup
    calls = [0]

    def counted(logits):
        calls[0] += 1
        return metric(logits)

    counted.__qualname__ = metric.__qualname__
    SWEEP(model, corrupted, cache, counted, progress=False, shard=(0, 1), metric_positions=[-1])
    # check_metric: 3 calls (metric_positions given), then one vmapped call per unit (each unit is one chunk).
    assert calls[0] == 3 + 8


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("activation, axes", [("resid_pre", (0,)), ("z", (0, 1))])
def test_prepared_units_equal_units_run_alone(setup, activation, axes, packed):
    """Any unit split, with several chunks per unit (a small memory budget): each unit against one preparation of
    the whole sweep gives the bits of the unit run alone; and the units together, the whole sweep's values up to
    float32 rounding (a chunk's GEMM shapes differ)."""
    model, corrupted, cache = setup
    ranges = [torch.arange(model.cfg.n_layers), torch.arange(corrupted.shape[1]), torch.arange(model.cfg.n_heads)]
    grids = torch.meshgrid(*ranges[:1 + len(axes)], indexing="ij")
    indices = torch.stack([g.reshape(-1) for g in grids], dim=1)  # [n, 1 + len(axes)]
    sweep = index_sweep(model, activation, indices, axes)
    budget = 3 * sweeps._variant_bytes(model, *corrupted.shape, 1, 8 * 32)  # a few variants per chunk
    prepared = prepare_sweep(model, corrupted, metric, sweep, [-1], budget)
    assert prepared.chunk_size < 8
    whole = run_sweep(model, corrupted, cache, metric, sweep, [-1], budget, False, packed=packed)
    for unit_size in (1, 5, 8, len(indices)):
        for start in range(0, len(indices), unit_size):
            part = sweeps.PatchSweep(activation, indices[start:start + unit_size],
                                     sweep.start_positions[start:start + unit_size], sweep.build_masks, axes=axes)
            alone = run_sweep(model, corrupted, cache, metric, part, [-1], budget, False, packed=packed)
            on_prepared = run_sweep(model, corrupted, cache, metric, part, [-1], budget, False, packed=packed,
                                    prepared=prepared)
            assert torch.equal(on_prepared, alone), (unit_size, start)
            torch.testing.assert_close(on_prepared, whole[start:start + unit_size], rtol=1e-5, atol=1e-5)


def test_a_preparation_for_another_call_is_refused(setup):
    model, corrupted, cache = setup
    sweep = index_sweep(model, "resid_pre", torch.tensor([[0, 1], [1, 2]]), (0,))
    prepared = prepare_sweep(model, corrupted, metric, sweep, [-1])
    other_sweep = index_sweep(model, "resid_mid", torch.tensor([[0, 1]]), (0,))
    cases = {
        "metric": dict(metric=lambda logits: logits[:, -1, 0].mean()),
        "corrupted_tokens": dict(corrupted_tokens=corrupted.flip(1)),
        "activation": dict(sweep=other_sweep),
        "metric_positions": dict(metric_positions=[-2]),
        "memory_budget": dict(memory_budget=1 << 20),
        "model": dict(model=make_tiny_model().eval()),
    }
    for what, change in cases.items():
        args = dict(model=model, corrupted_tokens=corrupted, clean_cache=cache, metric=metric, sweep=sweep,
                    metric_positions=[-1], progress=False) | change
        with pytest.raises(InvalidInputError, match=f"another {what} "):
            run_sweep(**args, prepared=prepared)
    run_sweep(model, corrupted, cache, metric, sweep, [-1], progress=False, prepared=prepared)  # its own call runs
