"""The token/string surface of `HookedTransformer` (TransformerLens 3.9's names, signatures and defaults).

`prepend_bos=None` / `padding_side=None` mean "the model's default", as TL's `USE_DEFAULT_VALUE` does;
`resolve_prepend_bos` / `resolve_padding_side` are the one place those defaults are read.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, List, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from hooklens import tokenizer as tok
from hooklens.errors import InvalidInputError
from hooklens.utils import get_attention_mask


def user_stacklevel() -> int:
    """`warnings.warn`'s stacklevel of the caller's line: the first frame outside hooklens, torch (`nn.Module`'s
    call wrappers, `torch.no_grad` decorators) and contextlib, however deep inside a forward the warning is made."""
    hooklens_dir = os.path.dirname(os.path.abspath(__file__))
    inside = (hooklens_dir + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(inside)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level


def _warn_truncated(lengths: List[int], n_ctx: int) -> None:
    """Say that text longer than the context lost its end: the kept tokens give a result that looks complete."""
    too_long = [n for n in lengths if n > n_ctx]
    longest = max(too_long)
    which = "The input tokenizes" if len(lengths) == 1 else \
        f"{len(too_long)} of {len(lengths)} inputs are too long (the longest tokenizes"
    warnings.warn(
        f"{which} to {longest} tokens, more than the model's context n_ctx={n_ctx}"
        f"{')' if len(lengths) > 1 else ''}: only the first {n_ctx} tokens are used and the last "
        f"{longest - n_ctx} are dropped. Shorten the text or split it into windows; to truncate on purpose without "
        "this warning, pass model.to_tokens(text, truncate=True) (and give the model those tokens).",
        UserWarning, stacklevel=user_stacklevel(),
    )


def _token_not_in_prompt_error(single_token: int, prepend_bos: Optional[bool]) -> InvalidInputError:
    """TL's exact "The token does not occur in the prompt" error; the advice rides along as a note (shown in the
    traceback) so that `str(error)` stays TL's message, which TL users' code compares."""
    error = InvalidInputError("The token does not occur in the prompt")
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(f"Token id {single_token} is not in the tokens. For a string prompt, check prepend_bos "
                       f"(here {prepend_bos}, None = the model's default): the BOS token is only there when it is "
                       "prepended, and a word's id changes with a leading space (' cat' vs 'cat').")
    return error


class TokensMixin:
    """Tokenizer handling and the text <-> tokens <-> residual-direction conversions of `HookedTransformer`."""

    # -- tokenizer and defaults ---------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Any, default_padding_side: Optional[str] = None) -> None:
        """Use a Hugging Face tokenizer; missing EOS/PAD/BOS default to GPT-2's `<|endoftext|>`."""
        tok.prepare_tokenizer(tokenizer, default_padding_side)
        self.tokenizer = tokenizer
        self.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
        if self.cfg.d_vocab == -1:
            self.cfg.d_vocab = max(tokenizer.get_vocab().values()) + 1
        if self.cfg.d_vocab_out == -1:
            self.cfg.d_vocab_out = self.cfg.d_vocab

    def require_tokenizer(self, what: str) -> Any:
        """The model's tokenizer; raises a ValueError naming `what` needed it when the model has none."""
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, but this model has none. Pass token ids instead, or call "
                "model.set_tokenizer(tokenizer)."
            )
        return self.tokenizer

    def resolve_prepend_bos(self, prepend_bos: Optional[bool] = None) -> bool:
        """`prepend_bos`, or `cfg.default_prepend_bos` when it is None."""
        return self.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)

    def resolve_padding_side(self, padding_side: Optional[Literal["left", "right"]] = None) -> str:
        """`padding_side`, or the tokenizer's padding side when it is None ("right" without a tokenizer)."""
        if padding_side is None:
            return self.tokenizer.padding_side if self.tokenizer is not None else "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return padding_side

    def padding_attention_mask(
        self,
        tokens: Tensor,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        required: bool = False,
    ) -> Optional[Tensor]:
        """The `[b, p]` mask of real (non-padding) tokens that forward derives for token input: None for right
        padding (trailing pads cannot affect earlier positions) unless `required`."""
        side = self.resolve_padding_side(padding_side)
        if side != "left" and not required:
            return None
        if self.tokenizer is None:
            raise ValueError("Cannot compute a padding mask without a tokenizer; pass attention_mask.")
        return get_attention_mask(self.tokenizer, tokens, self.resolve_prepend_bos(prepend_bos), padding_side=side)

    # -- text <-> tokens ----------------------------------------------------------------------------------------
    def to_tokens(
        self,
        input: Union[str, List[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        move_to_device: bool = True,
        truncate: Optional[bool] = None,
    ) -> Tensor:
        """Strings -> `[batch, pos]` token ids (lists are padded with the pad token on `padding_side`).

        Each text keeps its first `n_ctx` tokens unless `truncate=False`. As in TL, truncation is the default, but
        unless `truncate=True` is passed explicitly, cutting tokens off warns (UserWarning): a truncated prompt's
        result otherwise looks like the whole prompt's."""
        tokenizer = self.require_tokenizer("to_tokens")
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, (list, tuple)) or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"to_tokens takes a string or a list of strings, got {type(input).__name__}; token ids "
                            "need no tokenizing (pass them to the model directly).")
        if not texts:
            raise InvalidInputError("to_tokens got an empty list of strings: pass at least one prompt.")
        rows = tok.encode_ids(tokenizer, texts, prepend_bos=self.resolve_prepend_bos(prepend_bos),
                              tokenizer_prepends_bos=bool(self.cfg.tokenizer_prepends_bos))
        if truncate is None and max(len(ids) for ids in rows) > self.cfg.n_ctx:
            _warn_truncated([len(ids) for ids in rows], self.cfg.n_ctx)
        max_length = self.cfg.n_ctx if truncate is None or truncate else None
        tokens = tok.pad_ids(rows, tokenizer.pad_token_id, self.resolve_padding_side(padding_side), max_length)
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def to_string(self, tokens: Union[List[int], Tensor, np.ndarray]) -> Union[str, List[str]]:
        tokenizer = self.require_tokenizer("to_string")
        tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens)
        if tokens.dim() == 2:
            return tokenizer.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
        if tokens.dim() <= 1:
            return tokenizer.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
        raise ValueError(f"to_string takes tokens of shape [pos] or [batch, pos], got {tuple(tokens.shape)}")

    def to_str_tokens(
        self,
        input: Any,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
    ) -> Union[List[str], List[List[str]]]:
        """Text, tokens, or a list of either -> the tokens as strings."""
        tokenizer = self.require_tokenizer("to_str_tokens")
        if isinstance(input, list) and not (input and isinstance(input[0], (int, np.integer))):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            tokens = torch.as_tensor(np.asarray(input) if not isinstance(input, Tensor) else input).squeeze()
            if tokens.dim() == 0:
                tokens = tokens.unsqueeze(0)
            if tokens.dim() != 1:
                raise ValueError(f"to_str_tokens takes tokens of shape [pos] or [1, pos], got {tuple(tokens.shape)}")
        return tokenizer.batch_decode([[t] for t in tokens.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token; raises if it is not."""
        tokens = self.to_tokens(string, prepend_bos=False).squeeze(0)
        if tokens.numel() != 1:
            raise InvalidInputError(f"Input string: {string} is not a single token! It tokenizes to "
                                    f"{self.to_str_tokens(tokens)}; use to_tokens for longer strings.")
        return int(tokens[0])

    def to_single_str_token(self, int_token: int) -> str:
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: Union[str, int],
        input: Union[str, Tensor],
        mode: str = "first",
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
    ) -> int:
        """Position of `single_token` (an id, or a string that is one token) in `input` (a string, tokenized with
        `prepend_bos` / `padding_side`, or `[pos]` / `[1, pos]` tokens). A token that is not there raises TL's
        AssertionError-compatible `InvalidInputError("The token does not occur in the prompt")`."""
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = input
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise InvalidInputError(f"If tokens are rank two, they must have shape [1, seq_len], not "
                                        f"{tokens.shape}: pass one prompt, e.g. tokens[i:i+1] or tokens[i].")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token)
        indices = torch.nonzero(tokens == single_token).flatten()
        if len(indices) == 0:
            raise _token_not_in_prompt_error(single_token, prepend_bos)
        if mode == "first":
            return int(indices[0])
        if mode == "last":
            return int(indices[-1])
        raise ValueError(f"mode must be 'first' or 'last', not {mode}")

    def tokens_to_residual_directions(self, tokens: Union[str, int, Tensor]) -> Tensor:
        """Unembedding direction(s) of token(s): `[d_model]`, or `[..., d_model]` for a tensor of tokens."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)  # [d, ...] -> [..., d]
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, (int, np.integer)):
            token = int(tokens)
        elif isinstance(tokens, Tensor):
            token = int(tokens)
        else:
            raise ValueError(f"Invalid token type: {type(tokens).__name__}")
        return self.W_U[:, token]
