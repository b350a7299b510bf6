"""Where a hooklens IOI patching sweep's time goes, on CPU with one thread:
`python benchmarks/profile_sweep.py [resid_pre|attn_head_out_all_pos|mlp_out]`.

Prints the sweep's thread CPU time (3 calls after a warmup), torch.profiler's top ATen ops by self CPU time, the
share of Python frames' own time (cProfile with the thread clock: everything not inside a builtin / C call), and
the matmul FLOPs the engine does (`FlopCounterMode`) against the sweep's floor (`flop_floor`).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import harness  # noqa: E402
import patching_sweeps  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", default="resid_pre", choices=["resid_pre", "attn_head_out_all_pos",
                                                                          "mlp_out"])
    parser.add_argument("--top", type=int, default=12, help="ATen ops listed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    harness.set_timer("cpu")
    ctx = harness.Context(device="cpu", dtype=torch.float32, batch=1, seq=1, warmup=0, repeats=1)
    sweep = patching_sweeps.hooklens_sweep(ctx, args.kind)
    times = harness.time_fn_all(sweep, warmup=1, repeats=3)
    print(f"{args.kind}: thread CPU time {', '.join(f'{t * 1e3:.0f}' for t in times)} ms (commit "
          f"{harness.git_commit()})")

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        sweep()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)  # microseconds, inflated by the profiler on small ops
    print(f"\ntorch.profiler: {sum(e.count for e in events)} ATen ops, self CPU total {total / 1e3:.0f} ms")
    print("| op | calls | self CPU ms | share |\n|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | {e.self_cpu_time_total / total:.1%} |")

    profiler = cProfile.Profile(time.thread_time)
    with torch.no_grad():
        profiler.enable()
        sweep()
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own time, cumulative, ...)}
    own = sum(v[2] for v in stats.values())
    builtin = sum(v[2] for k, v in stats.items() if k[0] == "~")  # builtins and C functions: torch's ops
    print(f"\ncProfile: {own * 1e3:.0f} ms, of which Python frames' own time {(own - builtin) * 1e3:.0f} ms "
          f"({(own - builtin) / own:.1%})")
    for key, value in sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:6]:
        print(f"  {value[2] * 1e3:7.1f} ms  {value[0]:5d} calls  {key[2]} ({Path(key[0]).name}:{key[1]})")

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sweep()
    floor = patching_sweeps.sweep_flops(ctx, args.kind)
    print(f"\nmatmul FLOPs: engine {counter.get_total_flops() / 1e9:.1f} G, floor {floor / 1e9:.1f} G")
    return 0


if __name__ == "__main__":
    sys.exit(main())
