"""TransformerLens 3.9's `transformer_lens.loading_from_pretrained` names that users call, for the GPT-2 family.

Official model names and their aliases (`get_official_model_name`), and the training-checkpoint labels of the
checkpointed GPT-2s (`get_checkpoint_labels`: the Stanford CRFM runs, step labels). hooklens runs GPT-2-style
models only: any other name (Pythia, Llama, TL's own `attn-only-2l` / `solu-12l`, ...) raises a ValueError that
says so. Loading weights is `HookedTransformer.from_pretrained` (hooklens.loading).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

# TL 3.9's official names of the GPT-2-family models (Hugging Face repository ids), in TL's order.
OFFICIAL_MODEL_NAMES: List[str] = [
    "distilgpt2",
    "gpt2",
    "gpt2-large",
    "gpt2-medium",
    "gpt2-xl",
    "stanford-crfm/alias-gpt2-small-x21",
    "stanford-crfm/arwen-gpt2-medium-x21",
    "stanford-crfm/battlestar-gpt2-small-x49",
    "stanford-crfm/beren-gpt2-medium-x49",
    "stanford-crfm/caprica-gpt2-small-x81",
    "stanford-crfm/celebrimbor-gpt2-medium-x81",
    "stanford-crfm/darkmatter-gpt2-small-x343",
    "stanford-crfm/durin-gpt2-medium-x343",
    "stanford-crfm/eowyn-gpt2-medium-x777",
    "stanford-crfm/expanse-gpt2-small-x777",
]

# TL 3.9's aliases of those models (official name -> names users may type).
MODEL_ALIASES: Dict[str, List[str]] = {
    "distilgpt2": ["distillgpt2", "distill-gpt2", "distil-gpt2", "gpt2-xs"],
    "gpt2": ["gpt2-small"],
    "stanford-crfm/alias-gpt2-small-x21": [
        "stanford-gpt2-small-a", "alias-gpt2-small-x21", "gpt2-mistral-small-a", "gpt2-stanford-small-a"],
    "stanford-crfm/arwen-gpt2-medium-x21": [
        "stanford-gpt2-medium-a", "arwen-gpt2-medium-x21", "gpt2-medium-small-a", "gpt2-stanford-medium-a"],
    "stanford-crfm/battlestar-gpt2-small-x49": [
        "stanford-gpt2-small-b", "battlestar-gpt2-small-x49", "gpt2-mistral-small-b"],
    "stanford-crfm/beren-gpt2-medium-x49": [
        "stanford-gpt2-medium-b", "beren-gpt2-medium-x49", "gpt2-medium-small-b", "gpt2-stanford-medium-b"],
    "stanford-crfm/caprica-gpt2-small-x81": [
        "stanford-gpt2-small-c", "caprica-gpt2-small-x81", "gpt2-mistral-small-c", "gpt2-stanford-small-c"],
    "stanford-crfm/celebrimbor-gpt2-medium-x81": [
        "stanford-gpt2-medium-c", "celebrimbor-gpt2-medium-x81", "gpt2-medium-small-c"],
    "stanford-crfm/darkmatter-gpt2-small-x343": [
        "stanford-gpt2-small-d", "darkmatter-gpt2-small-x343", "gpt2-mistral-small-d"],
    "stanford-crfm/durin-gpt2-medium-x343": [
        "stanford-gpt2-medium-d", "durin-gpt2-medium-x343", "gpt2-medium-small-d", "gpt2-stanford-medium-d"],
    "stanford-crfm/eowyn-gpt2-medium-x777": [
        "stanford-gpt2-medium-e", "eowyn-gpt2-medium-x777", "gpt2-medium-small-e", "gpt2-stanford-medium-e"],
    "stanford-crfm/expanse-gpt2-small-x777": [
        "stanford-gpt2-small-e", "expanse-gpt2-small-x777", "gpt2-mistral-small-e"],
}

# The training steps saved for the Stanford CRFM GPT-2 runs.
STANFORD_CRFM_CHECKPOINTS: List[int] = (
    list(range(0, 100, 10))
    + list(range(100, 2000, 50))
    + list(range(2000, 20000, 100))
    + list(range(20000, 400000 + 1, 1000))
)


def make_model_alias_map() -> Dict[str, str]:
    """Every official name and alias, lower-cased -> its official name."""
    model_alias_map = {}
    for official_model_name in OFFICIAL_MODEL_NAMES:
        for alias in MODEL_ALIASES.get(official_model_name, []):
            model_alias_map[alias.lower()] = official_model_name
        model_alias_map[official_model_name.lower()] = official_model_name
    return model_alias_map


def get_official_model_name(model_name: str) -> str:
    """The official name of a GPT-2-family model name or alias (case-insensitive)."""
    if not isinstance(model_name, str):
        raise TypeError(f"model_name={model_name!r} is not a string: pass a name such as 'gpt2' or 'gpt2-medium'.")
    official_model_name = make_model_alias_map().get(model_name.lower())
    if official_model_name is None:
        raise ValueError(
            f"{model_name} not found. Valid official model names (excl aliases): {OFFICIAL_MODEL_NAMES}. "
            "hooklens knows the GPT-2 family only; other architectures (and TL's own models such as "
            "attn-only-2l or solu-12l) need TransformerLens."
        )
    return official_model_name


def get_checkpoint_labels(model_name: str, **kwargs: Any) -> Tuple[List[int], str]:
    """(checkpoint labels, label type "step") of a checkpointed GPT-2 (the Stanford CRFM runs); other models raise
    ValueError. `kwargs` (Hugging Face hub options in TL) are accepted and unused: the labels are fixed."""
    official_model_name = get_official_model_name(model_name)
    if official_model_name.startswith("stanford-crfm/"):
        return STANFORD_CRFM_CHECKPOINTS, "step"
    raise ValueError(f"Model {official_model_name} is not checkpointed.")
