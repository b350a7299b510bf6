"""hooklens.circuits.ioi: the IOI generator (templates, names, ABC counterfactuals, equal lengths, labels,
determinism, EAP-IG batches) and the logit_diff metric against a per-prompt loop."""
from __future__ import annotations

import pytest
import torch

from hooklens.circuits.ioi import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    IOIDataset,
    collate_EAP,
    logit_diff,
)


@pytest.fixture(scope="module")
def tokenizer():
    from hooklens.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return IOIDataset(64, seed=3, tokenizer=tokenizer)


def test_word_lists_are_single_gpt2_tokens(tokenizer):
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    assert len(set(NAMES)) == len(NAMES) >= 100
    for word in NAMES + PLACES + OBJECTS:
        assert len(tokenizer.encode(" " + word)) == 1, word
    for baba, abba in zip(BABA_TEMPLATES, ABBA_TEMPLATES):
        assert "[B] and [A]" in baba and "[A] and [B]" in abba and baba.endswith(" to [A]")


def words(text):
    return text.replace(",", " ").replace(".", " ").split()


def test_prompts_labels_and_counterfactuals(dataset, tokenizer):
    assert len(dataset) == 64
    assert dataset.labels.shape == (64, 2) and dataset.labels.dtype == torch.long
    for i in range(len(dataset)):
        clean, corrupted, label = dataset[i]
        io, s = dataset.io_names[i], dataset.s_names[i]
        assert io != s
        assert label == [tokenizer.encode(" " + io)[0], tokenizer.encode(" " + s)[0]]
        assert clean.endswith(" to") and not clean.endswith(" " + io)
        clean_words = words(clean)
        assert clean_words.count(io) == 1 and clean_words.count(s) == 2  # IO once, S twice (S1, S2)
        first, second = clean_words.index(io), clean_words.index(s)
        assert (first < second) == dataset.is_abba[i]  # ABBA names the IO first
        # ABC: three different names, none of the clean prompt's, in the same slots; the rest of the text unchanged
        x, y, z = dataset.corrupted_names[i]
        assert len({x, y, z, io, s}) == 5
        cor_words = words(corrupted)
        assert io not in cor_words and s not in cor_words
        swapped = [{x: io, y: s, z: s}.get(w, w) for w in cor_words]
        s_positions = [j for j, w in enumerate(clean_words) if w == s]
        assert [w for j, w in enumerate(cor_words) if j == clean_words.index(io)] == [x]
        assert [cor_words[j] for j in s_positions] == [y, z]
        assert swapped == clean_words
        # equal token lengths: the same count with and without BOS, pairwise
        clean_ids, cor_ids = tokenizer.encode(clean), tokenizer.encode(corrupted)
        assert len(clean_ids) == len(cor_ids) == dataset.n_tokens[i]
        # tokens differ exactly at the three name slots
        assert sum(a != b for a, b in zip(clean_ids, cor_ids)) == 3


def test_s2_counterfactual(tokenizer):
    ds = IOIDataset(16, seed=1, counterfactual="s2", tokenizer=tokenizer)
    for i in range(len(ds)):
        clean, corrupted, _ = ds[i]
        io, s = ds.io_names[i], ds.s_names[i]
        third = ds.corrupted_names[i][2]
        assert ds.corrupted_names[i][:2] == (io, s) and third not in (io, s)
        assert corrupted == clean[::-1].replace(s[::-1], third[::-1], 1)[::-1]  # only the last S replaced
        assert len(tokenizer.encode(clean)) == len(tokenizer.encode(corrupted))


def test_template_types(tokenizer):
    baba = IOIDataset(20, seed=0, template_type="BABA", tokenizer=tokenizer)
    abba = IOIDataset(20, seed=0, template_type="ABBA", tokenizer=tokenizer)
    assert not any(baba.is_abba) and all(abba.is_abba)
    for i in range(20):
        assert f"{baba.s_names[i]} and {baba.io_names[i]}" in baba.clean[i]
        assert f"{abba.io_names[i]} and {abba.s_names[i]}" in abba.clean[i]
    mixed = IOIDataset(200, seed=0, tokenizer=tokenizer)
    assert 60 < sum(mixed.is_abba) < 140 and len(set(mixed.template_ids)) > 20


def test_deterministic_by_seed(dataset, tokenizer):
    again = IOIDataset(64, seed=3, tokenizer=tokenizer)
    assert again.clean == dataset.clean and again.corrupted == dataset.corrupted
    assert torch.equal(again.labels, dataset.labels)
    other = IOIDataset(64, seed=4, tokenizer=tokenizer)
    assert other.clean != dataset.clean
    prefix = IOIDataset(10, seed=3, tokenizer=tokenizer)  # the first prompts don't depend on how many follow
    assert prefix.clean == dataset.clean[:10]


def test_dataloader_batches(dataset):
    batches = list(dataset.to_dataloader(batch_size=24))
    assert [len(b[0]) for b in batches] == [24, 24, 16]
    clean, corrupted, labels = batches[0]
    assert isinstance(clean, list) and isinstance(corrupted, list) and isinstance(clean[0], str)
    assert clean == dataset.clean[:24] and corrupted == dataset.corrupted[:24]
    assert labels.shape == (24, 2) and labels.dtype == torch.long and torch.equal(labels, dataset.labels[:24])
    shuffled = [b[0] for b in dataset.to_dataloader(24, shuffle=True, seed=5)]
    assert shuffled == [b[0] for b in dataset.to_dataloader(24, shuffle=True, seed=5)]
    assert sorted(sum(shuffled, [])) == sorted(dataset.clean) and shuffled[0] != clean
    c, k, lab = collate_EAP([("a", "b", [1, 2]), ("c", "d", [3, 4])])
    assert (c, k) == (["a", "c"], ["b", "d"]) and torch.equal(lab, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="batch_size"):
        dataset.to_dataloader(0)


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="n_prompts"):
        IOIDataset(0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="template_type"):
        IOIDataset(4, template_type="AABB", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="counterfactual"):
        IOIDataset(4, counterfactual="zero", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="single-token"):
        IOIDataset(4, names=["Aaron", "Adam", "Alan", "Alex", "Bartholomew"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="at least 5 distinct names"):
        IOIDataset(4, names=["Aaron", "Adam", "Alan", "Alex"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="template"):
        IOIDataset(4, templates=["[A] met [B]. [B] waved to [A]"], tokenizer=tokenizer)


def reference_logit_diff(logits, input_length, labels, prob):
    """One prompt at a time: the last real position's (correct - incorrect) logit or probability."""
    values = []
    for b in range(logits.shape[0]):
        row = logits[b, int(input_length[b]) - 1]
        if prob:
            row = torch.softmax(row, dim=-1)
        values.append(row[int(labels[b, 0])] - row[int(labels[b, 1])])
    return torch.stack(values)


@pytest.mark.parametrize("prob", [False, True])
def test_logit_diff_matches_per_prompt_loop(prob):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11)
    input_length = torch.tensor([7, 3, 5, 1, 6])  # right padding: real tokens are [0, input_length)
    labels = torch.tensor([[1, 2], [3, 0], [10, 9], [4, 4], [0, 7]])
    expected = reference_logit_diff(logits, input_length, labels, prob)
    per_prompt = logit_diff(logits, None, input_length, labels, mean=False, prob=prob)
    torch.testing.assert_close(per_prompt, expected, rtol=0, atol=0)
    torch.testing.assert_close(logit_diff(logits, None, input_length, labels, prob=prob), expected.mean())
    torch.testing.assert_close(logit_diff(logits, None, input_length, labels, prob=prob, loss=True), -expected.mean())
    # padding positions after input_length are never read
    padded = logits.clone()
    for b, n in enumerate(input_length.tolist()):
        padded[b, n:] = float("nan")
    torch.testing.assert_close(logit_diff(padded, None, input_length, labels, mean=False, prob=prob), expected)


def test_logit_diff_errors():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="labels"):
        logit_diff(logits, logits, torch.tensor([3, 3]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_length"):
        logit_diff(logits, logits, torch.tensor([3]), torch.tensor([[1, 2], [1, 2]]))
    with pytest.raises(ValueError, match="logits"):
        logit_diff(logits[:, 0], logits, torch.tensor([3, 3]), torch.tensor([[1, 2], [1, 2]]))


def test_logit_diff_on_a_model_with_eap_tokenization(tokenizer):
    """EAP-IG tokenizes with BOS and right padding; clean and counterfactual batches then have the same lengths, so
    the metric reads the same (last) position in both runs."""
    from conftest import make_tiny_model

    ds = IOIDataset(6, seed=0, tokenizer=tokenizer)
    model = make_tiny_model(d_vocab=tokenizer.vocab_size, n_ctx=64).eval()
    clean, corrupted, labels = next(iter(ds.to_dataloader(6)))
    rows = [[tokenizer.bos_token_id] + tokenizer.encode(t) for t in clean]
    cor_rows = [[tokenizer.bos_token_id] + tokenizer.encode(t) for t in corrupted]
    assert [len(r) for r in rows] == [len(r) for r in cor_rows]
    n_pos = max(len(r) for r in rows)
    tokens = torch.tensor([r + [tokenizer.eos_token_id] * (n_pos - len(r)) for r in rows])
    input_length = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        logits = model(tokens)
    expected = reference_logit_diff(logits, input_length, labels, prob=False)
    torch.testing.assert_close(logit_diff(logits, logits, input_length, labels, mean=False), expected, rtol=0, atol=0)
