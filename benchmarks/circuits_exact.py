"""Exact edge patching (EAP-IG's 'exact' method): hooklens's batched `exact` against EAP-IG's algorithm, one
hook-based evaluate_graph per edge, on a random GPT-2 (6 layers x 8 heads, d_model 256) and 8 short IOI-like prompts.

The loop reference is a transcription of EAP-IG's evaluate_graph (hannamw/EAP-IG, eap/evaluate.py): a corrupted
run whose sender hooks add outputs into a `[batch, pos, n_forward, d_model]` difference tensor, then a clean run
whose sender hooks subtract and whose receiver hooks (q/k/v inputs per layer, MLP inputs, final residual) add
`einsum(diff[:, :, :prev], absent[:prev, receivers])`, preceded by the clean baseline; per edge, the full graph
minus that edge. Only `--sample` edges of the loop are timed and the loop's time is extrapolated to every edge
(said so in the row); the sampled edges' loop scores are checked against hooklens's.

The row also has the FLOP floor of hooklens's algorithm (`exact_floor_flops`: matmul FLOPs of the work it must
do; only the positions from the first one a patch changes, the last block at the metric's token) over the
machine's measured GEMM rate (`flop_floor.gemm_peak_flops`), and its fraction of the measured time.

    python benchmarks/circuits_exact.py --threads 1 [--sample 24] [--log benchmarks/results.jsonl]

`--all-edges` scores every edge of a GPT-2-small-shaped random model (32,491 edges; `--layers` fewer for a CPU
smoke run) on `--prompts` IOI prompts with exact on `--device` (default: CUDA if available; `--budget`: exact's
memory_budget per chunk), against the loop on `--sample` edges extrapolated, with the fraction of the FLOP floor at
that device's measured GEMM rate: issue 25's `circuit_exact_all_edges` row (a GPU job; one CPU core needs hours):

    python benchmarks/circuits_exact.py --all-edges --prompts 100 --sample 4 --log benchmarks/results.jsonl

`--gpt2-small` instead builds a GPT-2-small-shaped random model (32,491 edges) and `--prompts` IOI prompts in one
batch, prints exact's memory plan against the measured peak RSS of preparing the batch and running chunks, and
times `--sample-edges` edges per receiver layer and kind, extrapolated to every edge (the full run is hours on
one CPU core and is not made):

    python benchmarks/circuits_exact.py --gpt2-small --threads 1 --prompts 100 --sample-edges 1
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["Mary", "John", "Alice", "Bob", "Anna", "Tom", "Lisa", "Sam", "Kate", "Mark", "Paul", "Sarah"]
PLACES = ["store", "park", "school", "garden"]


def ioi_batch(tokenizer, n=8, seed=0):
    """n prompts 'When A and B went to the P, B gave a drink to' with ABC counterfactuals (C replaces the second B)."""
    gen = torch.Generator().manual_seed(seed)
    clean, corrupted, labels = [], [], []
    for _ in range(n):
        a, b, c = (NAMES[i] for i in torch.randperm(len(NAMES), generator=gen)[:3].tolist())
        place = PLACES[int(torch.randint(len(PLACES), (1,), generator=gen))]
        clean.append(f"When {a} and {b} went to the {place}, {b} gave a drink to")
        corrupted.append(f"When {a} and {b} went to the {place}, {c} gave a drink to")
        labels.append([tokenizer.encode(" " + a)[0], tokenizer.encode(" " + b)[0]])
    return [(clean, corrupted, torch.tensor(labels))]


def logit_diff(logits, clean_logits, input_lengths, labels):
    last = logits[torch.arange(logits.shape[0]), input_lengths - 1]  # [b, v]
    return last.gather(-1, labels[:, :1])[:, 0] - last.gather(-1, labels[:, 1:])[:, 0]


def eap_loop_evaluate(model, in_graph, data, metric):
    """EAP-IG's evaluate_graph, transcribed with per-receiver hooks (in_graph: bool [n_forward, n_backward])."""
    from hooklens.circuits.interventions import tokenize_plus

    cfg = model.cfg
    H, L = cfg.n_heads, cfg.n_layers
    absent = (~in_graph).float().to(cfg.device)
    out = []
    for clean, corrupted, labels in data:
        tokens, mask, lengths, n_pos = tokenize_plus(model, clean)
        corrupted_tokens = tokenize_plus(model, corrupted)[0]
        diff = torch.zeros(len(clean), n_pos, in_graph.shape[0], cfg.d_model, device=tokens.device)

        def sender(index, sign):
            def hook(act, hook):
                if act.dim() == 4:
                    diff[:, :, index:index + H] += sign * act
                else:
                    diff[:, :, index] += sign * act
            return hook

        def receiver(prev, cols):
            def hook(act, hook):
                update = torch.einsum("bpsd,s...->bp...d", diff[:, :, :prev], absent[:prev, cols])
                return act + update
            return hook

        senders = {+1: [], -1: []}
        for sign in (+1, -1):
            senders[sign].append(("hook_embed", sender(0, sign)))
            for layer in range(L):
                first = 1 + layer * (H + 1)
                senders[sign].append((f"blocks.{layer}.attn.hook_result", sender(first, sign)))
                senders[sign].append((f"blocks.{layer}.hook_mlp_out", sender(first + H, sign)))
        receivers = []
        for layer in range(L):
            first, prev = layer * (3 * H + 1), 1 + layer * (H + 1)
            for i, letter in enumerate("qkv"):
                receivers.append((f"blocks.{layer}.hook_{letter}_input",
                                  receiver(prev, slice(first + i * H, first + (i + 1) * H))))
            receivers.append((f"blocks.{layer}.hook_mlp_in", receiver(prev + H, first + 3 * H)))
        receivers.append((f"blocks.{L - 1}.hook_resid_post", receiver(in_graph.shape[0], in_graph.shape[1] - 1)))
        with torch.inference_mode():
            with model.hooks(fwd_hooks=senders[+1]):
                model(corrupted_tokens, attention_mask=mask)
            with model.hooks(fwd_hooks=senders[-1] + receivers):
                logits = model(tokens, attention_mask=mask)
        out.append(metric(logits, None, lengths, labels))
    return torch.cat(out)


def exact_floor_flops(cfg, n_prompts: int, n_pos: int, p0: int, n_columns: int, positions: str = "last") -> float:
    """Matmul FLOPs of hooklens's exact algorithm over every edge (2*m*n*k per product; LayerNorm, GELU, softmax
    not counted): per edge, its receiver's layer (the one head's projection, attention and output at the changed
    positions p0.., then that layer's MLP; an MLP receiver's MLP), every later block at the changed positions
    (queries, keys, values, attention over all keys, output, MLP), the last block only at the last token when the
    metric reads only that (keys and values at the changed positions), and the unembedding of the metric's
    columns at its positions; plus the clean and corrupted runs. n_prompts prompts of n_pos tokens."""
    L, H, d, dh, m = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    a = H * dh
    s = n_pos - p0
    last = positions == "last"

    def block(rows_out: int, rows_kv: int) -> float:  # one full block: outputs at rows_out, keys/values at rows_kv
        return 2 * (rows_out * d * a + rows_kv * d * 2 * a + 2 * rows_out * n_pos * a + rows_out * a * d
                    + rows_out * 2 * d * m)

    def after(layer: int) -> float:  # blocks layer+1.. and the unembedding
        flops = sum(block(1 if (last and j == L - 1) else s, s) for j in range(layer + 1, L))
        return flops + 2 * (1 if last else s) * d * n_columns

    total = 2 * 2 * n_pos * (L * (4 * d * a + 2 * d * m) + d * cfg.d_vocab_out)  # the clean and corrupted runs
    for layer in range(L):
        senders = 1 + layer * (H + 1)
        t = 1 if (last and layer == L - 1) else s  # rows the receiver's layer outputs
        head = 2 * (t * n_pos * dh * 2 + t * dh * d + t * 2 * d * m)  # attention, W_O, the layer's MLP
        q_edge = 2 * t * d * dh + head
        kv_edge = 2 * s * d * dh + head
        mlp_edge = 2 * t * 2 * d * m
        total += senders * H * (q_edge + 2 * kv_edge) + (senders + H) * mlp_edge
        total += (senders * 3 * H + senders + H) * after(layer)
    total += (1 + L * (H + 1)) * 2 * (1 if last else s) * d * n_columns  # edges into the logits
    return float(total) * n_prompts


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak so far) of this process, from /proc."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def gpt2_small_sample(args) -> dict:
    """GPT-2-small-shaped random model (12 x 12 heads, d_model 768: 32,491 edges) on `--prompts` IOI prompts in
    one batch: the memory plan against the measured peak RSS of preparing the batch and running chunks, and the
    time of one chunk per receiver layer and kind, extrapolated to every edge (the full run is not made here)."""
    import importlib

    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens import HookedTransformer, HookedTransformerConfig
    from hooklens.circuits.evaluate import apply_metric
    from hooklens.circuits.graph import Graph
    from hooklens.circuits.ioi import IOIDataset, logit_diff_per_prompt

    ex = importlib.import_module("hooklens.circuits.exact")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                  d_vocab=50257, act_fn="gelu_new", seed=0, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    ds = IOIDataset(args.prompts, seed=0, counterfactual=args.counterfactual, tokenizer=tokenizer)
    clean, corrupted, labels = list(ds.clean), list(ds.corrupted), ds.labels
    graph = Graph.from_model(model)
    edges = graph.real_edge_mask.nonzero()
    rss_before = rss_bytes("VmRSS")
    with torch.inference_mode():
        batch = ex._Batch(model, clean, corrupted, labels, "patching", None, logit_diff_per_prompt, None, None)
        weights = ex._Weights(model)
        b, p = batch.mask.shape
        plan = ex.memory_plan(cfg, [(b, p, p - batch.p0)], args.budget, batch.positions,
                              None if batch.columns is None else batch.width)
        chunk = ex._edges_per_chunk(model, batch, args.budget)
        per_edge, timed = {}, 0
        for layer, kind, group in ex._receiver_groups(edges, cfg):
            if kind == "v":  # the same work as k (one head's values instead of its keys); timed as k's
                continue
            part = group[:min(len(group), max(1, min(chunk, args.sample_edges)))]
            start = time.perf_counter()
            logits = ex._chunk_logits(model, weights, batch, layer, kind, part)
            apply_metric(logit_diff_per_prompt, logits, None, batch.metric_lengths, batch.labels, {})
            per_edge[(layer, kind)] = (time.perf_counter() - start) / len(part)
            timed += len(part)
        del logits
    peak = rss_bytes("VmHWM") - rss_before
    total_s = 0.0
    for layer, kind, group in ex._receiver_groups(edges, cfg):
        total_s += len(group) * per_edge[(layer, "k" if kind == "v" else kind)]
    n_columns = cfg.d_vocab_out if batch.columns is None else len(batch.columns)
    return {"edges": len(edges), "prompts": b, "n_pos": p, "p0": batch.p0, "columns": n_columns,
            "width": batch.width, "edges_per_chunk": chunk, "budget_bytes": args.budget,
            "plan_bytes": {k: v for k, v in plan.items()}, "measured_peak_rss_over_model_bytes": peak,
            "edges_timed": timed, "extrapolated_exact_s": total_s,
            "floor_flops": exact_floor_flops(cfg, b, p, batch.p0, n_columns)}


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def gpt2_small_all_edges(args) -> dict:
    """Every edge of a GPT-2-small-shaped random model (12 x 12 heads, d_model 768, unless `--layers`) on
    `--prompts` IOI prompts, scored by exact on `--device`, against EAP-IG's per-edge loop on `--sample` edges
    (extrapolated, the sampled scores checked against exact's); the FLOP floor at the device's GEMM rate."""
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from flop_floor import gemm_peak_flops
    from hooklens import HookedTransformer, HookedTransformerConfig
    from hooklens.circuits.evaluate import evaluate_baseline
    from hooklens.circuits.exact import _Batch, exact
    from hooklens.circuits.graph import Graph
    from hooklens.circuits.ioi import IOIDataset, logit_diff_per_prompt

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    cfg = HookedTransformerConfig(n_layers=args.layers, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                  d_vocab=50257, act_fn="gelu_new", seed=0, device=device)
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    ds = IOIDataset(args.prompts, seed=0, counterfactual=args.counterfactual, tokenizer=tokenizer)
    data = [(list(ds.clean), list(ds.corrupted), ds.labels)]
    graph = Graph.from_model(model)
    n_edges = int(graph.real_edge_mask.sum())

    baseline = evaluate_baseline(model, data, logit_diff_per_prompt, quiet=True).mean()  # also warms the device up
    _synchronize(device)
    start = time.perf_counter()
    exact(model, graph, data, logit_diff_per_prompt, quiet=True, memory_budget=args.budget)
    _synchronize(device)
    exact_s = time.perf_counter() - start

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    edges = graph.real_edge_mask.nonzero()
    pick = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:args.sample]]
    full = graph.real_edge_mask.clone()
    max_diff, scale = 0.0, float(graph.scores[graph.real_edge_mask].abs().max())
    eap_loop_evaluate(model, full, data, logit_diff_per_prompt)  # warm-up
    _synchronize(device)
    start = time.perf_counter()
    for s, r in pick.tolist():
        in_graph = full.clone()
        in_graph[s, r] = False
        score = eap_loop_evaluate(model, in_graph, data, logit_diff_per_prompt).mean() - baseline
        max_diff = max(max_diff, abs(float(score) - float(graph.scores[s, r])))
    _synchronize(device)
    loop_s = (time.perf_counter() - start) / len(pick) * n_edges

    with torch.inference_mode():  # the plan exact made: changed positions and vocabulary columns
        plan = _Batch(model, *data[0], "patching", None, logit_diff_per_prompt, None, None)
    n_pos = plan.mask.shape[1]
    n_columns = cfg.d_vocab_out if plan.columns is None else len(plan.columns)
    flops = exact_floor_flops(cfg, args.prompts, n_pos, plan.p0, n_columns)
    gemm = gemm_peak_flops(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {args.threads} thread(s)"
    return {
        "workload": "circuit_exact_all_edges", "device": device, "device_name": name, "dtype": "float32",
        "reference": "eap_ig_loop_hooks (one evaluate_graph per edge, hooklens model)",
        "hooklens_s": exact_s, "reference_s": loop_s, "ratio": loop_s / exact_s, "memory_budget": args.budget,
        "reference_timing": f"{len(pick)} of {n_edges} edges timed, extrapolated linearly",
        "shape": f"{args.layers} layers x 12 heads, d_model 768, {n_edges} edges, {args.prompts} IOI prompts x "
                 f"{n_pos} tokens",
        # float32 through 12 random layers: the loop and exact sum in different orders
        "checked": max_diff <= 1e-3 * max(scale, 1.0), "max_abs_diff": max_diff, "max_abs_score": scale,
        "first_changed_position": plan.p0, "metric_columns": n_columns, "flops": flops, "gemm_flops_per_s": gemm,
        "floor_s": flops / gemm, "hooklens_floor_fraction": flops / gemm / exact_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample", type=int, default=24, help="edges of the loop reference timed (extrapolated)")
    parser.add_argument("--log", default=None, help="append a JSON row here (e.g. benchmarks/results.jsonl)")
    parser.add_argument("--gpt2-small", action="store_true",
                        help="instead: GPT-2-small shapes, memory plan vs measured peak RSS, chunk times extrapolated")
    parser.add_argument("--prompts", type=int, default=100, help="IOI prompts (--gpt2-small)")
    parser.add_argument("--counterfactual", default="abc", choices=["abc", "s2"], help="IOI data (--gpt2-small)")
    parser.add_argument("--budget", type=int, default=512 * 2**20,
                        help="exact's memory_budget (--gpt2-small, --all-edges)")
    parser.add_argument("--sample-edges", type=int, default=2, help="edges timed per receiver group (--gpt2-small)")
    parser.add_argument("--all-edges", action="store_true",
                        help="instead: exact over every edge of GPT-2-small shapes on --device (the GPU row)")
    parser.add_argument("--device", default=None, help="--all-edges: cpu or cuda (default: cuda if available)")
    parser.add_argument("--layers", type=int, default=12, help="--all-edges: fewer layers for a CPU smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.all_edges:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        row = {**gpt2_small_all_edges(args), "commit": commit, "threads": args.threads, "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv)}
        print(json.dumps(row))
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"circuit_exact_all_edges on {row['device_name']}: exact {row['hooklens_s']:.1f} s, loop "
              f"{row['reference_s']:.0f} s (extrapolated), ratio {row['ratio']:.1f}x, floor fraction "
              f"{row['hooklens_floor_fraction']:.2f}, checked {row['checked']}; {row['shape']}")
        return
    if args.gpt2_small:
        from flop_floor import gemm_peak_flops

        row = {"workload": "circuits_exact_gpt2_small_sample", "device": "cpu", "dtype": "float32",
               **gpt2_small_sample(args), "threads": args.threads, "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv)}
        row["gemm_flops_per_s"] = gemm_peak_flops("cpu")
        row["floor_s"] = row["floor_flops"] / row["gemm_flops_per_s"]
        row["floor_fraction"] = row["floor_s"] / row["extrapolated_exact_s"]
        print(json.dumps(row))
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        return

    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens import HookedTransformer, HookedTransformerConfig
    from hooklens.circuits.evaluate import evaluate_baseline
    from hooklens.circuits.exact import exact
    from hooklens.circuits.graph import Graph

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    cfg = HookedTransformerConfig(n_layers=6, d_model=256, n_heads=8, d_head=32, n_ctx=128, d_vocab=50257,
                                  act_fn="gelu_new", seed=0, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    data = ioi_batch(tokenizer)
    graph = Graph.from_model(model)
    n_edges = int(graph.real_edge_mask.sum())

    exact(model, Graph.from_model(model), data, logit_diff, quiet=True)  # warm-up
    start = time.perf_counter()
    exact(model, graph, data, logit_diff, quiet=True)
    batched_s = time.perf_counter() - start

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    edges = graph.real_edge_mask.nonzero()
    pick = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:args.sample]]
    full = graph.real_edge_mask.clone()
    max_diff = 0.0
    start = time.perf_counter()
    for s, r in pick.tolist():  # EAP-IG's get_scores_exact: baseline, then one evaluate_graph per edge
        baseline = evaluate_baseline(model, data, logit_diff, quiet=True).mean()
        in_graph = full.clone()
        in_graph[s, r] = False
        score = eap_loop_evaluate(model, in_graph, data, logit_diff).mean() - baseline
        max_diff = max(max_diff, abs(float(score) - float(graph.scores[s, r])))
    loop_sample_s = time.perf_counter() - start
    # EAP-IG computes the baseline once; subtract its share from the per-edge time
    start = time.perf_counter()
    for _ in range(len(pick)):
        evaluate_baseline(model, data, logit_diff, quiet=True)
    loop_sample_s -= time.perf_counter() - start
    loop_s = loop_sample_s / len(pick) * n_edges

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    n_pos = model.to_tokens(data[0][0]).shape[1]
    import importlib

    from flop_floor import gemm_peak_flops

    with torch.inference_mode():  # the plan exact made: changed positions and vocabulary columns
        plan = importlib.import_module("hooklens.circuits.exact")._Batch(model, *data[0], "patching", None,
                                                                        logit_diff, None, None)
    n_columns = cfg.d_vocab_out if plan.columns is None else len(plan.columns)
    flops = exact_floor_flops(cfg, len(data[0][0]), n_pos, plan.p0, n_columns)
    gemm = gemm_peak_flops("cpu")
    row = {
        "workload": "circuits_exact_all_edges", "device": "cpu", "dtype": "float32",
        "reference": "eap_ig_loop_hooks (one evaluate_graph per edge, hooklens model)",
        "hooklens_s": batched_s, "reference_s": loop_s, "ratio": loop_s / batched_s,
        "reference_timing": f"{len(pick)} of {n_edges} edges timed, extrapolated linearly",
        "shape": f"6 layers x 8 heads, d_model 256, {n_edges} edges, 8 prompts x {n_pos} tokens",
        "checked": max_diff < 1e-4, "max_abs_diff": max_diff, "commit": commit,
        "first_changed_position": plan.p0, "metric_columns": n_columns, "flops": flops, "gemm_flops_per_s": gemm,
        "floor_s": flops / gemm, "hooklens_floor_fraction": flops / gemm / batched_s,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(row))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
