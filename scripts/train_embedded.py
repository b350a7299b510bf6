#!/usr/bin/env python
"""Train the small GPT-2 shipped in `hooklens/models/gpt2-embedded/` (CPU, one thread, seeded).

Data, all available offline on every machine:
  * Python standard-library sources (`sysconfig.get_paths()["stdlib"]`, sorted `*.py` files, tests excluded),
    tokenized with the GPT-2 tokenizer shipped in hooklens;
  * synthetic rows of random tokens in which random segments are repeated. The period (segment length), the
    number of repeats and the offset of the repeats vary from row to row, so the model must find the earlier
    occurrence by content (induction), not by a fixed distance. The random tokens come from a pool that grows
    (curriculum): first tokens seen in the stdlib corpus, then the whole vocabulary, so the induction circuit also
    works for tokens whose embeddings were hardly trained (e.g. `randint(0, d_vocab)` as in TransformerLens demos).

Training from scratch did not grow an induction head within a CPU budget, so by default (`--construct`) the
circuit is first set by hand (previous-token head 0.0 from positional embeddings, induction heads 1.0/1.1 by
K-composition; see `construct_circuit`) and then every parameter is fine-tuned on the data above.
`--no-construct` trains from scratch.

The checkpoint is a normal Hugging Face GPT-2 directory (config.json + model.safetensors, float16) that
`hooklens.HookedTransformer.from_pretrained(dir)` loads (upcasting to float32). Scores are measured with hooklens
itself and written to `scores.json`.

    python scripts/train_embedded.py --out hooklens/models/gpt2-embedded --steps 1500 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BOS = 50256
VOCAB = 50257
EVAL_SEQ_LENS = (20, 50, 100)


# -- data --------------------------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not (skip & set(p.relative_to(root).parts)))


def build_corpus(max_chars: int) -> tuple[np.ndarray, dict]:
    """Concatenated tokens of stdlib sources (files in sorted order, EOS between files) up to `max_chars`."""
    from hooklens.tokenizer import load_tokenizer

    tok = load_tokenizer()
    texts, n_chars, files = [], 0, stdlib_files()
    used = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        used += 1
        n_chars += len(text)
        if n_chars >= max_chars:
            break
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(BOS)
    info = dict(stdlib=str(Path(sysconfig.get_paths()["stdlib"])), python=platform.python_version(),
                files_used=used, chars=n_chars, tokens=len(ids))
    return np.asarray(ids, dtype=np.int64), info


class Batches:
    """Mixed batches: stdlib text rows (loss on every position) + repeated-random rows (loss where predictable)."""

    def __init__(self, corpus: np.ndarray, ctx: int, seed: int):
        self.corpus, self.ctx = corpus, ctx
        self.rng = np.random.default_rng(seed)
        counts = np.bincount(corpus, minlength=VOCAB)
        counts[BOS] = 0
        # Tokens of the corpus, most frequent first: the first stage of the random-token curriculum.
        order = np.argsort(-counts, kind="stable")
        self.seen = order[: int((counts > 0).sum())]

    def text_rows(self, n: int):
        starts = self.rng.integers(0, len(self.corpus) - self.ctx, size=n)
        x = np.stack([self.corpus[s : s + self.ctx] for s in starts])
        x[:, 0] = BOS
        y = np.concatenate([x[:, 1:], np.full((n, 1), -100)], axis=1)
        return x, y

    def draw(self, n: int, pool: str, pool_size: int) -> np.ndarray:
        if pool == "full":
            return self.rng.integers(0, VOCAB, size=n)
        return self.seen[self.rng.integers(0, min(pool_size, len(self.seen)), size=n)]

    def repeat_rows(self, n: int, full_frac: float, pool_size: int):
        """BOS + [random filler] + segment A (length L) repeated r times + ... until ctx; targets only on repeats."""
        T = self.ctx
        x = np.empty((n, T), dtype=np.int64)
        y = np.full((n, T), -100, dtype=np.int64)
        for i in range(n):
            pool = "full" if self.rng.random() < full_frac else "seen"
            row, tgt_mask = [BOS], [False]
            # Half the rows start exactly like the evaluation (BOS + A + A), the rest after random filler.
            if self.rng.random() < 0.5:
                f = int(self.rng.integers(1, 40))
                row += list(self.draw(f, pool, pool_size))
                tgt_mask += [False] * f
            while len(row) < T + 1:
                L = int(np.exp(self.rng.uniform(np.log(3), np.log(T // 2 - 2))))
                reps = 2 if self.rng.random() < 0.8 else 3
                seg = list(self.draw(L, pool, pool_size))
                row += seg
                tgt_mask += [False] * L
                for _ in range(reps - 1):
                    row += seg
                    # The first token of a repeat is not predictable; the following ones are.
                    tgt_mask += [False] + [True] * (L - 1)
                if self.rng.random() < 0.3:
                    f = int(self.rng.integers(1, 20))
                    row += list(self.draw(f, pool, pool_size))
                    tgt_mask += [False] * f
            row, tgt_mask = np.asarray(row[: T + 1]), np.asarray(tgt_mask[: T + 1])
            x[i] = row[:T]
            y[i] = np.where(tgt_mask[1 : T + 1], row[1 : T + 1], -100)
        return x, y


# -- model ---------------------------------------------------------------------------------------------------------
def make_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=args.n_ctx, n_embd=args.d_model, n_layer=args.n_layers, n_head=args.n_heads,
        n_inner=4 * args.d_model, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=BOS, eos_token_id=BOS, tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


# Residual subspaces of the construction (d_model = 128): token identity, position, "previous token".
_T, _P, _S = slice(0, 64), slice(64, 96), slice(96, 128)


def _zero_mean_basis(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """`n x k` orthonormal columns orthogonal to the all-ones vector (so LayerNorm's centering leaves them alone)."""
    A = torch.randn(n, k, generator=gen)
    A = A - A.mean(0, keepdim=True)
    return torch.linalg.qr(A).Q


@torch.no_grad()
def construct_circuit(model, seed: int) -> None:
    """Set an induction circuit by hand (the issue's allowed fallback); training then fine-tunes everything.

    Residual subspaces (d_model = 128): T = dims 0-63 token identity, P = 64-95 position (15 sinusoid pairs with
    frequencies from a seeded search), S = 96-127 "previous token" written by layer 0.
      * head 0.0, previous-token head: q from P rotated back one position, k from P, so the score peaks at j = i-1;
        its OV copies a projection G of the token part into S.
      * heads 1.0 and 1.1, induction heads (K-composition): q = G^T(token at i), k = the S part at j
        (= G^T(token at j-1)); their OVs copy complementary halves of the token part at j back into T, which the
        tied unembedding reads as "predict the token that followed the earlier occurrence".
    MLPs and the other heads start at small random values; everything stays trainable.
    """
    cfg = model.config
    d, H = cfg.n_embd, cfg.n_head
    dh = d // H
    assert d == 128 and H == 4, "the construction is written for d_model=128, n_head=4"
    gen = torch.Generator().manual_seed(seed + 7)
    w, margin, B_P = _set_embeddings(model, seed, gen)
    c0 = math.sqrt(d / 30.0)  # LayerNorm scale at layer 0: |x| = sqrt(30)
    G = _zero_mean_basis(64, 32, gen)[:, :dh]  # token part -> d_head (random orthonormal projection)
    B_S = _zero_mean_basis(32, 31, gen)
    for layer, block in enumerate(model.transformer.h):
        block.attn.c_attn.bias.zero_()
        block.attn.c_proj.bias.zero_()
        block.mlp.c_proj.weight.mul_(0.1)
        if layer == 0:
            _set_previous_token_head(block, w, margin, B_P, G, B_S, c0)
        else:
            _set_induction_heads(block, G, B_S, gen)


def _set_embeddings(model, seed: int, gen: torch.Generator):
    """Token embeddings in T, sinusoidal positions in P. Returns (frequencies w, the positional margin, B_P)."""
    cfg = model.config
    d = cfg.n_embd
    # Token embeddings: zero-mean in T, norm sqrt(15) (equal to the positional part's norm).
    B_T = _zero_mean_basis(64, 63, gen)
    E = torch.randn(cfg.vocab_size, 63, generator=gen) @ B_T.T
    E = E / E.norm(dim=1, keepdim=True) * math.sqrt(15)
    wte = torch.zeros(cfg.vocab_size, d)
    wte[:, _T] = E
    model.transformer.wte.weight.copy_(wte)
    # Positions: 15 frequencies chosen (seeded search) so sum_f cos(w_f * delta) is low for every delta != 0.
    rng = np.random.default_rng(seed)
    deltas = np.arange(-1, cfg.n_positions)
    deltas = deltas[deltas != 0]
    best = None
    for _ in range(2000):
        w = np.sort(rng.uniform(0.05, np.pi, 15))
        k = np.cos(np.outer(deltas, w)).sum(1).max()
        if best is None or k < best[0]:
            best = (k, w)
    w = torch.tensor(best[1], dtype=torch.float32)
    pos = torch.arange(cfg.n_positions, dtype=torch.float32)[:, None] * w[None]
    s = torch.cat([torch.cos(pos), torch.sin(pos)], dim=1)  # [n_pos, 30]
    B_P = _zero_mean_basis(32, 30, gen)
    wpe = torch.zeros(cfg.n_positions, d)
    wpe[:, _P] = s @ B_P.T
    model.transformer.wpe.weight.copy_(wpe)
    return w, 15 - best[0], B_P


def _set_previous_token_head(block, w, margin: float, B_P, G, B_S, c0: float) -> None:
    """Head 0.0: q from P rotated back one position, k from P (score peaks at j = i-1); OV writes G^T e into S."""
    Wqkv = block.attn.c_attn.weight  # [d, 3d]: x @ W -> q | k | v
    Wo = block.attn.c_proj.weight  # [d, d]: z @ W
    d = Wo.shape[0]
    dh = G.shape[1]
    # Rotation by -w_f on each (cos, sin) pair: R s_i = s_{i-1}.
    R = torch.zeros(30, 30)
    c, sn = torch.cos(w), torch.sin(w)
    idx = torch.arange(15)
    R[idx, idx], R[idx, idx + 15] = c, sn
    R[idx + 15, idx], R[idx + 15, idx + 15] = -sn, c
    h = slice(0, dh)
    # score = alpha * c0^2 * s_{i-1}.s_j / sqrt(dh); margin (15 - best search value) -> ~12 nats
    alpha = 12.0 * math.sqrt(dh) / (c0 ** 2 * margin)
    Wqkv[:, 0:d][:, h] = 0
    Wqkv[:, d : 2 * d][:, h] = 0
    Wqkv[:, 2 * d :][:, h] = 0
    Wqkv[_P, 0:d][:, 0:30] = alpha * (B_P @ R.T)
    Wqkv[_P, d : 2 * d][:, 0:30] = B_P
    Wqkv[_T, 2 * d :][:, 0:dh] = G  # v = c0 * G^T e
    Wo[h, :] = 0
    gamma = 1.0 / c0
    Wo[0:31, _S] = gamma * B_S.T  # write G^T e (first 31 coords) into S


def _set_induction_heads(block, G, B_S, gen: torch.Generator) -> None:
    """Heads 1.0 and 1.1: q = G^T(token at i), k = the S part at j; OVs copy complementary halves of T back."""
    Wqkv = block.attn.c_attn.weight  # [d, 3d]: x @ W -> q | k | v
    Wo = block.attn.c_proj.weight  # [d, d]: z @ W
    d = Wo.shape[0]
    dh = G.shape[1]
    # LayerNorm scale at layer 1: |x| ~ sqrt(15 + 15 + |G^T e|^2 ~ 7.5)
    c1 = math.sqrt(d / 37.5)
    for hi in (0, 1):
        h = slice(hi * dh, (hi + 1) * dh)
        Wqkv[:, 0:d][:, h] = 0
        Wqkv[:, d : 2 * d][:, h] = 0
        Wqkv[:, 2 * d :][:, h] = 0
        # q = c1 G^T e_i; k = c1 * (B_S^T S-part) = c1 * (G^T e_{j-1})[:31]
        beta = 14.0 * math.sqrt(dh) / (c1 ** 2 * 7.5)
        Wqkv[_T, 0:d][:, h][:, 0:31] = beta * G[:, 0:31]
        Wqkv[_S, d : 2 * d][:, h][:, 0:31] = B_S
    # OVs: two complementary 32-dim halves of the token space, copied back into T.
    F2 = torch.linalg.qr(torch.randn(64, 64, generator=gen)).Q
    lam = 3.0
    for hi, cols in ((0, slice(0, 32)), (1, slice(32, 64))):
        h = slice(hi * dh, (hi + 1) * dh)
        Wqkv[_T, 2 * d :][:, h] = F2[:, cols]
        Wo[h, :] = 0
        Wo[h, _T] = lam / c1 * F2[:, cols].T


def loss_fn(model, x: torch.Tensor, y: torch.Tensor, n_neg: int = 0,
            gen: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy on the positions that have a target only (the 50257-way unembedding dominates the CPU cost).

    With `n_neg > 0` it is a sampled softmax: the candidates are this batch's targets plus `n_neg` tokens drawn
    uniformly from the vocabulary, whose logits get the usual log(V / n_neg) correction so that they stand for the
    whole vocabulary in the partition function.
    """
    h = model.transformer(input_ids=x).last_hidden_state
    keep = y != -100
    h, tgt = h[keep], y[keep]
    W = model.transformer.wte.weight
    if n_neg <= 0:
        return F.cross_entropy(h @ W.T, tgt)
    pos, tgt_idx = torch.unique(tgt, return_inverse=True)
    neg = torch.randint(0, VOCAB, (n_neg,), generator=gen)
    neg = neg[~torch.isin(neg, pos)]
    cand = torch.cat([pos, neg])
    logits = h @ W[cand].T
    logits[:, len(pos):] += math.log((VOCAB - len(pos)) / n_neg)
    return F.cross_entropy(logits, tgt_idx)


# -- evaluation with hooklens ----------------------------------------------------------------------------------------
@torch.inference_mode()
def measure(model_dir: Path, seed: int = 1234, batch: int = 16, seq_lens=EVAL_SEQ_LENS, low: int = 0,
            high: int = VOCAB) -> dict:
    """Induction / previous-token scores per head and log-prob gap on BOS + random tokens repeated twice."""
    from hooklens import HookedTransformer, head_scores

    model = HookedTransformer.from_pretrained(str(model_dir), device="cpu")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for L in seq_lens:
        rand = torch.randint(low, high, (batch, L), generator=gen)
        tokens = torch.cat([torch.full((batch, 1), BOS), rand, rand], dim=1)
        logits = model(tokens)
        scores = head_scores(model, tokens, kinds=("induction", "previous_token"), seq_len=L, progress=False)
        ind, prev = scores["induction"], scores["previous_token"]  # [n_layers, n_heads]
        logp = logits.float().log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, 2L]
        first, second = logp[:, :L].mean().item(), logp[:, L:].mean().item()
        acc = (logits[:, L:-1].argmax(-1) == tokens[:, L + 1 :]).float().mean().item()
        out[str(L)] = dict(
            induction_scores=[[round(v, 4) for v in row] for row in ind.tolist()],
            prev_token_scores=[[round(v, 4) for v in row] for row in prev.tolist()],
            best_induction=_best_head(ind),
            best_prev_token=_best_head(prev),
            logprob_first_half=round(first, 4), logprob_second_half=round(second, 4),
            logprob_gap=round(second - first, 4),
            accuracy_second_half=round(acc, 4),
        )
    return out


def _best_head(scores: torch.Tensor) -> dict:
    """The highest-scoring head of `[n_layers, n_heads]` scores, as {layer, head, score}."""
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    return dict(layer=layer, head=head, score=round(float(scores.max()), 4))


def summary(scores: dict) -> str:
    parts = []
    for L, s in scores.items():
        bi, bp = s["best_induction"], s["best_prev_token"]
        parts.append(f"L{L}: ind {bi['score']:.2f}@{bi['layer']}.{bi['head']} "
                     f"prev {bp['score']:.2f}@{bp['layer']}.{bp['head']} "
                     f"gap {s['logprob_gap']:.2f} acc {s['accuracy_second_half']:.2f}")
    return " | ".join(parts)


def targets_met(scores: dict, ind_t: float, prev_t: float, gap_t: float) -> bool:
    for s in scores.values():
        bi, bp = s["best_induction"], s["best_prev_token"]
        if bi["score"] < ind_t or bp["score"] < prev_t or s["logprob_gap"] < gap_t or bi["layer"] <= bp["layer"]:
            return False
    return True


def save(model, out: Path, dtype=torch.float16) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        model.float()


# -- main ----------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("hooklens/models/gpt2-embedded"))
    p.add_argument("--steps", type=int, default=1500,
                   help="number of optimizer steps (fewer if --min-steps allows early stopping)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--train-ctx", type=int, default=224, help="training row length (eval at seq_len 100 uses 201)")
    p.add_argument("--batch-repeat", type=int, default=8, help="repeated-random rows per step")
    p.add_argument("--batch-text", type=int, default=2, help="stdlib text rows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--corpus-chars", type=int, default=4_000_000)
    p.add_argument("--full-vocab-from", type=float, default=0.3,
                   help="fraction of --steps after which random tokens increasingly come from the full vocabulary")
    p.add_argument("--neg-samples", type=int, default=4096,
                   help="sampled-softmax negatives in training (0: full softmax)")
    p.add_argument("--construct", action=argparse.BooleanOptionalAction, default=True,
                   help="set the induction circuit by hand before training (--no-construct: train from scratch)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--stop-induction", type=float, default=0.8)
    p.add_argument("--stop-prev", type=float, default=0.8)
    p.add_argument("--stop-gap", type=float, default=6.0)
    p.add_argument("--min-steps", type=int, default=None,
                   help="stop early once the --stop-* targets are met, but not before this step "
                        "(default: --steps, no early stop)")
    args = p.parse_args()
    if args.min_steps is None:
        args.min_steps = args.steps
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    corpus, corpus_info = build_corpus(args.corpus_chars)
    print(f"corpus: {corpus_info} ({time.time() - t0:.1f}s)", flush=True)
    data = Batches(corpus, args.train_ctx, args.seed)
    model = make_model(args)
    if args.construct:
        construct_circuit(model, args.seed)
        tmp0 = Path(tempfile.mkdtemp(prefix="hooklens-embedded-init-"))
        save(model, tmp0, torch.float32)
        print(f"constructed circuit: {summary(measure(tmp0))}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    step, history, train_seconds = train(model, data, args, gen)
    model.eval()
    save(model, args.out)
    final = {
        "seed": args.seed, "steps": step, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1), "threads": args.threads, "torch": torch.__version__,
        "n_params": n_params, "corpus": corpus_info, "args": {k: str(v) for k, v in vars(args).items()},
        "eval": {"tokens": "BOS + randint(0, 50257) x seq_len, repeated twice; batch 16; torch.Generator seed 1234",
                 "scores": measure(args.out)},
        "eval_randint_1000_10000": measure(args.out, seed=4321, low=1000, high=10000),
        "history": history,
    }
    (args.out / "scores.json").write_text(json.dumps(final, indent=1))
    print(f"final: {summary(final['eval']['scores'])}", flush=True)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s", flush=True)


def train(model, data: "Batches", args: argparse.Namespace, gen: torch.Generator):
    """AdamW with warmup + cosine decay on repeated-random and text rows; evaluates every --eval-every steps and
    stops early once the targets are met. Returns (last step, eval history, training seconds)."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "wte" not in n and "wpe" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    history, step = [], 0
    ema_rep = ema_txt = None
    tmp = Path(tempfile.mkdtemp(prefix="hooklens-embedded-"))
    t_train = time.time()
    for step in range(1, args.steps + 1):
        progress = step / args.steps
        full_frac = 0.0 if progress < args.full_vocab_from else min(0.5, (progress - args.full_vocab_from) / 0.3 * 0.5)
        pool_size = int(2000 + (len(data.seen) - 2000) * min(1.0, progress / max(args.full_vocab_from, 1e-9)))
        xr, yr = data.repeat_rows(args.batch_repeat, full_frac, pool_size)
        xt, yt = data.text_rows(args.batch_text)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        model.train()
        loss_r = loss_fn(model, torch.from_numpy(xr), torch.from_numpy(yr), args.neg_samples, gen)
        loss_t = loss_fn(model, torch.from_numpy(xt), torch.from_numpy(yt), args.neg_samples, gen)
        loss = loss_r + loss_t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_rep = loss_r.item() if ema_rep is None else 0.95 * ema_rep + 0.05 * loss_r.item()
        ema_txt = loss_t.item() if ema_txt is None else 0.95 * ema_txt + 0.05 * loss_t.item()
        if step % 25 == 0:
            print(f"step {step} loss repeat {ema_rep:.3f} text {ema_txt:.3f} lr {lr_at(step):.2e} full {full_frac:.2f} "
                  f"pool {pool_size} {time.time() - t_train:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            save(model, tmp)
            scores = measure(tmp)
            history.append(dict(step=step, seconds=round(time.time() - t_train, 1), loss_repeat=round(ema_rep, 4),
                                loss_text=round(ema_txt, 4), summary=summary(scores)))
            print(f"eval step {step}: {summary(scores)}", flush=True)
            if step >= args.min_steps and targets_met(scores, args.stop_induction, args.stop_prev, args.stop_gap):
                print("targets met; stopping", flush=True)
                break
    return step, history, time.time() - t_train


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
