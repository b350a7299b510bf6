"""Exact edge patching (EAP-IG's 'exact' method): hooklens's batched `exact` against EAP-IG's algorithm, one
hook-based evaluate_graph per edge, on a random GPT-2 (6 layers x 8 heads, d_model 256) and 8 short IOI-like prompts.

The loop reference is a transcription of EAP-IG's evaluate_graph (hannamw/EAP-IG, eap/evaluate.py): a corrupted
run whose sender hooks add outputs into a `[batch, pos, n_forward, d_model]` difference tensor, then a clean run
whose sender hooks subtract and whose receiver hooks (q/k/v inputs per layer, MLP inputs, final residual) add
`einsum(diff[:, :, :prev], absent[:prev, receivers])`, preceded by the clean baseline; per edge, the full graph
minus that edge. Only `--sample` edges of the loop are timed and the loop's time is extrapolated to every edge
(said so in the row); the sampled edges' loop scores are checked against hooklens's.

    python benchmarks/circuits_exact.py --threads 1 [--sample 24] [--log benchmarks/results.jsonl]
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
    absent = (~in_graph).float()
    out = []
    for clean, corrupted, labels in data:
        tokens, mask, lengths, n_pos = tokenize_plus(model, clean)
        corrupted_tokens = tokenize_plus(model, corrupted)[0]
        diff = torch.zeros(len(clean), n_pos, in_graph.shape[0], cfg.d_model)

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample", type=int, default=24, help="edges of the loop reference timed (extrapolated)")
    parser.add_argument("--log", default=None, help="append a JSON row here (e.g. benchmarks/results.jsonl)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
    row = {
        "workload": "circuits_exact_all_edges", "device": "cpu", "dtype": "float32",
        "reference": "eap_ig_loop_hooks (one evaluate_graph per edge, hooklens model)",
        "hooklens_s": batched_s, "reference_s": loop_s, "ratio": loop_s / batched_s,
        "reference_timing": f"{len(pick)} of {n_edges} edges timed, extrapolated linearly",
        "shape": f"6 layers x 8 heads, d_model 256, {n_edges} edges, 8 prompts x {n_pos} tokens",
        "checked": max_diff < 1e-4, "max_abs_diff": max_diff, "commit": commit,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(row))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
