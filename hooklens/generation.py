"""Text generation with a key/value cache: greedy, temperature, top-k, top-p and frequency penalty.

`generate` reads as four steps: prompt -> tokens and padding mask (`prompt_tokens`), the stop rule
(`stop_tokens`), the decoding loop (`decode`), and the output in the form asked for (`format_output`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooklens.kv_cache import HookedTransformerKeyValueCache
from hooklens.utils import sample_logits

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.model import HookedTransformer

RETURN_TYPES = ("input", "str", "tokens")


def generate(
    model: "HookedTransformer",
    input: Union[str, List[str], Tensor],
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    do_sample: bool = True,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[Literal["left", "right"]] = None,
    return_type: Optional[str] = "input",
    verbose: bool = True,
) -> Union[str, List[str], Tensor]:
    """TL's `HookedTransformer.generate`: sample (or decode greedily with `do_sample=False`) up to
    `max_new_tokens` tokens per prompt, stopping rows at EOS when `stop_at_eos`."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    tokens, attention_mask = prompt_tokens(model, input, prepend_bos, padding_side)
    if return_type == "input":
        return_type = "str" if isinstance(input, (str, list)) else "tokens"
    stop_ids, pad_id = stop_tokens(model, stop_at_eos, eos_token_id)
    if max_new_tokens + tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"Prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"n_ctx={model.cfg.n_ctx}.")

    def next_tokens(final_logits: Tensor, seen_tokens: Tensor) -> Tensor:  # [b, v], [b, p] -> [b]
        if do_sample:
            return sample_logits(final_logits, top_k, top_p, temperature, freq_penalty, tokens=seen_tokens)
        return final_logits.argmax(dim=-1)

    all_tokens = decode(
        model, tokens, attention_mask, max_new_tokens, next_tokens,
        stop_ids=stop_ids if stop_at_eos else None, pad_id=pad_id, use_past_kv_cache=use_past_kv_cache,
        verbose=verbose,
    )
    return format_output(model, all_tokens, return_type)


def prompt_tokens(
    model: "HookedTransformer",
    input: Union[str, List[str], Tensor],
    prepend_bos: Optional[bool],
    padding_side: Optional[Literal["left", "right"]],
) -> Tuple[Tensor, Optional[Tensor]]:
    """The prompt as `[b, p]` tokens on the model's device, and the `[b, p]` mask of its left padding (None when
    nothing is left-padded)."""
    if isinstance(input, (str, list)):
        # Batched prompts are left-padded so every row's last prompt token sits at the same position.
        side = "left" if isinstance(input, list) and len(input) > 1 else model.resolve_padding_side(padding_side)
        tokens = model.to_tokens(input, prepend_bos=prepend_bos, padding_side=side)
        left_padded = side == "left"
    else:
        tokens = input if input.dim() == 2 else input[None]  # [p] -> [1, p]
        # Left-padded token prompts (TL: padding_side="left" or a left-padding tokenizer): mask the leading pads.
        left_padded = model.tokenizer is not None and model.resolve_padding_side(padding_side) == "left"
    attention_mask = model.padding_attention_mask(tokens, prepend_bos, "left") if left_padded else None
    tokens = tokens.to(model.cfg.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(tokens.device)
    return tokens, attention_mask


def stop_tokens(
    model: "HookedTransformer", stop_at_eos: bool, eos_token_id: Optional[Union[int, Sequence[int], Tensor]]
) -> Tuple[List[int], int]:
    """The ids that end a row (`eos_token_id`, else the tokenizer's EOS) and the id that pads finished rows.

    As TL: finished rows are padded with `eos_token_id` itself when it is one id, with the tokenizer's EOS when a
    list of stop ids is given (falling back to the first stop id when there is no tokenizer EOS)."""
    tokenizer = model.tokenizer
    if stop_at_eos and eos_token_id is None:
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("stop_at_eos needs eos_token_id (this model has no tokenizer that defines one).")
        eos_token_id = tokenizer.eos_token_id
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.tolist()
    one_id = isinstance(eos_token_id, (int, np.integer))
    stop_ids = [int(eos_token_id)] if one_id else [int(t) for t in (eos_token_id or [])]
    if stop_at_eos and not stop_ids:
        raise ValueError("stop_at_eos needs at least one eos_token_id.")
    pad_id = stop_ids[0] if stop_ids else 0
    if not one_id and tokenizer is not None and tokenizer.eos_token_id is not None:
        pad_id = int(tokenizer.eos_token_id)
    return stop_ids, pad_id


def decode(
    model: "HookedTransformer",
    tokens: Tensor,
    attention_mask: Optional[Tensor],
    max_new_tokens: int,
    next_tokens: Callable[[Tensor, Tensor], Tensor],
    stop_ids: Optional[List[int]],
    pad_id: int,
    use_past_kv_cache: bool,
    verbose: bool,
) -> Tensor:
    """Append up to `max_new_tokens` tokens chosen by `next_tokens(final_logits [b, v], tokens so far [b, p])`.

    With a KV cache each step feeds only the newest token. With `stop_ids`, a row that produced one of them is
    finished: it gets `pad_id` from then on, and the loop ends once every row is finished. Returns `[b, p + new]`."""
    batch = tokens.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    eos_ids = torch.tensor(stop_ids or [], dtype=torch.long, device=tokens.device)
    kv_cache = HookedTransformerKeyValueCache.init_cache(model.cfg, tokens.device, batch) if use_past_kv_cache else None
    if attention_mask is None and kv_cache is not None:
        attention_mask = torch.ones_like(tokens)
    all_tokens, step_input, step_mask = tokens, tokens, attention_mask
    for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
        if kv_cache is not None:
            logits = model(step_input, attention_mask=step_mask, past_kv_cache=kv_cache)
        else:
            logits = model(all_tokens, attention_mask=attention_mask)
        new_tokens = next_tokens(logits[:, -1, :], all_tokens)  # [b]
        if stop_ids is not None:
            new_tokens = torch.where(finished, torch.full_like(new_tokens, pad_id), new_tokens)
            finished = finished | torch.isin(new_tokens, eos_ids)
        all_tokens = torch.cat([all_tokens, new_tokens[:, None]], dim=1)  # [b, p + 1]
        step_input = new_tokens[:, None]  # [b, 1]
        if attention_mask is not None:
            step_mask = torch.ones_like(step_input)
            attention_mask = torch.cat([attention_mask, step_mask], dim=1)
        if stop_ids is not None and bool(finished.all()):
            break
    return all_tokens


def format_output(model: "HookedTransformer", all_tokens: Tensor, return_type: str) -> Union[str, List[str], Tensor]:
    """`[b, p]` tokens as asked: the tokens themselves, or (as TL) each row decoded without special tokens (BOS,
    left pads, EOS padding), a str for one row and a list of str for several."""
    if return_type == "tokens":
        return all_tokens
    tokenizer = model.require_tokenizer("generate(return_type='str')")
    decoded = [tokenizer.decode(row, skip_special_tokens=True) for row in all_tokens.tolist()]
    return decoded[0] if len(decoded) == 1 else decoded
