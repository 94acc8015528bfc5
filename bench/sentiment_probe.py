"""How much of VADER's ranking a linear reward head can read from the untrained demo model's features
(docs/sentiment.md, "Why the reward model stays near chance").

For each pair of `asset:sentiment`, the frozen SmolLM2-135M-Instruct runs on `prompt + chosen` and
`prompt + rejected`; a logistic regression on the difference of the two feature vectors (the
Bradley-Terry model with a linear head) is fitted on training pairs and scored on the held-out ones.
Features: the final hidden state at the last token (what a `*ForSequenceClassification` reward
model's head reads), at an EOS appended after it, or the mean over the continuation's tokens.

    python bench/sentiment_probe.py --pool last --train-pairs 600
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
from flax import nnx

from jaxrlhf.data import left_pad
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.models.decoder import default_positions
from jaxrlhf.models.demo import demo_model_path

DATA = os.path.join(os.path.dirname(__file__), "..", "jaxrlhf", "assets", "sentiment")
WIDTH, BATCH = 80, 64


def features(model, tok, pairs: list[dict], pool: str) -> np.ndarray:
    """`[pairs, d]`: chosen features minus rejected features."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def hidden(state, ids, mask):
        return nnx.merge(graphdef, state).hidden_states(ids, mask, default_positions(mask, *mask.shape))

    seqs, spans = [], []
    for r in pairs:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        for text in (r["chosen"], r["rejected"]):
            completion = tok(text, add_special_tokens=False)["input_ids"]
            extra = [tok.eos_token_id] if pool == "eos" else []
            seqs.append(np.asarray(prompt + completion + extra, np.int32)[-WIDTH:])
            spans.append(min(len(completion), WIDTH))
    out = []
    for start in range(0, len(seqs), BATCH):
        ids, mask = left_pad(seqs[start : start + BATCH], tok.pad_token_id, width=WIDTH, batch_size=BATCH)
        h = np.asarray(hidden(state, ids, mask))
        for k, span in enumerate(spans[start : start + BATCH]):
            out.append(h[k, -span:].mean(0) if pool == "mean" else h[k, -1])
    f = np.stack(out)
    return f[0::2] - f[1::2]


def fit_and_score(x: np.ndarray, x_test: np.ndarray, l2: float, steps: int = 800) -> tuple[float, float]:
    """Logistic regression (chosen preferred) by gradient descent; (train, held-out) accuracy."""
    scale = x.std(0) + 1e-6
    x, x_test = x / scale, x_test / scale
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        grad = -(x.T @ (1.0 / (1.0 + np.exp(x @ w)))) / len(x) + l2 * w / len(x)
        w -= 0.05 * grad
    return float(((x @ w) > 0).mean()), float(((x_test @ w) > 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", choices=["last", "eos", "mean"], default="last")
    ap.add_argument("--train-pairs", type=int, default=600)
    args = ap.parse_args()
    path = demo_model_path()
    tok, model = load_tokenizer(path), from_pretrained(path)

    def read(name: str, n: int | None = None) -> list[dict]:
        with open(os.path.join(DATA, name)) as f:
            return [json.loads(line) for line in f][:n]

    x = features(model, tok, read("pairs_train.jsonl", args.train_pairs), args.pool)
    x_test = features(model, tok, read("pairs_test.jsonl"), args.pool)
    for l2 in (1.0, 30.0, 300.0):
        train, test = fit_and_score(x, x_test, l2)
        print(f"pool={args.pool} l2={l2:g}: train accuracy {train:.3f}, held-out {test:.3f} "
              f"({len(x)} / {len(x_test)} pairs)")  # fmt: skip


if __name__ == "__main__":
    main()
