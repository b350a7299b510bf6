"""hooklens.ops.patching: `index_patch_` (C++ CPU operator, Triton CUDA kernel, PyTorch reference) against an
unbatched per-(variant, prompt) loop and against `masked_patch` with `hooklens.sweeps.index_mask`'s mask, on every
layout the patching setters use; `masked_patch` (torch.where) against the loop. CUDA twins are skipped without
CUDA; the Triton kernel runs on CPU tensors in Triton's interpreter (conftest switches the interpreter on there)."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from hooklens.ops import lowrank
from hooklens.ops.patching import (
    check_index_patch,
    index_patch_,
    index_patch_reference_,
    masked_patch,
    masked_patch_reference,
    use_reference,
)
from hooklens.sweeps import index_mask

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _extension():
    # Fails (not skips) every test of this file when hooklens._C is missing or broken.
    lowrank.load_extension(required=True)


def _triton_launcher():
    """hooklens.kernels.patch.index_patch_triton where it can run on CPU tensors (interpreter), else None."""
    try:
        import hooklens.kernels as K
        from hooklens.kernels.patch import index_patch_triton
    except ImportError:
        return None
    return index_patch_triton if K.kernels_runnable_on("cpu") else None


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
        assert torch.equal(index_patch_reference_(act.clone(), clean, index, axes), want)
        for backend in ("cpp", "torch"):
            got = act.clone()
            assert index_patch_(got, clean, index, axes, backend=backend) is got
            assert torch.equal(got, want), (backend, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T,b,n", [(1, 1, 1), (7, 3, 17), (113, 1, 5)])
def test_triton_kernel_is_the_reference(T, b, n, layout):
    # The CUDA kernel's launcher on CPU tensors in Triton's interpreter (on CUDA machines the operator's CUDA twin
    # of the test above runs it on the GPU).
    launch = _triton_launcher()
    if launch is None:
        pytest.skip("Triton's interpreter is off and there is no CUDA")
    for dtype in (F32, F64, BF16):
        act, clean, index, axes = _case(T, b, n, layout, dtype, "cpu", seed=T * n)
        got = act.clone()
        launch(got, clean, index, axes)
        assert torch.equal(got, _loop(act, clean, index, axes)), dtype


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
            idx = index[:, :1] if axes == (0,) else (index if axes == (0, 1) else index[:, 1:])
            buffer = torch.randn(n * b, T, h, dh, generator=g).to(device)
            act = buffer.narrow(1, 2, T - 2)  # non-contiguous view
            want_view = _loop(act, clean, idx, axes)
            want_buffer = buffer.clone()
            want_buffer[:, 2:] = want_view
            for backend in ("cpp", "torch"):
                got = buffer.clone()
                index_patch_(got.narrow(1, 2, T - 2), clean, idx, axes, backend=backend)
                assert torch.equal(got, want_buffer), (name, axes, backend)
            permuted = buffer.clone().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # [n*b, T, h, dh] view
            index_patch_(permuted[:, 2:], clean, idx, axes, backend="cpp")
            assert torch.equal(permuted, want_buffer), (name, axes, "permuted act")
            launch = _triton_launcher() if device == "cpu" else None
            if launch is not None:
                got = buffer.clone()
                launch(got.narrow(1, 2, T - 2), clean, idx, axes)
                assert torch.equal(got, want_buffer), (name, axes, "triton")


def test_index_patch_every_dtype_copies_bits():
    # The kernels copy bits: NaN payloads, -0.0, integers and bool come through unchanged.
    g = torch.Generator().manual_seed(4)
    index = torch.tensor([[2], [0], [4]])
    for dtype in (torch.float16, BF16, F32, F64, torch.int8, torch.int64, torch.bool, torch.complex64):
        act = (torch.randn(6, 5, 3, generator=g) * 10).to(dtype)
        clean = (torch.randn(2, 5, 3, generator=g) * 10).to(dtype)
        if dtype.is_floating_point:
            clean[0, 2, 0], clean[1, 4, 1] = float("nan"), -0.0
        want = _loop(act, clean, index, (0,))
        got = index_patch_(act.clone(), clean, index, (0,), backend="cpp")
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype


def test_index_patch_empty_shapes():
    for act, clean, index in [
        (torch.zeros(0, 4), torch.zeros(2, 4), torch.zeros(0, 1, dtype=torch.int64)),  # no variants
        (torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor([[1], [2]])),  # no prompts: indices still checked
        (torch.zeros(6, 4, 0), torch.zeros(2, 4, 0), torch.tensor([[1], [2], [3]])),  # nothing per position
    ]:
        for backend in ("cpp", "torch"):
            assert index_patch_(act, clean, index, (0,), backend=backend) is act


@pytest.mark.parametrize("device", DEVICES)
def test_index_patch_errors_name_the_problem(device):
    act, clean = torch.zeros(6, 5, 4, device=device), torch.zeros(2, 5, 4, device=device)
    index = torch.tensor([[1], [0], [4]], device=device)
    for backend in ("cpp", "torch"):
        if device == "cpu":  # on CUDA a bounds check would sync: the kernel skips such variants instead (below)
            for bad, column, axis, size in ((5, 0, 0, 5), (-1, 0, 0, 5)):
                with pytest.raises(IndexError, match=rf"axis {axis} of S.*size {size}"):
                    index_patch_(act, clean, torch.tensor([[1], [bad], [0]]), (0,), backend=backend)
            with pytest.raises(IndexError, match=r"index\[:, 1\] \(axis 1 of S, size 4\)|index\[0, 1\] = 4 .*axis 1"):
                index_patch_(act, clean, torch.tensor([[0, 4], [0, 0], [0, 0]]), (0, 1), backend=backend)
        with pytest.raises(TypeError, match="one dtype.*clean.to"):
            index_patch_(act, clean.double(), index, (0,), backend=backend)
        with pytest.raises(TypeError, match="index must be int64.*index.long"):
            index_patch_(act, clean, index.int(), (0,), backend=backend)
        with pytest.raises(ValueError, match=r"act has 6 rows, expected n\*b = 2\*2 = 4"):
            index_patch_(act, clean, index[:2], (0,), backend=backend)
        with pytest.raises(ValueError, match="must agree on S"):
            index_patch_(act, clean[:, :4], index, (0,), backend=backend)
        with pytest.raises(ValueError, match="axes must be distinct dims of S"):
            index_patch_(act, clean, index, (2,), backend=backend)
        with pytest.raises(ValueError, match="axes must be distinct dims of S"):
            index_patch_(act, clean, torch.zeros(3, 2, dtype=torch.int64, device=device), (0, 0), backend=backend)
        with pytest.raises(ValueError, match=r"index must be \[n, len\(axes\)\] = \[n, 2\]"):
            index_patch_(act, clean, index, (0, 1), backend=backend)
        with pytest.raises(ValueError, match="one device.*clean on meta"):
            index_patch_(act, clean.to("meta"), index, (0,), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        index_patch_(act, clean, index, (0,), backend="fast")


def test_operator_errors_real_and_fake_kernels():
    # The operator itself (no Python wrapper): the C++ kernel and the fake kernel refuse the same calls.
    index_patch_(torch.zeros(2, 1), torch.zeros(1, 1), torch.zeros(2, 1, dtype=torch.int64), (0,))  # registers
    op = torch.ops.hooklens.index_patch_
    act, clean, index = torch.zeros(6, 5), torch.zeros(2, 5), torch.tensor([[1], [0], [4]])
    for device in ("cpu", "meta"):
        a, c, i = act.to(device), clean.to(device), index.to(device)
        with pytest.raises(TypeError, match="one dtype"):
            op(a, c.double(), i, [0])
        with pytest.raises(TypeError, match="index must be int64"):
            op(a, c, i.int(), [0])
        with pytest.raises(ValueError, match=r"expected n\*b"):
            op(a, c, i[:2], [0])
        with pytest.raises(ValueError, match="axes must be distinct"):
            op(a, c, i, [1])
        with pytest.raises(ValueError, match="must agree on S"):
            op(a, c[:, :4], i, [0])
    for which in ("act", "clean", "index"):  # a CPU tensor mixed with a meta one reaches the fake kernel
        args = {"act": act, "clean": clean, "index": index}
        args[which] = args[which].to("meta")
        with pytest.raises(RuntimeError, match=rf"one device, got act on {args['act'].device}, clean on "
                                               rf"{args['clean'].device} and index on {args['index'].device}"):
            op(args["act"], args["clean"], args["index"], [0])
    op(act.to("meta"), clean.to("meta"), index.to("meta"), [0])  # valid meta call: no error, nothing to do
    with pytest.raises(RuntimeError, match="overlapping elements"):
        op(torch.zeros(1, 5).expand(6, 5), clean, index, [0])
    with pytest.raises(RuntimeError, match="share memory"):
        buffer = torch.zeros(8, 5)
        op(buffer[:6], buffer[4:6], index, [0])  # clean is two of act's rows


def test_grad_runs_the_differentiable_reference():
    act = torch.randn(6, 5, 4, dtype=F64, requires_grad=True)
    clean = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    index = torch.tensor([[1], [0], [4]])
    out = index_patch_(act.clone(), clean, index, (0,))  # auto: the operator has no autograd, the reference does
    want = _by_mask(act, clean, index, (0,))
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    assert all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(out, (act, clean), g),
                                                 torch.autograd.grad(want, (act, clean), g)))
    with pytest.raises(ValueError, match="no autograd.*no_grad"):
        index_patch_(act.clone(), clean, index, (0,), backend="cpp")


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_use_reference_switches_the_implementation():
    act, clean, index = torch.zeros(6, 5), torch.ones(2, 5), torch.tensor([[1], [0], [4]])
    runs = {}
    for reference in (False, True):
        with _OpNames() as mode, use_reference(reference):
            out = index_patch_(act.clone(), clean, index, (0,))
        runs[reference] = (mode.names, out)
    assert runs[False][0] == ["hooklens.index_patch_"] or runs[False][0][-1] == "hooklens.index_patch_"
    assert "hooklens.index_patch_" not in runs[True][0] and "aten.index_put_" in runs[True][0]
    assert torch.equal(runs[False][1], runs[True][1])
    with _OpNames() as mode:  # the switch is scoped to its block
        index_patch_(act.clone(), clean, index, (0,))
    assert "hooklens.index_patch_" in mode.names


def test_check_index_patch_returns_the_chunk_shape():
    assert check_index_patch(torch.zeros(6, 5, 3), torch.zeros(2, 5, 3), torch.zeros(3, 2, dtype=torch.int64),
                             [1, 0]) == (3, 2, (1, 0))


@requires_cuda
def test_cuda_kernel_skips_out_of_range_variants_without_syncing():
    # Documented CUDA behaviour: no host sync for a bounds check; a variant with an out-of-range coordinate is left
    # as it was, the others are patched. The call is capturable in a CUDA graph.
    act, clean = torch.zeros(6, 5, 4, device="cuda"), torch.ones(2, 5, 4, device="cuda")
    index = torch.tensor([[1], [7], [-1]], device="cuda")
    index_patch_(act, clean, index, (0,), backend="cpp")
    assert act[:2, 1].eq(1).all() and act.sum() == 2 * 4
    static_act, static_index = torch.zeros(6, 5, 4, device="cuda"), torch.tensor([[1], [0], [4]], device="cuda")
    index_patch_(static_act, clean, static_index, (0,))  # warm-up (registration, compilation) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        index_patch_(static_act, clean, static_index, (0,))
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
    assert masked_patch_reference is masked_patch


@pytest.mark.parametrize("device", DEVICES)
def test_masked_patch_errors(device):
    act, clean = torch.zeros(6, 4, device=device), torch.zeros(2, 4, device=device)
    with pytest.raises(TypeError, match="mask must be bool"):
        masked_patch(act, clean, torch.zeros(3, 4, device=device))
    with pytest.raises(ValueError, match=r"expected n\*b"):
        masked_patch(act, clean, torch.zeros(4, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="one device"):
        masked_patch(act, clean, torch.zeros(3, 4, dtype=torch.bool, device="meta"))
