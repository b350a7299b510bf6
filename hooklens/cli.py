"""The `hooklens` command: the induction-head, IOI patching and circuit-discovery analyses, end to end, on any
GPT-2 checkpoint.

    hooklens induction [--model PATH_OR_NAME] [--device cpu] [--dtype float32] [--out DIR]
    hooklens patch [--clean TEXT --corrupted TEXT --answer TEXT --wrong TEXT] [--model ...] [--out DIR]
                   [--shard I/N --results-dir DIR]   (also: torchrun --nproc_per_node N -m hooklens patch ...)
    hooklens circuit [--method EAP-IG-inputs] [--n-prompts 100] [--ig-steps 5] [--model ...] [--out DIR]

Without `--model` the embedded default model (shipped inside the package) is used, so every command runs on a
fresh offline machine. Each writes PNG figures and `summary.json` to `--out` and prints a short table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hooklens import HookedTransformer, head_scores, patching, plotting, report
from hooklens.embedded import load_embedded
from hooklens.evals import repeated_random_tokens
from hooklens.loading import CheckpointError
from hooklens.mlp_patching import repeated_token_mlp_patching
from hooklens.sharding import local_device, parse_shard, resolve_shard
from hooklens.utils import get_act_name

IOI_CLEAN = "When John and Mary went to the shops, John gave the bag to"
IOI_CORRUPTED = "When John and Mary went to the shops, Mary gave the bag to"

# What each command writes into --out (summary.json last: its presence marks a complete run).
OUTPUT_FILES = {
    "induction": ("induction_scores.png", "prev_token_scores.png", "loss_by_position.png",
                  "top_induction_head_pattern.png", "mlp_patching.png", "ov_copying_scores.png", "report.html",
                  "summary.json"),
    "patch": ("resid_pre_patching.png", "head_out_patching.png", "report.html", "summary.json"),
    "circuit": ("faithfulness.png", "circuit.png", "importances.json", "report.html", "summary.json"),
}
# Keys that identify a command's summary.json written before summaries named their command.
SUMMARY_KEYS = {"induction": {"induction_scores", "kcomp_top1"}, "patch": {"resid_pre_patching", "head_out_patching"},
                "circuit": {"cpr", "cmd", "faithfulness"}}
DEFAULT_SEQ_LEN = 50
MLP_EFFECT_LABEL = "loss(patched) − loss(clean) [nats]"


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
    if parsed.type == "meta":  # meta tensors have shapes but no values: every number would be made up
        raise CLIError(f"--device {device}: meta tensors hold no values, so there is nothing to analyse. "
                       "Use --device cpu or cuda.")
    if parsed.type not in ("cpu", "cuda"):
        backend = getattr(torch, parsed.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise CLIError(f"--device {device}: this torch ({torch.__version__}) cannot use {parsed.type} "
                           "devices here. Use --device cpu or cuda.")
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
    with staged_output(args.out, "induction") as stage:
        model = load_model(args.model, args.device, args.dtype)
        seq_len = _induction_seq_len(args.seq_len, model)
        tokens = induction_prompt(model, seq_len, args.batch, args.seed)  # [b, 1 + 2 * seq_len]
        _say(args, f"head scores: induction and previous-token scores of every head on {tuple(tokens.shape)} tokens")
        heads = _induction_head_scores(model, tokens, seq_len, stage, progress=not args.quiet)
        losses = _repeated_token_losses(model, tokens, seq_len, heads["top_induction_head"], stage)
        mlp_patching = _second_half_mlp_patching(model, tokens, seq_len, args, stage)
        _say(args, "K-composition of the top heads and OV copying scores of every head")
        circuits = _circuit_scores(model, heads["top_induction_head"], heads["top_prev_token_head"], args, stage)
        summary = {"command": "hooklens induction", "model": model.cfg.model_name, "seq_len": seq_len,
                   "batch": args.batch, **losses, **heads, **mlp_patching, **circuits,
                   "seconds": time.perf_counter() - start}
        save_summary(stage / "summary.json", summary)
        _say(args, "writing report.html")
        report.induction_report(stage, model, tokens, summary, _report_rows(summary, _induction_table(summary)))
    _print_summary(Path(args.out), "hooklens induction", summary, _induction_table(summary))
    return summary


def _induction_seq_len(requested: Optional[int], model: HookedTransformer) -> int:
    """--seq-len, checked against the context: BOS + two copies must fit in n_ctx. The default shrinks to fit;
    an explicit value that does not fit is an error (cutting it silently would report a run nobody asked for)."""
    longest = (model.cfg.n_ctx - 1) // 2
    if longest < 2:
        raise CLIError(f"The model's context (n_ctx={model.cfg.n_ctx}) is too short for the induction analysis, "
                       "which needs 1 + 2 x 2 tokens at least.")
    if requested is None:
        return min(DEFAULT_SEQ_LEN, longest)
    if requested > longest:
        raise CLIError(f"--seq-len {requested}: the prompt would be 1 + 2 x {requested} = {1 + 2 * requested} "
                       f"tokens, more than the model's n_ctx={model.cfg.n_ctx}. Use --seq-len {longest} or less.")
    return requested


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


def _second_half_mlp_patching(model, tokens: Tensor, seq_len: int, args: argparse.Namespace,
                              out: Path) -> Dict[str, Any]:
    """The seeds' MLP experiment (`hooklens.mlp_patching`): each second-half position's MLP output replaced by the
    same token's first-half one, per layer; loss(patched) - loss(clean) on the second half, `[layers, seq_len]`."""
    if model.cfg.attn_only:  # nothing to patch; the summary says so instead of a made-up matrix
        return {"mlp_patching_loss_change": None, "mlp_patching_positions": [], "mlp_patching_metric": None}
    _say(args, "MLP patching: second-half MLP outputs <- the same tokens' first-half ones")
    effect = repeated_token_mlp_patching(model, tokens, seq_len, progress=not args.quiet)
    positions = list(range(1 + seq_len, 1 + 2 * seq_len))  # BOS + first half come before
    _, layer_labels = _labels(model)
    token_labels = _token_labels(model, tokens[0])
    plotting.heatmap(effect, out / "mlp_patching.png",
                     "MLP output at a repeated token <- its first-occurrence output (mean loss of the second half)",
                     [token_labels[p] for p in positions], layer_labels, "repeated token (position)", "layer",
                     colorbar_title=MLP_EFFECT_LABEL)
    return {"mlp_patching_loss_change": effect.tolist(), "mlp_patching_positions": positions,
            "mlp_patching_metric": "mean next-token loss (nats) of the second half's predictions at positions "
                                   f"{positions[0]}..{positions[-1] - 1}, batch mean"}


def _token_labels(model, tokens: Tensor) -> List[str]:
    """Axis labels of a prompt's positions: "token|position" (random tokens repeat, so the position tells them
    apart)."""
    if model.tokenizer is None:
        return [f"{int(t)}|{i}" for i, t in enumerate(tokens)]
    return [f"{t}|{i}" for i, t in enumerate(model.to_str_tokens(tokens))]


def _say(args: argparse.Namespace, what: str) -> None:
    """Name a long step on stderr (not with --quiet), so a user watching the run knows what it is doing."""
    if getattr(args, "say", not args.quiet):
        print(f"hooklens {args.command}: {what}", file=sys.stderr, flush=True)


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
            "kcomp_rows": min(args.kcomp_rows or model.cfg.d_vocab, model.cfg.d_vocab),  # rows really scored
            "ov_copying_scores": ov_copying.tolist()}


def _induction_table(summary: Dict[str, Any]) -> List[tuple]:
    """The rows `hooklens induction` prints."""
    ind_layer, ind_head = summary["top_induction_head"]
    prev_layer, prev_head = summary["top_prev_token_head"]
    ind_score = summary["induction_scores"][ind_layer][ind_head]
    prev_score = summary["prev_token_scores"][prev_layer][prev_head]
    mlp_row = ("MLP patching (seeds' experiment)", "none: the model has no MLPs")
    if summary["mlp_patching_loss_change"] is not None:
        effect = torch.tensor(summary["mlp_patching_loss_change"])  # [layers, seq_len]
        layer, column = divmod(int(effect.abs().argmax()), effect.shape[1])
        mlp_row = ("MLP patching: loss change", f"median |.| {float(effect.abs().median()):.4f}, largest "
                   f"{float(effect[layer, column]):+.3f} nats (L{layer}, repeated token {column + 1} of "
                   f"{effect.shape[1]})")
    return [
        ("model", summary["model"]),
        ("tokens", f"{summary['batch']} x (1 + 2 x {summary['seq_len']}) repeated random tokens"),
        ("log-prob first half", f"{summary['logprob_first_half']:.2f}"),
        ("log-prob second half", f"{summary['logprob_second_half']:.2f}"),
        ("accuracy second half", f"{summary['accuracy_second_half']:.2f}"),
        ("top induction head", f"L{ind_layer}H{ind_head}  score {ind_score:.2f}"),
        ("top previous-token head", f"L{prev_layer}H{prev_head}  score {prev_score:.2f}"),
        mlp_row,
        ("K-composition top-1 accuracy", f"{summary['kcomp_top1']:.3f} ({summary['kcomp_rows']} rows)"),
        ("best OV copying score", f"{max(max(row) for row in summary['ov_copying_scores']):.2f}"),
    ]


def _labels(model) -> Tuple[List[str], List[str]]:
    """Heatmap tick labels: heads ("H0", ...) and layers ("L0", ...)."""
    return [f"H{h}" for h in range(model.cfg.n_heads)], [f"L{l}" for l in range(model.cfg.n_layers)]


def check_output_dir(path: str, command: str) -> Path:
    """--out, checked before any work: a directory (made if missing) that holds no files of the names this
    command writes, unless they are a previous run of the same command (which the new run then replaces)."""
    out = Path(path)
    if out.is_symlink() and not out.exists():  # moving the run into place would replace the link itself
        raise CLIError(f"--out {path} is a symbolic link to nothing ({os.readlink(out)}). Remove it or give "
                       "another directory.")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {path} is an existing file, not a directory. Give a directory (it is created "
                       "if missing).")
    if out.is_dir():
        clashes = [name for name in OUTPUT_FILES[command] if (out / name).exists()]
        if clashes and not _holds_previous_run(out, command):
            raise CLIError(f"--out {path} already holds {', '.join(clashes)}, which are not the files of a "
                           f"previous `hooklens {command}` run; the new run would overwrite them. Choose another "
                           "--out, or move those files.")
    return out


def _holds_previous_run(out: Path, command: str) -> bool:
    """Whether out/summary.json is the summary of a complete earlier `hooklens <command>` run."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict):
        return False
    if "command" in summary:
        return summary["command"] == f"hooklens {command}"
    return SUMMARY_KEYS[command] <= set(summary)


@contextlib.contextmanager
def staged_output(path: str, command: str) -> Iterator[Path]:
    """A fresh hidden directory to write the run into; moved into --out when the block ends normally,
    deleted when it raises (Ctrl-C included). So --out only ever holds complete runs: an interrupted run leaves
    the previous one as it was, never a mix of new figures and an old summary.json."""
    out = check_output_dir(path, command)
    # Inside --out when it exists (only it must be writable), else beside it; either way on the same file system,
    # so moving the files into place is a rename.
    home = out if out.is_dir() else out.parent
    stage = home / f".{out.name or 'hooklens'}.{command}-{uuid.uuid4().hex[:12]}.partial"
    try:
        home.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as err:
        raise CLIError(f"--out {path}: cannot write there ({err.strerror}). Choose a writable directory.") from err
    try:
        yield stage
        with _sigint_deferred():  # the moves take milliseconds; half of them would mix two runs
            _move_into_place(stage, out, command)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_into_place(stage: Path, out: Path, command: str) -> None:
    """Replace --out's previous run of `command` (if any) by the staged files, summary.json last."""
    if not out.exists():
        os.replace(stage, out)  # one rename: the whole run appears at once
        return
    written = [name for name in OUTPUT_FILES[command] if (stage / name).exists()]
    # The old summary goes first: from here on the directory is not marked as a complete run until the new one is.
    (out / "summary.json").unlink(missing_ok=True)
    for name in OUTPUT_FILES[command]:  # figures the new run does not draw would describe the old one
        if name not in written:
            (out / name).unlink(missing_ok=True)
    for name in written:
        os.replace(stage / name, out / name)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then deliver it (signal handlers can only be set in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])


def _single_token(model, text: str, what: str) -> int:
    tokens = model.to_tokens(text, prepend_bos=False)[0]
    if tokens.numel() != 1:
        raise CLIError(f"--{what} {text!r} is {tokens.numel()} tokens {model.to_str_tokens(tokens)}; it must be "
                       "exactly one (GPT-2 tokens usually start with a space, e.g. ' Mary').")
    return int(tokens[0])


def run_patch(args: argparse.Namespace) -> Dict[str, Any]:
    """`hooklens patch`: residual-stream and head-output patching of a clean / corrupted prompt pair (IOI by
    default), metric = the logit difference normalized to 0 (corrupted) .. 1 (clean); figures + summary.json.

    `--shard i/n --results-dir D` computes that shard's work units into D and writes no --out (a run without
    --shard and the same --results-dir then only merges); under torchrun every rank computes its units, rank 0
    writes --out."""
    start = time.perf_counter()
    shard = _check_shard_flags(args)
    with _process_group_from_launcher(args) as rank:
        if shard is not None or rank != 0:
            _patch_results(args, shard)
            if shard is not None:
                print(f"hooklens patch: shard {shard[0]}/{shard[1]} done; its units are in --results-dir "
                      f"{args.results_dir}. Run without --shard (same flags) to write {args.out}.")
            return {}
        with staged_output(args.out, "patch") as stage:
            model, corrupted, clean_diff, corrupted_diff, resid, heads = _patch_results(args, None)
            _patch_figures(model, corrupted, resid, heads, stage)
            top_layer, top_head = divmod(int(heads.abs().argmax()), model.cfg.n_heads)
            summary = {
                "command": "hooklens patch", "model": model.cfg.model_name,
                "clean": args.clean, "corrupted": args.corrupted, "answer": args.answer, "wrong": args.wrong,
                "str_tokens": model.to_str_tokens(corrupted),
                "clean_logit_diff": float(clean_diff), "corrupted_logit_diff": float(corrupted_diff),
                "resid_pre_patching": resid.tolist(),
                "head_out_patching": heads.tolist(),
                "top_head": [top_layer, top_head],
                "seconds": time.perf_counter() - start,
            }
            save_summary(stage / "summary.json", summary)
            report.patch_report(stage, model, corrupted, summary, _report_rows(summary, _patch_table(summary)))
    _print_summary(Path(args.out), "hooklens patch", summary, _patch_table(summary))
    return summary


def _patch_table(summary: Dict[str, Any]) -> List[tuple]:
    """The rows `hooklens patch` prints."""
    top_layer, top_head = summary["top_head"]
    return [
        ("model", summary["model"]),
        ("clean / corrupted logit diff", f"{summary['clean_logit_diff']:.3f} / {summary['corrupted_logit_diff']:.3f}"),
        ("strongest head (output patching)",
         f"L{top_layer}H{top_head}  {summary['head_out_patching'][top_layer][top_head]:+.3f}"),
    ]


def _patch_results(args: argparse.Namespace, shard: Optional[Tuple[int, int]]):
    """Load the model and run both sweeps (this shard's units of them when `shard` is given, the process group's
    share under torchrun, kept in --results-dir when given): (model, corrupted, clean_diff, corrupted_diff, resid,
    heads)."""
    model = load_model(args.model, args.device, args.dtype)
    clean, corrupted, answer, wrong = _patch_inputs(model, args)

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

    kwargs = dict(metric_positions=[-1], progress=not args.quiet, shard=shard, results_dir=args.results_dir)
    with warnings.catch_warnings():
        # A shard's result is partial by design; the command says where its units went instead.
        warnings.filterwarnings("ignore", message="Shard .* work units are filled")
        resid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, normalized, **kwargs)
        heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, normalized, **kwargs)
    return model, corrupted, clean_diff, corrupted_diff, resid, heads


def _check_shard_flags(args: argparse.Namespace) -> Optional[Tuple[int, int]]:
    """--shard as (i, n), checked before anything is loaded: a shard keeps its work only in --results-dir. Without
    --shard, a SLURM array task with --results-dir (and no torchrun) takes its shard from the environment (the
    library's fallback), so it writes its units, not an --out with only its share of the results."""
    if args.shard is None:
        if args.results_dir is None or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return None
        try:
            index, count, _ = resolve_shard()
        except ValueError as err:
            raise CLIError(str(err)) from err
        return (index, count) if count > 1 else None
    if args.results_dir is None:
        raise CLIError(f"--shard {args.shard} needs --results-dir DIR: a shard computes only its part of the sweep, "
                       "and the other shards' parts and the final merge run meet there.")
    try:
        return parse_shard(args.shard)
    except ValueError as err:
        raise CLIError(str(err)) from err


@contextlib.contextmanager
def _process_group_from_launcher(args: argparse.Namespace) -> Iterator[int]:
    """Under torchrun (WORLD_SIZE > 1 in the environment, no process group yet): a process group for the run (gloo
    on the CPU, NCCL on GPUs; each rank on cuda:LOCAL_RANK unless --device says otherwise), destroyed after it.
    Yields this process's rank (0 without a launcher)."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or args.shard is not None or not dist.is_available() or dist.is_initialized():
        yield dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return
    if args.device is None and torch.cuda.is_available():
        args.device = str(local_device())
    backend = "nccl" if args.device is not None and torch.device(args.device).type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def _patch_inputs(model: HookedTransformer, args: argparse.Namespace) -> Tuple[Tensor, Tensor, int, int]:
    """The clean and corrupted tokens [1, pos] and the answer / wrong token ids, checked before any forward: each
    prompt fits in the context (the model would otherwise see only its first n_ctx tokens, and two prompts that
    differ after the cut would look identical), both are the same length, each answer is one token."""
    clean = model.to_tokens(args.clean, truncate=False)
    corrupted = model.to_tokens(args.corrupted, truncate=False)
    for flag, tokens in (("clean", clean), ("corrupted", corrupted)):
        if tokens.shape[1] > model.cfg.n_ctx:
            raise CLIError(f"--{flag} prompt too long: {tokens.shape[1]} tokens (BOS included), but the model's "
                           f"context is n_ctx={model.cfg.n_ctx} tokens. Shorten the prompt.")
    if clean.shape != corrupted.shape:
        raise CLIError(f"The clean prompt is {clean.shape[1]} tokens and the corrupted one {corrupted.shape[1]}; "
                       f"patching needs equal lengths.\n  clean:     {model.to_str_tokens(args.clean)}\n"
                       f"  corrupted: {model.to_str_tokens(args.corrupted)}")
    return clean, corrupted, _single_token(model, args.answer, "answer"), _single_token(model, args.wrong, "wrong")


def _patch_figures(model: HookedTransformer, corrupted: Tensor, resid: Tensor, heads: Tensor, out: Path) -> None:
    str_tokens = [f"{t}_{i}" for i, t in enumerate(model.to_str_tokens(corrupted))]
    layer_labels = [f"L{l}" for l in range(model.cfg.n_layers)]
    plotting.heatmap(resid, out / "resid_pre_patching.png", "Residual stream patching (normalized logit diff)",
                     str_tokens, layer_labels, "position", "layer")
    plotting.heatmap(heads, out / "head_out_patching.png", "Head output patching (normalized logit diff)",
                     [f"H{h}" for h in range(model.cfg.n_heads)], layer_labels, "head", "layer")


# -- hooklens circuit -------------------------------------------------------------------------------------------
CIRCUIT_METHODS = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact")
CIRCUIT_INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")
IG_METHODS = ("EAP-IG-inputs", "EAP-IG-activations")


def _check_circuit_flags(args: argparse.Namespace) -> None:
    """The checks `hooklens circuit` can make before loading anything (argparse already checked types/choices)."""
    if args.seed < 0:
        raise CLIError(f"--seed {args.seed}: the IOI generator (numpy) takes seeds >= 0.")
    if args.method in ("EAP-IG-inputs", "clean-corrupted") and args.intervention != "patching":
        raise CLIError(f"--intervention {args.intervention}: --method {args.method} interpolates between the clean "
                       "and the corrupted prompts, so it takes --intervention patching only.")


def _default_top_n(n_edges: int) -> int:
    """Edges of the drawn circuit when --top-n is not given: 1% of the edges, at least 10 and at most 200 (a
    drawing of more is unreadable), never more than the graph has."""
    return min(n_edges, 200, max(10, int(0.01 * n_edges)))


def _ioi_data(model: HookedTransformer, args: argparse.Namespace):
    """IOI prompts for the model's tokenizer, checked against its context before any forward."""
    from hooklens.circuits.ioi import IOIDataset

    if model.tokenizer is None:
        raise CLIError("The model has no tokenizer; the IOI prompts are text. Give a --model with its tokenizer.")
    try:
        dataset = IOIDataset(args.n_prompts, seed=args.seed, counterfactual=args.counterfactual,
                             tokenizer=model.tokenizer)
    except ValueError as err:  # e.g. a name that is several tokens under this model's tokenizer
        raise CLIError(f"IOI data for this model's tokenizer: {err}") from err
    longest = max(dataset.n_tokens) + 1  # + BOS
    if longest > model.cfg.n_ctx:
        raise CLIError(f"The IOI prompts are up to {longest} tokens (BOS included), more than the model's "
                       f"n_ctx={model.cfg.n_ctx}.")
    return dataset


def run_circuit(args: argparse.Namespace) -> Dict[str, Any]:
    """`hooklens circuit`: edge attribution (EAP-IG's methods) on IOI prompts, then MIB's faithfulness curves (CPR
    from the signed-score ranking, CMD from the absolute one); the curve, the top circuit, EAP-IG's importances.json
    and summary.json.

    `--method exact --shard i/n --results-dir D` scores that shard's work units of edges into D and writes no --out
    (a run without --shard and the same --results-dir then only merges); under torchrun every rank scores its
    units, rank 0 writes --out."""
    start = time.perf_counter()
    _check_circuit_flags(args)
    shard = _check_circuit_shard_flags(args)
    with _process_group_from_launcher(args) as rank:
        if shard is not None or rank != 0:
            _circuit_units_only(args, shard)
            return {}
        return _run_circuit(args, start)


def _run_circuit(args: argparse.Namespace, start: float) -> Dict[str, Any]:
    """`hooklens circuit` in one process (or rank 0 of a launcher's group): attribution, faithfulness, --out."""
    # imported here: `hooklens --help` and the other commands need none of the circuits package
    from hooklens.circuits import interventions
    from hooklens.circuits.faithfulness import MIB_KS, mib_scores
    from hooklens.circuits.graph import Graph
    from hooklens.circuits.ioi import logit_diff_loss, logit_diff_per_prompt

    timings: Dict[str, float] = {}
    with staged_output(args.out, "circuit") as stage:
        model = load_model(args.model, args.device, args.dtype)
        try:
            interventions.check_supported(model)
        except ValueError as err:
            raise CLIError(str(err)) from err
        dataset = _ioi_data(model, args)
        dataloader = dataset.to_dataloader(args.batch)
        # MIB passes the task data as the mean interventions' data too
        intervention_data = dataloader if "mean" in args.intervention else None
        graph = Graph.from_model(model)
        n_edges = len(graph.edges)
        if args.top_n is not None and args.top_n > n_edges:
            raise CLIError(f"--top-n {args.top_n}: the model's graph has {n_edges} edges. Use --top-n {n_edges} or "
                           "less.")
        top_n = _default_top_n(n_edges) if args.top_n is None else args.top_n
        timings["load"] = time.perf_counter() - start

        tick = time.perf_counter()
        # MIB's attribution metric: the mean logit difference as a loss (an edge's score is its effect on it)
        _circuit_attribute(model, graph, dataloader, logit_diff_loss, args, intervention_data, None)
        timings["attribute"] = time.perf_counter() - tick
        graph.to_json(stage / "importances.json")

        tick = time.perf_counter()
        scores = mib_scores(model, graph, dataloader, logit_diff_per_prompt, intervention=args.intervention,
                            intervention_dataloader=intervention_data, quiet=args.quiet)
        timings["faithfulness"] = time.perf_counter() - tick

        tick = time.perf_counter()
        method = args.method + (f", {args.ig_steps} steps" if args.method in IG_METHODS else "")
        scores.plot(stage / "faithfulness.png",
                    title=f"{model.cfg.model_name}: {method}, {args.n_prompts} IOI prompts")
        graph.apply_topn(top_n, absolute=True, prune=True)
        graph.draw(stage / "circuit.png", title=f"Top {top_n} edges by |score| ({method}): "
                   f"{graph.count_included_edges()} after pruning")
        timings["figures"] = time.perf_counter() - tick

        summary = {
            "command": "hooklens circuit", "command_line": "hooklens " + shlex.join(args.argv),
            "model": model.cfg.model_name, "method": args.method,
            "ig_steps": args.ig_steps if args.method in IG_METHODS else None, "intervention": args.intervention,
            "n_prompts": args.n_prompts, "batch": args.batch, "seed": args.seed,
            "counterfactual": args.counterfactual, "n_edges": n_edges,
            "cpr": scores.cpr, "cmd": scores.cmd, "ks": list(MIB_KS),
            "faithfulness": {"signed": scores.signed.to_dict(), "absolute": scores.absolute.to_dict()},
            "baselines": {"clean_logit_diff": scores.signed.full_score,
                          "corrupted_logit_diff": scores.signed.empty_score},
            "top_circuit": {"top_n": top_n, "absolute": True, "edges": graph.count_included_edges(),
                            "nodes": graph.count_included_nodes()},
            "timings": timings,
            "seconds": time.perf_counter() - start,
        }
        save_summary(stage / "summary.json", summary)
        report.circuit_report(stage, summary, _report_rows(summary, _circuit_table(args, summary, scores, method)))
    _print_summary(Path(args.out), "hooklens circuit", summary, _circuit_table(args, summary, scores, method))
    return summary


def _check_circuit_shard_flags(args: argparse.Namespace) -> Optional[Tuple[int, int]]:
    """--shard / --results-dir of `hooklens circuit`, before anything is loaded: only --method exact (one patched
    run per edge) runs by work units; the gradient methods are a few passes over the data."""
    if (args.shard is not None or args.results_dir is not None) and args.method != "exact":
        raise CLIError(f"--shard / --results-dir: --method {args.method} is a few passes over the data and does not "
                       "run by work units; use --method exact, or drop --shard / --results-dir.")
    return _check_shard_flags(args)


def _circuit_attribute(model, graph, dataloader, metric, args: argparse.Namespace, intervention_data,
                       shard: Optional[Tuple[int, int]]) -> None:
    """The edge scores into `graph`: `exact` by work units (this shard's, the process group's share, kept in
    --results-dir) when --method exact runs sharded, else `attribute`."""
    from hooklens.circuits.attribute import attribute
    from hooklens.sharding import wants_units

    if args.method == "exact" and wants_units(shard, args.results_dir):
        from hooklens.circuits.exact import exact
        with warnings.catch_warnings():
            # A shard's scores are partial by design; the command says where its units went instead.
            warnings.filterwarnings("ignore", message="Shard .* work units are filled")
            exact(model, graph, dataloader, metric, intervention=args.intervention,
                  intervention_dataloader=intervention_data, quiet=args.quiet, shard=shard,
                  results_dir=args.results_dir)
        return
    attribute(model, graph, dataloader, metric, method=args.method, intervention=args.intervention,
              ig_steps=args.ig_steps, intervention_dataloader=intervention_data, quiet=args.quiet)


def _circuit_units_only(args: argparse.Namespace, shard: Optional[Tuple[int, int]]) -> None:
    """A --shard run, or a torchrun rank other than 0: score this process's units of edges (--method exact; the
    other methods have none, rank 0 runs them alone) and write no --out."""
    from hooklens.circuits import interventions
    from hooklens.circuits.graph import Graph
    from hooklens.circuits.ioi import logit_diff_loss

    if args.method != "exact":
        return
    model = load_model(args.model, args.device, args.dtype)
    try:
        interventions.check_supported(model)
    except ValueError as err:
        raise CLIError(str(err)) from err
    dataloader = _ioi_data(model, args).to_dataloader(args.batch)
    intervention_data = dataloader if "mean" in args.intervention else None  # as _run_circuit passes them
    _circuit_attribute(model, Graph.from_model(model), dataloader, logit_diff_loss, args, intervention_data, shard)
    if shard is not None:
        print(f"hooklens circuit: shard {shard[0]}/{shard[1]} done; its units are in --results-dir "
              f"{args.results_dir}. Run without --shard (same flags) to write {args.out}.")


def _circuit_table(args: argparse.Namespace, summary: Dict[str, Any], scores, method: str) -> List[tuple]:
    """The rows `hooklens circuit` prints."""
    n_edges = summary["n_edges"]
    return [
        ("model", summary["model"]),
        ("data", f"{args.n_prompts} IOI prompts ({args.counterfactual} counterfactuals), batches of {args.batch}"),
        ("method", f"{method}, intervention {args.intervention}"),
        ("edges", str(n_edges)),
        ("clean / corrupted logit diff", f"{scores.signed.full_score:.3f} / {scores.signed.empty_score:.3f}"),
        ("CPR (signed ranking, higher is better)", f"{scores.cpr:.3f}"),
        ("CMD (|score| ranking, lower is better)", f"{scores.cmd:.3f}"),
        ("f per k (|score| ranking)", " ".join(f"{f:.2f}" for f in scores.absolute.faithfulness)),
        ("top circuit (circuit.png)", f"{summary['top_circuit']['edges']} edges, "
         f"{summary['top_circuit']['nodes']} nodes"),
    ]


def save_summary(path: Path, summary: dict) -> None:
    """Write `summary` as strict JSON: NaN and infinities (which `json` would write as the non-JSON tokens NaN
    and Infinity) become null, with a warning naming where they were."""
    non_finite: List[str] = []
    clean = _finite_or_none(summary, "", non_finite)
    if non_finite:
        shown = ", ".join(non_finite[:8]) + (f" and {len(non_finite) - 8} more" if len(non_finite) > 8 else "")
        warnings.warn(f"{path}: {len(non_finite)} non-finite value(s) written as null ({shown}); the model "
                      "produced NaN or infinite numbers (try --dtype float32 or float64).", RuntimeWarning,
                      stacklevel=2)
    path.write_text(json.dumps(clean, indent=2, allow_nan=False))


def _finite_or_none(value: Any, where: str, non_finite: List[str]) -> Any:
    """`value` with every non-finite float replaced by None; their places (e.g. "mlp_patching[1][3]") are
    appended to `non_finite`."""
    if isinstance(value, float) and not math.isfinite(value):
        non_finite.append(where or "(the value)")
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v, f"{where}.{k}" if where else str(k), non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v, f"{where}[{i}]", non_finite) for i, v in enumerate(value)]
    return value


def _print_summary(out: Path, title: str, summary: dict, rows: Sequence[tuple]) -> None:
    """Print the result table (rows + where the files are + time)."""
    _print_table(title, [*rows, ("figures + summary.json", str(out)), ("seconds", f"{summary['seconds']:.1f}")])


def _report_rows(summary: dict, rows: Sequence[tuple]) -> List[tuple]:
    """The table of report.html: the printed rows and the run's time (the page sits beside the files)."""
    return [*rows, ("seconds", f"{summary['seconds']:.1f}")]


def _print_table(title: str, rows: Sequence[tuple]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def int_at_least(low: int, high: Optional[int] = None, also: Optional[str] = None):
    """An argparse type: an integer in [low, high] (or the word `also`, read as None), so that a bad value is a
    one-line usage error before anything is loaded."""
    def parse(text: str) -> Optional[int]:
        if also is not None and text == also:
            return None
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            allowed = f"an integer >= {low}" if high is None else f"an integer in {low} .. {high}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}" + (f" or {also!r}" if also else ""))
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooklens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, out: str) -> None:
        sub.add_argument("--model", default=None, help="GPT-2 checkpoint: HF-format directory or a name in the "
                         "local HF cache (default: the embedded model)")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
        sub.add_argument("--out", default=out, help=f"output directory (default: {out}); the run is written "
                         "beside it and moved in when complete, replacing a previous run of the same command")
        # torch takes seeds in [-2**63, 2**64 - 1]; the corrupted induction prompt uses seed + 1
        sub.add_argument("--seed", type=int_at_least(-2 ** 63, 2 ** 64 - 2), default=0)
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    induction = commands.add_parser("induction", help="induction heads on repeated random tokens")
    common(induction, "hooklens-induction")
    induction.add_argument("--seq-len", type=int_at_least(2), default=None,
                           help=f"random tokens before they repeat (default: {DEFAULT_SEQ_LEN}, or what fits in "
                           "the model's context)")
    induction.add_argument("--batch", type=int_at_least(1), default=4)
    induction.add_argument("--kcomp-rows", type=int_at_least(1, also="all"), default=2000,
                           help="vocabulary rows sampled for the K-composition top-1 accuracy ('all' for every row)")
    patch = commands.add_parser("patch", help="IOI-style residual-stream and head-output patching")
    common(patch, "hooklens-patch")
    patch.add_argument("--clean", default=IOI_CLEAN)
    patch.add_argument("--corrupted", default=IOI_CORRUPTED)
    patch.add_argument("--answer", default=" Mary", help="the clean prompt's answer (one token)")
    patch.add_argument("--wrong", default=" John", help="the corrupted prompt's answer (one token)")
    patch.add_argument("--shard", default=None, metavar="I/N",
                       help="compute only shard I of N of the sweeps' work units into --results-dir (no --out); a "
                       "run without --shard then merges them")
    patch.add_argument("--results-dir", default=None, metavar="DIR",
                       help="keep finished work units here: a rerun skips them (resumable), shards meet here")
    circuit = commands.add_parser("circuit", help="circuit discovery on IOI: edge attribution (EAP-IG) and MIB's "
                                  "faithfulness (CPR / CMD)")
    common(circuit, "hooklens-circuit")
    circuit.add_argument("--method", default="EAP-IG-inputs", choices=CIRCUIT_METHODS,
                         help="edge attribution method (default: EAP-IG-inputs)")
    circuit.add_argument("--ig-steps", type=int_at_least(1), default=5,
                         help="integration steps of EAP-IG-inputs / EAP-IG-activations (default: 5, as MIB)")
    circuit.add_argument("--intervention", default="patching", choices=CIRCUIT_INTERVENTIONS,
                         help="what edges outside a circuit carry (default: patching, the corrupted run)")
    circuit.add_argument("--n-prompts", type=int_at_least(1), default=100, help="IOI prompts (default: 100)")
    circuit.add_argument("--batch", type=int_at_least(1), default=20, help="prompts per batch (default: 20)")
    circuit.add_argument("--counterfactual", default="abc", choices=["abc", "s2"],
                         help="corrupted prompts: 'abc' (three new names) or 's2' (a new repeated subject)")
    circuit.add_argument("--shard", default=None, metavar="I/N",
                         help="--method exact: score only shard I of N of the edges' work units into --results-dir "
                         "(no --out); a run without --shard then merges them")
    circuit.add_argument("--results-dir", default=None, metavar="DIR",
                         help="--method exact: keep finished work units here: a rerun skips them (resumable), shards "
                         "meet here")
    circuit.add_argument("--top-n", type=int_at_least(1), default=None,
                         help="edges of the drawn circuit, by |score| (default: 1%% of the edges, 10 to 200)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad input (argparse's usage errors exit 2 too), 130 interrupted (Ctrl-C)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, recorded in summaries
    args.say = not args.quiet  # step messages: off with --quiet only
    # TQDM_DISABLE turns the progress bars off as for any tqdm bar: tqdm reads it only for bars made without an
    # explicit `disable=`, and the library's bars pass one (progress=...), so the command applies it here. Any
    # non-empty value counts, as in tqdm.
    args.quiet = args.quiet or bool(os.environ.get("TQDM_DISABLE", ""))
    torch.manual_seed(args.seed)
    commands = {"induction": run_induction, "patch": run_patch, "circuit": run_circuit}
    try:
        check_device(args.device)  # before --out is touched: no directory made for a run that cannot start
        commands[args.command](args)
    except CLIError as err:
        print(f"hooklens {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nhooklens {args.command}: interrupted; --out {args.out} holds no partial results.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
