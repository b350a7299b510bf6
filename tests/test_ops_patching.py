"""hooklens.ops.patching: `index_patch_` (gather + index_put_) against an unbatched per-(variant, prompt) loop and
against `masked_patch` with `hooklens.sweeps.index_mask`'s mask, on every layout the patching setters use;
`masked_patch` (torch.where) against the loop. CUDA twins are skipped without CUDA."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from hooklens.ops.patching import check_index_patch, index_patch_, masked_patch
from hooklens.sweeps import index_mask

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


# Every (activation shape without batch, axes) hooklens.patching's setters use, by name; T is the suffix length.
def _layouts(T):
    d, h, dh = 6, 3, 4
    return {
        "resid[pos,d]-pos": ((T, d), (0,)),
        "z[pos,head,dh]-head": ((T, h, dh), (1,)),
        "z[pos,head,dh]-pos,head": ((T, h, dh), (0, 1)),
        "pattern[head,dest,src]-head": ((h, T, T), (0,)),
        "pattern[head,dest,src]-head,dest": ((h, T, T), (0, 1)),
    }


def _indices(n, shape, axes, g):
    cols = [torch.randint(0, shape[a], (n,), generator=g) for a in axes]
    return torch.stack(cols, 1) if cols else torch.zeros(n, 0, dtype=torch.int64)


def _loop(act, clean, index, axes):
    """The obviously-correct version: one slice assignment per variant and prompt."""
    out = act.clone()
    n, b = index.shape[0], clean.shape[0]
    for v in range(n):
        where = [slice(None)] * (act.dim() - 1)
        for column, axis in enumerate(axes):
            where[axis] = int(index[v, column])
        for j in range(b):
            out[v * b + j][tuple(where)] = clean[j][tuple(where)]
    return out


def _by_mask(act, clean, index, axes):
    """masked_patch with the engine's mask (index_mask wants column 0 = layer)."""
    with_layer = torch.cat([torch.zeros(len(index), 1, dtype=torch.int64), index.cpu()], 1)
    mask = index_mask(with_layer, tuple(act.shape[1:]), axes).to(act.device)
    return masked_patch(act, clean, mask)


def _case(T, b, n, layout, dtype, device, seed=0):
    shape, axes = _layouts(T)[layout]
    g = torch.Generator().manual_seed(seed)
    act = torch.randn((n * b,) + shape, generator=g, dtype=F64).to(device, dtype)
    clean = torch.randn((b,) + shape, generator=g, dtype=F64).to(device, dtype)
    return act, clean, _indices(n, shape, axes, g).to(device), axes


LAYOUTS = list(_layouts(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T", [1, 7, 113])
@pytest.mark.parametrize("b,n", [(1, 1), (1, 17), (3, 1), (3, 17)])
def test_index_patch_is_the_loop_and_the_mask_patch(b, n, T, layout, device):
    for dtype in (F32, F64, BF16):
        act, clean, index, axes = _case(T, b, n, layout, dtype, device, seed=T + n)
        want = _loop(act, clean, index, axes)
        assert torch.equal(_by_mask(act, clean, index, axes), want)
        for check_bounds in (True, False):
            got = act.clone()
            assert index_patch_(got, clean, index, axes, check_bounds=check_bounds) is got
            assert torch.equal(got, want), (dtype, check_bounds)


@pytest.mark.parametrize("device", DEVICES)
def test_index_patch_strided_clean_and_act(device):
    # clean narrowed along positions (the engine's suffix), clean expanded from one prompt (stride 0), act a narrowed
    # view of a bigger buffer (only the view's patched elements change), act with permuted strides.
    g = torch.Generator().manual_seed(3)
    b, n, T, h, dh = 2, 5, 9, 3, 4
    index = torch.stack([torch.randint(0, T - 2, (n,), generator=g), torch.randint(0, h, (n,), generator=g)], 1)
    index = index.to(device)
    full = torch.randn(b, T, h, dh, generator=g).to(device)
    cleans = {
        "narrowed": full.narrow(1, 2, T - 2),
        "expanded": full[:1, 2:].expand(b, T - 2, h, dh),
        "transposed": full[:, 2:].transpose(-1, -2).contiguous().transpose(-1, -2),
    }
    for name, clean in cleans.items():
        for axes in ((0, 1), (1,)):
            idx = index if axes == (0, 1) else index[:, 1:]
            buffer = torch.randn(n * b, T, h, dh, generator=g).to(device)
            act = buffer.narrow(1, 2, T - 2)  # non-contiguous view
            want_view = _loop(act, clean, idx, axes)
            want_buffer = buffer.clone()
            want_buffer[:, 2:] = want_view
            got = buffer.clone()
            index_patch_(got.narrow(1, 2, T - 2), clean, idx, axes)
            assert torch.equal(got, want_buffer), (name, axes)
            permuted = buffer.clone().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # [n*b, T, h, dh] view
            index_patch_(permuted[:, 2:], clean, idx, axes)
            assert torch.equal(permuted, want_buffer), (name, axes, "permuted act")


def test_index_patch_every_dtype_copies_bits():
    # A copy, no arithmetic: NaN payloads, -0.0, integers and bool come through unchanged.
    g = torch.Generator().manual_seed(4)
    index = torch.tensor([[2], [0], [4]])
    for dtype in (torch.float16, BF16, F32, F64, torch.int8, torch.int64, torch.bool, torch.complex64):
        act = (torch.randn(6, 5, 3, generator=g) * 10).to(dtype)
        clean = (torch.randn(2, 5, 3, generator=g) * 10).to(dtype)
        if dtype.is_floating_point:
            clean[0, 2, 0], clean[1, 4, 1] = float("nan"), -0.0
        want = _loop(act, clean, index, (0,))
        got = index_patch_(act.clone(), clean, index, (0,))
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype


def test_index_patch_empty_shapes():
    for act, clean, index in [
        (torch.zeros(0, 4), torch.zeros(2, 4), torch.zeros(0, 1, dtype=torch.int64)),  # no variants
        (torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor([[1], [2]])),  # no prompts: indices still checked
        (torch.zeros(6, 4, 0), torch.zeros(2, 4, 0), torch.tensor([[1], [2], [3]])),  # nothing per position
    ]:
        assert index_patch_(act, clean, index, (0,)) is act
    with pytest.raises(IndexError, match="axis 0 of S, size 4"):
        index_patch_(torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor([[1], [4]]), (0,))


@pytest.mark.parametrize("device", DEVICES)
def test_index_patch_errors_name_the_problem(device):
    act, clean = torch.zeros(6, 5, 4, device=device), torch.zeros(2, 5, 4, device=device)
    index = torch.tensor([[1], [0], [4]], device=device)
    for bad, axis, size in ((5, 0, 5), (-1, 0, 5)):
        with pytest.raises(IndexError, match=rf"axis {axis} of S.*size {size}.*must be in 0 .. {size - 1}"):
            index_patch_(act, clean, torch.tensor([[1], [bad], [0]], device=device), (0,))
    with pytest.raises(IndexError, match=r"index\[:, 1\] \(axis 1 of S, size 4\)"):
        index_patch_(act, clean, torch.tensor([[0, 4], [0, 0], [0, 0]], device=device), (0, 1))
    with pytest.raises(TypeError, match="one dtype.*clean.to"):
        index_patch_(act, clean.double(), index, (0,))
    with pytest.raises(TypeError, match="index must be int64.*index.long"):
        index_patch_(act, clean, index.int(), (0,))
    with pytest.raises(TypeError, match="act must be a tensor"):
        index_patch_(act.tolist(), clean, index, (0,))
    with pytest.raises(TypeError, match="axes must be a sequence of ints"):
        index_patch_(act, clean, index, 0)
    with pytest.raises(ValueError, match=r"act has 6 rows, expected n\*b = 2\*2 = 4"):
        index_patch_(act, clean, index[:2], (0,))
    with pytest.raises(ValueError, match="must agree on S"):
        index_patch_(act, clean[:, :4], index, (0,))
    with pytest.raises(ValueError, match="axes must be distinct dims of S"):
        index_patch_(act, clean, index, (2,))
    with pytest.raises(ValueError, match="axes must be distinct dims of S"):
        index_patch_(act, clean, torch.zeros(3, 2, dtype=torch.int64, device=device), (0, 0))
    with pytest.raises(ValueError, match=r"index must be \[n, len\(axes\)\] = \[n, 2\]"):
        index_patch_(act, clean, index, (0, 1))
    with pytest.raises(ValueError, match="one device.*clean on meta"):
        index_patch_(act, clean.to("meta"), index, (0,))


def test_index_patch_is_differentiable():
    act = torch.randn(6, 5, 4, dtype=F64, requires_grad=True)
    clean = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    index = torch.tensor([[1], [0], [4]])
    out = index_patch_(act.clone(), clean, index, (0,))
    want = _by_mask(act, clean, index, (0,))
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    assert all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(out, (act, clean), g),
                                                 torch.autograd.grad(want, (act, clean), g)))


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
def test_index_patch_dispatches_the_same_ops_for_any_number_of_variants(axes):
    # No loop over variants: one gather and one index_put_ whatever n is; the engine's bounds-free call dispatches
    # nothing that reads the indices back to the host.
    runs = []
    for n in (1, 4, 64):
        act, clean = torch.zeros(n * 2, 5, 3, 4), torch.ones(2, 5, 3, 4)
        index = torch.zeros(n, len(axes), dtype=torch.int64)
        with _OpNames() as mode:
            index_patch_(act, clean, index, axes, check_bounds=False)
        runs.append(mode.names)
    assert runs[0] == runs[1] == runs[2] and runs[0].count("aten.index_put_") == 1
    assert not {"aten._local_scalar_dense", "aten.any", "aten.min", "aten.max"} & set(runs[0])


def test_check_index_patch_returns_the_chunk_shape():
    assert check_index_patch(torch.zeros(6, 5, 3), torch.zeros(2, 5, 3), torch.zeros(3, 2, dtype=torch.int64),
                             [1, 0]) == (3, 2, (1, 0))


@requires_cuda
def test_index_patch_without_bounds_check_is_capturable():
    # The engine's call (check_bounds=False) has no host sync, so it can sit inside a CUDA graph.
    clean = torch.ones(2, 5, 4, device="cuda")
    static_act, static_index = torch.zeros(6, 5, 4, device="cuda"), torch.tensor([[1], [0], [4]], device="cuda")
    index_patch_(static_act, clean, static_index, (0,), check_bounds=False)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        index_patch_(static_act, clean, static_index, (0,), check_bounds=False)
    static_act.zero_()
    static_index.copy_(torch.tensor([[4], [3], [2]]))
    graph.replay()
    want = _loop(torch.zeros(6, 5, 4), clean.cpu(), static_index.cpu(), (0,))
    assert torch.equal(static_act.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5,), (7, 3, 4), (2, 6, 6)])
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_masked_patch_matches_the_loop(shape, dtype, device):
    n, b = 3, 2
    g = torch.Generator().manual_seed(5)
    act = torch.randn((n * b,) + shape, generator=g).to(device, dtype)
    clean = torch.randn((b,) + shape, generator=g).to(device, dtype)
    mask = (torch.rand((n,) + shape, generator=g) > 0.5).to(device)
    expected = act.clone()
    for v in range(n):  # what the op replaces: one patch per variant
        rows = expected[v * b : (v + 1) * b]
        rows[:, mask[v]] = clean[:, mask[v]]
    assert torch.equal(masked_patch(act, clean, mask), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_patch_errors(device):
    act, clean = torch.zeros(6, 4, device=device), torch.zeros(2, 4, device=device)
    with pytest.raises(TypeError, match="mask must be bool"):
        masked_patch(act, clean, torch.zeros(3, 4, device=device))
    with pytest.raises(ValueError, match=r"expected n\*b"):
        masked_patch(act, clean, torch.zeros(4, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="one device"):
        masked_patch(act, clean, torch.zeros(3, 4, dtype=torch.bool, device="meta"))
