"""Rough evals, compatible with ``transformer_lens.evals`` (TransformerLens 3.9).

Ported from TransformerLens (MIT License, Copyright (c) 2022 TransformerLensOrg).
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from hooklens.utils import lm_cross_entropy_loss, override_or_use_default_value

__all__ = ["make_repeated_tokens", "repeated_random_tokens", "induction_loss", "sanity_check", "evaluate_on_dataset",
           "IOIDataset", "ioi_eval"]

SANITY_CHECK_TEXT = (
    "Many important transition points in the history of science have been moments when science 'zoomed in.' At "
    "these points, we develop a visualization or tool that allows us to see the world in a new level of detail, and "
    "a new field of science develops to study the world through this lens."
)


def sanity_check(model: Any) -> torch.Tensor:
    """Loss on the first paragraph of Circuits: Zoom In (roughly: < 5 fine, > 7 broken), as TL's."""
    return model(SANITY_CHECK_TEXT, return_type="loss")


@torch.inference_mode()
def evaluate_on_dataset(model: Any, data_loader: Any, truncate: int = 100, device: Any = None) -> float:
    """Mean loss over the first `truncate + 1` batches of `data_loader` (each a dict with `"tokens"`), as TL's;
    `device` defaults to the model's (TL defaulted to "cuda")."""
    device = model.cfg.device if device is None else device
    losses = []
    for batch in tqdm(data_loader, desc="evaluate"):
        losses.append(model(batch["tokens"].to(device), return_type="loss").mean())
        if len(losses) > truncate:
            break
    if not losses:
        raise ValueError("data_loader gave no batches.")
    return float(torch.stack(losses).mean())


def repeated_random_tokens(
    batch_size: int,
    subseq_len: int,
    *,
    bos_token_id: Optional[int] = None,
    low: int = 100,
    high: int = 20000,
    seed: Optional[int] = None,
    device: Any = "cpu",
) -> torch.Tensor:
    """The prompt on which induction heads show: random ids in ``[low, high)``, each row's first half repeated,
    ``[batch, 2 * subseq_len]`` (``[batch, 1 + 2 * subseq_len]`` with ``bos_token_id`` first).

    ``seed`` draws from a private generator seeded with it (the global RNG is untouched); ``None`` draws from the
    global CPU RNG, as TransformerLens's ``make_repeated_tokens`` does."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    first_half = torch.randint(low, high, (batch_size, subseq_len), generator=generator)
    parts = [first_half, first_half]
    if bos_token_id is not None:
        parts.insert(0, torch.full((batch_size, 1), bos_token_id, dtype=first_half.dtype))
    return torch.cat(parts, dim=1).to(device)


def make_repeated_tokens(batch_size: int = 4, subseq_len: int = 384, device: Any = "cpu") -> torch.Tensor:
    """``[batch, 2 * subseq_len]`` tokens: random ids in ``[100, 20000)``, each row repeated twice.

    Draws from the global CPU RNG exactly like TransformerLens, so a seeded call gives the same tokens.
    """
    return repeated_random_tokens(batch_size, subseq_len, device=device)


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


class IOIDataset(torch.utils.data.Dataset):
    """TL's indirect-object-identification prompts: templates with [A], [B] and noun slots filled at random.

    Items are `{"prompt": token ids (BOS first if prepend_bos), "IO": ids of " " + the indirect object,
    "S": ids of " " + the subject}`; `seed` seeds Python's `random` as TL does, so the samples equal TL's."""

    def __init__(self, tokenizer: Any, templates: Optional[List[str]] = None, names: Optional[List[str]] = None,
                 nouns: Optional[Dict[str, List[str]]] = None, num_samples: int = 1000, symmetric: bool = False,
                 prepend_bos: bool = True, seed: Optional[int] = None):
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        if seed is not None:
            random.seed(seed)
        self.templates = templates if templates is not None else self.get_default_templates()
        self.names = names if names is not None else self.get_default_names()
        self.nouns = nouns if nouns is not None else self.get_default_nouns()
        self.samples: List[Dict[str, str]] = []
        for _ in range(num_samples // 2 if symmetric else num_samples):
            self.samples.extend(self.get_sample(symmetric=symmetric))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        sample = self.samples[idx]
        prompt = self.tokenizer.encode(sample["text"])
        if self.prepend_bos:
            prompt = [self.tokenizer.bos_token_id] + prompt
        return {
            "prompt": torch.LongTensor(prompt),
            "IO": torch.LongTensor(self.tokenizer.encode(sample["IO"])),
            "S": torch.LongTensor(self.tokenizer.encode(sample["S"])),
        }

    def get_sample(self, symmetric: bool = False) -> List[Dict[str, str]]:
        template = random.choice(self.templates)
        for noun_type, noun_list in self.nouns.items():
            template = template.replace(f"[{noun_type}]", random.choice(noun_list))
        first, second = random.sample(self.names, 2)
        samples = [{"text": template.replace("[A]", first).replace("[B]", second), "IO": " " + first,
                    "S": " " + second}]
        if symmetric:
            samples.append({"text": template.replace("[A]", second).replace("[B]", first), "IO": " " + second,
                            "S": " " + first})
        return samples

    @staticmethod
    def get_default_names() -> List[str]:
        return ["John", "Mary"]

    @staticmethod
    def get_default_templates() -> List[str]:
        return [
            "[A] and [B] went to the [LOCATION] to buy [OBJECT]. [B] handed the [OBJECT] to [A]",
            "Then, [B] and [A] went to the [LOCATION]. [B] gave the [OBJECT] to [A]",
        ]

    @staticmethod
    def get_default_nouns() -> Dict[str, List[str]]:
        return {"LOCATION": ["store", "market"], "OBJECT": ["milk", "eggs", "bread"]}


@torch.inference_mode()
def ioi_eval(model: Any, dataset: Any = None, batch_size: int = 8, num_samples: int = 1000, tokenizer: Any = None,
             symmetric: bool = False) -> Dict[str, float]:
    """Mean logit difference (IO minus S, at the first token where they differ) and accuracy on IOI prompts,
    as TL's `ioi_eval`; the logits of a batch are gathered in one indexing op."""
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if dataset is None:
        dataset = IOIDataset(tokenizer, num_samples=num_samples, symmetric=symmetric)
    total_diff = torch.zeros((), dtype=torch.float64, device=model.cfg.device)  # summed on the device, read once
    total_correct = torch.zeros((), dtype=torch.float64, device=model.cfg.device)
    for start in tqdm(range(0, len(dataset), batch_size), desc="ioi_eval"):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        prompts = torch.nn.utils.rnn.pad_sequence([s["prompt"] for s in samples], batch_first=True)  # [b, p]
        rows, positions, io_ids, s_ids = [], [], [], []
        for row, sample in enumerate(samples):  # per-sample setup: which position and tokens to read
            n = min(len(sample["IO"]), len(sample["S"]))
            io, s = sample["IO"][:n], sample["S"][:n]
            first_diff = int(torch.nonzero(io != s)[0, 0])
            rows.append(row)
            positions.append(len(sample["prompt"]) - len(sample["IO"]) + first_diff - 1)
            io_ids.append(int(io[first_diff]))
            s_ids.append(int(s[first_diff]))
        logits = model(prompts.to(model.cfg.device), return_type="logits")[rows, positions]  # [b, v]
        diff = (logits[torch.arange(len(rows)), io_ids] - logits[torch.arange(len(rows)), s_ids]).double()
        total_diff += diff.sum()
        total_correct += (diff > 0).sum()
    return {"Logit Difference": float(total_diff) / len(dataset), "Accuracy": float(total_correct) / len(dataset)}
