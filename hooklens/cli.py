"""The `hooklens` command: the induction-head and IOI analyses, end to end, on any GPT-2 checkpoint.

    hooklens induction [--model PATH_OR_NAME] [--device cpu] [--dtype float32] [--out DIR]
    hooklens patch [--clean TEXT --corrupted TEXT --answer TEXT --wrong TEXT] [--model ...] [--out DIR]

Without `--model` the embedded default model (shipped inside the package) is used, so both commands run on a
fresh offline machine. Each writes PNG figures and `summary.json` to `--out` and prints a short table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hooklens import HookedTransformer, head_scores, patching, plotting
from hooklens.embedded import load_embedded
from hooklens.evals import repeated_random_tokens
from hooklens.loading import CheckpointError
from hooklens.utils import get_act_name

IOI_CLEAN = "When John and Mary went to the shops, John gave the bag to"
IOI_CORRUPTED = "When John and Mary went to the shops, Mary gave the bag to"


class CLIError(Exception):
    """A user-facing error: printed without a traceback."""


def check_device(device: Optional[str]) -> None:
    """Turn a --device this machine cannot use into a one-line error (instead of torch's traceback)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise CLIError(f"--device {device}: not a device name ({err}). Use cpu, cuda or cuda:N.") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
            raise CLIError(f"--device {device}: this torch ({torch.__version__}) {build}. Use --device cpu, or "
                           "install a CUDA build of torch on a GPU machine.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
                           f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")


def load_model(model: Optional[str], device: Optional[str], dtype: str) -> HookedTransformer:
    check_device(device)
    torch_dtype = getattr(torch, dtype)
    try:
        if model is None:
            return load_embedded(device=device, dtype=torch_dtype)
        return HookedTransformer.from_pretrained(model, device=device, dtype=torch_dtype)
    except CheckpointError as err:
        raise CLIError(f"--model {model}: {err}") from err


def induction_prompt(model: HookedTransformer, seq_len: int, batch: int, seed: int) -> Tensor:
    """BOS + seq_len random tokens, repeated: [batch, 1 + 2 * seq_len] (the induction demo's input). Ids are drawn
    from [100, 20000) when the vocabulary is GPT-2's, else from the whole vocabulary but id 0."""
    low, high = (100, 20000) if model.cfg.d_vocab > 20000 else (1, model.cfg.d_vocab)
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else 0
    return repeated_random_tokens(batch, seq_len, bos_token_id=bos, low=low, high=high, seed=seed,
                                  device=model.cfg.device)


def top_1_accuracy(circuit, rows: Optional[int], seed: int) -> float:
    """Fraction of (sampled) rows whose diagonal entry is the row's maximum (FactoredMatrix.argmax: the rows
    are reduced tile by tile, never formed densely)."""
    n = circuit.shape[-2]
    indices = torch.arange(n)
    if rows is not None and rows < n:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].sort().values
    predicted = circuit[indices].argmax(-1)
    return float((predicted.cpu() == indices).sum()) / len(indices)


def run_induction(args: argparse.Namespace) -> Dict[str, Any]:
    """`hooklens induction`: on repeated random tokens, the loss by position, induction and previous-token head
    scores, MLP-output patching of the second half, K-composition and OV copying scores; figures + summary.json."""
    start = time.perf_counter()
    out = _output_dir(args.out)
    model = load_model(args.model, args.device, args.dtype)
    seq_len = min(args.seq_len, (model.cfg.n_ctx - 1) // 2)
    tokens = induction_prompt(model, seq_len, args.batch, args.seed)  # [b, 1 + 2 * seq_len]
    heads = _induction_head_scores(model, tokens, seq_len, out, progress=not args.quiet)
    losses = _repeated_token_losses(model, tokens, seq_len, heads["top_induction_head"], out)
    mlp_patching = _second_half_mlp_patching(model, tokens, seq_len, args, out)
    circuits = _circuit_scores(model, heads["top_induction_head"], heads["top_prev_token_head"], args, out)
    summary = {"model": model.cfg.model_name, "seq_len": seq_len, "batch": args.batch, **losses, **heads,
               "mlp_patching": mlp_patching.tolist(), **circuits, "seconds": time.perf_counter() - start}
    _write_summary(out, "hooklens induction", summary, _induction_table(summary, mlp_patching))
    return summary


def _induction_head_scores(model, tokens: Tensor, seq_len: int, out: Path, progress: bool) -> Dict[str, Any]:
    """Induction and previous-token scores of every head (`hooklens.head_scores`), their heatmaps, the top heads."""
    scores = head_scores(model, tokens, kinds=("induction", "previous_token"), seq_len=seq_len, progress=progress)
    induction, prev_token = scores["induction"], scores["previous_token"]  # [layers, heads] each
    head_labels, layer_labels = _labels(model)
    plotting.heatmap(induction, out / "induction_scores.png", "Induction scores", head_labels, layer_labels,
                     "head", "layer", diverging=False)
    plotting.heatmap(prev_token, out / "prev_token_scores.png", "Previous-token scores", head_labels, layer_labels,
                     "head", "layer", diverging=False)
    n_heads = model.cfg.n_heads
    return {"induction_scores": induction.tolist(), "prev_token_scores": prev_token.tolist(),
            "top_induction_head": list(divmod(int(induction.argmax()), n_heads)),
            "top_prev_token_head": list(divmod(int(prev_token.argmax()), n_heads))}


def _repeated_token_losses(model, tokens: Tensor, seq_len: int, top_head: List[int], out: Path) -> Dict[str, Any]:
    """Log-probs of the first (random) and second (repeated) halves, the loss-by-position plot, and the attention
    pattern of the top induction head (`top_head` = [layer, head])."""
    layer, head = top_head
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=get_act_name("pattern", layer))
    log_probs = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].float()  # [b, 2*seq_len]
    first, second = log_probs[:, : seq_len - 1], log_probs[:, seq_len:]
    accuracy = (logits[:, seq_len:-1].argmax(-1) == tokens[:, seq_len + 1:]).float().mean()
    loss_by_position = -log_probs.mean(0)
    plotting.line(loss_by_position, out / "loss_by_position.png", "Loss by position (repeated random tokens)",
                  "position", "loss (nats)")
    plotting.heatmap(cache["pattern", layer][0, head].float(), out / "top_induction_head_pattern.png",
                     f"Attention pattern of L{layer}H{head} (induction)", x_title="source position",
                     y_title="destination position", diverging=False)
    return {"logprob_first_half": float(first.mean()), "logprob_second_half": float(second.mean()),
            "accuracy_second_half": float(accuracy), "loss_by_position": loss_by_position.tolist()}


def _second_half_mlp_patching(model, tokens: Tensor, seq_len: int, args: argparse.Namespace, out: Path) -> Tensor:
    """MLP-output patching `[layers, pos]` of the second half: clean = the repeated sequence, corrupted = a different
    first half (so induction cannot predict the second half); metric = mean log-prob of the correct second half."""
    if model.cfg.attn_only:
        return torch.zeros(0, tokens.shape[1])
    corrupted = induction_prompt(model, seq_len, args.batch, args.seed + 1)
    corrupted[:, seq_len + 1:] = tokens[:, seq_len + 1:]
    targets = tokens[:, seq_len + 1:]

    def second_half_logprob(patched_logits: Tensor) -> Tensor:
        lp = patched_logits[:, seq_len:-1].log_softmax(-1)
        return lp.gather(-1, targets[..., None]).mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp_out"))
    mlp_patching = patching.get_act_patch_mlp_out(model, corrupted, clean_cache, second_half_logprob,
                                                  metric_positions=range(seq_len, 2 * seq_len),
                                                  progress=not args.quiet)
    _, layer_labels = _labels(model)
    plotting.heatmap(mlp_patching, out / "mlp_patching.png", "MLP-output patching (second-half log-prob)",
                     x_title="position", y_labels=layer_labels, y_title="layer")
    return mlp_patching


def _circuit_scores(model, top_induction: List[int], top_prev: List[int], args: argparse.Namespace,
                    out: Path) -> Dict[str, Any]:
    """K-composition top-1 accuracy of the top previous-token head into the top induction head's keys, and the
    OV copying score (eigenvalues of W_E W_OV W_U) of every head, with its heatmap."""
    with torch.no_grad():
        W_E, W_U = model.W_E, model.W_U
        kcomp = W_E @ model.QK[top_induction[0], top_induction[1]] @ (W_E @ model.OV[top_prev[0], top_prev[1]]).T
        kcomp_top1 = top_1_accuracy(kcomp, args.kcomp_rows, args.seed)
        eigenvalues = (W_E @ model.OV @ W_U).eigenvalues  # [l, h, d_head], from the small B @ A
        ov_copying = (eigenvalues.sum(-1) / eigenvalues.abs().sum(-1)).real.float()
    head_labels, layer_labels = _labels(model)
    plotting.heatmap(ov_copying, out / "ov_copying_scores.png", "OV circuit copying scores", head_labels,
                     layer_labels, "head", "layer")
    return {"kcomp_top1": kcomp_top1,
            "kcomp_rows": args.kcomp_rows if args.kcomp_rows is not None else model.cfg.d_vocab,
            "ov_copying_scores": ov_copying.tolist()}


def _induction_table(summary: Dict[str, Any], mlp_patching: Tensor) -> List[tuple]:
    """The rows `hooklens induction` prints."""
    ind_layer, ind_head = summary["top_induction_head"]
    prev_layer, prev_head = summary["top_prev_token_head"]
    ind_score = summary["induction_scores"][ind_layer][ind_head]
    prev_score = summary["prev_token_scores"][prev_layer][prev_head]
    max_mlp_effect = float(mlp_patching.abs().max()) if mlp_patching.numel() else 0
    return [
        ("model", summary["model"]),
        ("tokens", f"{summary['batch']} x (1 + 2 x {summary['seq_len']}) repeated random tokens"),
        ("log-prob first half", f"{summary['logprob_first_half']:.2f}"),
        ("log-prob second half", f"{summary['logprob_second_half']:.2f}"),
        ("accuracy second half", f"{summary['accuracy_second_half']:.2f}"),
        ("top induction head", f"L{ind_layer}H{ind_head}  score {ind_score:.2f}"),
        ("top previous-token head", f"L{prev_layer}H{prev_head}  score {prev_score:.2f}"),
        ("max |MLP patching effect|", f"{max_mlp_effect:.3f}"),
        ("K-composition top-1 accuracy", f"{summary['kcomp_top1']:.3f} ({summary['kcomp_rows']} rows)"),
        ("best OV copying score", f"{max(max(row) for row in summary['ov_copying_scores']):.2f}"),
    ]


def _labels(model) -> Tuple[List[str], List[str]]:
    """Heatmap tick labels: heads ("H0", ...) and layers ("L0", ...)."""
    return [f"H{h}" for h in range(model.cfg.n_heads)], [f"L{l}" for l in range(model.cfg.n_layers)]


def _output_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _single_token(model, text: str, what: str) -> int:
    tokens = model.to_tokens(text, prepend_bos=False)[0]
    if tokens.numel() != 1:
        raise CLIError(f"--{what} {text!r} is {tokens.numel()} tokens {model.to_str_tokens(tokens)}; it must be "
                       "exactly one (GPT-2 tokens usually start with a space, e.g. ' Mary').")
    return int(tokens[0])


def run_patch(args: argparse.Namespace) -> Dict[str, Any]:
    """`hooklens patch`: residual-stream and head-output patching of a clean / corrupted prompt pair (IOI by
    default), metric = the logit difference normalized to 0 (corrupted) .. 1 (clean); figures + summary.json."""
    start = time.perf_counter()
    out = _output_dir(args.out)
    model = load_model(args.model, args.device, args.dtype)
    clean = model.to_tokens(args.clean)
    corrupted = model.to_tokens(args.corrupted)
    if clean.shape != corrupted.shape:
        raise CLIError(f"The clean prompt is {clean.shape[1]} tokens and the corrupted one {corrupted.shape[1]}; "
                       f"patching needs equal lengths.\n  clean:     {model.to_str_tokens(args.clean)}\n"
                       f"  corrupted: {model.to_str_tokens(args.corrupted)}")
    answer, wrong = _single_token(model, args.answer, "answer"), _single_token(model, args.wrong, "wrong")

    def logit_diff(logits: Tensor) -> Tensor:
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    clean_diff, corrupted_diff = logit_diff(clean_logits), logit_diff(corrupted_logits)
    scale = clean_diff - corrupted_diff
    if float(scale.abs()) < 1e-6:
        raise CLIError("The clean and corrupted prompts give the same logit difference; nothing to patch.")

    def normalized(logits: Tensor) -> Tensor:  # 0 = corrupted behaviour, 1 = clean behaviour
        return (logit_diff(logits) - corrupted_diff) / scale

    kwargs = dict(metric_positions=[-1], progress=not args.quiet)
    resid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, normalized, **kwargs)
    heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, normalized, **kwargs)
    str_tokens = [f"{t}_{i}" for i, t in enumerate(model.to_str_tokens(corrupted))]
    layer_labels = [f"L{l}" for l in range(model.cfg.n_layers)]
    plotting.heatmap(resid, out / "resid_pre_patching.png", "Residual stream patching (normalized logit diff)",
                     str_tokens, layer_labels, "position", "layer")
    plotting.heatmap(heads, out / "head_out_patching.png", "Head output patching (normalized logit diff)",
                     [f"H{h}" for h in range(model.cfg.n_heads)], layer_labels, "head", "layer")
    top_layer, top_head = divmod(int(heads.abs().argmax()), model.cfg.n_heads)
    summary = {
        "model": model.cfg.model_name,
        "clean": args.clean, "corrupted": args.corrupted, "answer": args.answer, "wrong": args.wrong,
        "str_tokens": model.to_str_tokens(corrupted),
        "clean_logit_diff": float(clean_diff), "corrupted_logit_diff": float(corrupted_diff),
        "resid_pre_patching": resid.tolist(),
        "head_out_patching": heads.tolist(),
        "top_head": [top_layer, top_head],
        "seconds": time.perf_counter() - start,
    }
    _write_summary(out, "hooklens patch", summary, [
        ("model", summary["model"]),
        ("clean / corrupted logit diff", f"{float(clean_diff):.3f} / {float(corrupted_diff):.3f}"),
        ("strongest head (output patching)", f"L{top_layer}H{top_head}  {float(heads[top_layer, top_head]):+.3f}"),
    ])
    return summary


def _write_summary(out: Path, title: str, summary: dict, rows: Sequence[tuple]) -> None:
    """Save `summary.json` beside the figures and print the result table (rows + where the files are + time)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_table(title, [*rows, ("figures + summary.json", str(out)), ("seconds", f"{summary['seconds']:.1f}")])


def _print_table(title: str, rows: Sequence[tuple]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooklens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, out: str) -> None:
        sub.add_argument("--model", default=None, help="GPT-2 checkpoint: HF-format directory or a name in the "
                         "local HF cache (default: the embedded model)")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
        sub.add_argument("--out", default=out, help=f"output directory (default: {out})")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    induction = commands.add_parser("induction", help="induction heads on repeated random tokens")
    common(induction, "hooklens-induction")
    induction.add_argument("--seq-len", type=int, default=50)
    induction.add_argument("--batch", type=int, default=4)
    induction.add_argument("--kcomp-rows", type=lambda s: None if s == "all" else int(s), default=2000,
                           help="vocabulary rows sampled for the K-composition top-1 accuracy ('all' for every row)")
    patch = commands.add_parser("patch", help="IOI-style residual-stream and head-output patching")
    common(patch, "hooklens-patch")
    patch.add_argument("--clean", default=IOI_CLEAN)
    patch.add_argument("--corrupted", default=IOI_CORRUPTED)
    patch.add_argument("--answer", default=" Mary", help="the clean prompt's answer (one token)")
    patch.add_argument("--wrong", default=" John", help="the corrupted prompt's answer (one token)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        (run_induction if args.command == "induction" else run_patch)(args)
    except CLIError as err:
        print(f"hooklens {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
