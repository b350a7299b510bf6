"""The patch op `hooklens::index_patch_` against the best ATen compositions, alone and inside whole sweeps.

Op workloads (one chunk of n variants x b prompts at one hook, GPT-2 small: d_model 768, 12 heads x 64):

- `index_patch_resid_pre`: act `[n*b, T, 768]`, one position per variant (axes (0,)), the IOI resid_pre chunk.
- `index_patch_head_out`: act `[n*b, T, 12, 64]`, one head at every position (axes (1,)), the head_out_all_pos chunk.

References: `torch_where` (`masked_patch`: torch.where with the `[n, *S]` bool mask, built outside the timing,
which is ATen's best case: the engine would build it per chunk) and `index_put` (advanced-indexing `index_put_` on
permuted views, the reference's composition without its bounds check). hooklens is the operator
(`torch.ops.hooklens.index_patch_`: C++ on CPU, Triton on CUDA).

Sweep workloads (`sweep_resid_pre_op`, `sweep_head_out_all_pos_op`, `sweep_head_out_by_pos_op`,
`sweep_pattern_all_pos_op`, `sweep_pattern_by_pos_op`): the IOI sweeps of `patching_sweeps.py` as the
engine runs them, against the same sweeps inside `hooklens.ops.patching.use_reference()` (`aten_patch`: every
`index_patch_` the engine makes runs the ATen reference instead).

Standalone: `python benchmarks/ops_patching.py [--threads 1] [--device cpu] [--repeats 20]` prints the op table
over the IOI chunk shapes (n 17..204, b 1..8, T 15..128) as Markdown, interleaving the implementations.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from harness import Case, Context, workload  # noqa: E402

D_MODEL, N_HEADS, D_HEAD = 768, 12, 64


def chunk(kind: str, n: int, b: int, T: int, device, dtype=torch.float32, seed: int = 0):
    """(act, clean, index, axes, mask) of one chunk: `resid` [n*b, T, d_model] by position, or `head`
    [n*b, T, heads, d_head] by head at every position."""
    g = torch.Generator().manual_seed(seed)
    shape, axes = ((T, D_MODEL), (0,)) if kind == "resid" else ((T, N_HEADS, D_HEAD), (1,))
    act = torch.randn((n * b,) + shape, generator=g).to(device, dtype)
    clean = torch.randn((b,) + shape, generator=g).to(device, dtype)
    index = (torch.arange(n) % shape[axes[0]]).unsqueeze(1).to(device)  # [n, 1]
    from hooklens.sweeps import index_mask

    with_layer = torch.cat([torch.zeros_like(index), index], 1).cpu()
    mask = index_mask(with_layer, shape, axes).contiguous().to(device)  # [n, *S], materialized as ATen would need
    return act, clean, index, axes, mask


def impls(act, clean, index, axes, mask) -> Dict[str, Callable[[], torch.Tensor]]:
    """The three implementations on one chunk, each returning the patched activation."""
    from hooklens.ops import patching

    patching._ensure_operator(required=True)
    op = torch.ops.hooklens.index_patch_
    n, b = index.shape[0], clean.shape[0]
    shape = tuple(act.shape[1:])
    rest = [d for d in range(len(shape)) if d not in axes]
    perm_act = [0] + [a + 2 for a in axes] + [1] + [d + 2 for d in rest]
    perm_clean = [a + 1 for a in axes] + [0] + [d + 1 for d in rest]
    coords = tuple(index[:, i] for i in range(len(axes)))
    variants = torch.arange(n, device=act.device)

    def hooklens():
        op(act, clean, index, list(axes))
        return act

    def index_put():
        act.view((n, b) + shape).permute(perm_act).index_put_((variants,) + coords, clean.permute(perm_clean)[coords])
        return act

    def torch_where():
        return patching.masked_patch(act, clean, mask)

    return {"hooklens": hooklens, "index_put": index_put, "torch_where": torch_where}


def _check(a: torch.Tensor, b: torch.Tensor) -> Tuple[bool, float]:
    return torch.equal(a, b), float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _op_case(ctx: Context, kind: str, n: int, b: int, T: int) -> Case:
    act, clean, index, axes, mask = chunk(kind, n, b, T, ctx.device, ctx.dtype)
    # Each implementation patches its own copy of act, so the check compares values, not one aliased tensor.
    names = ("hooklens", "torch_where", "index_put")
    fns = {name: impls(act.clone(), clean, index, axes, mask)[name] for name in names}
    return Case(impls=fns,
                check=_check, shape=f"n={n} b={b} T={T}" + (" 12x64" if kind == "head" else " 768"),
                kernel_timing=True)


@workload("index_patch_resid_pre", references=("torch_where", "index_put"),
          description="index_patch_ on an IOI resid_pre chunk (68 variants x 8 prompts x 15 positions x 768).")
def index_patch_resid_pre(ctx: Context) -> Case:
    return _op_case(ctx, "resid", 68, 8, 15)


@workload("index_patch_head_out", references=("torch_where", "index_put"),
          description="index_patch_ on an attn_head_out_all_pos chunk (48 variants x 8 prompts x 15 x 12 x 64).")
def index_patch_head_out(ctx: Context) -> Case:
    return _op_case(ctx, "head", 48, 8, 15)


def _sweep_shape(ctx: Context, kind: str) -> str:
    import patching_sweeps

    if not kind.startswith("attn_head_pattern"):
        return patching_sweeps.sweep_shape(ctx, kind)
    hl, _, corrupted = patching_sweeps._setup(ctx)[:3]
    per_pos = f" x {corrupted.shape[1]} dest pos" if kind.endswith("by_pos") else ""
    return f"{hl.cfg.n_layers} layers x {hl.cfg.n_heads} heads{per_pos}"


def _sweep_case(ctx: Context, kind: str) -> Case:
    import patching_sweeps
    from hooklens.ops.patching import use_reference

    run = patching_sweeps.hooklens_sweep(ctx, kind)

    def aten_patch():
        with use_reference():
            return run()

    return Case(impls={"hooklens": run, "aten_patch": aten_patch}, check=patching_sweeps.check_sweep,
                shape=_sweep_shape(ctx, kind), warmup=1, repeats=3)


@workload("sweep_resid_pre_op", references=("aten_patch",),
          description="IOI get_act_patch_resid_pre with index_patch_ vs the same sweep with the ATen reference patch.")
def sweep_resid_pre_op(ctx: Context) -> Case:
    return _sweep_case(ctx, "resid_pre")


@workload("sweep_head_out_all_pos_op", references=("aten_patch",),
          description="IOI get_act_patch_attn_head_out_all_pos with index_patch_ vs with the ATen reference patch.")
def sweep_head_out_all_pos_op(ctx: Context) -> Case:
    return _sweep_case(ctx, "attn_head_out_all_pos")


# The sweeps where the engine calls index_patch_ (pattern / score patches: padded [rows, h, q, k] rows, a
# rectangular layout the op covers). Resid / z / MLP patches act on the ragged packed-token matrix, where the engine
# patches with a precomputed per-token mask (torch.where) and never calls the op: those rows read 1.00x by design.


@workload("sweep_pattern_all_pos_op", references=("aten_patch",),
          description="IOI get_act_patch_attn_head_pattern_all_pos with index_patch_ vs the ATen reference patch.")
def sweep_pattern_all_pos_op(ctx: Context) -> Case:
    return _sweep_case(ctx, "attn_head_pattern_all_pos")


@workload("sweep_pattern_by_pos_op", references=("aten_patch",),
          description="IOI get_act_patch_attn_head_pattern_by_pos with index_patch_ vs the ATen reference patch.")
def sweep_pattern_by_pos_op(ctx: Context) -> Case:
    return _sweep_case(ctx, "attn_head_pattern_by_pos")


@workload("sweep_head_out_by_pos_op", references=("aten_patch",),
          description="IOI get_act_patch_attn_head_out_by_pos with index_patch_ vs with the ATen reference patch "
                      "(z patches are token-packed: the op is not on this path, expect 1.00x).")
def sweep_head_out_by_pos_op(ctx: Context) -> Case:
    return _sweep_case(ctx, "attn_head_out_by_pos")


# -- standalone: the op over the IOI chunk shapes ------------------------------------------------------------------


def _time(fn: Callable[[], object], device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the issue's CPU numbers: 1)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [(kind, n, b, T) for kind in ("resid", "head") for n, b, T in
              ((17, 1, 15), (68, 1, 15), (204, 1, 15), (17, 8, 15), (68, 8, 15), (17, 1, 128), (68, 4, 128))]
    print(f"device {args.device}, {args.threads} thread(s), median of {args.repeats} interleaved calls, microseconds")
    print("| chunk | act MB | hooklens op | torch.where | index_put_ | where / op | index_put / op |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for kind, n, b, T in shapes:
            act, clean, index, axes, mask = chunk(kind, n, b, T, args.device)
            fns = impls(act, clean, index, axes, mask)
            outs = {name: f().clone() for name, f in fns.items()}
            assert torch.equal(outs["hooklens"], outs["torch_where"]) and torch.equal(outs["hooklens"],
                                                                                       outs["index_put"])
            samples = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, f in fns.items():
                    samples[name].append(_time(f, args.device))
            t = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
            shape = "x".join(map(str, act.shape))
            print(f"| {kind} n={n} b={b} T={T} ({shape}) | {act.numel() * act.element_size() / 2**20:.1f} | "
                  f"{t['hooklens']:.1f} | {t['torch_where']:.1f} | {t['index_put']:.1f} | "
                  f"{t['torch_where'] / t['hooklens']:.1f}x | {t['index_put'] / t['hooklens']:.1f}x |")


if __name__ == "__main__":
    main()
