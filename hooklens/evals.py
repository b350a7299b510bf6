"""Rough evals, compatible with ``transformer_lens.evals`` (TransformerLens 3.9).

Ported from TransformerLens (MIT License, Copyright (c) 2022 TransformerLensOrg).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from hooklens.utils import lm_cross_entropy_loss, override_or_use_default_value

__all__ = ["make_repeated_tokens", "induction_loss"]


def make_repeated_tokens(batch_size: int = 4, subseq_len: int = 384, device: Any = "cpu") -> torch.Tensor:
    """``[batch, 2 * subseq_len]`` tokens: random ids in ``[100, 20000)``, each row repeated twice.

    Draws from the global CPU RNG exactly like TransformerLens, so a seeded call gives the same tokens.
    """
    first_half_tokens = torch.randint(100, 20000, (batch_size, subseq_len)).to(device)
    return first_half_tokens.repeat(1, 2)


@torch.inference_mode()
def induction_loss(
    model: Any,
    tokenizer: Any = None,
    batch_size: int = 4,
    subseq_len: int = 384,
    prepend_bos: Optional[bool] = None,
    device: Any = None,
) -> torch.Tensor:
    """Mean next-token loss on the second half of random sequences repeated twice.

    Low loss means the model has induction heads. If ``prepend_bos`` (default
    ``model.cfg.default_prepend_bos``), the first token is overwritten with BOS. The loss is
    averaged over per-token losses ``[:, subseq_len + 1:]``. ``device`` defaults to ``model.cfg.device``.
    """
    if device is None:
        device = model.cfg.device
    repeated_tokens = make_repeated_tokens(batch_size, subseq_len, device)

    prepend_bos = override_or_use_default_value(model.cfg.default_prepend_bos, override=prepend_bos)
    if prepend_bos:
        if tokenizer is None:
            tokenizer = model.tokenizer
        repeated_tokens[:, 0] = tokenizer.bos_token_id
    logits = model(repeated_tokens, return_type="logits")
    correct_log_probs = lm_cross_entropy_loss(logits, repeated_tokens, per_token=True)
    return correct_log_probs[:, subseq_len + 1 :].mean()
