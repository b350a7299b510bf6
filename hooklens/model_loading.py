"""The pretrained-loading and weight-processing surface of `HookedTransformer` (TransformerLens 3.9's names).

The work is done in `hooklens.loading`; these methods keep TL's signatures and positional order.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Literal, Optional, Union

import torch
from torch import Tensor

from hooklens import loading

logger = logging.getLogger(__name__)


class LoadingMixin:
    """`from_pretrained` and TL's weight-processing steps, delegated to `hooklens.loading`."""

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        refactor_factored_attn_matrices: bool = False,
        checkpoint_index: Optional[int] = None,
        checkpoint_value: Optional[int] = None,
        checkpoint_label: Optional[int] = None,
        hf_model: Any = None,
        device: Optional[Union[str, torch.device]] = None,
        n_devices: int = 1,
        tokenizer: Any = None,
        move_to_device: bool = True,
        fold_value_biases: bool = True,
        default_prepend_bos: Optional[bool] = None,
        default_padding_side: Optional[Literal["left", "right"]] = None,
        dtype: Union[torch.dtype, str] = torch.float32,
        first_n_layers: Optional[int] = None,
        n_ctx: Optional[int] = None,
        **config_overrides: Any,
    ):
        """Load GPT-2 weights from an HF-format directory, a GPT-2 name in the local HF cache, or `hf_model`.

        Weights are processed as TL does by default (fold LayerNorm, centre writing weights and unembedding, fold
        value biases); `from_pretrained_no_processing` keeps HF's raw weights. TL's signature, positional order
        included: `first_n_layers` keeps only the first blocks, `n_ctx` shortens the context (and `W_pos`),
        `move_to_device=False` leaves the weights on the CPU. GPT-2 has no training checkpoints and hooklens runs on
        one device, so `checkpoint_*` and `n_devices > 1` are refused with an error.

        Before any weight is allocated, config.json must be a regular file holding a JSON object whose values can
        form a model and agree with the checkpoint's tensor shapes, or a `CheckpointError` names the field and the
        fix; weights holding NaN or inf load with a warning that names them. Pickled code is never run.
        """
        if checkpoint_index is not None or checkpoint_value is not None or checkpoint_label is not None:
            raise ValueError("checkpoint_index / checkpoint_value / checkpoint_label select training checkpoints, "
                             "which GPT-2 checkpoints do not have; pass a directory of the checkpoint you want.")
        if n_devices != 1:
            raise ValueError(f"n_devices={n_devices}: hooklens runs a model on one device; pass device=... instead.")
        cfg, state_dict = loading.load_checkpoint(
            model_name, hf_model, device=device, dtype=dtype, fold_ln=fold_ln,
            center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            default_prepend_bos=True if default_prepend_bos is None else default_prepend_bos,
            first_n_layers=first_n_layers, n_ctx=n_ctx, **config_overrides,
        )
        if tokenizer is None and cfg.tokenizer_name is None:
            logger.warning("%s has no tokenizer files and d_vocab=%d is not GPT-2's: the model takes token ids only "
                           "(model.set_tokenizer(...) adds one).", model_name, cfg.d_vocab)
        # Built once, with the norms the processed weights need (LNPre once LayerNorm is folded), on the CPU.
        padding_side = default_padding_side or "right"
        model = cls(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side=padding_side)
        loading.load_weights(model, state_dict)
        return (model.to(cfg.device) if move_to_device else model).eval()

    @classmethod
    def from_pretrained_no_processing(cls, model_name: str, **kwargs: Any):
        """`from_pretrained` without any weight processing: activations equal Hugging Face's."""
        for flag in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
            kwargs.setdefault(flag, False)
        return cls.from_pretrained(model_name, **kwargs)

    def process_weights_(
        self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
        fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """Process this model's own weights in place (a no-op for steps already applied, e.g. fold_ln twice)."""
        self.load_and_process_state_dict(
            {k: v.detach().clone() for k, v in self.state_dict().items()}, fold_ln=fold_ln,
            center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )

    # -- TL's individual processing steps, on TL-format state dicts (each returns the processed dict) -------------
    def fold_layer_norm(
        self, state_dict: Dict[str, Tensor], fold_biases: bool = True, center_weights: bool = True
    ) -> Dict[str, Tensor]:
        return loading.fold_layer_norm(dict(state_dict), self.cfg, fold_biases, center_weights)

    def center_writing_weights(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return loading.center_writing_weights(dict(state_dict), self.cfg)

    def center_unembed(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return loading.center_unembed(dict(state_dict))

    def fold_value_biases(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return loading.fold_value_biases(dict(state_dict), self.cfg)

    def refactor_factored_attn_matrices(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return loading.refactor_factored_attn_matrices(dict(state_dict), self.cfg)
