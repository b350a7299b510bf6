"""Text generation with a key/value cache: greedy, temperature, top-k, top-p and frequency penalty.

`generate` reads as four steps: prompt -> tokens and padding mask (`prompt_tokens`) or embeddings, the stop rule
(`stop_tokens`), the decoding loop (`decode`, one `forward_step` per new token), and the output in the form asked
for (`format_output`, or `logits_output` with `output_logits=True`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooklens.errors import InvalidInputError
from hooklens.kv_cache import HookedTransformerKeyValueCache
from hooklens.progress import bar_disabled
from hooklens.utils import sample_logits

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.model import HookedTransformer

RETURN_TYPES = ("input", "str", "tokens", "embeds")
# The Hugging Face generate flags TL 3.9 takes: `output_logits` is honoured, `return_dict_in_generate` is implied by
# it (the output object is returned exactly when `output_logits=True`). Any other flag is ignored with a warning.
HF_GENERATION_FLAGS = ("output_logits", "return_dict_in_generate")


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
    **generation_kwargs: Any,
) -> Any:
    """TL's `HookedTransformer.generate`: sample (or decode greedily with `do_sample=False`) up to
    `max_new_tokens` tokens per prompt, stopping rows at EOS when `stop_at_eos`.

    `input` is text, tokens `[b, p]` (or `[p]`) or token embeddings `[b, p, d_model]` (positional embeddings are
    added here, as for tokens). An embeddings prompt yields only the new tokens as "tokens" / "str", and no
    frequency penalty (there are no prompt tokens to count). "embeds" returns the token embeddings of prompt and
    new tokens. With `output_logits=True` the result is TL's `GenerateDecoderOnlyOutput(sequences, logits)`."""
    output_logits = hf_generation_flags(generation_kwargs)
    check_input(input, return_type)
    embeds_input = isinstance(input, Tensor) and input.dim() == 3
    if return_type == "input":
        return_type = "str" if isinstance(input, (str, list)) else "embeds" if embeds_input else "tokens"
    if embeds_input:
        prompt, attention_mask = input.to(model.cfg.device), None  # TL builds no padding mask for embeddings
    else:
        prompt, attention_mask = prompt_tokens(model, input, prepend_bos, padding_side)
    stop_ids, pad_id = stop_tokens(model, stop_at_eos, eos_token_id)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
    if max_new_tokens + prompt.shape[1] > model.cfg.n_ctx:
        raise InvalidInputError(f"Prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                f"n_ctx={model.cfg.n_ctx}: shorten the prompt or ask for at most "
                                f"{model.cfg.n_ctx - prompt.shape[1]} new tokens.")

    def next_tokens(final_logits: Tensor, seen_tokens: Tensor) -> Tensor:  # [b, v], [b, p] -> [b]
        if not do_sample:
            return final_logits.argmax(dim=-1)
        if embeds_input:
            return sample_logits(final_logits, top_k, top_p, temperature)
        return sample_logits(final_logits, top_k, top_p, temperature, freq_penalty, tokens=seen_tokens)

    step_logits: Optional[List[Tensor]] = [] if output_logits else None
    sequence, new_tokens = decode(
        model, prompt, attention_mask, max_new_tokens, next_tokens,
        stop_ids=stop_ids if stop_at_eos else None, pad_id=pad_id, use_past_kv_cache=use_past_kv_cache,
        verbose=verbose, step_logits=step_logits,
    )
    output_tokens = new_tokens if embeds_input else sequence
    if step_logits is not None:
        return logits_output(output_tokens, step_logits)
    return format_output(model, output_tokens, return_type, sequence)


def hf_generation_flags(generation_kwargs: Dict[str, Any]) -> bool:
    """Whether `output_logits` is asked for. As TL 3.9, `return_dict_in_generate` is accepted and ignored, and any
    other keyword (Hugging Face's `output_scores`, ...) is ignored with a UserWarning rather than refused."""
    unsupported = [name for name in generation_kwargs if name not in HF_GENERATION_FLAGS]
    if unsupported:
        warnings.warn(
            f"HookedTransformer.generate received unsupported generation kwargs; ignoring: {unsupported}. "
            f"Of Hugging Face's generate flags only {list(HF_GENERATION_FLAGS)} are understood.",
            UserWarning, stacklevel=5,  # the caller of HookedTransformer.generate (under torch.no_grad)
        )
    return bool(generation_kwargs.get("output_logits", False))


def check_input(input: Any, return_type: Optional[str]) -> None:
    """TL's checks on `generate`'s arguments, as InvalidInputError (what TL asserts)."""
    if not (isinstance(input, (str, Tensor)) or isinstance(input, list) and all(isinstance(i, str) for i in input)):
        raise InvalidInputError(
            f"Input must be either string, torch.Tensor, or List[str], got {type(input).__name__}; pass text, "
            "token ids [batch, pos] or token embeddings [batch, pos, d_model]."
        )
    if return_type not in RETURN_TYPES:
        raise InvalidInputError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}.")
    if isinstance(input, Tensor) and input.dim() == 3 and not input.is_floating_point():
        raise InvalidInputError(f"Embeddings input [batch, pos, d_model] must be a float tensor, got {input.dtype}.")


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
        tokens = model._token_ids(input)  # [b, p] int ids on the model's device, or a clear error
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
            raise InvalidInputError("Must pass a eos_token_id if stop_at_eos is True and tokenizer is None or has no "
                                    "eos_token_id: pass eos_token_id=... or stop_at_eos=False.")
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
    prompt: Tensor,
    attention_mask: Optional[Tensor],
    max_new_tokens: int,
    next_tokens: Callable[[Tensor, Tensor], Tensor],
    stop_ids: Optional[List[int]],
    pad_id: int,
    use_past_kv_cache: bool,
    verbose: bool,
    step_logits: Optional[List[Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """Append up to `max_new_tokens` tokens chosen by `next_tokens(final_logits [b, v], sequence so far)` to a
    prompt of tokens `[b, p]` or of token embeddings `[b, p, d]` (new tokens are appended as their embeddings).

    With a KV cache each step feeds only the newest position. With `stop_ids`, a row that produced one of them is
    finished: it gets `pad_id` from then on, and the loop ends once every row is finished. Each step's final
    logits `[b, v]` are appended to `step_logits` when given. Returns the grown sequence (`[b, p + new]` or
    `[b, p + new, d]`) and the new tokens `[b, new]`."""
    batch, device = prompt.shape[0], prompt.device
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos_ids = torch.tensor(stop_ids or [], dtype=torch.long, device=device)
    kv_cache = HookedTransformerKeyValueCache.init_cache(model.cfg, device, batch) if use_past_kv_cache else None
    if attention_mask is None and kv_cache is not None and prompt.dim() == 2:
        attention_mask = torch.ones_like(prompt)
    sequence, generated = prompt, []
    for _ in tqdm(range(max_new_tokens), disable=bar_disabled(verbose), desc="generate"):
        final_logits = forward_step(model, sequence, attention_mask, kv_cache)[:, -1, :]  # [b, v]
        if step_logits is not None:
            step_logits.append(final_logits.clone())
        new_tokens = next_tokens(final_logits, sequence)  # [b]
        if stop_ids is not None:
            new_tokens = torch.where(finished, torch.full_like(new_tokens, pad_id), new_tokens)
            finished = finished | torch.isin(new_tokens, eos_ids)
        generated.append(new_tokens[:, None])  # [b, 1]
        appended = new_tokens[:, None] if prompt.dim() == 2 else model.embed(new_tokens[:, None])  # [b, 1(, d)]
        sequence = torch.cat([sequence, appended], dim=1)  # [b, p + 1(, d)]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        if stop_ids is not None and bool(finished.all()):
            break
    new = torch.cat(generated, dim=1) if generated else torch.zeros(batch, 0, dtype=torch.long, device=device)
    return sequence, new


def forward_step(
    model: "HookedTransformer", sequence: Tensor, attention_mask: Optional[Tensor],
    kv_cache: Optional[HookedTransformerKeyValueCache],
) -> Tensor:
    """Logits `[b, q, v]` for the positions of `sequence` not yet in `kv_cache` (all of them without a cache).

    Tokens take the whole forward. Embeddings get the positional embeddings of their absolute positions (after the
    cached ones, as in one forward over the whole sequence) and enter block 0, as TL's generate does."""
    past = kv_cache.past_length if kv_cache is not None else 0
    fresh = sequence[:, past:]  # [b, q] or [b, q, d]
    if sequence.dim() == 2:
        mask = attention_mask[:, past:] if attention_mask is not None else None  # the cache holds the earlier part
        return model(fresh, attention_mask=mask, past_kv_cache=kv_cache)
    shape_only = torch.zeros(fresh.shape[:2], dtype=torch.long, device=fresh.device)  # pos_embed reads [b, q] only
    residual = fresh + model.hook_pos_embed(model.pos_embed(shape_only, past))  # [b, q, d]
    return model(residual, start_at_layer=0, past_kv_cache=kv_cache)


def format_output(
    model: "HookedTransformer", output_tokens: Tensor, return_type: str, sequence: Tensor
) -> Union[str, List[str], Tensor]:
    """The result as asked: the tokens themselves; the token embeddings (`sequence` itself for an embeddings
    prompt); or (as TL) each row of tokens decoded without special tokens (BOS, left pads, EOS padding), a str for
    one row and a list of str for several."""
    if return_type == "tokens":
        return output_tokens
    if return_type == "embeds":
        return sequence if sequence.dim() == 3 else model.embed(sequence)  # [b, p + new, d]
    tokenizer = model.require_tokenizer("generate(return_type='str')")
    decoded = [tokenizer.decode(row, skip_special_tokens=True) for row in output_tokens.tolist()]
    return decoded[0] if len(decoded) == 1 else decoded


def logits_output(sequences: Tensor, step_logits: List[Tensor]) -> Any:
    """TL 3.9's result with `output_logits=True`: Hugging Face's `GenerateDecoderOnlyOutput` with `sequences` (the
    output tokens, whatever `return_type` says) and `logits`, a tuple of one `[b, v]` tensor per step."""
    # lazy: transformers takes seconds to import and only this output needs it
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(step_logits))
