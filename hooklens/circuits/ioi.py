"""Indirect object identification (IOI) data, generated offline, in EAP-IG's batch format.

Prompts follow Wang et al. 2022 ("Interpretability in the Wild", arXiv:2211.00593): a sentence introduces two
people, the subject S and the indirect object IO, then S is repeated and the model should complete with IO:

    "When Mary and John went to the store, John gave a drink to"  ->  " Mary" (IO), not " John" (S)

BABA templates name S first ("[B] and [A]"); ABBA templates name IO first. The counterfactual ("corrupted") prompt
is the ABC one of the paper: the same template, place and object with the three name slots (IO, S1, S2) filled by
three other names, so the sentence no longer says who the indirect object is. Every name, place and object is a
single token with its leading space, so a clean prompt and its counterfactual have the same number of tokens.

A dataset yields EAP-IG's items `(clean: str, corrupted: str, [io_token, s_token])`; `to_dataloader` batches them
as `(clean: list[str], corrupted: list[str], labels: LongTensor[batch, 2])`. `logit_diff` is EAP-IG/MIB's metric
`metric(logits, clean_logits, input_lengths, labels)`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["BABA_TEMPLATES", "ABBA_TEMPLATES", "NAMES", "PLACES", "OBJECTS", "IOIDataset", "collate_EAP",
           "get_logit_positions", "logit_diff", "logit_diff_loss", "logit_diff_per_prompt"]

# [A] is the indirect object, [B] the subject; each template ends with the answer " [A]", which the prompt omits.
BABA_TEMPLATES: List[str] = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]
# The same sentences with the IO named first.
ABBA_TEMPLATES: List[str] = [t.replace("[B] and [A]", "[A] and [B]", 1) for t in BABA_TEMPLATES]

# First names, places and objects of the paper's dataset; each is one GPT-2 token after a space (checked on load
# against the tokenizer in use).
NAMES: List[str] = [
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Anderson", "Andre", "Andrew", "Andy", "Anna", "Anthony",
    "Arthur", "Austin", "Blake", "Brandon", "Brian", "Carter", "Charles", "Charlie", "Christian", "Christopher",
    "Clark", "Cole", "Collins", "Connor", "Crew", "Crystal", "Daniel", "David", "Dean", "Edward", "Elizabeth",
    "Emily", "Eric", "Eva", "Ford", "Frank", "George", "Georgia", "Graham", "Grant", "Henry", "Ian", "Jack", "Jacob",
    "Jake", "James", "Jamie", "Jane", "Jason", "Jay", "Jennifer", "Jeremy", "Jessica", "John", "Jonathan", "Jordan",
    "Joseph", "Joshua", "Justin", "Kate", "Kelly", "Kevin", "Kyle", "Laura", "Leon", "Lewis", "Lisa", "Louis",
    "Luke", "Madison", "Marco", "Marcus", "Maria", "Mark", "Martin", "Mary", "Matthew", "Max", "Michael",
    "Michelle", "Morgan", "Patrick", "Paul", "Peter", "Prince", "Rachel", "Richard", "River", "Robert", "Roman",
    "Rose", "Ruby", "Russell", "Ryan", "Sarah", "Scott", "Sean", "Simon", "Stephen", "Steven", "Sullivan", "Taylor",
    "Thomas", "Tyler", "Victoria", "Warren", "William",
]
PLACES: List[str] = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS: List[str] = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]

TemplateType = Literal["mixed", "BABA", "ABBA"]
Counterfactual = Literal["abc", "s2"]


def _render(template: str, io: str, s1: str, s2: str, place: str, obj: str) -> str:
    """The prompt for `template` (without the final answer) with its name slots filled separately: the first [A]
    is the IO, the first [B] is S1, the second [B] is S2."""
    if not template.endswith(" [A]"):
        raise ValueError(f"IOI template must end with ' [A]' (the answer), got {template!r}")
    text = template[: -len(" [A]")]
    text = text.replace("[A]", io, 1).replace("[B]", s1, 1).replace("[B]", s2, 1)
    return text.replace("[PLACE]", place).replace("[OBJECT]", obj)


def _single_token_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"IOI word {word!r} is {len(ids)} tokens with a leading space under this tokenizer; "
                         "the generator needs single-token names, places and objects (pass names=/places=/objects=)")
    return ids[0]


class IOIDataset(Dataset):
    """`n_prompts` IOI prompts with counterfactuals, deterministic in `seed`.

    template_type: 'mixed' (each prompt BABA or ABBA at random), 'BABA' or 'ABBA'.
    counterfactual: 'abc' (Wang et al.'s ABC distribution: IO, S1 and S2 each replaced by a different name, none of
    them the clean prompt's) or 's2' (only S2 replaced by a third name, as EAP-IG's IOI example data).
    tokenizer: a Hugging Face tokenizer, or None for the GPT-2 tokenizer bundled with hooklens (pass
    `model.tokenizer` for a model with another vocabulary); label ids come from it.
    names / places / objects / templates: override the paper's lists (each word must be a single token).

    Attributes: `clean`, `corrupted` (lists of str), `labels` (LongTensor [n, 2]: IO token, S token), `io_names`,
    `s_names`, `corrupted_names` ((IO, S1, S2) slot names of each counterfactual), `template_ids` (index into
    `templates`), `is_abba`, `n_tokens` (tokens per prompt without BOS; the counterfactual has as many).
    """

    def __init__(self, n_prompts: int, seed: int = 0, template_type: TemplateType = "mixed",
                 counterfactual: Counterfactual = "abc", tokenizer: Any = None,
                 names: Optional[Sequence[str]] = None, places: Optional[Sequence[str]] = None,
                 objects: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None):
        if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
            raise ValueError(f"IOIDataset: n_prompts must be a positive integer, got {n_prompts!r}")
        if template_type not in ("mixed", "BABA", "ABBA"):
            raise ValueError(f"IOIDataset: template_type must be 'mixed', 'BABA' or 'ABBA', got {template_type!r}")
        if counterfactual not in ("abc", "s2"):
            raise ValueError(f"IOIDataset: counterfactual must be 'abc' or 's2', got {counterfactual!r}")
        names = list(NAMES if names is None else names)
        places = list(PLACES if places is None else places)
        objects = list(OBJECTS if objects is None else objects)
        baba = list(BABA_TEMPLATES if templates is None else templates)
        needed = 5 if counterfactual == "abc" else 3  # 2 clean names + 3 (abc) or 1 (s2) fresh ones
        if len(set(names)) < needed:
            raise ValueError(f"IOIDataset: need at least {needed} distinct names for counterfactual="
                             f"{counterfactual!r}, got {len(set(names))}")
        if not places or not objects or not baba:
            raise ValueError("IOIDataset: places, objects and templates must be non-empty")
        for template in baba:
            if "[B] and [A]" not in template or template.count("[B]") != 2 or template.count("[A]") != 2:
                raise ValueError(f"IOI template {template!r} must name '[B] and [A]', repeat [B] once and end with "
                                 "' [A]' (the BABA form; ABBA is derived)")
        if tokenizer is None:
            from hooklens.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.tokenizer = tokenizer
        # Checked before generating anything: a multi-token word would make clean/corrupted lengths differ.
        token_of: Dict[str, int] = {w: _single_token_id(tokenizer, w) for w in {*names, *places, *objects}}

        self.templates = baba + [t.replace("[B] and [A]", "[A] and [B]", 1) for t in baba]
        rng = np.random.default_rng(seed)
        n_baba = len(baba)
        self.clean: List[str] = []
        self.corrupted: List[str] = []
        self.io_names: List[str] = []
        self.s_names: List[str] = []
        self.corrupted_names: List[Tuple[str, str, str]] = []
        self.template_ids: List[int] = []
        labels = []
        for _ in range(n_prompts):
            abba = {"BABA": False, "ABBA": True}.get(template_type)
            if abba is None:
                abba = bool(rng.integers(2))
            template_id = int(rng.integers(n_baba)) + (n_baba if abba else 0)
            picked = rng.choice(len(names), size=needed, replace=False)
            io, s = names[picked[0]], names[picked[1]]
            fresh = [names[i] for i in picked[2:]]
            place = places[int(rng.integers(len(places)))]
            obj = objects[int(rng.integers(len(objects)))]
            template = self.templates[template_id]
            slots = (fresh[0], fresh[1], fresh[2]) if counterfactual == "abc" else (io, s, fresh[0])
            self.clean.append(_render(template, io, s, s, place, obj))
            self.corrupted.append(_render(template, *slots, place, obj))
            self.io_names.append(io)
            self.s_names.append(s)
            self.corrupted_names.append(slots)
            self.template_ids.append(template_id)
            labels.append((token_of[io], token_of[s]))
        self.labels = torch.tensor(labels, dtype=torch.long)  # [n_prompts, 2]
        self.is_abba = [tid >= n_baba for tid in self.template_ids]
        self.n_tokens = [len(ids) for ids in tokenizer(self.clean, add_special_tokens=False)["input_ids"]]
        corrupted_tokens = [len(ids) for ids in tokenizer(self.corrupted, add_special_tokens=False)["input_ids"]]
        if corrupted_tokens != self.n_tokens:  # guaranteed by the single-token words; a tokenizer could still merge
            bad = next(i for i, (a, b) in enumerate(zip(self.n_tokens, corrupted_tokens)) if a != b)
            raise ValueError(f"IOIDataset: prompt {bad} has {self.n_tokens[bad]} tokens but its counterfactual "
                             f"{corrupted_tokens[bad]} under this tokenizer: {self.clean[bad]!r} / "
                             f"{self.corrupted[bad]!r}")

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, index: int) -> Tuple[str, str, List[int]]:
        return self.clean[index], self.corrupted[index], self.labels[index].tolist()

    def to_dataloader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A DataLoader of EAP-IG batches `(clean: list[str], corrupted: list[str], labels: LongTensor[batch, 2])`;
        with shuffle, the order is fixed by `seed`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"to_dataloader: batch_size must be a positive integer, got {batch_size!r}")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self, batch_size=int(batch_size), shuffle=shuffle, collate_fn=collate_EAP,
                          generator=generator)


def collate_EAP(items: Sequence[Tuple[str, str, Any]]) -> Tuple[List[str], List[str], Tensor]:
    """Batch `(clean, corrupted, label)` items the way EAP-IG's examples do: two lists of strings and a tensor."""
    clean, corrupted, labels = zip(*items)
    return list(clean), list(corrupted), torch.tensor(labels)


def get_logit_positions(logits: Tensor, input_length: Tensor) -> Tensor:
    """`[batch, vocab]`: each prompt's logits at its last real token, `input_length - 1` (right padding)."""
    return logits[torch.arange(logits.size(0), device=logits.device), input_length.to(logits.device) - 1]


def logit_diff(logits: Tensor, clean_logits: Tensor, input_length: Tensor, labels: Tensor, mean: bool = True,
               prob: bool = False, loss: bool = False) -> Tensor:
    """EAP-IG / MIB's IOI metric: logit (or, with prob, probability) of the correct token minus the incorrect one,
    at each prompt's last real position. labels: `[batch, 2]` (correct, incorrect) token ids. loss negates it (for
    attribution, which descends a loss); mean averages over the batch, else one value per prompt. `clean_logits` is
    unused (it is part of the metric signature other metrics, e.g. KL to the clean run, need)."""
    if logits.ndim != 3:
        raise ValueError(f"logit_diff: logits must be [batch, pos, d_vocab], got shape {tuple(logits.shape)}")
    if labels.ndim != 2 or labels.size(1) != 2 or labels.size(0) != logits.size(0):
        raise ValueError(f"logit_diff: labels must be [batch={logits.size(0)}, 2] (correct, incorrect token ids), got "
                         f"shape {tuple(labels.shape)}")
    if input_length.shape != (logits.size(0),):
        raise ValueError(f"logit_diff: input_length must be [batch={logits.size(0)}], got {tuple(input_length.shape)}")
    last = get_logit_positions(logits, input_length)  # [batch, d_vocab]
    values = torch.softmax(last, dim=-1) if prob else last
    good_bad = torch.gather(values, -1, labels.to(values.device))  # [batch, 2]
    results = good_bad[:, 0] - good_bad[:, 1]
    if loss:
        results = -results
    return results.mean() if mean else results


# The two uses of the metric in EAP-IG's examples: a loss for attribution, per-prompt values for evaluation.
logit_diff_loss = partial(logit_diff, loss=True, mean=True)
logit_diff_per_prompt = partial(logit_diff, loss=False, mean=False)
