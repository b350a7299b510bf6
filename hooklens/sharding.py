"""Sweeps split over processes, GPUs, nodes and job-array tasks, and resumable from a results directory.

A sweep's variants (the rows of `PatchSweep.indices`) are cut into **work units** of `unit_size` consecutive
variants. The cut depends only on the number of variants (`default_unit_size`), never on how many workers run it,
so a results directory written by 4 workers can be finished by 1, or by 8. Unit `u` belongs to shard `u % count`
(round robin: every shard gets units from every layer, so the shards' work is balanced).
`run_sharded` runs the patching sweeps this way (one `run_sweep` call per unit, all on one `prepare_sweep`: one
corrupted forward per process); `plan_units` + `run_units` run any sweep of n items (`hooklens.circuits.exact`: its
edges in receiver order, one process-wide clean run).

Which shard a process runs, first match wins:

1. an explicit `shard=(i, n)` (`--shard i/n` on the command line);
2. an initialized `torch.distributed` process group: its rank and world size (torchrun, accelerate, a script's own
   `init_process_group`);
3. `RANK` / `WORLD_SIZE` in the environment (a launcher without a process group);
4. `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT` (a SLURM job array, task ids 0..count-1);
5. otherwise the whole sweep, `(0, 1)`.

With a process group (case 2) every rank gets the whole result: the ranks' units are gathered (`all_gather`), so a
script written for one process works unchanged under torchrun. Before gathering, the ranks check they run the same
sweep (a rank with other prompts or another model is an error naming it), and on gloo a `monitored_barrier` with the
group's timeout names a rank that never arrives instead of hanging. Otherwise a sharded run returns the full-shape
result with only its own units filled (NaN elsewhere; a warning says so): the units are in `results_dir`, and a
rerun without a shard (or `merge`) assembles them.

With `results_dir`, each finished unit is written atomically (a temporary file renamed into place) as
`<results_dir>/<sweep key>/unit-XXXXX.pt` (plain tensors and strings, read back with `weights_only=True`), and
`sweep.json` beside it records what the units belong to: the model's fingerprint (its config and a hash of its
weights' bytes) and the sweep's (activation, indices, prompts, the clean activations patched in, metric, metric
positions, precision, unit size, the files' format). A run whose model or sweep differs is refused before any
forward, naming what differs. A rerun skips the finished units (logged), so a run preempted or killed after some
units computes only the rest, and a run whose units are all present only loads them.

The device: hooklens runs the sweep where the model is. Under torchrun with GPUs, put each process's model on its
own GPU first: `model.to(f"cuda:{os.environ['LOCAL_RANK']}")` (`local_device()` returns that device).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hooklens.errors import InvalidInputError
from hooklens.progress import bar_disabled
from hooklens.sweeps import PatchSweep, PreparedSweep, attach_partial, prepare_sweep, run_sweep
from hooklens.utils import get_act_name

logger = logging.getLogger(__name__)

FORMAT = 2  # bumped when the unit files' layout or fingerprints change: older units are then refused, not misread
# Units per sweep the default size aims at: enough for 64 workers and frequent checkpoints, few enough that the
# per-unit cost (the chunks' fixed overhead: the corrupted run is prepared once per process) stays small.
TARGET_UNITS = 64
MIN_UNIT_SIZE = 8


class ResultsMismatchError(InvalidInputError):
    """A results directory holds units of another model or another sweep."""


def default_unit_size(n_variants: int) -> int:
    """Variants per work unit: `n / TARGET_UNITS` rounded up, at least `MIN_UNIT_SIZE`; a function of the sweep
    only, so that every worker count cuts the same units."""
    return max(MIN_UNIT_SIZE, math.ceil(n_variants / TARGET_UNITS))


def _process_group():
    """The default `torch.distributed` process group when one is initialized, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def _env_pair(index_name: str, count_name: str) -> Optional[Tuple[int, int]]:
    if index_name not in os.environ or count_name not in os.environ:
        return None
    try:
        return int(os.environ[index_name]), int(os.environ[count_name])
    except ValueError:
        raise InvalidInputError(f"{index_name}={os.environ[index_name]!r} / {count_name}={os.environ[count_name]!r}"
                                " are not integers; unset them or pass shard=(i, n).") from None


def resolve_shard(shard: Optional[Tuple[int, int]] = None) -> Tuple[int, int, str]:
    """`(index, count, source)` of the shard this process runs (see the module docstring for the order)."""
    source = "shard="
    if shard is None and _process_group() is not None:
        shard, source = (torch.distributed.get_rank(), torch.distributed.get_world_size()), "torch.distributed"
    if shard is None:
        shard, source = _env_pair("RANK", "WORLD_SIZE"), "RANK/WORLD_SIZE"
    if shard is None:
        shard, source = _env_pair("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), \
            "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    if shard is None:
        return 0, 1, "default"
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise InvalidInputError(f"shard must be a pair (index, count), e.g. (0, 2), got {shard!r}.") from None
    if count < 1 or not 0 <= index < count:
        raise InvalidInputError(f"shard {index}/{count} (from {source}): the index must be in 0..count-1 and the "
                                "count at least 1, e.g. (0, 2) and (1, 2) for two workers.")
    return index, count, source


def parse_shard(text: str) -> Tuple[int, int]:
    """`"i/n"` (the command line's `--shard`) as `(i, n)`, checked."""
    parts = text.split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise InvalidInputError(f"--shard {text!r}: write it as INDEX/COUNT, e.g. 0/2 and 1/2.") from None
    resolve_shard((index, count))
    return index, count


def local_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` when CUDA is available (LOCAL_RANK from the launcher, default 0),
    else the CPU. hooklens never moves a model: call `model.to(local_device())` before the sweep."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# -- fingerprints ---------------------------------------------------------------------------------------------------
def digest(*parts) -> str:
    """A short SHA-256 of `parts`: tensors by dtype, shape and bytes (wherever they are), lists / tuples / dicts
    (sorted keys) item by item, anything else as JSON (`str` for what JSON cannot write)."""
    h = hashlib.sha256()
    for part in parts:
        _update(h, part)
    return h.hexdigest()[:16]


def _update(h, part) -> None:
    if isinstance(part, Tensor):
        part = part.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor:{part.dtype}:{part.numel()}:".encode())
        h.update(part.view(torch.uint8).numpy() if part.numel() else b"")  # a uint8 view: bfloat16 has no numpy dtype
    elif isinstance(part, (list, tuple)):
        h.update(f"list:{len(part)}:".encode())
        for item in part:
            _update(h, item)
    elif isinstance(part, dict):
        h.update(f"dict:{len(part)}:".encode())
        for name in sorted(part, key=str):
            _update(h, str(name))
            _update(h, part[name])
    else:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    h.update(b"\x00")


def _tensor_sums(tensors: Sequence[Tensor]) -> Tensor:
    """[len(tensors), 4] float64: each tensor's sum, sum of squares, position-weighted sum (a permutation of its
    entries changes it) and element count, computed where the tensors are and copied to the host once."""
    rows = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) / max(flat.numel(), 1)
        count = torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device)
        rows.append(torch.stack([flat.sum(), flat.square().sum(), (flat * weights).sum(), count]))
    return torch.stack(rows).cpu()


# Fields compared with a tolerance, not for equality: computed activations, whose last bits differ between devices
# and kernels (a sweep sharded over GPUs and merged on a CPU node patches in the same clean run). Relative to each
# statistic's largest possible size (sqrt(count * sum of squares) for the sums): GPU and CPU runs of one prompt
# agree to ~1e-6, while another prompt, even one token apart, moves them by ~1e-2.
APPROX_FIELDS = {"clean_activations": 1e-4}


def _same(field: str, ours: Optional[str], theirs: Optional[str]) -> bool:
    """Whether two fingerprint values are the same (within APPROX_FIELDS' tolerance for those fields)."""
    if field not in APPROX_FIELDS or ours is None or theirs is None or ours == theirs:
        return ours == theirs
    try:
        a, b = torch.tensor(json.loads(ours), dtype=torch.float64), torch.tensor(json.loads(theirs),
                                                                                   dtype=torch.float64)
    except (ValueError, TypeError):
        return False
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 4 or not torch.equal(a[:, 3], b[:, 3]):
        return False
    scale = (a[:, 3] * a[:, 1].abs()).sqrt().clamp(min=1e-30)[:, None]  # [tensors, 1]: bound of |sum|, |w. sum|
    sums_close = ((a[:, [0, 2]] - b[:, [0, 2]]).abs() <= APPROX_FIELDS[field] * scale).all()
    squares_close = ((a[:, 1] - b[:, 1]).abs() <= APPROX_FIELDS[field] * a[:, 1].abs().clamp(min=1e-30)).all()
    return bool(sums_close and squares_close)


def _differing(ours: Dict[str, Dict[str, str]], theirs: Dict[str, Dict[str, str]]) -> List[Tuple[str, str]]:
    """(part, field) of every fingerprint field of `ours` that `theirs` lacks or holds another value of."""
    return [(part, field) for part in ("model", "sweep") for field, value in ours[part].items()
            if not _same(field, value, theirs.get(part, {}).get(field))]


def model_fingerprint(model) -> Dict[str, str]:
    """What identifies a model's results: a hash of its config and a SHA-256 of its parameters' names, dtypes,
    shapes and bytes (a GPU model's copied to the host one parameter at a time). Exact and the same on every
    device: hooklens processes checkpoint weights on the CPU before moving them, so a model loaded on a GPU holds
    the bytes of the same model loaded on the CPU. (SHA-256 reads ~1 GB/s: 0.6 s for GPT-2 small's 163M float32
    parameters, where float64 sums took 5.8 s.)"""
    config = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else vars(model.cfg)
    config = {k: v for k, v in config.items() if k not in ("device", "n_devices")}  # the same model anywhere
    weights = hashlib.sha256()
    for name, param in model.named_parameters():
        data = param.detach().contiguous().cpu().reshape(-1)  # no copy for a contiguous CPU parameter
        weights.update(f"{name}:{data.dtype}:{tuple(param.shape)}".encode())
        # the bytes through a uint8 view: bfloat16 has no numpy dtype
        weights.update(data.view(torch.uint8).numpy() if data.numel() else b"")
    return {"model_name": str(config.get("model_name")), "config": digest(config),
            "weights": weights.hexdigest()[:16]}


def callable_name(fn) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def sweep_fingerprint(sweep: PatchSweep, corrupted_tokens: Tensor, clean_cache, metric: Callable,
                      metric_positions, unit_size: int, extra: Optional[dict] = None) -> Dict[str, str]:
    """What identifies a sweep's results: its patches, prompts, the clean activations it patches in, the metric
    (by name), the metric positions, the unit size and `extra` (e.g. the precision)."""
    layers = sorted(set(sweep.indices[:, 0].tolist()))
    clean = [clean_cache[get_act_name(sweep.activation_name, layer)] for layer in layers]
    positions = metric_positions.tolist() if isinstance(metric_positions, Tensor) else metric_positions
    return {
        "activation": sweep.activation_name,
        "patches": digest(sweep.indices, sweep.start_positions, list(sweep.axes or ()),
                          callable_name(sweep.patch_setter) if sweep.patch_setter is not None else None),
        "tokens": digest(corrupted_tokens.long()),
        "clean_activations": json.dumps(_tensor_sums(clean).tolist()),  # compared with a tolerance
        "metric": callable_name(metric),
        "metric_positions": json.dumps(positions, default=str),
        "n_variants": str(len(sweep.indices)),
        "unit_size": str(unit_size),
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
        "format": str(FORMAT),
    }


# -- the results directory ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Store:
    """One sweep's units under `results_dir/key`."""

    directory: Path
    meta: Dict[str, Dict[str, str]]  # {"model": ..., "sweep": ...}

    def unit_path(self, unit: int) -> Path:
        return self.directory / f"unit-{unit:05d}.pt"

    def check(self, found: Dict[str, Dict[str, str]], where: Path) -> None:
        """Refuse `found` (a manifest's or unit's metadata) unless it is this run's, naming the first field that
        differs."""
        for part, field in _differing(self.meta, found)[:1]:
            ours, theirs = self.meta[part][field], found.get(part, {}).get(field)
            raise ResultsMismatchError(
                f"{where} holds results of another {part}: its {field} is {_short(theirs)!r}, this run's is "
                f"{_short(ours)!r}. Use another results_dir for this run (or delete {self.directory} to recompute "
                "it there).")

    def open(self) -> None:
        """Create the directory, or check the manifest a previous run left (before any forward)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "sweep.json"
        if manifest.exists():
            self.check(json.loads(manifest.read_text()), manifest)
        else:
            _atomic_write(manifest, lambda f: f.write(json.dumps(self.meta, indent=1).encode()))

    def load(self, unit: int, size: int) -> Optional[Tensor]:
        path = self.unit_path(unit)
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.check(json.loads(saved.get("meta", "{}")), path)
        values = saved["values"]
        if saved.get("unit") != unit or values.shape != (size,):
            raise ResultsMismatchError(f"{path} is unit {saved.get('unit')} of {tuple(values.shape)} values, "
                                       f"expected unit {unit} of {size}; delete it to recompute it.")
        return values

    def save(self, unit: int, values: Tensor) -> None:
        payload = {"values": values.detach().float().cpu(), "unit": unit, "format": FORMAT,
                   "meta": json.dumps(self.meta)}
        _atomic_write(self.unit_path(unit), lambda f: torch.save(payload, f))


def _short(value: Optional[str]) -> Optional[str]:
    """A fingerprint value for a message: long ones (the clean activations' statistics) cut."""
    return value if value is None or len(value) <= 80 else value[:77] + "..."


def _atomic_write(path: Path, write: Callable) -> None:
    """Write `path` through a temporary file in its directory and a rename: readers (a concurrent worker, a
    rerun after a kill) see the old file or the whole new one, never half of one."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def merge(results_dir, key: str) -> Tuple[Tensor, Tensor]:
    """The units of sweep `key` (a subdirectory of `results_dir`; the patching functions name them
    `<activation>-<index axes>`) assembled without a model: `(values [n] float32, NaN where missing; done [n]
    bool)`. A rerun of the same call with the same `results_dir` and no shard returns the full, shaped result."""
    directory = Path(results_dir) / key
    manifest = directory / "sweep.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist: no sharded run wrote sweep {key!r} into {results_dir}.")
    meta = json.loads(manifest.read_text())
    n, unit_size = int(meta["sweep"]["n_variants"]), int(meta["sweep"]["unit_size"])
    store = _Store(directory, {"model": meta["model"], "sweep": meta["sweep"]})
    values = torch.full((n,), float("nan"))
    done = torch.zeros(n, dtype=torch.bool)
    for unit, start in enumerate(range(0, n, unit_size)):
        stop = min(n, start + unit_size)
        loaded = store.load(unit, stop - start)
        if loaded is not None:
            values[start:stop], done[start:stop] = loaded, True
    return values, done


# -- running a sweep by units ---------------------------------------------------------------------------------------
def wants_units(shard, results_dir) -> bool:
    """Whether a sweep runs by units: an explicit shard, a results directory, or an initialized process group.
    Without any of them it runs whole, as before. (RANK / SLURM variables alone do not shard a run without a
    results directory: its other units would be lost.)"""
    return shard is not None or results_dir is not None or _process_group() is not None


def run_sharded(model, corrupted_tokens: Tensor, clean_cache, metric: Callable[[Tensor], Tensor], sweep: PatchSweep,
                metric_positions=None, memory_budget: Optional[int] = None, progress: bool = True, *,
                shard: Optional[Tuple[int, int]] = None, results_dir=None, key: Optional[str] = None,
                unit_size: Optional[int] = None, extra: Optional[dict] = None) -> Tensor:
    """`run_sweep`'s result ([n] float32), computed by work units (`plan_units`, `run_units`): one `run_sweep` call
    per unit, on the unit's variants, all against one `prepare_sweep` per process (made before the first unit this
    process computes, never when every unit is loaded): the corrupted forward and the metric check run once, not
    once per unit. Each unit still chunks only its own variants, so its values do not depend on the shard."""
    n = len(sweep.indices)
    unit_size = int(unit_size) if unit_size is not None else default_unit_size(n)
    prepared: List[PreparedSweep] = []  # filled by the first unit computed

    def compute(start: int, stop: int) -> Tensor:
        if not prepared:
            prepared.append(prepare_sweep(model, corrupted_tokens, metric, sweep, metric_positions, memory_budget))
        part = dataclasses.replace(sweep, indices=sweep.indices[start:stop],
                                   start_positions=sweep.start_positions[start:stop])
        return run_sweep(model, corrupted_tokens, clean_cache, metric, part, metric_positions, memory_budget, False,
                         prepared=prepared[0])

    def fingerprint() -> Dict[str, Dict[str, str]]:
        return {"model": model_fingerprint(model),
                "sweep": sweep_fingerprint(sweep, corrupted_tokens, clean_cache, metric, metric_positions, unit_size,
                                           extra)}

    plan = plan_units(n, fingerprint, unit_size=unit_size, shard=shard, results_dir=results_dir, key=key)
    values, _ = run_units(compute, plan, model.W_E.device, progress=progress, desc=f"{sweep.activation_name} units",
                          stacklevel=4)
    return values


@dataclasses.dataclass
class UnitPlan:
    """Which work units of a sweep of `n` items this process runs, and where finished ones are kept (`plan_units`).
    Unit u is items [u * unit_size, (u + 1) * unit_size)."""

    n: int
    unit_size: int
    index: int  # this process's shard ...
    count: int  # ... of this many
    source: str  # where the shard came from (`resolve_shard`)
    group: Optional[object]  # the process group whose ranks split the units, or None
    store: Optional[_Store]
    key: Optional[str]

    @property
    def n_units(self) -> int:
        return math.ceil(self.n / self.unit_size)

    @property
    def mine(self) -> List[int]:
        return [u for u in range(self.n_units) if u % self.count == self.index]


def plan_units(n: int, fingerprint: Callable[[], Dict[str, Dict[str, str]]], *, unit_size: int,
               shard: Optional[Tuple[int, int]] = None, results_dir=None, key: Optional[str] = None) -> UnitPlan:
    """The checks a unit run makes before any work: the shard (see the module docstring), under a process group
    that every rank runs the same sweep, and with `results_dir` that `results_dir/key` holds this sweep's units
    (else `ResultsMismatchError`). `fingerprint()` (called only with a results directory or a process group)
    returns `{"model": ..., "sweep": ...}` string fields; the sweep's must hold `n_variants` and `unit_size` (for
    `merge`)."""
    if unit_size < 1:
        raise InvalidInputError(f"unit_size must be at least 1, got {unit_size}.")
    if results_dir is None and shard is None and _process_group() is None:
        shard = (0, 1)  # RANK / SLURM variables alone do not shard a run whose other units would be lost
    index, count, source = resolve_shard(shard)
    group = _process_group() if source == "torch.distributed" else None
    if results_dir is not None and not key:
        raise InvalidInputError("results_dir needs a key naming the sweep's subdirectory.")
    meta = fingerprint() if results_dir is not None or group is not None else None
    if group is not None:
        _check_same_sweep(meta, key)
    store = _Store(Path(results_dir) / key, meta) if results_dir is not None else None
    if store is not None:
        store.open()
    return UnitPlan(n, unit_size, index, count, source, group, store, key)


def run_units(compute: Callable[[int, int], Tensor], plan: UnitPlan, device, *, progress: bool = True,
              desc: str = "units", stacklevel: int = 3) -> Tuple[Tensor, Tensor]:
    """`(values [n] float32, done [n] bool)`: `plan`'s units for this process, each loaded from the results
    directory or computed with `compute(start, stop)` (-> [stop - start] values) and saved there. With a process
    group every rank returns the whole result; otherwise the other shards' units are NaN (done False) unless they
    are in the results directory, with a warning `stacklevel` frames up. An exception carries `partial_result` /
    `done`."""
    mine = plan.mine
    values = torch.full((plan.n,), float("nan"), dtype=torch.float32, device=device)
    done = torch.zeros(plan.n, dtype=torch.bool, device=device)
    computed = _run_units(compute, plan.store, mine, plan.unit_size, values, done, progress, desc)
    logger.info("%s: shard %d/%d (%s): %d units of %d, %d found in results_dir, %d computed.", plan.key or "sweep",
                plan.index, plan.count, plan.source, len(mine), plan.n_units, len(mine) - computed, computed)
    if plan.group is not None:
        return _gather(values, plan.unit_size, plan.count), torch.ones_like(done)
    if plan.count > 1:
        where = f"; the others are in {plan.store.directory} once their shards finish, and a rerun without a " \
                "shard (same arguments, same results_dir) returns the whole result" if plan.store is not None else ""
        warnings.warn(f"Shard {plan.index}/{plan.count}: only this shard's {len(mine)} of {plan.n_units} work units "
                      f"are filled, the rest of the result is NaN{where}.", stacklevel=stacklevel)
    return values, done


def _run_units(compute: Callable[[int, int], Tensor], store: Optional[_Store], units: List[int], unit_size: int,
               values: Tensor, done: Tensor, progress: bool, desc: str) -> int:
    """Fill `values` / `done` at `units` (loaded from `store`, else computed and saved); returns how many were
    computed. An exception carries the whole sweep's finished work (a unit's own partial result included, when
    `compute` attached one)."""
    from tqdm.auto import tqdm

    n, computed = len(values), 0
    bar = tqdm(total=len(units), desc=desc, disable=bar_disabled(progress))
    try:
        for unit in units:
            start, stop = unit * unit_size, min(n, (unit + 1) * unit_size)
            loaded = store.load(unit, stop - start) if store is not None else None
            if loaded is None:
                try:
                    loaded = compute(start, stop)
                except BaseException as exc:
                    unit_partial, unit_done = getattr(exc, "partial_result", None), getattr(exc, "done", None)
                    if unit_partial is not None and unit_done is not None and unit_done.shape == (stop - start,):
                        values[start:stop], done[start:stop] = unit_partial.to(values.device), unit_done.to(
                            done.device)
                    raise
                computed += 1
                if store is not None:
                    store.save(unit, loaded)
            values[start:stop], done[start:stop] = loaded.to(values.device), True
            bar.update(1)
    except BaseException as exc:
        attach_partial(exc, values.clone(), done.clone())
        raise
    finally:
        bar.close()
    return computed


def _check_same_sweep(fingerprint: dict, key: Optional[str]) -> None:
    """Every rank of the process group runs the same sweep of the same model, else an error naming the ranks
    that differ (all ranks raise it, so none waits in a later collective)."""
    dist = torch.distributed
    _barrier("before the sweep")
    everyone: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, fingerprint)
    differing = {rank: _differing(everyone[0], theirs) + _differing(theirs, everyone[0])
                 for rank, theirs in enumerate(everyone)}
    differ = [rank for rank, fields in differing.items() if fields]
    if differ:
        fields = sorted({f"{part}.{field}" for rank in differ for part, field in differing[rank]})
        raise InvalidInputError(
            f"{key or 'sweep'}: ranks {differ} run another sweep than rank 0 (differing: {', '.join(fields)}). With "
            "a process group the ranks split one sweep between them; to run a different sweep in each process, "
            "pass shard=(0, 1).")


def _barrier(when: str) -> None:
    """On gloo, a barrier that names the ranks missing after the group's timeout (NCCL's collectives time out
    with the group's timeout themselves)."""
    dist = torch.distributed
    if dist.get_backend() != "gloo":
        return
    try:
        dist.monitored_barrier(wait_all_ranks=True)
    except RuntimeError as err:
        raise RuntimeError(f"hooklens sharded sweep: not every rank arrived {when} within the process group's "
                           f"timeout ({err}). A rank crashed or is stuck; see its log.") from err


def _gather(values: Tensor, unit_size: int, count: int) -> Tensor:
    """Every rank's units in one [n] result on every rank: all_gather of each rank's [n] values (NaN outside its
    units), then each variant taken from the rank that owns its unit."""
    dist = torch.distributed
    _barrier("at the gather")
    wire = values.cpu() if dist.get_backend() == "gloo" else values
    gathered = [torch.empty_like(wire) for _ in range(count)]
    dist.all_gather(gathered, wire)
    owner = (torch.arange(len(values), device=wire.device) // unit_size) % count  # [n]: rank of each variant's unit
    return torch.stack(gathered).gather(0, owner[None]).squeeze(0).to(values.device)  # [count, n] -> [n]
