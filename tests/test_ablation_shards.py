"""head_ablation by work units: shards into one results directory, then a merge run, give the one-process units'
result exactly and the whole sweep's within float32 tolerance; a results directory of other prompts is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from tolerances import tolerance

from hooklens import head_ablation, sharding

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model(n_layers=3, d_head=4).eval()  # 3 layers x 8 heads = 24 variants: 3 units of 8
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    whole = head_ablation(model, tokens, metric, kind="mean", progress=False)
    by_units = head_ablation(model, tokens, metric, kind="mean", progress=False, shard=(0, 1))
    return model, tokens, whole, by_units


def test_shards_then_merge_equal_one_process(setup, tmp_path):
    model, tokens, whole, by_units = setup
    torch.testing.assert_close(by_units, whole, **tolerance())
    with pytest.warns(UserWarning, match="work units are filled"):
        part = head_ablation(model, tokens, metric, kind="mean", progress=False, shard=(0, 2), results_dir=tmp_path)
    assert part.isnan().any() and not part.isnan().all()  # shard 0 of 2: only its own units
    with pytest.warns(UserWarning, match="work units are filled"):
        head_ablation(model, tokens, metric, kind="mean", progress=False, shard=(1, 2), results_dir=tmp_path)
    assert len(list((tmp_path / "head_ablation-mean").glob("unit-*.pt"))) >= 2
    merged = head_ablation(model, tokens, metric, kind="mean", progress=False, results_dir=tmp_path)
    assert torch.equal(merged, by_units)


def test_results_of_other_prompts_are_refused(setup, tmp_path):
    model, tokens, _, _ = setup
    head_ablation(model, tokens, metric, kind="zero", progress=False, results_dir=tmp_path)
    other = tokens.clone()
    other[0, 3] = (other[0, 3] + 1) % model.cfg.d_vocab
    with pytest.raises(sharding.ResultsMismatchError):
        head_ablation(model, other, metric, kind="zero", progress=False, results_dir=tmp_path)
