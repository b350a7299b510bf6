"""The engine's patch step, by index (`hooklens.ops.patching.index_patch_`: one gather + one `index_put_`, writing
only the patched elements) against the mask patch (`masked_patch`: torch.where with a `[n, *S]` bool mask), the
reason the engine patches scores / patterns by index wherever a sweep gives coordinates.

Workloads (one chunk of n variants x b prompts at one hook, GPT-2 small: d_model 768, 12 heads x 64):

- `index_patch_resid_pre`: act `[n*b, T, 768]`, one position per variant (axes (0,)), the IOI resid_pre chunk.
- `index_patch_head_out`: act `[n*b, T, 12, 64]`, one head at every position (axes (1,)), the head_out_all_pos chunk.

Reference `torch_where`: the mask is built outside the timing, which is the mask patch's best case (the engine
would build it per chunk). There is no compiled patch op: one (C++ on CPU, Triton on CUDA) was twice as fast as
`index_put_` on this step alone but left whole sweeps unchanged (the step is under 1 % of a sweep), and was removed
(docs/perf-log/2026-12-05-issue21-cpu.md).

Standalone: `python benchmarks/ops_patching.py [--threads 1] [--device cpu] [--repeats 20]` prints the table over
the IOI chunk shapes (n 17..204, b 1..8, T 15..128) as Markdown, interleaving the implementations.
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
    """Both implementations on one chunk, each returning the patched activation."""
    from hooklens.ops import patching

    def hooklens():
        return patching.index_patch_(act, clean, index, axes, check_bounds=False)  # as the engine calls it

    def torch_where():
        return patching.masked_patch(act, clean, mask)

    return {"hooklens": hooklens, "torch_where": torch_where}


def _check(a: torch.Tensor, b: torch.Tensor) -> Tuple[bool, float]:
    return torch.equal(a, b), float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _op_case(ctx: Context, kind: str, n: int, b: int, T: int) -> Case:
    act, clean, index, axes, mask = chunk(kind, n, b, T, ctx.device, ctx.dtype)
    # Each implementation patches its own copy of act, so the check compares values, not one aliased tensor.
    names = ("hooklens", "torch_where")
    fns = {name: impls(act.clone(), clean, index, axes, mask)[name] for name in names}
    return Case(impls=fns,
                check=_check, shape=f"n={n} b={b} T={T}" + (" 12x64" if kind == "head" else " 768"),
                kernel_timing=True)


@workload("index_patch_resid_pre", references=("torch_where",),
          description="index_patch_ on an IOI resid_pre chunk (68 variants x 8 prompts x 15 positions x 768).")
def index_patch_resid_pre(ctx: Context) -> Case:
    return _op_case(ctx, "resid", 68, 8, 15)


@workload("index_patch_head_out", references=("torch_where",),
          description="index_patch_ on an attn_head_out_all_pos chunk (48 variants x 8 prompts x 15 x 12 x 64).")
def index_patch_head_out(ctx: Context) -> Case:
    return _op_case(ctx, "head", 48, 8, 15)


# -- standalone: both over the IOI chunk shapes ------------------------------------------------------------------


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
    print("| chunk | act MB | index_patch_ | torch.where | where / index_patch_ |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for kind, n, b, T in shapes:
            act, clean, index, axes, mask = chunk(kind, n, b, T, args.device)
            fns = impls(act, clean, index, axes, mask)
            outs = {name: f().clone() for name, f in fns.items()}
            assert torch.equal(outs["hooklens"], outs["torch_where"])
            samples = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, f in fns.items():
                    samples[name].append(_time(f, args.device))
            t = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
            shape = "x".join(map(str, act.shape))
            print(f"| {kind} n={n} b={b} T={T} ({shape}) | {act.numel() * act.element_size() / 2**20:.1f} | "
                  f"{t['hooklens']:.1f} | {t['torch_where']:.1f} | {t['torch_where'] / t['hooklens']:.1f}x |")


if __name__ == "__main__":
    main()
