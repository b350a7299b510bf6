"""Shared benchmark harness: timing, the workload registry, result records and the results log.

Every benchmark in this directory goes through here, so all results share one format:

* `time_fn(fn, warmup, repeats)` -> median wall-clock seconds of `fn()` (synchronizing CUDA around each call).
  A `Case` with `kernel_timing=True` is timed on CUDA with `triton.testing.do_bench` instead (CUDA events around
  many launches: a single kernel launch is as short as the host-side synchronize + clock around it).
* `@workload(name, ...)` registers a *setup* function `setup(ctx) -> Case`. A `Case` holds one zero-argument
  callable per implementation (`"hooklens"` plus one or more references such as `"transformer_lens"` or `"hf"`)
  and a `check(hooklens_out, reference_out) -> (ok, max_abs_diff)`. `run_workload` runs every implementation once,
  checks each reference's output against hooklens's, then times them all and returns one `Record` per reference.
* `append_results(records, device, log_path, ...)` appends one JSON row per record to the results log
  (`benchmarks/results.jsonl` by default; `result_rows` builds the rows).

Adding a workload: write `@workload("my_workload", references=("transformer_lens",))` over a setup function in a
module under `benchmarks/`, and list that module in `run.py`'s `WORKLOAD_MODULES`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
HOOKLENS = "hooklens"


# -- timing -----------------------------------------------------------------------------------------------------
# "wall": time.perf_counter (the default, and what the result files normally hold).
# "cpu": time.thread_time of the calling thread, for CPU runs with torch.set_num_threads(1) on a busy shared machine:
# it does not count the time this process spends descheduled, so other processes barely move it.
TIMERS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_timer_name = "wall"


def set_timer(name: str) -> None:
    global _timer_name
    if name not in TIMERS:
        raise ValueError(f"timer must be one of {sorted(TIMERS)}, got {name!r}")
    _timer_name = name


def timer_name() -> str:
    return _timer_name


def _sync(device: Optional[str]) -> None:
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, device: Optional[str] = None) -> float:
    """Median seconds of `fn()` over `repeats` timed calls after `warmup` untimed ones, under `torch.no_grad()`.

    With `device` on CUDA the GPU is synchronized before and after each call, so the time covers the kernels.
    """
    times = time_fn_all(fn, warmup, repeats, device)
    return statistics.median(times)


def time_fn_all(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, device: Optional[str] = None) -> List[float]:
    """Every timed call's seconds (see `time_fn`)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    times: List[float] = []
    clock = TIMERS[_timer_name]
    with torch.no_grad():
        for _ in range(max(warmup, 0)):
            fn()
        _sync(device)
        for _ in range(repeats):
            _sync(device)
            start = clock()
            out = fn()
            _sync(device)
            times.append(clock() - start)
            del out
    return times


def time_kernel_all(fn: Callable[[], Any], repeats: int) -> List[float]:
    """Seconds per call of a CUDA kernel launch `fn`, one sample per repeat: each sample is the median of
    `triton.testing.do_bench` (CUDA events around many launches, L2 flushed between them)."""
    from triton.testing import do_bench  # lazy: triton is an optional dependency, needed only on CUDA

    with torch.no_grad():
        return [do_bench(fn, return_mode="median") / 1e3 for _ in range(repeats)]  # do_bench reports ms


# -- workloads --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """What one workload runs: one callable per implementation, and how to compare their outputs."""

    impls: Dict[str, Callable[[], Any]]  # "hooklens" plus one or more references
    check: Callable[[Any, Any], Tuple[bool, float]]  # (hooklens_out, reference_out) -> (agree, max_abs_diff)
    shape: str  # e.g. "4x128"; printed as is
    # Per-workload overrides of the run's warmup / repeats (heavy workloads time fewer calls).
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    note: str = ""
    # Called after timing, for notes that depend on what the run measured (e.g. peak memory); appended to `note`.
    note_fn: Optional[Callable[[], str]] = None
    # Each callable is one kernel launch: on CUDA time it with CUDA events (`time_kernel_all`), not the host clock.
    kernel_timing: bool = False
    # The reference is the workload's floor (e.g. a copy moving the kernel's minimum bytes): ratio is then the
    # fraction of the floor reached, recorded as `floor_fraction` too.
    reference_is_floor: bool = False
    # Matmul FLOPs of the workload's ideal algorithm (e.g. `flop_floor.sweep_floor`): the run then measures the
    # dense GEMM rate once (`flop_floor.gemm_peak_flops`) and records floor_s = flops / rate and, for hooklens and
    # each reference, floor_s / its time (the fraction of the floor reached).
    flops: Optional[float] = None


@dataclass
class Workload:
    name: str
    setup: Callable[["Context"], Case]
    references: Tuple[str, ...]
    description: str = ""
    max_repeats: Optional[int] = None  # cap on repeats (e.g. a loop of many forwards)


WORKLOADS: Dict[str, Workload] = {}


def workload(name: str, references: Sequence[str] = ("transformer_lens",), description: str = "",
             max_repeats: Optional[int] = None) -> Callable[[Callable[["Context"], Case]], Callable[["Context"], Case]]:
    """Register `setup(ctx) -> Case` as the workload `name` (names must be unique across modules)."""

    def register(setup: Callable[["Context"], Case]) -> Callable[["Context"], Case]:
        if name in WORKLOADS and WORKLOADS[name].setup is not setup:
            raise ValueError(f"Workload {name!r} is already registered (by {WORKLOADS[name].setup.__module__}).")
        WORKLOADS[name] = Workload(name, setup, tuple(references), description or (setup.__doc__ or "").strip(),
                                   max_repeats)
        return setup

    return register


@dataclass
class Context:
    """Run-wide settings and lazily built, shared models (see `models.py`)."""

    device: str
    dtype: torch.dtype
    batch: int
    seq: int
    warmup: int
    repeats: int
    seed: int = 0
    options: Dict[str, Any] = field(default_factory=dict)  # workload-specific knobs (e.g. patch_positions)
    _cache: Dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, build: Callable[[], Any]) -> Any:
        """Build `key` once per run and share it between workloads (models, checkpoints, inputs)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass
class Record:
    workload: str
    shape: str
    dtype: str
    hooklens_s: float
    reference: str
    reference_s: float
    ratio: float  # reference_s / hooklens_s: > 1 means hooklens is faster
    checked: bool
    max_abs_diff: Optional[float] = None
    # Fastest timed call of each (contention on a shared machine only ever adds time, so the minimum is the
    # steadier number there; the median stays the headline).
    hooklens_min_s: Optional[float] = None
    reference_min_s: Optional[float] = None
    repeats: Optional[int] = None
    note: str = ""
    floor_fraction: Optional[float] = None  # ratio, when the reference is the workload's floor (see Case)
    timing: str = "host"  # "host": the run's timer around each call; "cuda_events": triton.testing.do_bench
    # Where the Case gives `flops`: the floor's FLOPs, the run's measured dense GEMM rate (FLOP/s), the floor's
    # time at that rate, and floor_s / hooklens_s, floor_s / reference_s.
    flops: Optional[float] = None
    gemm_flops_per_s: Optional[float] = None
    floor_s: Optional[float] = None
    hooklens_floor_fraction: Optional[float] = None
    reference_floor_fraction: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def gemm_rate(ctx: "Context") -> float:
    """The run's dense GEMM rate in FLOP/s on its device and dtype, measured once per run (`flop_floor`)."""
    import flop_floor  # lazy: a sibling module, imported only by runs with a FLOP floor

    return ctx.get("gemm_flops_per_s", lambda: flop_floor.gemm_peak_flops(ctx.device, ctx.dtype))


class WorkloadSkipped(Exception):
    """Raised by a setup function when the workload cannot run here (e.g. a GPU-only kernel on a CPU run)."""


def run_workload(w: Workload, ctx: Context, log: Callable[[str], None] = print) -> List[Record]:
    """Set up `w`, check each reference against hooklens, time every implementation, return one record each.

    A setup that raises `WorkloadSkipped` produces no records (the reason is logged)."""
    try:
        case = w.setup(ctx)
    except WorkloadSkipped as reason:
        log(f"  skip {w.name}: {reason}")
        return []
    missing = [name for name in (HOOKLENS, *w.references) if name not in case.impls]
    if missing:
        raise ValueError(f"Workload {w.name!r} did not provide implementations {missing}.")
    warmup = ctx.warmup if case.warmup is None else case.warmup
    repeats = ctx.repeats if case.repeats is None else case.repeats
    if w.max_repeats is not None:
        repeats = max(1, min(repeats, w.max_repeats))

    # One untimed call per implementation: it is both the correctness check and a warmup call.
    with torch.no_grad():
        hooklens_out = case.impls[HOOKLENS]()
        _sync(ctx.device)
        checks: Dict[str, Tuple[bool, float]] = {}
        for ref in w.references:
            ref_out = case.impls[ref]()
            _sync(ctx.device)
            ok, diff = case.check(hooklens_out, ref_out)
            checks[ref] = (bool(ok), float(diff))
            status = "ok" if ok else "MISMATCH"
            log(f"  check {w.name} vs {ref}: {status} (max |diff| {diff:.3g})")
            del ref_out
        del hooklens_out
    warm_left = max(warmup - 1, 0)

    # Interleave the implementations (hooklens, ref1, ref2, hooklens, ...) so that a slow spell of the machine
    # (another process, thermal throttling) hits all of them alike instead of one implementation's block.
    names = (HOOKLENS, *w.references)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    cuda_events = case.kernel_timing and str(ctx.device).startswith("cuda")
    with torch.no_grad():
        for _ in range(warm_left):
            for name in names:
                case.impls[name]()
        for _ in range(repeats):
            for name in names:
                if cuda_events:
                    samples[name] += time_kernel_all(case.impls[name], 1)
                else:
                    samples[name] += time_fn_all(case.impls[name], 0, 1, ctx.device)
    times = {name: statistics.median(samples[name]) for name in names}
    for name in names:
        spread = f", min {min(samples[name]) * 1e3:.1f} max {max(samples[name]) * 1e3:.1f}" if repeats > 1 else ""
        log(f"  time  {w.name} {name}: {times[name] * 1e3:.1f} ms (median of {repeats}{spread})")

    note = "; ".join(part for part in (case.note, case.note_fn() if case.note_fn else "") if part)
    if note:
        log(f"  note  {w.name}: {note}")
    floor = {}
    if case.flops is not None:
        rate = gemm_rate(ctx)
        floor_s = case.flops / rate
        floor = dict(flops=float(case.flops), gemm_flops_per_s=rate, floor_s=floor_s,
                     hooklens_floor_fraction=floor_s / times[HOOKLENS])
        log(f"  floor {w.name}: {case.flops / 1e9:.2f} GFLOP = {floor_s * 1e3:.1f} ms at the measured GEMM rate "
            f"{rate / 1e9:.1f} GFLOP/s; " + ", ".join(f"{name} {floor_s / times[name]:.1%}" for name in names)
            + " of it")
    records = []
    for ref in w.references:
        ok, diff = checks[ref]
        ratio = times[ref] / times[HOOKLENS]
        records.append(Record(
            workload=w.name, shape=case.shape, dtype=ctx.dtype_name, hooklens_s=times[HOOKLENS], reference=ref,
            reference_s=times[ref], ratio=ratio, checked=ok, max_abs_diff=diff,
            hooklens_min_s=min(samples[HOOKLENS]), reference_min_s=min(samples[ref]), repeats=repeats, note=note,
            floor_fraction=ratio if case.reference_is_floor else None,
            timing="cuda_events" if cuda_events else "host",
            reference_floor_fraction=floor["floor_s"] / times[ref] if floor else None,
            **floor,
        ))
    return records


# -- metadata ---------------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: str) -> str:
    """"cpu", or the CUDA device's name slugified (e.g. "nvidia-h100-80gb-hbm3")."""
    if str(device).startswith("cuda"):
        return slugify(torch.cuda.get_device_name(torch.device(device)))
    return slugify(str(device))


def git_commit(root: Path = REPO_ROOT) -> Optional[str]:
    """`git rev-parse --short HEAD`, plus "-dirty" if tracked or untracked files differ from it (rows appended to
    the results log itself do not count: the code measured is still HEAD's).

    Without a git checkout (a copied working tree on a GPU machine) the environment variable HOOKLENS_COMMIT,
    set by whoever copied the tree, names the commit."""
    if os.environ.get("HOOKLENS_COMMIT"):
        return os.environ["HOOKLENS_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results.jsonl"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if status else "")


def triton_version() -> Optional[str]:
    try:
        import triton  # type: ignore
    except Exception:
        return None
    return getattr(triton, "__version__", None)


def command_line() -> str:
    return "python " + shlex.join(sys.argv)


# -- output -----------------------------------------------------------------------------------------------------
def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def markdown_table(records: Sequence[Record]) -> str:
    """One row per record; with FLOP floors (`Case.flops`) also the floor's time and the fraction of it that
    hooklens and the reference reach."""
    floors = any(r.floor_s is not None for r in records)
    header = "| workload | shape | dtype | hooklens | reference | reference time | ratio (ref / hooklens) | checked |"
    rule = "|---|---|---|---:|---|---:|---:|:---:|"
    if floors:
        header += " FLOP floor | hooklens / floor | reference / floor |"
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for r in records:
        checked = "yes" if r.checked else f"NO (max diff {r.max_abs_diff:.3g})"
        line = (f"| {r.workload} | {r.shape} | {r.dtype} | {_fmt_s(r.hooklens_s)} | {r.reference} | "
                f"{_fmt_s(r.reference_s)} | {r.ratio:.2f}x | {checked} |")
        if floors:
            line += (f" {r.flops / 1e9:.1f} GFLOP = {_fmt_s(r.floor_s)} | {r.hooklens_floor_fraction:.1%} | "
                     f"{r.reference_floor_fraction:.1%} |" if r.floor_s is not None else " | | |")
        lines.append(line)
    return "\n".join(lines)


RESULTS_LOG = REPO_ROOT / "benchmarks" / "results.jsonl"
# The leading keys of every results-log row, in this order; the rest follow.
ROW_KEYS = ("workload", "device", "dtype", "reference", "hooklens_s", "reference_s", "ratio", "floor_fraction",
            "commit", "date", "command")
# Row keys left out where a workload does not set them (they belong to floors only some workloads have).
_ONLY_WHEN_SET = ("floor_fraction", "flops", "gemm_flops_per_s", "floor_s", "hooklens_floor_fraction",
                  "reference_floor_fraction")


def run_metadata(device: str, extra: Optional[Dict[str, Any]] = None, date: Optional[str] = None,
                 commit: Optional[str] = None) -> Dict[str, Any]:
    """What every row of one run shares: device, date, commit, command, versions, timer and the run's settings.
    `commit`: the one read when the run started (a long run outlives commits made meanwhile); default: now."""
    return {
        "device": device_slug(device),
        "date": date or _dt.date.today().isoformat(),
        "commit": commit or git_commit(),
        "command": command_line(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "timer": _timer_name,
        "run": dict(extra or {}),
    }


def result_rows(records: Sequence[Record], meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One results-log row per record: `ROW_KEYS` first (`floor_fraction` only where the reference is a floor),
    then the record's other fields (the FLOP-floor ones only where the workload has a floor) and the run's
    metadata."""
    rows = []
    for record in records:
        merged = {**record.to_json(), **meta}
        for key in _ONLY_WHEN_SET:
            if merged.get(key) is None:
                merged.pop(key, None)
        rows.append({**{k: merged.pop(k) for k in ROW_KEYS if k in merged}, **merged})
    return rows


def append_results(records: Sequence[Record], device: str, log_path: Path | str = RESULTS_LOG,
                   extra: Optional[Dict[str, Any]] = None, commit: Optional[str] = None) -> List[Dict[str, Any]]:
    """Append one JSON line per record to `log_path` (created if missing); returns the rows written."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rows = result_rows(records, run_metadata(device, extra, commit=commit))
    with log_path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows
