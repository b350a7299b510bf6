"""path_patch_senders by work units: units (of any size) equal the one-batch result within float32 tolerance;
shards into one results directory, then a merge run, equal one process's units exactly; a results directory of
other prompts is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from tolerances import tolerance

from hooklens import sharding
from hooklens.path_patching import path_patch_senders

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

RECEIVERS = [("blocks.2.attn.hook_q", 1), ("blocks.2.hook_resid_pre", None)]


def metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model(n_layers=3, d_head=4).eval()  # 3 layers x 8 heads = 24 senders
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 97, (2, 8), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, 97, (2, 3), generator=g)
    whole = path_patch_senders(model, clean, corrupted, RECEIVERS, metric)
    return model, clean, corrupted, whole


@pytest.mark.parametrize("unit_size", [1, 5, 24])
def test_units_equal_one_batch(setup, unit_size):
    model, clean, corrupted, whole = setup
    got = path_patch_senders(model, clean, corrupted, RECEIVERS, metric, unit_size=unit_size)
    torch.testing.assert_close(got, whole.float(), **tolerance())


def test_shards_then_merge_equal_one_process(setup, tmp_path, monkeypatch):
    model, clean, corrupted, _ = setup
    one = path_patch_senders(model, clean, corrupted, RECEIVERS, metric, shard=(0, 1))
    for i in range(2):
        with pytest.warns(UserWarning, match="work units are filled"):
            part = path_patch_senders(model, clean, corrupted, RECEIVERS, metric, shard=(i, 2), results_dir=tmp_path)
        assert part.isnan().any() and not part.isnan().all()
    computed = []
    real = sharding._run_units

    def counting(compute, *args, **kwargs):
        def counted(start, stop):
            computed.append((start, stop))
            return compute(start, stop)
        return real(counted, *args, **kwargs)

    monkeypatch.setattr(sharding, "_run_units", counting)
    merged = path_patch_senders(model, clean, corrupted, RECEIVERS, metric, results_dir=tmp_path)
    assert computed == [], "the merge run recomputed units the shards had written"
    assert torch.equal(merged, one)


def test_results_of_other_prompts_are_refused(setup, tmp_path):
    model, clean, corrupted, _ = setup
    path_patch_senders(model, clean, corrupted, RECEIVERS, metric, results_dir=tmp_path)
    other = corrupted.clone()
    other[0, 5] = (other[0, 5] + 1) % 97
    with pytest.raises(sharding.ResultsMismatchError):
        path_patch_senders(model, clean, other, RECEIVERS, metric, results_dir=tmp_path)
