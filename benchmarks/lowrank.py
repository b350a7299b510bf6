"""Low-rank circuit workloads: hooklens's FactoredMatrix (on hooklens._C) against TransformerLens 3.9's.

GPT-2-small-shaped random weights (144 heads, d_head 64, vocabulary 50257), as in the induction-head demo:
`model.OV.eigenvalues`, the full OV circuit `W_E @ OV @ W_U` eigenvalues for all 144 heads, `model.OV.svd()`,
the 144 x 144 K-composition score matrix, and the K-composition full-circuit top-1 accuracy over all 50257 rows
(hooklens through `FactoredMatrix.argmax`, and both libraries through the demo's dense chunk loop).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

import models
from harness import Case, Context, workload


def _copying(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Copying score per head: sum(eig) / sum(|eig|) (real): a permutation-invariant summary to compare."""
    eigenvalues = eigenvalues.to(torch.complex128)
    return (eigenvalues.sum(-1) / eigenvalues.abs().sum(-1)).real


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-3) -> Tuple[bool, float]:
    diff = float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())
    return diff <= atol, diff


def _pair(ctx: Context):
    return models.hooklens_model(ctx), models.tl_model(ctx)


@workload("ov_eigenvalues", references=("transformer_lens",),
          description="Eigenvalues of model.OV (144 heads, 768x768 of rank 64).")
def ov_eigenvalues(ctx: Context) -> Case:
    hl, tl = _pair(ctx)
    return Case(impls={"hooklens": lambda: hl.OV.eigenvalues, "transformer_lens": lambda: tl.OV.eigenvalues},
                check=lambda a, b: _close(_copying(a), _copying(b)), shape="12x12 heads")


@workload("full_ov_eigenvalues", references=("transformer_lens",),
          description="Eigenvalues of W_E @ OV @ W_U for all 144 heads (50257x50257 of rank 64).")
def full_ov_eigenvalues(ctx: Context) -> Case:
    hl, tl = _pair(ctx)
    return Case(
        impls={"hooklens": lambda: (hl.W_E @ hl.OV @ hl.W_U).eigenvalues,
               "transformer_lens": lambda: (tl.W_E @ tl.OV @ tl.W_U).eigenvalues},
        check=lambda a, b: _close(_copying(a), _copying(b)), shape="12x12 heads, vocab 50257", warmup=0, repeats=1,
    )


@workload("ov_svd", references=("transformer_lens",), description="model.OV.svd() (144 heads).")
def ov_svd(ctx: Context) -> Case:
    hl, tl = _pair(ctx)
    return Case(impls={"hooklens": lambda: hl.OV.svd(), "transformer_lens": lambda: tl.OV.svd()},
                check=lambda a, b: _close(a[1], b[1], atol=1e-3), shape="12x12 heads")


@workload("composition_scores", references=("transformer_lens",),
          description="The 144 x 144 K-composition score matrix (all_composition_scores('K')).")
def composition_scores(ctx: Context) -> Case:
    hl, tl = _pair(ctx)
    return Case(impls={"hooklens": lambda: hl.all_composition_scores("K"),
                       "transformer_lens": lambda: tl.all_composition_scores("K")},
                check=lambda a, b: _close(a, b, atol=1e-4), shape="144x144", warmup=0, repeats=1)


def _top_1_acc(full_circuit: Any, batch_size: int = 1000) -> float:
    """The demo's loop: for each chunk of rows, is the diagonal entry the row's argmax?"""
    total = 0
    device = full_circuit.A.device  # the demo ran on CPU; on CUDA the indices must live beside the circuit
    for indices in torch.split(torch.arange(full_circuit.shape[-2], device=device), batch_size):
        total += (full_circuit[indices].AB.argmax(dim=-1) == indices).float().sum().item()
    return total / full_circuit.shape[-2]


def _kcomp_circuit(model):
    return model.W_E @ model.QK[1, 4] @ (model.W_E @ model.OV[0, 7]).T


@workload("kcomp_top1", references=("transformer_lens",),
          description="K-composition full circuit W_E @ QK[1,4] @ (W_E @ OV[0,7]).T: top-1 accuracy over all rows "
                      "(hooklens: circuit.argmax(-1), tiles in cache; TL: the demo's chunked .AB.argmax loop).")
def kcomp_top1(ctx: Context) -> Case:
    hl, tl = _pair(ctx)

    def run_hooklens():
        circuit = _kcomp_circuit(hl)
        return (circuit.argmax(-1) == torch.arange(circuit.ldim, device=circuit.A.device)).sum() / circuit.ldim

    return Case(impls={"hooklens": run_hooklens,
                       "transformer_lens": lambda: torch.tensor(_top_1_acc(_kcomp_circuit(tl)))},
                check=lambda a, b: _close(a, b, atol=1e-4), shape="50257 rows x 50257", warmup=0, repeats=1)


@workload("kcomp_top1_demo_loop", references=("transformer_lens",),
          description="kcomp_top1 with the demo's chunked `circuit[rows].AB.argmax(-1)` loop in both libraries "
                      "(dense 1000 x 50257 chunks: the same GEMMs, so about 1x).")
def kcomp_top1_demo_loop(ctx: Context) -> Case:
    hl, tl = _pair(ctx)
    return Case(impls={"hooklens": lambda: torch.tensor(_top_1_acc(_kcomp_circuit(hl))),
                       "transformer_lens": lambda: torch.tensor(_top_1_acc(_kcomp_circuit(tl)))},
                check=lambda a, b: _close(a, b, atol=1e-4), shape="50257 rows x 50257", warmup=0, repeats=1)
