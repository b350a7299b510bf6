"""MIB's circuit-faithfulness metrics: the faithfulness curve over circuit sizes, CPR and CMD.

Follows the MIB circuit track (hannamw/MIB-circuit-track, `MIB_circuit_track/evaluation.py`,
`evaluate_area_under_curve`, and `print_results.py`); its semantics, not its code:

- E = the number of edges of the graph (`len(graph.edges)`, MIB's `n_scored_items` at edge level).
- For each k in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1), the circuit C_k is
  `graph.apply_topn(int(k * E), absolute, prune=True)` (Python's `int` of the float product, as MIB computes it).
- m(C) = the mean over all examples of `evaluate_graph(model, C, dataloader, metric)` (MIB: `.mean().item()` of the
  concatenated per-example values; MIB's metric is the per-prompt logit difference).
- f(C_k) = (m(C_k) - m(empty)) / (m(full) - m(empty)). m(empty) is `apply_topn(0)`: every edge carries the
  intervention's activations (the counterfactual's, for 'patching'). MIB takes m(full) from `evaluate_baseline` (the
  unmodified model on the clean data); here it is the circuit holding every edge, evaluated in the same stacked pass,
  which computes the same function (tests check it equals `evaluate_baseline` to float32 tolerance) and makes
  f(full circuit) = 1 by construction.
- The areas are MIB's trapezoid sums over consecutive k on a linear axis (`log_scale` puts log k on the axis, MIB's
  option): `cpr` = area under f, `cmd` = area under |1 - f|. MIB reports CPR from the curve of circuits ranked by
  signed score (`absolute=False`) and CMD from the curve ranked by absolute score (`absolute=True`); `mib_scores`
  computes both curves and picks them so. Higher CPR and lower CMD are better.

All circuits (every k of every ranking, plus the empty and full ones) are evaluated in one `evaluate_graphs` call:
stacked on a variant dimension, one forward per batch and memory chunk, instead of MIB's 12 `evaluate_graph` passes
per ranking. Circuits that come out identical (e.g. several small k giving 0 edges on a small graph) are evaluated
once.
"""
from __future__ import annotations

import copy
import math
import numbers
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from hooklens.circuits.evaluate import DEFAULT_MEMORY_BUDGET, evaluate_graphs

__all__ = ["MIB_KS", "FaithfulnessCurve", "MIBScores", "curve_areas", "faithfulness_curve", "faithfulness_curves",
           "mib_scores"]

# MIB's circuit sizes, as fractions of the graph's edges.
MIB_KS: Tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


def curve_areas(ks: Sequence[float], faithfulness: Sequence[float], log_scale: bool = False) -> Tuple[float, float]:
    """(area under f, area under |1 - f|) by the trapezoid rule over consecutive points, x = k (or log k)."""
    xs = [math.log(k) for k in ks] if log_scale else [float(k) for k in ks]
    area_under = area_from_1 = 0.0
    for i in range(len(xs) - 1):
        width = xs[i + 1] - xs[i]
        area_under += width * (faithfulness[i] + faithfulness[i + 1]) / 2
        area_from_1 += width * (abs(1.0 - faithfulness[i]) + abs(1.0 - faithfulness[i + 1])) / 2
    return area_under, area_from_1


@dataclass
class FaithfulnessCurve:
    """One faithfulness curve (circuits ranked by |score| if `absolute`, else by signed score).

    ks: the circuit sizes as fractions of the edges; n_edges: `int(k * E)` edges asked of `apply_topn`; edges_kept:
    edges left after pruning (MIB's `weighted_edge_counts` at edge level); faithfulness: f(C_k); scores: m(C_k);
    empty_score / full_score: m(empty circuit) / m(full circuit); cpr / cmd: trapezoid areas of f and |1 - f|
    (MIB's `area_under` / `area_from_1`); average: mean of f."""

    ks: List[float]
    n_edges: List[int]
    edges_kept: List[int]
    faithfulness: List[float]
    scores: List[float]
    empty_score: float
    full_score: float
    absolute: bool
    log_scale: bool
    cpr: float
    cmd: float
    average: float

    def to_dict(self) -> Dict[str, Any]:
        """Plain floats / ints / lists (JSON-ready)."""
        return asdict(self)

    def to_mib_dict(self) -> Dict[str, Any]:
        """The dict MIB's `run_evaluation.py` pickles for one curve (what its `print_results.py` reads)."""
        return {"weighted_edge_counts": [float(n) for n in self.edges_kept], "area_under": self.cpr,
                "area_from_1": self.cmd, "average": self.average, "faithfulnesses": list(self.faithfulness)}

    def plot(self, path: Optional[Union[str, os.PathLike]] = None, title: Optional[str] = None):
        """f against k (a line at f = 1 for the full model, at 0 for the empty circuit); saved to `path` if given;
        returns the matplotlib Figure."""
        label = "ranked by |score|" if self.absolute else "ranked by signed score"
        return _plot([(self, f"{label}: CPR {self.cpr:.3f}, CMD {self.cmd:.3f}")], path,
                     title or "Circuit faithfulness")


@dataclass
class MIBScores:
    """MIB's two numbers for one attribution: `cpr` (area under f of the signed-score ranking) and `cmd` (area
    under |1 - f| of the absolute-score ranking), with both curves."""

    cpr: float
    cmd: float
    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve

    def to_dict(self) -> Dict[str, Any]:
        return {"cpr": self.cpr, "cmd": self.cmd, "signed": self.signed.to_dict(),
                "absolute": self.absolute.to_dict()}

    def plot(self, path: Optional[Union[str, os.PathLike]] = None, title: Optional[str] = None):
        """Both curves, f against k; saved to `path` if given; returns the matplotlib Figure."""
        return _plot([(self.signed, f"signed score (CPR {self.cpr:.3f})"),
                      (self.absolute, f"|score| (CMD {self.cmd:.3f})")], path, title or "Circuit faithfulness")


def _plot(curves: Sequence[Tuple[FaithfulnessCurve, str]], path, title: str):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend choice

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    for curve, label in curves:
        ax.plot(curve.ks, curve.faithfulness, marker="o", markersize=4, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    if curves and curves[0][0].log_scale:
        ax.set_xscale("log")
    ax.set_xlabel("fraction of edges in the circuit (k)")
    ax.set_ylabel("faithfulness f = (m(C) - m(empty)) / (m(full) - m(empty))")
    ax.yaxis.label.set_fontsize(8)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


# -- argument checks (all before any forward) -------------------------------------------------------------------
def _check_ks(ks) -> List[float]:
    try:
        values = list(ks)
    except TypeError:
        raise ValueError(f"ks must be a sequence of fractions of edges in [0, 1], got {ks!r}.") from None
    if len(values) < 2:
        raise ValueError(f"ks needs at least 2 circuit sizes for an area (MIB uses {MIB_KS}), got {values!r}.")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 <= k <= 1:
            raise ValueError(f"ks must be fractions of edges in [0, 1] (MIB uses {MIB_KS}), got {k!r} in {values!r}.")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"ks must be strictly increasing (the areas integrate over k), got {values!r}.")
    return [float(k) for k in values]


def _check_graph(graph) -> None:
    for attr in ("scores", "in_graph", "real_edge_mask", "edges", "apply_topn", "prune"):
        if not hasattr(graph, attr):
            raise TypeError(f"graph must be a hooklens.circuits.Graph (Graph.from_model(model)), got "
                            f"{type(graph).__name__} without .{attr}.")
    real = graph.scores[graph.real_edge_mask]
    if not torch.isfinite(real).all():
        bad = int((~torch.isfinite(real)).sum())
        raise ValueError(f"graph.scores has {bad} NaN/infinite edge score(s); attribution produced invalid scores "
                         "(check the metric and the data), so circuits cannot be ranked.")
    if not bool((real != 0).any()):
        raise ValueError("graph.scores are all zero: the graph has not been attributed, so every circuit size would "
                         "pick edges by position. Run attribute(model, graph, dataloader, metric, method=...) first.")


def _circuit_copy(graph):
    """A graph sharing `graph`'s structure and scores with its own circuit tensors, so that `apply_topn` / `prune`
    on it leave `graph` untouched. (Node and edge objects stay shared and read the original's circuit: only the
    tensor API is used on copies.) A shallow copy, because a deep copy of GPT-2 small's 32k edge objects per
    circuit would cost more than the tensors it protects."""
    circuit = copy.copy(graph)
    circuit.in_graph = graph.in_graph.clone()
    circuit.nodes_in_graph = graph.nodes_in_graph.clone()
    if getattr(graph, "neurons_in_graph", None) is not None:
        circuit.neurons_in_graph = graph.neurons_in_graph.clone()
    return circuit


def _mean_score(values: Union[Tensor, List[Tensor]]) -> float:
    if isinstance(values, list):  # a list means several metrics were passed
        raise ValueError("faithfulness needs one metric (e.g. the per-prompt logit difference), got a list.")
    return float(values.double().mean())  # float64 accumulation: no float32 rounding of a float64 model


# -- the curves -------------------------------------------------------------------------------------------------
def faithfulness_curves(model, graph, dataloader: Iterable, metric: Callable[..., Tensor],
                        ks: Sequence[float] = MIB_KS, absolute: Sequence[bool] = (False, True),
                        intervention: str = "patching", intervention_dataloader: Optional[Iterable] = None,
                        log_scale: bool = False, quiet: bool = False, skip_clean: bool = True,
                        metric_positions: Optional[str] = None,
                        memory_budget: int = DEFAULT_MEMORY_BUDGET) -> List[FaithfulnessCurve]:
    """One `FaithfulnessCurve` per entry of `absolute` (ranking by |score| when True, by signed score when False),
    every circuit of every curve evaluated in one stacked `evaluate_graphs` pass. `graph` (attributed) is not
    modified. See `faithfulness_curve` for the arguments."""
    ks = _check_ks(ks)
    absolutes = list(absolute)
    if not absolutes or any(not isinstance(a, bool) for a in absolutes):
        raise ValueError(f"absolute must be a non-empty sequence of bools, got {absolute!r}.")
    if not isinstance(log_scale, bool):
        raise ValueError(f"log_scale must be a bool, got {log_scale!r}.")
    if log_scale and ks[0] == 0:
        raise ValueError(f"log_scale=True needs every k > 0 (log 0 is -inf), got ks={ks!r}.")
    _check_graph(graph)
    n_total = len(graph.edges)
    n_edges = [int(k * n_total) for k in ks]  # MIB: int(pct * n_scored_items), float product truncated

    empty = _circuit_copy(graph)
    empty.apply_topn(0, True, prune=True)
    full = _circuit_copy(graph)
    full.reset(empty=False)
    full.prune()
    circuits = [empty, full]
    for ranking in absolutes:
        for n in n_edges:
            circuit = _circuit_copy(graph)
            circuit.apply_topn(n, ranking, prune=True)
            circuits.append(circuit)

    # Identical circuits (same pruned edge set) are evaluated once; `slot[i]` is circuit i's evaluated variant.
    unique: List[Any] = []
    seen: Dict[bytes, int] = {}
    slot: List[int] = []
    for circuit in circuits:
        key = circuit.in_graph.numpy().tobytes()
        if key not in seen:
            seen[key] = len(unique)
            unique.append(circuit)
        slot.append(seen[key])
    results = evaluate_graphs(model, unique, dataloader, metric, quiet=quiet, intervention=intervention,
                              intervention_dataloader=intervention_dataloader, skip_clean=skip_clean,
                              metric_positions=metric_positions, memory_budget=memory_budget)
    means = [_mean_score(results[s]) for s in slot]
    empty_score, full_score = means[0], means[1]
    scale = full_score - empty_score
    # A difference within float rounding of the scores (e.g. counterfactual = clean prompt) is no signal: the
    # stacked and the plain forward round differently, so "equal" shows up as ~1e-7 relative, not as 0.
    rounding = 1e3 * torch.finfo(model.cfg.dtype).eps * max(1.0, abs(full_score), abs(empty_score))
    if not math.isfinite(scale) or abs(scale) <= rounding:
        raise ValueError(f"m(full) = {full_score!r} and m(empty) = {empty_score!r}: the model scores the clean and "
                         f"the {intervention} data the same (or not finitely), so faithfulness (m(C) - m(empty)) / "
                         "(m(full) - m(empty)) is undefined. Use data whose counterfactual changes the metric.")

    curves = []
    for r, ranking in enumerate(absolutes):
        offset = 2 + r * len(ks)
        scores = means[offset:offset + len(ks)]
        faithfulness = [(m - empty_score) / scale + 0.0 for m in scores]  # + 0.0: no -0.0 in reports
        cpr, cmd = curve_areas(ks, faithfulness, log_scale)
        curves.append(FaithfulnessCurve(
            ks=list(ks), n_edges=n_edges,
            edges_kept=[circuits[offset + i].count_included_edges() for i in range(len(ks))],
            faithfulness=faithfulness, scores=scores, empty_score=empty_score, full_score=full_score,
            absolute=ranking, log_scale=log_scale, cpr=cpr, cmd=cmd, average=sum(faithfulness) / len(faithfulness)))
    return curves


def faithfulness_curve(model, graph, dataloader: Iterable, metric: Callable[..., Tensor],
                       ks: Sequence[float] = MIB_KS, absolute: bool = True, intervention: str = "patching",
                       intervention_dataloader: Optional[Iterable] = None, log_scale: bool = False,
                       quiet: bool = False, skip_clean: bool = True, metric_positions: Optional[str] = None,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET) -> FaithfulnessCurve:
    """MIB's faithfulness curve of an attributed `graph` (scores from `attribute`; the graph is not modified).

    dataloader / metric: as `evaluate_graph` (MIB: per-prompt logit difference, `logit_diff(..., mean=False)`);
    m(C) is the metric's mean over all values. ks: circuit sizes as fractions of the edges (MIB's by default).
    absolute: rank edges by |score| (MIB's default, the curve its CMD comes from) or by signed score (False: its
    CPR). intervention / intervention_dataloader: what absent edges carry ('patching': the corrupted run).
    log_scale: integrate over log k instead of k. metric_positions / memory_budget / skip_clean: see
    `evaluate_graphs`. Returns a `FaithfulnessCurve` (`cpr` / `cmd` are this curve's two areas)."""
    if not isinstance(absolute, bool):
        raise ValueError(f"absolute must be a bool, got {absolute!r}.")
    return faithfulness_curves(model, graph, dataloader, metric, ks=ks, absolute=(absolute,),
                               intervention=intervention, intervention_dataloader=intervention_dataloader,
                               log_scale=log_scale, quiet=quiet, skip_clean=skip_clean,
                               metric_positions=metric_positions, memory_budget=memory_budget)[0]


def mib_scores(model, graph, dataloader: Iterable, metric: Callable[..., Tensor], ks: Sequence[float] = MIB_KS,
               intervention: str = "patching", intervention_dataloader: Optional[Iterable] = None,
               log_scale: bool = False, quiet: bool = False, skip_clean: bool = True,
               metric_positions: Optional[str] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> MIBScores:
    """MIB's CPR (area under f, circuits ranked by signed score) and CMD (area under |1 - f|, ranked by |score|)
    of an attributed `graph`, both curves in one stacked evaluation. Arguments as `faithfulness_curve`."""
    signed, absolute = faithfulness_curves(model, graph, dataloader, metric, ks=ks, absolute=(False, True),
                                           intervention=intervention,
                                           intervention_dataloader=intervention_dataloader, log_scale=log_scale,
                                           quiet=quiet, skip_clean=skip_clean, metric_positions=metric_positions,
                                           memory_budget=memory_budget)
    return MIBScores(cpr=signed.cpr, cmd=absolute.cmd, signed=signed, absolute=absolute)
