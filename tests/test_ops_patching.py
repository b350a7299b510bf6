"""hooklens.ops.patching: `masked_patch`, the patching engine's op (C++ `hooklens::masked_patch` and its PyTorch
reference), on every device in DEVICES (the CUDA twins are skipped where CUDA is absent)."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from hooklens.ops import lowrank
from hooklens.ops.patching import masked_patch, masked_patch_reference


@pytest.fixture(scope="module", autouse=True)
def _extension():
    # Fails (not skips) every test of this file when hooklens._C is missing or broken.
    lowrank.load_extension(required=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5,), (7, 3, 4), (2, 6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_masked_patch_matches_reference_and_loop(shape, dtype, device):
    n, b = 3, 2
    g = torch.Generator().manual_seed(5)
    act = torch.randn((n * b,) + shape, generator=g).to(device, dtype)
    clean = torch.randn((b,) + shape, generator=g).to(device, dtype)
    mask = (torch.rand((n,) + shape, generator=g) > 0.5).to(device)
    expected = act.clone()
    for v in range(n):  # what the op replaces: one patch per variant
        rows = expected[v * b : (v + 1) * b]
        rows[:, mask[v]] = clean[:, mask[v]]
    assert torch.equal(masked_patch(act, clean, mask, backend="cpp"), expected)
    assert torch.equal(masked_patch_reference(act, clean, mask), expected)
    torch.library.opcheck(torch.ops.hooklens.masked_patch.default, (act, clean, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_patch_operator_and_wrapper_agree(device):
    # The wrapper calls the operator on every device (backend "auto" and "cpp").
    g = torch.Generator().manual_seed(6)
    act, clean = torch.randn(8, 5, generator=g).to(device), torch.randn(2, 5, generator=g).to(device)
    mask = (torch.rand(4, 5, generator=g) > 0.5).to(device)
    want = torch.ops.hooklens.masked_patch(act, clean, mask)
    assert want.device.type == device
    for backend in ("auto", "cpp"):
        assert torch.equal(masked_patch(act, clean, mask, backend=backend), want), backend


@pytest.mark.parametrize("device", DEVICES)
def test_masked_patch_errors(device):
    act, clean = torch.zeros(6, 4, device=device), torch.zeros(2, 4, device=device)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        masked_patch(act, clean, torch.zeros(3, 4, device=device), backend="cpp")
    with pytest.raises(RuntimeError, match="expected n\\*b"):
        masked_patch(act, clean, torch.zeros(4, 4, dtype=torch.bool, device=device), backend="cpp")
