"""End-to-end tour of hooklens: load, cache, hook, patch, generate.

Uses real GPT-2 weights when they are in the local Hugging Face cache (or `--model DIR`); otherwise the small
GPT-2 shipped inside the package (2 layers, trained on Python sources: it has real induction heads, but its
English is poor), so the whole tour runs on a fresh offline machine.
"""
from __future__ import annotations

import argparse
import time

import torch

import hooklens.utils as utils
from hooklens import HookedTransformer
from hooklens.embedded import load_embedded
from hooklens.loading import CheckpointError


def load_model(name: str) -> HookedTransformer:
    try:
        return HookedTransformer.from_pretrained(name)
    except CheckpointError as err:
        print(f"[no real weights] {err}\n[no real weights] using the embedded model shipped with hooklens\n")
        return load_embedded()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gpt2", help="GPT-2 name in the local HF cache, or an HF-format directory")
    args = parser.parse_args()
    start = time.perf_counter()
    model = load_model(args.model)
    cfg = model.cfg
    print(f"model: {cfg.model_name}  layers={cfg.n_layers} heads={cfg.n_heads} d_model={cfg.d_model}")

    text = "The first thing you need to figure out is *how* things are tokenized."
    tokens = model.to_tokens(text)
    print("tokens:", tokens[0, :8].tolist(), "...")
    print("str tokens:", model.to_str_tokens(text)[:8], "...")

    logits, cache = model.run_with_cache(tokens)
    print(f"loss: {model.loss_fn(logits, tokens).item():.3f}   cached activations: {len(cache)}")
    pattern = cache["pattern", 0, "attn"]
    print("layer 0 pattern:", tuple(pattern.shape), "(batch, head, query, key)")

    # Repeated random tokens: induction heads attend from each token of the second copy to the token after its
    # first occurrence; the induction score is the mean of that diagonal.
    seq_len = 50
    rand = torch.randint(1000, 10000, (4, seq_len))
    repeated = torch.cat([torch.full((4, 1), model.tokenizer.bos_token_id), rand, rand], dim=1).to(model.cfg.device)
    scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

    def induction_score(pattern, hook):
        diagonal = pattern.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)  # [b, h, seq_len]
        scores[hook.layer()] = diagonal.mean(dim=(0, -1)).cpu()

    model.run_with_hooks(repeated, return_type=None, fwd_hooks=[(lambda n: n.endswith("pattern"), induction_score)])
    layer, head = divmod(int(scores.argmax()), model.cfg.n_heads)
    print(f"top induction head: L{layer}H{head} score {scores.max():.3f}")

    # Activation patching by hand: put the clean residual stream at one (layer, position) into a corrupted run.
    clean = model.to_tokens("When John and Mary went to the shops, John gave the bag to")
    corrupt = model.to_tokens("When John and Mary went to the shops, Mary gave the bag to")
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))
    position = 10  # the token that differs (" John" vs " Mary")
    def patch(resid, hook):
        resid[:, position] = clean_cache[hook.name][:, position]
        return resid
    for layer in (0, model.cfg.n_layers - 1):
        name = utils.get_act_name("resid_pre", layer)
        patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)])
        diff = (patched[0, -1, mary] - patched[0, -1, john]).item()
        print(f"patch {name} at position {position}: logit(Mary) - logit(John) = {diff:+.3f}")

    continuation = model.generate("The first thing", max_new_tokens=8, do_sample=False, verbose=False)
    print("greedy continuation:", repr(continuation))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
