"""The seeds' MLP experiment on repeated random tokens: do the MLPs matter for induction?

On a sequence whose second half repeats its first, the MLP output at each second-half position is replaced by the
MLP output at the same token's first-half position (one layer and one position at a time), and the loss on the
second half is compared with the unpatched run's. If MLPs carried what induction needs, the MLP outputs of a token
seen for the second time would differ from its first sighting's and the swap would cost loss; the finding is
"near zero except the first repeated token".

    effect = repeated_token_mlp_patching(model, tokens)  # [n_layers, seq_len], loss(patched) - loss(clean), nats

The patches run on the batched sweep engine (`hooklens.sweeps.run_sweep`): the "clean" activations it patches in
are the run's own MLP outputs shifted by `seq_len` positions, so every patch of a chunk is one packed forward from
its layer and position on, with no Python loop over patches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
from torch import Tensor

from hooklens.errors import InvalidInputError
from hooklens.sweeps import check_tokens, index_sweep, run_sweep
from hooklens.utils import get_act_name

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.model import HookedTransformer


def repeated_halves(tokens: Tensor, seq_len: Optional[int] = None) -> Tuple[int, int]:
    """`(prefix, seq_len)` of a `[batch, prefix + 2 * seq_len]` prompt whose last `seq_len` tokens repeat the
    `seq_len` before them (prefix: e.g. 1 for a BOS token). `seq_len` defaults to half the prompt (rounded down);
    a prompt that does not repeat raises InvalidInputError before any forward."""
    n_pos = tokens.shape[-1]
    seq_len = n_pos // 2 if seq_len is None else int(seq_len)
    if seq_len < 1 or 2 * seq_len > n_pos:
        raise InvalidInputError(f"seq_len={seq_len}: a prompt of {n_pos} tokens holds two copies of 1 .. "
                                f"{n_pos // 2} tokens. Give the length of the repeated part.")
    prefix = n_pos - 2 * seq_len
    first, second = tokens[:, prefix:prefix + seq_len], tokens[:, prefix + seq_len:]
    if not torch.equal(first, second):
        rows = (first != second).any(-1).nonzero()[:, 0].tolist()
        raise InvalidInputError(
            f"tokens rows {rows[:8]} do not repeat: positions {prefix + seq_len}.. must equal positions {prefix}.. "
            f"(seq_len={seq_len}, prefix={prefix}). Use hooklens.evals.repeated_random_tokens, or pass the "
            "repeated length as seq_len.")
    return prefix, seq_len


def second_half_loss(tokens: Tensor, prefix: int, seq_len: int):
    """The metric: mean next-token loss (nats) over the second half's predictable tokens, i.e. the predictions made
    at positions `prefix + seq_len .. prefix + 2 * seq_len - 2` (of tokens 2 .. seq_len of the repeat; the first
    repeated token is predicted from the first half's last position, which no second-half patch reaches).
    Returns `(metric, logit_positions)`; the metric reads only those positions' logits."""
    start, end = prefix + seq_len, prefix + 2 * seq_len - 1
    targets = tokens[:, start + 1:end + 1]  # [b, seq_len - 1]

    def loss(logits: Tensor) -> Tensor:  # logits [b, pos, vocab] -> scalar
        log_probs = logits[:, start:end].float().log_softmax(-1)
        return -log_probs.gather(-1, targets[..., None]).mean()

    return loss, list(range(start, end))


def _shifted_mlp_outputs(model: "HookedTransformer", tokens: Tensor, prefix: int, seq_len: int) -> Dict[str, Tensor]:
    """Each layer's MLP output on `tokens` with the second half replaced by the first half's: the "clean" values the
    sweep patches in, `{hook name: [b, pos, d_model]}`. A patch at position p then writes the output at p - seq_len,
    which the patch cannot change (causal), so this is the patched run's own first-half value."""
    names = {get_act_name("mlp_out", layer) for layer in range(model.cfg.n_layers)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    shifted = {}
    for name in names:
        out = cache[name].clone()  # [b, pos, d_model]
        out[:, prefix + seq_len:] = out[:, prefix:prefix + seq_len]
        shifted[name] = out
    return shifted


def repeated_token_mlp_patching(model: "HookedTransformer", tokens: Tensor, seq_len: Optional[int] = None, *,
                                progress: bool = True, memory_budget: Optional[int] = None) -> Tensor:
    """loss(patched) - loss(clean), in nats, `[n_layers, seq_len]` float32: entry `[l, j]` replaces layer l's MLP
    output at second-half position `prefix + seq_len + j` by its output at the same token's first-half position
    `prefix + j`, on `tokens` (`[batch, prefix + 2 * seq_len]`, second half repeating the first; see
    `repeated_halves`). The loss is `second_half_loss`, averaged over the batch. The last column is 0: a patch at
    the last position changes only its own prediction, which has no target.

    Batched on the sweep engine (every patch of a chunk in one packed forward). Models without MLPs raise
    InvalidInputError, as does a prompt that does not repeat (both before any forward)."""
    if model.cfg.attn_only:
        raise InvalidInputError("The model is attention-only (cfg.attn_only): it has no MLP outputs to patch.")
    tokens = check_tokens(tokens).to(model.W_E.device)
    prefix, seq_len = repeated_halves(tokens, seq_len)
    metric, positions = second_half_loss(tokens, prefix, seq_len)
    n_layers = model.cfg.n_layers
    layers = torch.arange(n_layers).repeat_interleave(seq_len)  # [n_layers * seq_len], layer-major
    second_half = torch.arange(prefix + seq_len, prefix + 2 * seq_len).repeat(n_layers)
    indices = torch.stack([layers, second_half], dim=1)  # [n_layers * seq_len, (layer, pos)]
    sweep = index_sweep(model, "mlp_out", indices, axes=(0,))  # mlp_out is [pos, d_model] without batch
    shifted = _shifted_mlp_outputs(model, tokens, prefix, seq_len)
    with torch.no_grad():
        clean = metric(model(tokens)).float()
    patched = run_sweep(model, tokens, shifted, metric, sweep, metric_positions=positions,
                        memory_budget=memory_budget, progress=progress)
    return (patched - clean).view(n_layers, seq_len)
