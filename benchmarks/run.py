"""Run the benchmarks: `python benchmarks/run.py [--device cpu|cuda] [--dtype float32|bfloat16] [--workloads a,b]
[--batch B --seq T] [--repeats N] [--warmup N] [--log benchmarks/results.jsonl]`.

Times hooklens against its references (TransformerLens 3.9, HF GPT2LMHeadModel) on random GPT-2-small-shaped
weights, prints a Markdown table and appends one JSON row per measurement to the results log (`--log`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import harness  # noqa: E402

# Modules whose `@workload`s are registered; later benchmark files (kernels, FactoredMatrix, sweeps) add theirs here.
# `peers` needs nnsight (the `bench` extra) only to run its workloads; without it they are skipped.
WORKLOAD_MODULES = ["core", "lowrank", "patching_sweeps", "attention", "peers", "ops_patching"]

DEFAULTS = {
    # Per device kind. The CPU defaults keep a full run under ~5 minutes on 2 cores; patching_loop does
    # 1 + 12 x patch_positions forwards per call, so it is timed patch_repeats times (after the check call).
    "cpu": dict(batch=4, seq=128, warmup=1, repeats=3, patch_positions=2, patch_repeats=1),
    "cuda": dict(batch=8, seq=1024, warmup=2, repeats=10, patch_positions=4, patch_repeats=3),
}


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def load_workloads() -> dict:
    for module in WORKLOAD_MODULES:
        importlib.import_module(module)
    return harness.WORKLOADS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--workloads", default="all", help="comma-separated workload names, or 'all'")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 4 on CPU, 8 on CUDA)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per prompt (default: 128 on CPU, 1024 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (the check call counts as one)")
    parser.add_argument("--patch-positions", type=int, default=None, help="positions per layer in patching_loop")
    parser.add_argument("--patch-repeats", type=int, default=None, help="timed calls of patching_loop")
    parser.add_argument("--streamed-rows", type=int, default=9901,
                        help="rows of 101 tokens in induction_scores_streamed (default 9901: 1,000,001 tokens)")
    parser.add_argument("--nnsight-invokes", type=int, default=None,
                        help="patches (tracer.invoke calls) per trace in the *_nnsight workloads' nnsight_batched "
                             "reference (default 68)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--timer", default="wall", choices=["wall", "cpu"],
                        help="wall: perf_counter (default). cpu: thread CPU time with 1 torch thread, for a CPU run on "
                             "a busy shared machine (ignores time spent descheduled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default=str(harness.RESULTS_LOG),
                        help="results log (JSON lines) the rows are appended to (default: benchmarks/results.jsonl)")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workloads = load_workloads()
    if args.list:
        for w in workloads.values():
            print(f"{w.name:28s} vs {', '.join(w.references):24s} {w.description}")
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.nnsight_invokes is not None and args.nnsight_invokes < 1:
        print("error: --nnsight-invokes must be >= 1", file=sys.stderr)
        return 2
    kind = "cuda" if device.startswith("cuda") else "cpu"
    defaults = DEFAULTS[kind]
    if args.timer == "cpu":
        if kind != "cpu":
            print("error: --timer cpu is for --device cpu", file=sys.stderr)
            return 2
        if args.threads not in (None, 1):
            print("error: --timer cpu measures one thread; it needs --threads 1", file=sys.stderr)
            return 2
        args.threads = 1
    harness.set_timer(args.timer)
    if args.threads:
        torch.set_num_threads(args.threads)

    requested = [w.strip() for w in args.workloads.split(",") if w.strip()]
    selected = list(workloads) if args.workloads == "all" else requested
    unknown = [w for w in selected if w not in workloads]
    if unknown:
        print(f"error: unknown workloads {unknown}; choose from {sorted(workloads)}", file=sys.stderr)
        return 2

    ctx = harness.Context(
        device=device,
        dtype=getattr(torch, args.dtype),
        batch=args.batch or defaults["batch"],
        seq=args.seq or defaults["seq"],
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        repeats=args.repeats or defaults["repeats"],
        seed=args.seed,
        options={"patch_positions": args.patch_positions or defaults["patch_positions"],
                 "streamed_rows": args.streamed_rows, "nnsight_invokes": args.nnsight_invokes},
    )
    ctx.options["patch_repeats"] = args.patch_repeats or min(ctx.repeats, defaults["patch_repeats"])
    print(f"device {harness.device_slug(device)} ({torch.get_num_threads()} CPU threads), dtype {ctx.dtype_name}, "
          f"batch {ctx.batch} x seq {ctx.seq}, warmup {ctx.warmup}, repeats {ctx.repeats}, timer {args.timer}")

    load_before = _load_average()
    if kind == "cpu" and args.timer == "wall" and load_before is not None and load_before > 0.5:
        print(f"warning: 1-minute load average is {load_before:.2f} before starting; other processes on this machine "
              "will slow the CPU timings (every parallel op waits for descheduled threads)")

    commit = harness.git_commit()  # the code measured: read now, not after a run that may outlive a commit
    start = time.perf_counter()
    records = []
    for name in selected:
        print(f"[{name}] ({time.perf_counter() - start:.0f} s)")
        records += harness.run_workload(workloads[name], ctx)
    elapsed = time.perf_counter() - start

    table = harness.markdown_table(records)
    print()
    print(table)
    extra = {"batch": ctx.batch, "seq": ctx.seq, "warmup": ctx.warmup, "repeats": ctx.repeats,
             "patch_positions": ctx.options["patch_positions"], "patch_repeats": ctx.options["patch_repeats"],
             "cpu_threads": torch.get_num_threads(), "wall_s": round(elapsed, 1)}
    if ctx.options["nnsight_invokes"] is not None:
        extra["nnsight_invokes"] = ctx.options["nnsight_invokes"]
    if kind == "cpu":
        extra["load_average_1min_before_after"] = [load_before, _load_average()]
    rows = harness.append_results(records, device, args.log, extra=extra, commit=commit)
    print(f"\nappended {len(rows)} rows to {args.log} ({elapsed:.0f} s)")
    return 0 if all(r.checked for r in records) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - progress bars are cosmetic
        pass
    sys.exit(main())
