"""Sharded sweeps' scaling: the same IOI patching sweep in 1 process and in N gloo processes (1 thread each).

A GPT-2-small-shaped random model (12 layers x 12 heads, d_model 768, vocab 50257; seeded, nothing downloaded) and
`--prompts` IOI prompts with ABC counterfactuals (`circuits_exact.ioi_batch`; metric: the mean logit difference of
the indirect object over the subject at the last position). Each sweep runs

* in 1 process, unsharded (`run_sweep` over every variant: what a user runs without a launcher) -> t1;
* in 1 process by work units (`shard=(0, 1)`): the units' own cost, `units_overhead = t1_units / t1`;
* in N processes joined by a gloo process group (as under torchrun), each returning the whole result -> tN, the
  slowest rank's time from a common barrier to its gathered result.

Reported: `speedup = t1 / tN` and `scaling_efficiency = t1 / (N * tN)` (1.0: perfect; `units_scaling_efficiency`
uses t1_units instead, the split's own efficiency apart from the units' overhead), times as medians of
`--repeats`; the N-process result is checked against the 1-process one. Every process is a fresh spawned one with
`torch.set_num_threads(1)`, so N processes need N free cores: the 1-minute load average before and after is in the
row (on a shared machine the efficiency is a lower bound).

The prompt batch sets the regime. Each work unit (8 variants for these sweeps) is one `run_sweep` call against the
process's one `prepare_sweep` (the corrupted forward and the metric check), running its variants as one packed
chunk. With few prompts a forward is bound by reading the weights, so small chunks cost more per variant than the
unsharded sweep's large ones. Measured (2 processes, shared 2-core CPU), 4 prompts: resid_pre units_overhead 1.09x,
speedup 1.40x (efficiency 0.70); attn_head_out_all_pos 0.97x, 1.66x (0.83); 16 prompts, attn_head_out_all_pos
0.74x, 2.27x (1.14: the units' small chunks run faster here than the unsharded sweep's large ones). Before
prepare_sweep each unit repeated the corrupted forward: 4 prompts, units_overhead 1.5-1.9x, speedup 0.87-1.19x;
16 prompts, 1.22x and 1.51x.

    python benchmarks/sharding_scaling.py [--processes 2] [--prompts 4] [--sweeps resid_pre,attn_head_out_all_pos]
                                          [--repeats 3] [--log benchmarks/results.jsonl]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.multiprocessing as mp

from circuits_exact import ioi_batch
from harness import command_line, git_commit, triton_version

SWEEPS = ("resid_pre", "attn_head_out_all_pos", "attn_head_out_by_pos")
GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, n_ctx=1024, d_vocab=50257, act_fn="gelu_new",
                  seed=0, device="cpu")


def scaling(t1: float, tn: float, processes: int) -> Dict[str, float]:
    """Speedup `t1 / tN` and scaling efficiency `t1 / (N * tN)` of N processes over one."""
    if t1 <= 0 or tn <= 0 or processes < 1:
        raise ValueError(f"times must be positive and processes at least 1, got {t1}, {tn}, {processes}")
    return {"speedup": t1 / tn, "scaling_efficiency": t1 / (processes * tn)}


def unit_split(n_variants: int, processes: int) -> List[int]:
    """Work units per process (round robin over `default_unit_size` units): the sweep's best case balance."""
    from hooklens.sharding import default_unit_size

    n_units = -(-n_variants // default_unit_size(n_variants))
    return [len(range(rank, n_units, processes)) for rank in range(processes)]


def _setup(n_prompts: int):
    """The model, corrupted tokens, clean cache and metric: the same in every process (seeded weights)."""
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens import HookedTransformer, HookedTransformerConfig

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    model = HookedTransformer(HookedTransformerConfig(**GPT2_SMALL), tokenizer=tokenizer).eval()
    (clean_text, corrupted_text, labels), = ioi_batch(tokenizer, n=n_prompts)  # labels [b, 2]: (IO, S) token ids
    clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupted_text)
    lengths = {len(model.to_tokens(text)[0]) for text in clean_text + corrupted_text}
    assert lengths == {clean.shape[1]}, f"the IOI prompts must have one length (no padding), got {lengths}"
    _, cache = model.run_with_cache(clean)

    def ioi_logit_diff(logits):  # [b, p, v] -> the mean over prompts of logit(IO) - logit(S) at the last position
        io_s = logits[:, -1].gather(-1, labels)  # [b, 2]
        return (io_s[:, 0] - io_s[:, 1]).mean()

    return model, corrupted, cache, ioi_logit_diff


def _timed(fn, barrier) -> tuple:
    barrier()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _worker(rank: int, world: int, rendezvous: str, sweeps: Sequence[str], repeats: int, n_prompts: int,
            out: str) -> None:
    """One process: every sweep `repeats` times (1 process: unsharded and by units; N: under the process group),
    its times and last results saved to `out/<world>-<rank>.pt`."""
    torch.set_num_threads(1)
    from hooklens import patching

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                                             timeout=timedelta(minutes=10))
    barrier = torch.distributed.barrier if world > 1 else (lambda: None)
    record: Dict[str, dict] = {}
    with torch.no_grad():
        model, corrupted, cache, metric = _setup(n_prompts)
        model(corrupted)  # warm-up: first-call allocations outside the timings
        record["prompt"] = {"tokens": corrupted.shape[1]}
        for name in sweeps:
            sweep = getattr(patching, f"get_act_patch_{name}")
            modes = {"whole": {}, "units": {"shard": (0, 1)}} if world == 1 else {"group": {}}
            for mode, kwargs in modes.items():
                times = []
                for _ in range(repeats):
                    result, seconds = _timed(lambda: sweep(model, corrupted, cache, metric, metric_positions=[-1],
                                                           progress=False, **kwargs), barrier)
                    times.append(seconds)
                record[f"{name}/{mode}"] = {"times": times, "result": result}
    torch.save(record, f"{out}/{world}-{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def _run(world: int, sweeps: Sequence[str], repeats: int, n_prompts: int, out: str) -> List[dict]:
    rendezvous = f"file://{out}/rendezvous-{world}"
    mp.spawn(_worker, args=(world, rendezvous, sweeps, repeats, n_prompts, out), nprocs=world)
    return [torch.load(f"{out}/{world}-{rank}.pt") for rank in range(world)]


def _row(name: str, single: dict, ranks: List[dict], processes: int, n_prompts: int, load: List[float]) -> dict:
    whole, units = single[f"{name}/whole"], single[f"{name}/units"]
    t1, t1_units = statistics.median(whole["times"]), statistics.median(units["times"])
    # The N-process time of one repeat is its slowest rank's (all ranks return only after the gather).
    tn = statistics.median(max(r[f"{name}/group"]["times"][i] for r in ranks) for i in range(len(whole["times"])))
    expected = whole["result"]
    diffs = [float((r[f"{name}/group"]["result"] - expected).abs().max()) for r in ranks]
    n_variants = expected.numel()
    return {
        "workload": f"sharding_scaling_{name}", "device": "cpu", "dtype": "float32",
        "reference": "1 process, unsharded sweep (1 thread)",
        "hooklens_s": tn, "reference_s": t1, "ratio": t1 / tn, **scaling(t1, tn, processes),
        "processes": processes, "threads_per_process": 1, "backend": "gloo",
        "t1_units_s": t1_units, "units_overhead": t1_units / t1,
        # the machinery's own scaling: N processes against 1 process running the same units
        "units_scaling_efficiency": scaling(t1_units, tn, processes)["scaling_efficiency"],
        "shape": f"GPT-2-small shape (12 layers x 12 heads, d_model 768), {n_prompts} IOI prompts x "
                 f"{single['prompt']['tokens']} tokens, "
                 f"result {list(expected.shape)} ({n_variants} variants)",
        "units_per_process": unit_split(n_variants, processes),
        "checked": max(diffs) <= 1e-5, "max_abs_diff": max(diffs),
        "bitwise_equal_units": all(torch.equal(r[f"{name}/group"]["result"], units["result"]) for r in ranks),
        "repeats": len(whole["times"]), "times_1": whole["times"],
        "times_n": [r[f"{name}/group"]["times"] for r in ranks],
        "load_average_1min_before_after": load, "cpu_count": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sweeps", default="resid_pre,attn_head_out_all_pos",
                        help=f"comma-separated, of {', '.join(SWEEPS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="IOI prompts in the batch (at least 1)")
    parser.add_argument("--log", default=None, help="append the rows here (e.g. benchmarks/results.jsonl)")
    parser.add_argument("--note", default="", help="recorded in each row")
    args = parser.parse_args()
    sweeps = [s for s in args.sweeps.split(",") if s]
    unknown = sorted(set(sweeps) - set(SWEEPS))
    if unknown or args.processes < 2 or args.repeats < 1 or args.prompts < 1:
        parser.error(f"--sweeps from {', '.join(SWEEPS)} (unknown: {unknown}), --processes >= 2, --repeats >= 1, "
                     "--prompts >= 1")
    commit, started = git_commit(), time.perf_counter()
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as out:
        single = _run(1, sweeps, args.repeats, args.prompts, out)[0]
        ranks = _run(args.processes, sweeps, args.repeats, args.prompts, out)
    load.append(os.getloadavg()[0])
    meta = {"date": datetime.date.today().isoformat(), "commit": commit, "command": command_line(),
            "torch": torch.__version__, "triton": triton_version(), "timer": "wall",
            "wall_s": round(time.perf_counter() - started, 1), "note": args.note}
    rows = [{**_row(name, single, ranks, args.processes, args.prompts, load), **meta} for name in sweeps]
    for row in rows:
        print(f"{row['workload']}: 1 process {row['reference_s']:.2f} s, {args.processes} processes "
              f"{row['hooklens_s']:.2f} s: speedup {row['speedup']:.2f}x, efficiency {row['scaling_efficiency']:.2f}"
              f" (units overhead {row['units_overhead']:.3f}, checked {row['checked']}, load {load})")
    if args.log:
        with Path(args.log).open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0 if all(row["checked"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
