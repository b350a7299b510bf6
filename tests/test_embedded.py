"""The embedded model loads offline and has the induction circuit its model card promises."""
from __future__ import annotations

import json

import pytest
import torch
from tolerances import tolerance
from transformers import GPT2LMHeadModel

from hooklens.embedded import embedded_model_dir, load_embedded

SEQ_LENS = (20, 50, 100)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_embedded(device="cpu")


def repeated_random_tokens(model, seq_len: int, batch: int, seed: int, low: int = 0, high: int | None = None):
    """BOS + `seq_len` random tokens, the random tokens repeated twice (as in TransformerLens demos)."""
    gen = torch.Generator().manual_seed(seed)
    high = model.cfg.d_vocab if high is None else high
    rand = torch.randint(low, high, (batch, seq_len), generator=gen)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id)
    return torch.cat([bos, rand, rand], dim=1)


def scores(model, tokens: torch.Tensor, seq_len: int):
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    layers = range(model.cfg.n_layers)
    ind = torch.stack([cache["pattern", l].diagonal(1 - seq_len, -2, -1).mean((0, -1)) for l in layers])
    prev = torch.stack([cache["pattern", l].diagonal(-1, -2, -1).mean((0, -1)) for l in range(model.cfg.n_layers)])
    logp = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    gap = (logp[:, seq_len:].mean() - logp[:, :seq_len].mean()).item()
    return ind, prev, gap


def test_files_and_size():
    path = embedded_model_dir()
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert (path / "model.safetensors").stat().st_size <= 15_000_000
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2"


def test_loads_as_float32(model):
    assert model.W_E.dtype == torch.float32
    assert model.W_E.shape == (50257, model.cfg.d_model)
    assert torch.isfinite(model.W_E).all()
    text = "def f(x):\n    return x"
    logits = model(text, return_type="logits")
    tokens = model.to_tokens(text)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # The values: HF's GPT-2 on the same checkpoint (in float32; hooklens folds and centers the weights, so the
    # log-probs agree, not the raw logits).
    hf = GPT2LMHeadModel.from_pretrained(embedded_model_dir(), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf.eval()(tokens).logits
    torch.testing.assert_close(logits.log_softmax(-1), hf_logits.log_softmax(-1), **tolerance("logits_cross_impl"))


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("low,high", [(0, None), (1000, 10000)])
def test_induction_circuit(model, seq_len, low, high):
    tokens = repeated_random_tokens(model, seq_len, batch=8, seed=seq_len, low=low, high=high)
    ind, prev, gap = scores(model, tokens, seq_len)
    n_heads = model.cfg.n_heads
    ind_layer, ind_head = divmod(int(ind.argmax()), n_heads)
    prev_layer, prev_head = divmod(int(prev.argmax()), n_heads)
    assert ind.max() >= 0.5, f"best induction score {ind.max():.3f} at {ind_layer}.{ind_head}"
    assert prev.max() >= 0.5, f"best previous-token score {prev.max():.3f} at {prev_layer}.{prev_head}"
    # A real induction circuit: the previous-token head feeds an induction head in a later layer.
    assert ind_layer > prev_layer
    assert gap >= 3.0, f"second-half log-prob only {gap:.2f} nats above the first half"


def test_layer0_is_not_an_induction_head(model):
    """No positional shortcut: layer 0 cannot do induction, so its scores there must stay low."""
    for seq_len in SEQ_LENS:
        ind, _, _ = scores(model, repeated_random_tokens(model, seq_len, batch=4, seed=7 + seq_len), seq_len)
        assert ind[0].max() < 0.3
