"""hooklens.circuits.attribute (EAP, EAP-IG-inputs, ...) vs the same algorithm run as EAP-IG runs it: per-node hooks
on every sender and receiver, one einsum over the [batch, pos, n_forward, d_model] difference per receiver hook, one
backward per integration step (the reference is tests/test_circuits_attribute.py's `reference_scores`).

Standalone: `python benchmarks/circuits_attribute.py [--methods EAP,EAP-IG-inputs] [--repeats 3] [--log]`.
A random GPT-2 (6 layers x 8 heads, d_model 256, 3,628 edges), 8 IOI-like prompts in one batch, CPU, 1 thread,
thread CPU time (`--timer cpu`, the harness's timer that ignores time descheduled on a shared machine). Scores of
both are compared before timing. `--log` appends one row per method to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402

NAMES = [" Mary", " John", " Alice", " Bob", " Sarah", " Tom", " Anna", " Mike", " Emma", " David", " Lisa", " Paul",
         " Kate", " Mark", " Jane", " Peter", " Laura", " James", " Susan", " Chris", " Amy", " Steve", " Helen",
         " Jack"]
TEMPLATE = "When{a} and{b} went to the {place},{b} gave a {obj} to"
PLACES = ["store", "park", "school", "garden"]
OBJECTS = ["drink", "book", "ring", "kiss"]


def ioi_batch(model, n=8):
    """n IOI-like (clean, corrupted, labels): corrupted replaces the three names with unrelated ones (ABC); token
    lengths of each pair are equal (single-token names), so EAP-IG-inputs applies."""
    clean, corrupted, labels = [], [], []
    for i in range(n):
        a, b, c, d, e = (NAMES[(5 * i + j) % len(NAMES)] for j in range(5))
        place, obj = PLACES[i % len(PLACES)], OBJECTS[i % len(OBJECTS)]
        clean.append(TEMPLATE.format(a=a, b=b, place=place, obj=obj))
        corrupted.append(TEMPLATE.format(a=c, b=d, place=place, obj=obj).replace(f",{d} gave", f",{e} gave"))
        ids = [model.to_single_token(a), model.to_single_token(b)]
        labels.append(ids)
    for x, y in zip(clean, corrupted):
        assert model.to_tokens(x).shape == model.to_tokens(y).shape, (x, y)
    return [(clean, corrupted, torch.tensor(labels))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="EAP,EAP-IG-inputs")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timer", default="cpu", choices=sorted(harness.TIMERS))
    parser.add_argument("--log", action="store_true", help="append rows to benchmarks/results.jsonl")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    harness.set_timer(args.timer)
    clock = harness.TIMERS[args.timer]
    commit = harness.git_commit()

    from test_circuits_attribute import make_model, mean_logit_diff, reference_scores

    from hooklens.circuits.attribute import attribute
    from hooklens.circuits.graph import Graph

    model = make_model(n_layers=6, d_model=256, n_heads=8, d_head=32, d_mlp=1024)
    data = ioi_batch(model)
    n_edges = int(Graph.from_model(model).real_edge_mask.sum())
    n_pos = model.to_tokens(data[0][0]).shape[1]
    rows = []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for method in args.methods.split(","):
        kwargs = dict(ig_steps=args.ig_steps) if method.startswith("EAP-IG") else {}

        def ours():
            graph = Graph.from_model(model)
            attribute(model, graph, data, mean_logit_diff, method, quiet=True, **kwargs)
            return graph.scores

        def reference():
            graph = Graph.from_model(model)
            with torch.enable_grad():
                return reference_scores(model, graph, data, mean_logit_diff, method, **kwargs)

        def timed(fn, repeats):
            fn()  # warm-up (and the checked output)
            times = []
            for _ in range(repeats):
                start = clock()
                out = fn()
                times.append(clock() - start)
            return out, times

        got, ours_times = timed(ours, args.repeats)
        expected, ref_times = timed(reference, args.reference_repeats)
        max_abs = float((got - expected).abs().max().detach())
        scale = float(expected.abs().max())
        checked = bool(torch.allclose(got, expected, atol=2e-5 * scale, rtol=2e-4))
        ours_s, ref_s = statistics.median(ours_times), statistics.median(ref_times)
        print(f"{method:20s} hooklens {ours_s * 1e3:8.1f} ms   per-node hooks {ref_s * 1e3:8.1f} ms   "
              f"x{ref_s / ours_s:5.2f}   max|diff| {max_abs:.2e} (scores up to {scale:.2e}) checked={checked}")
        rows.append({
            "workload": f"circuits_attribute_{method}", "device": "cpu", "dtype": "float32",
            "reference": "per-node-hook EAP-IG algorithm (tests/test_circuits_attribute.py reference_scores)",
            "hooklens_s": ours_s, "reference_s": ref_s, "ratio": ref_s / ours_s,
            "shape": f"6 layers x 8 heads, d_model 256, {n_edges} edges, 8 IOI prompts x {n_pos} tokens"
                     + (f", ig_steps {args.ig_steps}" if kwargs else ""),
            "checked": checked, "max_abs_diff": max_abs, "hooklens_min_s": min(ours_times),
            "reference_min_s": min(ref_times), "repeats": args.repeats, "timing": "host",
        })
    meta = harness.run_metadata("cpu", {"cpu_threads": args.threads, "repeats": args.repeats,
                                        "reference_repeats": args.reference_repeats,
                                        "wall_s": round(time.perf_counter() - started, 1),
                                        "load_average_1min_before_after": [load_before, os.getloadavg()[0]]},
                                commit=commit)
    if args.log:
        with (ROOT / "benchmarks" / "results.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({**row, **meta}) + "\n")
    return rows


if __name__ == "__main__":
    main()
