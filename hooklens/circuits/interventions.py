"""Sender outputs of a run, decomposed as EAP-IG decomposes the residual stream, and the replacement outputs each
intervention puts in place of an absent edge's sender ('patching', 'zero', 'mean', 'mean-positional').

The residual stream EAP-IG's graphs read is a sum of *sender* outputs plus terms no edge carries:

    resid = pos_embed + sum(b_O of earlier attention layers) + embed + sum(head results) + sum(MLP outputs)

Senders are `input` (`hook_embed`, the token embedding only: positional embeddings are never patched), each head's
`hook_result` (without `b_O`) and each MLP's `hook_mlp_out`, in EAP-IG's forward order (`input`, then per layer the
layer's heads and its MLP), i.e. the graph's `forward_index`. A receiver is a head's q, k or v input, an MLP's input
or the logits' input (the final residual), in the graph's `backward_index` order.

Everything here is hooklens's own code (EAP-IG is MIT, hannamw/EAP-IG; its semantics are followed, not its code).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from hooklens.attention import attention_scores, softmax_pattern, z_from_pattern

INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")


def check_supported(model) -> None:
    """Raise before any work for models whose residual stream EAP-IG's graph does not describe."""
    cfg = model.cfg
    problems = []
    if getattr(cfg, "attn_only", False):
        problems.append("attn_only=True (EAP-IG's graph has an MLP node per layer)")
    if getattr(cfg, "positional_embedding_type", "standard") != "standard":
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (only 'standard' is decomposed)")
    if getattr(cfg, "n_key_value_heads", None) is not None:
        problems.append("grouped-query attention (n_key_value_heads is set)")
    if getattr(cfg, "use_normalization_before_and_after", False):
        problems.append("use_normalization_before_and_after=True")
    if getattr(cfg, "act_fn", None) == "solu_ln":
        problems.append("act_fn='solu_ln'")
    if problems:
        raise ValueError(
            "hooklens.circuits supports GPT-2-style models (standard positional embeddings, an MLP per layer); this "
            "model has " + "; ".join(problems) + ". Use a GPT-2-style model."
        )


def check_intervention(intervention: str, intervention_dataloader) -> None:
    if intervention not in INTERVENTIONS:
        raise ValueError(f"Invalid intervention: {intervention!r}; use one of {INTERVENTIONS}.")
    if "mean" in intervention and intervention_dataloader is None:
        raise ValueError(
            f"intervention={intervention!r} needs intervention_dataloader=..., the data to take the mean over."
        )


def tokenize_plus(model, inputs: List[str], max_length: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, int]:
    """EAP-IG's tokenization: BOS prepended, right padding; returns `(tokens [b, p], attention_mask [b, p],
    input_lengths [b], n_pos)`. With `max_length`, each text keeps its first `max_length` tokens."""
    from hooklens.utils import get_attention_mask

    if isinstance(inputs, str):
        inputs = [inputs]
    tokens = model.to_tokens(list(inputs), prepend_bos=True, padding_side="right", truncate=max_length is not None)
    if max_length is not None:
        tokens = tokens[:, :max_length]  # [b, min(p, max_length)]
    attention_mask = get_attention_mask(model.tokenizer, tokens, True, padding_side="right").to(tokens.device)
    input_lengths = attention_mask.sum(1)
    return tokens, attention_mask, input_lengths, attention_mask.size(1)


def n_forward(cfg) -> int:
    return 1 + cfg.n_layers * (cfg.n_heads + 1)


def n_backward(cfg) -> int:
    return cfg.n_layers * (3 * cfg.n_heads + 1) + 1


def prev_index(cfg, layer: int, mlp: bool) -> int:
    """How many senders (forward indices) precede a receiver at `layer` (its heads' q/k/v, or its MLP)."""
    first = 1 + layer * (cfg.n_heads + 1)
    return first + cfg.n_heads if (mlp and not cfg.parallel_attn_mlp) else first


def attention(q: Tensor, k: Tensor, v: Tensor, attn_scale: float, attention_mask: Tensor) -> Tensor:
    """TL's causal attention with a key padding mask: q, k, v `[n, p, h, dh]` -> z `[n, p, h, dh]`."""
    pattern = softmax_pattern(attention_scores(q, k, attn_scale, 0, attention_mask))  # [n, h, p, p]
    return z_from_pattern(pattern, v)


def run_cache(model, tokens: Tensor, attention_mask: Tensor) -> Dict[str, Any]:
    """One ordinary forward, keeping what the circuit engines start from: per layer the residual before the layer,
    per-head q, k, v, z and results, the residual between attention and MLP and the MLP output; the final residual;
    the positional embedding; and the sender outputs `[b, p, n_forward, d]` in forward-index order."""
    cfg = model.cfg
    embed = model.embed(tokens)  # [b, p, d]
    pos = model.pos_embed(tokens, 0, attention_mask)  # [b, p, d]
    resid = embed + pos
    senders = [embed]
    cache: Dict[str, Any] = {"pos": pos, "resid_pre": [], "q": [], "k": [], "v": [], "z": [], "result": [],
                             "resid_mid": [], "mlp_out": []}
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        cache["resid_pre"].append(resid)
        x = block.ln1(resid)  # [b, p, d]
        q = torch.einsum("bpd,hde->bphe", x, attn.W_Q) + attn.b_Q  # [b, p, h, dh]
        k = torch.einsum("bpd,hde->bphe", x, attn.W_K) + attn.b_K
        v = torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V
        z = attention(q, k, v, attn.attn_scale, attention_mask)  # [b, p, h, dh]
        result = torch.einsum("bphe,hed->bphd", z, attn.W_O)  # [b, p, h, d], without b_O
        attn_out = result.sum(2) + attn.b_O
        mlp_in = resid if cfg.parallel_attn_mlp else resid + attn_out
        mlp_out = block.mlp(block.ln2(mlp_in))  # [b, p, d]
        resid_mid = resid + attn_out
        resid = resid_mid + mlp_out
        for name, value in (("q", q), ("k", k), ("v", v), ("z", z), ("result", result), ("resid_mid", resid_mid),
                            ("mlp_out", mlp_out)):
            cache[name].append(value)
        senders.extend(result.unbind(2))
        senders.append(mlp_out)
    cache["resid_final"] = resid
    cache["senders"] = torch.stack(senders, dim=2)  # [b, p, n_forward, d]
    return cache


def sender_outputs(model, tokens: Tensor, attention_mask: Tensor) -> Tensor:
    """Sender outputs `[b, p, n_forward, d]` of an ordinary forward on `tokens` (the corrupted run for 'patching')."""
    return run_cache(model, tokens, attention_mask)["senders"]


def _batch_inputs(batch) -> List[str]:
    # As EAP-IG: a tuple batch is (clean, corrupted, labels); anything else is the list of strings itself.
    return list(batch[0]) if isinstance(batch, tuple) else list(batch)


def compute_means(model, dataloader: Iterable, per_position: bool) -> Tensor:
    """Mean sender outputs over `dataloader`, with EAP-IG's arithmetic (eap.utils.compute_mean_activations), so a
    'mean' / 'mean-positional' ablation gives EAP-IG's numbers:

    - per_position=True ('mean-positional'): `[n_pos, n_forward, d]`, the sum over examples of each position's
      sender outputs (pad positions included) divided by the number of examples; every batch must have the first
      batch's number of positions (texts are cut at 512 tokens).
    - per_position=False ('mean'): a single `[d]` vector. EAP-IG takes each example's sender output at its last
      token divided by its length, averages over examples, then averages over *all senders* (its final
      `means.mean(0)`); that vector replaces every absent sender. This is EAP-IG's behaviour, kept for parity.
    """
    total = 0
    means = None
    with torch.inference_mode():
        for batch in dataloader:
            texts = _batch_inputs(batch)
            tokens, attention_mask, input_lengths, n_pos = tokenize_plus(model, texts, max_length=512)
            total += len(texts)
            senders = sender_outputs(model, tokens, attention_mask)  # [b, p, n_forward, d]
            if per_position:
                if means is None:
                    means = torch.zeros_like(senders[0])  # [p, n_forward, d]
                if senders.shape[1] != means.shape[0]:
                    raise ValueError(
                        f"mean-positional needs every intervention batch to have {means.shape[0]} positions (the "
                        f"first batch's), got {senders.shape[1]}; give prompts of one token length."
                    )
                means += senders.sum(0)
            else:
                last = senders[torch.arange(senders.shape[0], device=senders.device), input_lengths - 1]  # [b, n_f, d]
                item = last / input_lengths.to(last.dtype)[:, None, None]
                means = item.sum(0) if means is None else means + item.sum(0)  # [n_forward, d]
    if means is None:
        raise ValueError("intervention_dataloader is empty; give at least one batch to take the mean over.")
    means = means / total
    return means if per_position else means.mean(0)


def replacement_outputs(
    model,
    intervention: str,
    corrupted_tokens: Tensor,
    attention_mask: Tensor,
    means: Optional[Tensor] = None,
) -> Tensor:
    """What an absent edge's sender contributes instead of its in-flight output, broadcastable to
    `[b, p, n_forward, d]`: the corrupted run's sender outputs ('patching', run with the clean attention mask as
    EAP-IG does), zeros ('zero'), or the precomputed means ('mean': `[1, 1, 1, d]`; 'mean-positional':
    `[1, p, n_forward, d]`)."""
    cfg = model.cfg
    if intervention == "patching":
        return sender_outputs(model, corrupted_tokens, attention_mask)
    b, p = attention_mask.shape
    if intervention == "zero":
        return torch.zeros(1, 1, n_forward(cfg), cfg.d_model, device=attention_mask.device, dtype=cfg.dtype)
    if means is None:
        raise ValueError(f"intervention={intervention!r} needs means (compute_means over intervention_dataloader).")
    if intervention == "mean-positional":
        if means.shape[0] != p:
            raise ValueError(
                f"mean-positional means have {means.shape[0]} positions but this batch has {p}; use prompts of the "
                "same token length in the dataloader and intervention_dataloader."
            )
        return means.unsqueeze(0)  # [1, p, n_forward, d]
    return means.view(1, 1, 1, -1)  # [1, 1, 1, d]
