"""benchmarks/sharding_scaling.py's helpers: the scaling numbers it reports, and its count of units per process
equal to the units a sharded sweep really computes."""
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from hooklens import patching, sharding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sharding_scaling  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")


def test_scaling_numbers():
    assert sharding_scaling.scaling(10.0, 5.0, 2) == {"speedup": 2.0, "scaling_efficiency": 1.0}
    assert sharding_scaling.scaling(10.0, 8.0, 2) == {"speedup": 1.25, "scaling_efficiency": 0.625}
    with pytest.raises(ValueError, match="positive"):
        sharding_scaling.scaling(1.0, 0.0, 2)


def test_unit_split_is_what_each_shard_computes(monkeypatch):
    model = make_tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(1, model.cfg.d_vocab, (2, 2, 12), generator=g)
    _, cache = model.run_with_cache(clean)
    calls = []
    real = sharding.run_sweep

    def counting(*args, **kwargs):
        calls.append(len(args[4].indices))
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "run_sweep", counting)
    # resid_pre: 2 layers x 12 positions = 24 variants, 3 units of 8: round robin gives 2 and 1.
    assert sharding_scaling.unit_split(24, 2) == [2, 1]
    for i, expected in enumerate(sharding_scaling.unit_split(24, 2)):
        calls.clear()
        with pytest.warns(UserWarning, match=f"Shard {i}/2"):
            patching.get_act_patch_resid_pre(model, corrupted, cache, lambda logits: logits[:, -1, 3].mean(),
                                             progress=False, shard=(i, 2))
        assert len(calls) == expected
    assert sharding_scaling.unit_split(144, 2) == [9, 9] and sharding_scaling.unit_split(2160, 4) == [16] * 4
