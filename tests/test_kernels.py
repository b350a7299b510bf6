"""The Triton attention kernels against the one reference, `hooklens.attention.reference_attention`, in float64.

On a machine without CUDA the kernels run in Triton's interpreter (switched on in conftest.py); with CUDA they run
on the GPU. Skipped when Triton is missing.

Accuracy rule (tests/tolerances.py): every result's max error vs the float64 reference is within the table's
"kernel_<output>" entry; bfloat16/float16 results also meet "kernel_vs_torch": at most 2x the max error of the same
computation done with PyTorch ops in that dtype (plus a tiny floor for cases where PyTorch happens to be exact).
"""
from __future__ import annotations

import math

import pytest
import torch
from tolerances import TOLERANCES, tolerance

from hooklens.attention import attention_scores, causal_mask, line_entries, reference_attention

pytest.importorskip("triton")

import hooklens.kernels as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not K.kernels_runnable_on("cpu"):
    pytest.skip("no CUDA and Triton's interpreter is off", allow_module_level=True)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def max_err_allowed(name, dtype):
    """The table's max abs error vs float64 for kernel output `name` ("scores", "pattern", "z" or "stats")."""
    return tolerance(f"kernel_{name}", dtype)["atol"]


# (T, batch, padded, dtype, d_head): every T with batch 1 and 3, with and without padding, all dtypes; T >= 257
# uses d_head 16 and batch 1 to keep the interpreter fast.
CASES = [
    (1, 1, False, F32, 64),
    (1, 3, True, BF16, 64),
    (1, 3, False, F16, 64),
    (7, 1, True, F16, 64),
    (7, 3, False, F32, 64),
    (7, 3, True, BF16, 64),
    (113, 1, False, BF16, 64),
    (113, 3, True, F32, 64),
    (113, 3, True, F16, 64),
    (128, 1, True, F32, 128),
    (128, 3, False, BF16, 64),
    (128, 1, False, F16, 16),
    (257, 1, True, F32, 16),
    (257, 1, False, BF16, 16),
]
IDS = [f"T{t}-b{b}-{'pad' if p else 'nopad'}-{str(dt)[6:]}-dh{dh}" for t, b, p, dt, dh in CASES]
HEADS = 2


def reference(q, k, v, scale=None, pos_offset=0, key_padding_mask=None):
    """`(scores, pattern, z)` from the reference in q's dtype; `scale` multiplies q.k as in the kernels' API
    (default 1/sqrt(d_head)), the reference divides by TL's `attn_scale = 1 / scale`."""
    attn_scale = math.sqrt(q.shape[-1]) if scale is None else 1.0 / scale
    z, pattern = reference_attention(q, k, v, attn_scale, pos_offset, key_padding_mask)
    return attention_scores(q, k, attn_scale, pos_offset, key_padding_mask), pattern, z


def reference_stats(q, k, v, specs, key_padding_mask=None):
    """The reference pattern's line means over batch and entries: `(z, [n_stats, h])`."""
    _, pattern, z = reference(q, k, v, key_padding_mask=key_padding_mask)
    heads = pattern.shape[1]
    means = [line_entries(pattern, spec).transpose(0, 1).reshape(heads, -1).mean(-1) for spec in specs]
    return z, torch.stack(means)


def make_inputs(T, b, padded, dtype, dh, seed=0, tk=None, heads=HEADS):
    gen = torch.Generator().manual_seed(seed)
    tk = T if tk is None else tk
    q = torch.randn(b, T, heads, dh, generator=gen)
    k = torch.randn(b, tk, heads, dh, generator=gen)
    v = torch.randn(b, tk, heads, dh, generator=gen)
    q = q * 2.0  # peakier softmax than N(0, 1) scores
    mask = None
    if padded:  # left padding: row r has pads[r] pad tokens (row 2: everything but the last token)
        pads = [min(3, tk - 1), 0, tk - 1][:b] if b > 1 else [min(3, tk - 1)]
        mask = torch.ones(b, tk, dtype=torch.bool if b > 1 else torch.long)
        for r, n in enumerate(pads):
            mask[r, :n] = 0
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(q), to(k), to(v), (None if mask is None else mask.to(DEVICE))


def f64(*ts):
    return [t.double() for t in ts]


def max_err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "infinities differ"
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def check_close(name, got, truth, lowp_torch, dtype):
    err, allowed = max_err(got, truth), max_err_allowed(name, dtype)
    assert err <= allowed, f"{name}: max error {err:.3g} > {allowed} ({dtype})"
    if dtype in TOLERANCES["kernel_vs_torch"]:
        torch_err = max_err(lowp_torch, truth)
        vs_torch = tolerance("kernel_vs_torch", dtype)
        assert err <= vs_torch["rtol"] * torch_err + vs_torch["atol"], \
            f"{name}: kernel error {err:.3g} > {vs_torch['rtol']}x torch's {torch_err:.3g}"


def check_pattern_properties(pattern, mask, T, tk, pos_offset=0):
    p = pattern.double()
    visible = causal_mask(T, tk, pos_offset, mask, p.device)  # [b|1, 1, q, k]
    visible = visible.expand_as(p)
    assert torch.all(p[~visible] == 0), "pattern must be exactly 0 where a key is invisible (above the diagonal)"
    assert torch.all(torch.triu(p, diagonal=1 + pos_offset) == 0)
    has_key = visible.any(-1)
    sums = p.sum(-1)
    ones = torch.ones_like(sums[has_key])
    torch.testing.assert_close(sums[has_key], ones, **tolerance("pattern_row_sum", pattern.dtype))
    assert torch.all(sums[~has_key] == 0), "rows with no visible key must be 0"


@pytest.mark.parametrize("T,b,padded,dtype,dh", CASES, ids=IDS)
def test_pattern_attention(T, b, padded, dtype, dh):
    q, k, v, mask = make_inputs(T, b, padded, dtype, dh)
    scores, pattern, z = K.pattern_attention(q, k, v, pos_offset=0, key_padding_mask=mask, return_scores=True)
    assert pattern.shape == (b, HEADS, T, T) and scores.shape == (b, HEADS, T, T) and z.shape == (b, T, HEADS, dh)
    assert pattern.dtype == scores.dtype == z.dtype == dtype
    truth = reference(*f64(q, k, v), key_padding_mask=mask)
    lowp = reference(q, k, v, key_padding_mask=mask)
    for name, got, t, lp in zip(("scores", "pattern", "z"), (scores, pattern, z), truth, lowp):
        check_close(name, got, t, lp, dtype)
    # TL semantics: -inf scores exactly where masked, pattern 0 there, rows with no key -> pattern 0 and z 0
    assert torch.equal(torch.isneginf(scores), torch.isneginf(truth[0]))
    check_pattern_properties(pattern, mask, T, T)
    no_key = pattern.double().sum(-1).eq(0).transpose(1, 2)  # [b, q, h]
    assert torch.all(z[no_key] == 0)


@pytest.mark.parametrize("T,b,padded,dtype,dh", CASES, ids=IDS)
def test_flash_attention(T, b, padded, dtype, dh):
    q, k, v, mask = make_inputs(T, b, padded, dtype, dh, seed=1)
    z = K.flash_attention(q, k, v, key_padding_mask=mask)
    assert z.shape == (b, T, HEADS, dh) and z.dtype == dtype
    truth = reference(*f64(q, k, v), key_padding_mask=mask)[2]
    check_close("z", z, truth, reference(q, k, v, key_padding_mask=mask)[2], dtype)
    if mask is not None:  # query rows that see only padding -> z exactly 0
        no_key = reference(*f64(q, k, v), key_padding_mask=mask)[1].sum(-1).eq(0)
        assert torch.all(z[no_key.transpose(1, 2)] == 0)


def stat_specs(T):
    s = max(1, (T - 1) // 2)
    return [("diagonal", 1 - s), ("diagonal", -1), ("diagonal", -s), ("diagonal", 0), ("column", 0)]


@pytest.mark.parametrize("T,b,padded,dtype,dh", CASES, ids=IDS)
def test_attention_stats(T, b, padded, dtype, dh):
    q, k, v, mask = make_inputs(T, b, padded, dtype, dh, seed=2)
    specs = stat_specs(T)
    z, means = K.attention_stats(q, k, v, specs, key_padding_mask=mask)
    assert means.shape == (len(specs), HEADS) and means.dtype == F32
    z_truth, truth = reference_stats(*f64(q, k, v), specs, key_padding_mask=mask)
    _, lowp = reference_stats(q, k, v, specs, key_padding_mask=mask)
    empty = torch.isnan(truth)  # e.g. the -1 diagonal of a 1x1 pattern
    assert torch.equal(torch.isnan(means), empty)
    check_close("stats", means[~empty], truth[~empty], lowp[~empty].double(), dtype)
    check_close("z", z, z_truth, reference(q, k, v, key_padding_mask=mask)[2], dtype)
    _, sums = K.attention_stats(q, k, v, specs, key_padding_mask=mask, reduction="sum")
    counts = K.stat_counts(specs, T, T)
    assert sums.shape == (len(specs), b, HEADS)
    ok = counts > 0
    torch.testing.assert_close((sums.sum(1).double().cpu() / (counts[:, None] * b))[ok], means.double().cpu()[ok],
                               **tolerance("pattern_mean"))


def test_long_sequence():
    """T > 1024 (ragged last block), one head, d_head 16: all three kernels."""
    T = 1030
    q, k, v, mask = make_inputs(T, 1, True, F32, 16, seed=5, heads=1)
    truth = reference(*f64(q, k, v), key_padding_mask=mask)
    _, pattern, z = K.pattern_attention(q, k, v, key_padding_mask=mask)
    assert max_err(pattern, truth[1]) <= max_err_allowed("pattern", F32)
    assert max_err(z, truth[2]) <= max_err_allowed("z", F32)
    check_pattern_properties(pattern, mask, T, T)
    assert max_err(K.flash_attention(q, k, v, key_padding_mask=mask), truth[2]) <= max_err_allowed("z", F32)
    specs = [("diagonal", -514), ("diagonal", -1), ("column", 0)]
    _, means = K.attention_stats(q, k, v, specs, key_padding_mask=mask)
    _, ref = reference_stats(*f64(q, k, v), specs, key_padding_mask=mask)
    torch.testing.assert_close(means.double().cpu(), ref.cpu(), **tolerance("pattern_mean"))


def test_non_contiguous_inputs_and_outputs():
    b, T, dh = 2, 37, 64
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, T, 3, HEADS, dh, generator=gen).to(DEVICE)  # fused projection: q, k, v strided views
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    k = k.transpose(0, 1).contiguous().transpose(0, 1)  # another odd layout: [T, b, ...] storage
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = torch.ones(b, 2 * T, dtype=torch.int32, device=DEVICE)[:, ::2]  # strided mask
    mask[1, :5] = 0
    truth = reference(*f64(q, k, v), key_padding_mask=mask)
    # caller buffers with non-standard strides: pattern stored [b, q, h, k] and viewed as [b, h, q, k]
    pattern_buf = torch.empty(b, T, HEADS, T, device=DEVICE).transpose(1, 2)
    scores_buf = torch.empty(b, HEADS, T, T + 3, device=DEVICE)[..., :T]
    z_buf = torch.empty(b, HEADS, T, dh, device=DEVICE).transpose(1, 2)
    scores, pattern, z = K.pattern_attention(q, k, v, 0.125, 0, mask, pattern_out=pattern_buf, scores_out=scores_buf,
                                             z_out=z_buf)
    assert pattern is pattern_buf and scores is scores_buf and z is z_buf
    for name, got, t in zip(("scores", "pattern", "z"), (scores, pattern, z), truth):
        assert max_err(got, t) <= max_err_allowed(name, F32), name
    z2 = K.flash_attention(q, k, v, key_padding_mask=mask)
    assert max_err(z2, truth[2]) <= max_err_allowed("z", F32)
    _, means = K.attention_stats(q, k, v, [("diagonal", -1), ("column", 0)], key_padding_mask=mask)
    _, ref = reference_stats(*f64(q, k, v), [("diagonal", -1), ("column", 0)], key_padding_mask=mask)
    torch.testing.assert_close(means.double().cpu(), ref.cpu(), **tolerance("pattern_mean"))


@pytest.mark.parametrize("q_len", [1, 5])
def test_pos_offset_kv_cache_decode(q_len):
    """Queries after cached keys (generation): key j visible to query i when j <= i + pos_offset."""
    tk = 40
    q, k, v, _ = make_inputs(q_len, 3, False, F32, 64, seed=4, tk=tk)
    mask = torch.ones(3, tk, dtype=torch.long, device=DEVICE)
    mask[1, :7] = 0
    pos = tk - q_len
    truth = reference(*f64(q, k, v), pos_offset=pos, key_padding_mask=mask)
    scores, pattern, z = K.pattern_attention(q, k, v, pos_offset=pos, key_padding_mask=mask, return_scores=True)
    for name, got, t in zip(("scores", "pattern", "z"), (scores, pattern, z), truth):
        assert max_err(got, t) <= max_err_allowed(name, F32), name
    check_pattern_properties(pattern, mask, q_len, tk, pos)
    z_flash = K.flash_attention(q, k, v, pos_offset=pos, key_padding_mask=mask)
    assert max_err(z_flash, truth[2]) <= max_err_allowed("z", F32)


def test_launchers_validate_inputs():
    q, k, v, _ = make_inputs(4, 1, False, F32, 16)
    with pytest.raises(TypeError, match="dtype"):
        K.flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="share a dtype"):
        K.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="4-D"):
        K.pattern_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v"):
        K.flash_attention(q, k[:, :, :1], v)
    big = torch.zeros(1, 4, 1, 256, device=DEVICE)
    with pytest.raises(ValueError, match="d_head"):
        K.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="key_padding_mask"):
        K.flash_attention(q, k, v, key_padding_mask=torch.ones(1, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="bool or integer"):
        K.flash_attention(q, k, v, key_padding_mask=torch.ones(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="pos_offset"):
        K.flash_attention(q, k, v, pos_offset=-1)
    with pytest.raises(ValueError, match="pattern_out"):
        K.pattern_attention(q, k, v, pattern_out=torch.empty(1, 2, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="scale"):
        K.flash_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="stat"):
        K.attention_stats(q, k, v, [("row", 0)])
    with pytest.raises(ValueError, match="reduction"):
        K.attention_stats(q, k, v, [("column", 0)], reduction="max")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_kernels_are_deterministic(dtype):
    """Same inputs, three runs: every output of the pattern, flash and stats kernels is bitwise the same (no atomics,
    a fixed reduction order per launch configuration)."""
    q, k, v, mask = make_inputs(37, 3, True, dtype, 64, seed=6)
    specs = stat_specs(37)
    runs = []
    for _ in range(3):
        scores, pattern, z = K.pattern_attention(q, k, v, key_padding_mask=mask, return_scores=True)
        z_flash = K.flash_attention(q, k, v, key_padding_mask=mask)
        z_stats, sums = K.attention_stats(q, k, v, specs, key_padding_mask=mask, reduction="sum")
        runs.append((scores, pattern, z, z_flash, z_stats, sums))
    for run in runs[1:]:
        for name, first, again in zip(("scores", "pattern", "z", "flash z", "stats z", "stats"), runs[0], run):
            assert torch.equal(first, again), f"{name} differs between runs ({dtype})"
