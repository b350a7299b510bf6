"""The error table of lower-precision sweeps (`dtype=torch.bfloat16`, `float16`, TF32 on CUDA) against float32.

Not a speed benchmark: it measures how far a lower-precision sweep's results are from the float32 sweep's, on

* a GPT-2-small-shaped random model (seeded `GPT2LMHeadModel`, random biases and LayerNorm parameters, loaded
  through hooklens's real loading code; nothing downloaded), and
* the embedded model (`hooklens.embedded.load_embedded`, trained, with previous-token and induction heads),

for three sweeps: IOI `get_act_patch_resid_pre`, IOI `get_act_patch_attn_head_out_all_pos`, and an induction
(repeated random tokens) `get_act_patch_resid_pre`. Per sweep and precision:

* `max |err|` / `mean |err|` of the normalized metric: (patched - corrupted) / (clean - corrupted), the baselines
  from float32 forwards, so the error is |low - float32| / |clean - corrupted|;
* `abs err (metric units)`: the largest |low - float32| itself (for the IOI metric, logits);
* `spearman`: rank correlation (average ranks for ties) of the patch effects, low precision vs float32, over every
  patch and over the patches that matter (float32 |normalized effect| >= 5%, their count in brackets);
* `naive max |err|`: the same error of TransformerLens's loop (one full forward per patch) run under the same
  autocast, i.e. what this precision costs without hooklens's batching (`--no-naive` skips it).

    python benchmarks/sweep_precision.py                      # both models, CPU (or CUDA when present)
    python benchmarks/sweep_precision.py --models embedded --device cpu --threads 1

Prints a Markdown table (for docs/sweep-precision.md) and, with `--json PATH`, writes the rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hooklens.patching as patching  # noqa: E402
from hooklens.utils import get_act_name  # noqa: E402

GPT2_SMALL_SHAPE = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
# IOI pairs of equal token length: clean repeats the subject (answer: the other name), corrupted swaps it.
IOI_PROMPTS = [
    ("When John and Mary went to the shops, John gave the bag to", " Mary", " John"),
    ("When Tom and James went to the park, James gave the ball to", " Tom", " James"),
]
SWEEPS = {  # sweep -> (function, activation, TL setter) for the naive loop
    "resid_pre": ("get_act_patch_resid_pre", "resid_pre", patching.layer_pos_patch_setter),
    "head_out_all_pos": ("get_act_patch_attn_head_out_all_pos", "z", patching.layer_head_vector_patch_setter),
}


def gpt2_small_random(seed: int, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hooklens import HookedTransformer

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL_SHAPE)).eval()
    with torch.no_grad():  # random (not zero / one) biases and LayerNorm parameters, as benchmarks/models.py does
        for name, param in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                param.add_(0.1 * torch.randn_like(param))
    with tempfile.TemporaryDirectory(prefix="hooklens-precision-") as directory:
        hf.save_pretrained(directory)
        return HookedTransformer.from_pretrained(directory, device=device).eval()


def embedded(seed: int, device: str):
    from hooklens.embedded import load_embedded

    return load_embedded(device=device).eval()


MODELS = {"gpt2-small-shape (random)": gpt2_small_random, "gpt2-embedded": embedded}
MODEL_KEYS = {"small": "gpt2-small-shape (random)", "embedded": "gpt2-embedded"}


class Task:
    """Clean / corrupted tokens and a metric (with the positions it reads) for one kind of prompt."""

    def __init__(self, name: str, clean: torch.Tensor, corrupted: torch.Tensor, metric: Callable,
                 metric_positions: List[int]):
        self.name, self.clean, self.corrupted = name, clean, corrupted
        self.metric, self.metric_positions = metric, metric_positions


def ioi_task(model) -> Task:
    clean = model.to_tokens([p for p, _, _ in IOI_PROMPTS])  # [2, p]
    corrupted_prompts = [p.replace(f"{s.strip()} gave", f"{a.strip()} gave") for p, a, s in IOI_PROMPTS]
    corrupted = model.to_tokens(corrupted_prompts)
    assert clean.shape == corrupted.shape, "IOI prompts must tokenize to equal lengths"
    answers = torch.tensor([model.to_single_token(a) for _, a, _ in IOI_PROMPTS], device=clean.device)
    wrong = torch.tensor([model.to_single_token(s) for _, _, s in IOI_PROMPTS], device=clean.device)
    rows = torch.arange(len(IOI_PROMPTS), device=clean.device)

    def logit_diff(logits):  # [b, p, v] -> scalar: answer minus subject logit at the last position
        last = logits[:, -1]
        return (last[rows, answers] - last[rows, wrong]).mean()

    return Task("IOI", clean, corrupted, logit_diff, [-1])


def induction_task(model, length: int = 10, batch: int = 2, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(1000, 20000, (batch, length), generator=g)
    other = torch.randint(1000, 20000, (batch, length), generator=g)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id)
    clean = torch.cat([bos, first, first], dim=1).to(model.cfg.device)  # [b, 1 + 2L]
    corrupted = torch.cat([bos, first, other], dim=1).to(model.cfg.device)
    # The metric reads positions L+1 .. 2L-1 of the second half, each predicting the clean repeat's next token.
    positions = list(range(length + 1, 2 * length))
    targets = clean[:, [p + 1 for p in positions]]  # [b, L-1]
    index = torch.tensor(positions, device=clean.device)

    def induction_logit(logits):  # mean logit of the repeated token the clean prompt predicts
        return logits.index_select(1, index).gather(-1, targets.unsqueeze(-1)).mean()

    return Task("induction", clean, corrupted, induction_logit, positions)


def naive_loop(model, task: Task, clean_cache, sweep: str, shape: Tuple[int, ...]) -> torch.Tensor:
    """TransformerLens's algorithm: one full forward per patch, the setter on a copy of the activation."""
    _, activation, setter = SWEEPS[sweep]
    indices = torch.cartesian_prod(*[torch.arange(s) for s in shape]).view(-1, len(shape)).tolist()
    out = torch.empty(len(indices))
    for i, index in enumerate(indices):
        name = get_act_name(activation, index[0])

        def hook(act, hook, index=index, clean=clean_cache[name]):
            return setter(act.clone(), index, clean)

        out[i] = task.metric(model.run_with_hooks(task.corrupted, fwd_hooks=[(name, hook)])).float().cpu()
    return out.view(shape)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a flat tensor, tied values sharing their average rank (Spearman's convention)."""
    x = x.flatten().double()
    order = x.argsort()
    ordered = x[order]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = starts.cumsum(0) - 1  # tie group of each sorted element
    n_groups = int(group[-1]) + 1
    sums = torch.zeros(n_groups, dtype=torch.double).index_add_(0, group, torch.arange(len(x), dtype=torch.double))
    mean_rank = sums / torch.bincount(group, minlength=n_groups)
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float("nan") if denominator == 0 else (ra @ rb).item() / denominator


def precisions(device: str) -> Dict[str, dict]:
    out = {"bfloat16": dict(dtype=torch.bfloat16), "float16": dict(dtype=torch.float16)}
    if device.startswith("cuda"):
        out["tf32"] = dict(allow_tf32=True)
    return out


def measure(model_name: str, model, task: Task, sweep: str, naive: bool, device: str) -> List[dict]:
    fn = getattr(patching, SWEEPS[sweep][0])
    with torch.no_grad():
        clean_metric = task.metric(model(task.clean)).float().item()
        corrupted_metric = task.metric(model(task.corrupted)).float().item()
        _, clean_cache = model.run_with_cache(task.clean)
        kwargs = dict(metric_positions=task.metric_positions, progress=False)
        exact = fn(model, task.corrupted, clean_cache, task.metric, **kwargs).cpu()
        scale = abs(clean_metric - corrupted_metric)
        large = (exact - corrupted_metric).abs() >= 0.05 * scale  # the patches whose ranking a reader looks at
        rows = []
        for label, precision in precisions(device).items():
            start = time.perf_counter()
            low = fn(model, task.corrupted, clean_cache, task.metric, **kwargs, **precision).cpu()
            seconds = time.perf_counter() - start
            error = (low - exact).abs() / scale
            row = dict(model=model_name, task=task.name, sweep=sweep, precision=label, patches=exact.numel(),
                       clean_minus_corrupted=clean_metric - corrupted_metric,
                       max_abs_err=error.max().item(), mean_abs_err=error.mean().item(),
                       max_abs_err_metric_units=(low - exact).abs().max().item(),
                       spearman=spearman(low - corrupted_metric, exact - corrupted_metric),
                       spearman_large=spearman(low[large] - corrupted_metric, exact[large] - corrupted_metric)
                       if large.sum() > 1 else float("nan"), n_large=int(large.sum()),
                       finite=bool(torch.isfinite(low).all()), seconds=seconds)
            if naive and "dtype" in precision:
                with torch.autocast(torch.device(device).type, precision["dtype"]):
                    reference = naive_loop(model, task, clean_cache, sweep, tuple(exact.shape))
                row["naive_max_abs_err"] = ((reference - exact).abs() / scale).max().item()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| model | prompts | sweep | patches | clean - corrupted | precision | max abs err (normalized) | "
             "mean abs err (normalized) | max abs err (metric units) | Spearman, all | Spearman, effect >= 5% [n] | "
             "naive loop max abs err (normalized) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        naive = f"{r['naive_max_abs_err']:.2e}" if "naive_max_abs_err" in r else "—"
        lines.append(f"| {r['model']} | {r['task']} | {r['sweep']} | {r['patches']} | "
                     f"{r['clean_minus_corrupted']:.3f} | {r['precision']} | {r['max_abs_err']:.2e} | "
                     f"{r['mean_abs_err']:.2e} | {r['max_abs_err_metric_units']:.2e} | {r['spearman']:.4f} | "
                     f"{r['spearman_large']:.4f} [{r['n_large']}] | {naive} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small,embedded", help="comma-separated: small, embedded")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive-loop reference column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODEL_KEYS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODEL_KEYS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for key in args.models.split(","):
        name = MODEL_KEYS[key]
        model = MODELS[name](args.seed, args.device)
        ioi, induction = ioi_task(model), induction_task(model, seed=args.seed)
        for task, sweep in ((ioi, "resid_pre"), (ioi, "head_out_all_pos"), (induction, "resid_pre")):
            rows.extend(measure(name, model, task, sweep, not args.no_naive, args.device))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    header = (f"`python benchmarks/sweep_precision.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f" — commit {commit}, {datetime.date.today()}, torch {torch.__version__}, device {args.device} "
              f"({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    print(header + "\n\n" + markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
