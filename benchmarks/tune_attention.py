"""Block-size / warp / stage sweep for the Triton attention kernels on a CUDA machine.

    python benchmarks/tune_attention.py [--batch 8] [--seq 1024] [--out DIR]

For each dtype (float32, bfloat16) and kernel (pattern-emitting, flash z-only) it times every configuration in the
grid below with `triton.testing.do_bench` (CUDA events, median) on GPT-2-small shapes, checks each configuration's
output against the float32 PyTorch computation, and prints one table per kernel with two yardsticks measured in
the same run: a device copy moving the kernel's floor bytes (pattern kernel) and `scaled_dot_product_attention`
(flash kernel). Configurations the compiler rejects (too much shared memory, ...) are listed as failed.
Writes `tune-attention.json` to --out. The launch configuration is swapped in by replacing `launch_config` in the
kernel modules for the duration of one measurement; the library's own choice is timed as "default".
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", default=".")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_attention.py needs CUDA", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    import hooklens.kernels  # noqa: F401  (the package exports functions named like their modules)
    from hooklens.attention import reference_attention

    flash_mod = sys.modules["hooklens.kernels.flash_attention"]
    pattern_mod = sys.modules["hooklens.kernels.pattern_attention"]

    b, t, h, dh = args.batch, args.seq, 12, 64
    grid = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
            for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
            if os.environ.get("TUNE_FULL") or n != 32]
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, t, h, dh, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
        pattern = torch.empty(b, h, t, t, device="cuda", dtype=dtype)
        z = torch.empty_like(q)
        ref_z, ref_pattern = reference_attention(q.float(), k.float(), v.float(), attn_scale=8.0)  # TL's, float32
        floor_bytes = (pattern.numel() + 4 * q.numel()) * q.element_size()
        src = torch.empty(floor_bytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)

        sdpa_ms = do_bench(sdpa, warmup=25, rep=200, return_mode="median")
        print(f"\n{dtype_name}: copy of {floor_bytes / 1e9:.3f} GB {copy_ms * 1e3:.1f} us "
              f"({floor_bytes / copy_ms / 1e6:.0f} GB/s); sdpa {sdpa_ms * 1e3:.1f} us", flush=True)
        kernels = {
            "pattern": (pattern_mod, lambda: pattern_mod.pattern_attention(q, k, v, pattern_out=pattern, z_out=z),
                        copy_ms),
            "flash": (flash_mod, lambda: flash_mod.flash_attention(q, k, v, z_out=z), sdpa_ms),
        }
        for kname, (module, fn, yardstick) in kernels.items():
            buffers = (pattern, z, ref_pattern if kname == "pattern" else None, ref_z)
            rows = [_measure(module, fn, cfg, buffers, yardstick) for cfg in [None] + grid]
            rows = [dict(dtype=dtype_name, kernel=kname, **row) for row in rows]
            results += rows
            _print_best(dtype_name, kname, rows)
        torch.cuda.empty_cache()  # the next dtype's buffers replace these
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune-attention.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       commit=os.environ.get("HOOKLENS_COMMIT"), batch=b, seq=t, results=results), f, indent=1)
    return 0


def _measure(module, fn, cfg, buffers, yardstick_ms: float) -> dict:
    """Time `fn` with `module.launch_config` overridden by `cfg` (None: the library's own choice) and check its
    outputs against the float32 reference; a configuration the compiler rejects gives a row with its error."""
    from triton.testing import do_bench

    pattern, z, ref_pattern, ref_z = buffers
    original = module.launch_config
    label = "default" if cfg is None else "m{BLOCK_M} n{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
    if cfg is not None:
        def patched(kernel, q_, tq, tk, dh_):
            return {**original(kernel, q_, tq, tk, dh_), **cfg}
        module.launch_config = patched
    try:
        pattern.fill_(float("nan"))
        z.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        err_z = float((z.float() - ref_z).abs().max())
        err_p = float((pattern.float() - ref_pattern).abs().max()) if ref_pattern is not None else 0.0
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        return dict(config=label, us=ms * 1e3, ratio=yardstick_ms / ms, err_z=err_z, err_pattern=err_p)
    except Exception as e:  # compile failures (shared memory, registers) are data too
        return dict(config=label, error=f"{type(e).__name__}: {e}"[:200])
    finally:
        module.launch_config = original


def _print_best(dtype_name: str, kname: str, rows) -> None:
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    yard = "copy" if kname == "pattern" else "sdpa"
    print(f"{dtype_name} {kname}: {len(ok)} configs ran, {len(rows) - len(ok)} failed; best 6 "
          f"(ratio = {yard} / kernel):")
    for r in ok[:6] + [r for r in ok if r["config"] == "default"]:
        print(f"  {r['config']:<20} {r['us']:8.1f} us  {r['ratio']:.2f}x  err z {r['err_z']:.1e} "
              f"pattern {r['err_pattern']:.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
