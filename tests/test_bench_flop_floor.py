"""benchmarks/flop_floor.py: the sweeps' FLOP floor is the matmul count of a reuse algorithm that really works.

A tiny GPT-2-style model in plain torch runs the ideal reuse algorithm literally (corrupted run cached once; each
variant recomputes only the rows and blocks the floor counts); `FlopCounterMode` counts its matmul FLOPs, which
must equal `variant_flops`, and its logits at the metric's positions must equal a full forward with the patch.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.functional import gelu, layer_norm
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flop_floor  # noqa: E402

SHAPE = flop_floor.Shape(n_layers=3, d_model=8, n_heads=2, d_head=4, d_mlp=12, d_vocab=11)
N_POS = 6


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    s, a = SHAPE, SHAPE.n_heads * SHAPE.d_head

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / shape[0] ** 0.5

    blocks = [dict(q=r(s.d_model, a), k=r(s.d_model, a), v=r(s.d_model, a), o=r(a, s.d_model),
                   w_in=r(s.d_model, s.d_mlp), w_out=r(s.d_mlp, s.d_model)) for _ in range(s.n_layers)]
    return blocks, r(s.d_model, s.d_vocab)


def _ln(x):
    return layer_norm(x, x.shape[-1:])


def _attend(q, keys, values, rows):
    """z at query `rows` (q: [len(rows), a]) against keys/values [T', a] (causal: row t reads 0..t), per head."""
    d = SHAPE.d_head
    out = []
    for i, t in enumerate(rows):
        heads = []
        for h in range(SHAPE.n_heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[i:i + 1, cols] @ keys[:t + 1, cols].T  # [1, t + 1]
            heads.append(torch.softmax(scores / d ** 0.5, -1) @ values[:t + 1, cols])  # [1, d]
        out.append(torch.cat(heads, -1))
    return torch.cat(out, 0)  # [len(rows), a]


def _full_forward(blocks, w_u, resid, patch=None):
    """Every activation of a full forward (no reuse); `patch(name, layer, tensor)` may edit z / mlp_out / resid_pre."""
    acts = {}
    rows = list(range(N_POS))
    for l, w in enumerate(blocks):
        resid = patch("resid_pre", l, resid) if patch else resid
        x = _ln(resid)
        z = _attend(x @ w["q"], x @ w["k"], x @ w["v"], rows)
        z = patch("z", l, z) if patch else z
        mid = resid + z @ w["o"]
        mlp = gelu(_ln(mid) @ w["w_in"]) @ w["w_out"]
        mlp = patch("mlp_out", l, mlp) if patch else mlp
        acts.update({("resid_pre", l): resid, ("k", l): x @ w["k"], ("v", l): x @ w["v"], ("z", l): z,
                     ("mid", l): mid, ("mlp_out", l): mlp})
        resid = mid + mlp
    return acts, _ln(resid) @ w_u


def _reuse_variant(blocks, w_u, cache, clean, entry, layer, start, index, metric):
    """The floor's algorithm for one variant: logits at the metric positions >= start (None if there are none)."""
    read = sorted(m for m in metric if m >= start)
    if not read:
        return None
    rows = list(range(start, read[-1] + 1))
    rel = [t - start for t in read]  # the read positions among `rows`
    resid = None
    for l in range(layer, SHAPE.n_layers):
        w, last = blocks[l], l == SHAPE.n_layers - 1
        out_rows, out_rel = (read, rel) if last else (rows, list(range(len(rows))))
        if l == layer and entry == "mlp_out":
            patched = cache[("mlp_out", l)].clone()
            patched[index] = clean[("mlp_out", l)][index]
            resid = (cache[("mid", l)] + patched)[rows]
            continue
        if l == layer and entry == "z":
            z = cache[("z", l)][out_rows].clone()
            cols = slice(index * SHAPE.d_head, (index + 1) * SHAPE.d_head)
            z[:, cols] = clean[("z", l)][out_rows][:, cols]
            resid = cache[("resid_pre", l)][out_rows]
        else:
            if l == layer:  # resid_pre: the clean residual at `index` (== start)
                resid = cache[("resid_pre", l)][rows].clone()
                resid[index - start] = clean[("resid_pre", l)][index]
            x = _ln(resid)
            keys = torch.cat([cache[("k", l)][:start], x @ w["k"]])
            values = torch.cat([cache[("v", l)][:start], x @ w["v"]])
            z = _attend(x[out_rel] @ w["q"], keys, values, out_rows)
            resid = resid[out_rel]
        mid = resid + z @ w["o"]
        resid = mid + gelu(_ln(mid) @ w["w_in"]) @ w["w_out"]
    if len(resid) != len(read):  # the patched block was the last one and ran on every row
        resid = resid[rel]
    return _ln(resid) @ w_u


def _variants(entry):
    if entry == "z":
        return [(l, 0, h) for l in range(SHAPE.n_layers) for h in range(SHAPE.n_heads)]
    return [(l, p, p) for l in range(SHAPE.n_layers) for p in range(N_POS)]


@pytest.mark.parametrize("metric", [[N_POS - 1], [1, 3], list(range(N_POS))])
@pytest.mark.parametrize("entry", flop_floor.ENTRY_POINTS)
def test_variant_flops_count_a_reuse_algorithm_that_matches_the_full_forward(entry, metric):
    blocks, w_u = _weights()
    g = torch.Generator().manual_seed(1)
    corrupted_in = torch.randn(N_POS, SHAPE.d_model, generator=g, dtype=torch.float64)
    clean_in = torch.randn(N_POS, SHAPE.d_model, generator=g, dtype=torch.float64)
    cache, _ = _full_forward(blocks, w_u, corrupted_in)
    clean, _ = _full_forward(blocks, w_u, clean_in)
    for layer, start, index in _variants(entry):
        def patch(name, l, t, layer=layer, index=index):
            if name != entry or l != layer:
                return t
            t = t.clone()
            if entry == "z":
                cols = slice(index * SHAPE.d_head, (index + 1) * SHAPE.d_head)
                t[:, cols] = clean[(name, l)][:, cols]
            else:
                t[index] = clean[(name, l)][index]
            return t

        _, expected = _full_forward(blocks, w_u, corrupted_in, patch)
        with FlopCounterMode(display=False) as counter:
            logits = _reuse_variant(blocks, w_u, cache, clean, entry, layer, start, index, metric)
        floor = flop_floor.variant_flops(SHAPE, layer, start, metric, entry)
        assert counter.get_total_flops() == floor, (entry, layer, start, index)
        read = [m for m in metric if m >= start]
        if logits is None:
            assert floor == 0 and not read
        else:
            torch.testing.assert_close(logits, expected[read], rtol=1e-10, atol=1e-10)


def test_sweep_floor_sums_the_variants_and_the_corrupted_run_per_prompt():
    metric = [-1]
    per_prompt = sum(flop_floor.variant_flops(SHAPE, l, p, [N_POS - 1], "resid_pre")
                     for l in range(SHAPE.n_layers) for p in range(N_POS))
    per_prompt += flop_floor.corrupted_run_flops(SHAPE, N_POS, [N_POS - 1])
    assert flop_floor.sweep_floor("resid_pre", SHAPE, N_POS, metric, batch=3) == 3 * per_prompt
    no_run = flop_floor.sweep_floor("resid_pre", SHAPE, N_POS, metric, include_corrupted_run=False)
    assert no_run == per_prompt - flop_floor.corrupted_run_flops(SHAPE, N_POS, [N_POS - 1])


def test_floor_refuses_unknown_sweeps_and_out_of_range_positions():
    with pytest.raises(ValueError, match="unknown sweep"):
        flop_floor.sweep_floor("resid_post", SHAPE, N_POS)
    with pytest.raises(ValueError, match="outside a prompt of 6 positions"):
        flop_floor.sweep_floor("resid_pre", SHAPE, N_POS, [6])
    with pytest.raises(ValueError, match="entry must be one of"):
        flop_floor.variant_flops(SHAPE, 0, 0, [1], "q")
