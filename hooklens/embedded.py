"""The small GPT-2 shipped inside the package (`hooklens/models/gpt2-embedded/`), usable offline everywhere.

A 2-layer GPT-2-architecture model trained by `scripts/train_embedded.py` on Python standard-library sources mixed
with repeated random token sequences, so it has a previous-token head (layer 0) and an induction head (layer 1).
See `hooklens/models/MODEL_CARD.md` for data, size, training time and measured scores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hooklens.model import HookedTransformer

__all__ = ["EMBEDDED_MODEL_NAME", "embedded_model_dir", "load_embedded"]

EMBEDDED_MODEL_NAME = "gpt2-embedded"


def embedded_model_dir() -> Path:
    """Directory of the shipped checkpoint (Hugging Face GPT-2 format: config.json + model.safetensors)."""
    path = Path(__file__).resolve().parent / "models" / EMBEDDED_MODEL_NAME
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The embedded model is missing from {path} (config.json + model.safetensors expected). Reinstall "
            "hooklens, or recreate it with `python scripts/train_embedded.py --out hooklens/models/gpt2-embedded`."
        )
    return path


def load_embedded(**from_pretrained_kwargs: Any):
    """`HookedTransformer.from_pretrained(embedded_model_dir(), **from_pretrained_kwargs)`.

    The weights are stored in float16 and loaded as float32 unless `dtype=` says otherwise; the tokenizer is the
    GPT-2 one shipped in `hooklens/assets/gpt2-tokenizer`.
    """
    return HookedTransformer.from_pretrained(str(embedded_model_dir()), **from_pretrained_kwargs)
