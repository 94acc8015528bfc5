"""What the sentiment task's data let a reward model reach (docs/sentiment.md, "The reward model").

Two reference points for the held-out pairwise accuracy of a reward model against VADER's labels,
neither of them a neural network:

* **lexicon sum**: the sum of the VADER lexicon's valences of a text's words, without VADER's rules
  (negation, intensifiers, "but", punctuation, capitals) -- what a reward model that had learnt every
  word's valence, and nothing else, would score;
* **bag of words**: a Bradley-Terry model on word counts (a logistic regression on the difference of
  the two texts' counts, L2-regularised, no bias) fitted on a training set of pairs -- how far the
  words the pairs show, with their labels, teach VADER's lexicon.

    python bench/sentiment_bounds.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re

import numpy as np
import scipy.optimize
import scipy.sparse

DATA = os.path.join(os.path.dirname(__file__), "..", "jaxrlhf", "assets", "sentiment")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def read(name: str) -> list[dict]:
    with open(os.path.join(DATA, name)) as f:
        return [json.loads(line) for line in f]


def first(rows: list[dict], n: int) -> list[dict]:
    """Ranked rows cut to their first `n` samples (the 16 of the larger set come first)."""
    return [{**r, "completions": r["completions"][:n], "scores": r["scores"][:n]} for r in rows]


def ranked_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """Every two continuations of a ranked row with different scores, the higher first."""
    out = []
    for row in rows:
        for i, j in itertools.combinations(range(len(row["scores"])), 2):
            if row["scores"][i] != row["scores"][j]:
                hi, lo = (i, j) if row["scores"][i] > row["scores"][j] else (j, i)
                out.append((row["completions"][hi], row["completions"][lo]))
    return out


def counts(pairs: list[tuple[str, str]], vocab: dict[str, int]) -> scipy.sparse.csr_matrix:
    """`[pairs, vocab]`: word counts of the first text minus those of the second."""
    rows, cols, vals = [], [], []
    for r, (a, b) in enumerate(pairs):
        for sign, text in ((1.0, a), (-1.0, b)):
            for w in words(text):
                if w in vocab:
                    rows.append(r)
                    cols.append(vocab[w])
                    vals.append(sign)
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(pairs), len(vocab)))


def fit(x: scipy.sparse.csr_matrix, l2: float) -> np.ndarray:
    """argmin_w mean(log(1 + exp(-x w))) + l2 / (2 n) |w|^2 (L-BFGS)."""
    n = x.shape[0]

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        loss = np.logaddexp(0.0, -z).mean() + 0.5 * l2 * (w @ w) / n
        grad = -(x.T @ (1.0 / (1.0 + np.exp(z)))) / n + l2 * w / n
        return float(loss), grad

    res = scipy.optimize.minimize(loss_and_grad, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 2000})  # fmt: skip
    return res.x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--l2", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    args = ap.parse_args()
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    test = [(r["chosen"], r["rejected"]) for r in read("pairs_test.jsonl")]
    lex = lambda t: sum(lexicon.get(w, 0.0) for w in words(t))  # noqa: E731
    accuracy = np.mean([lex(a) > lex(b) for a, b in test])
    print(f"lexicon sum: held-out accuracy {accuracy:.3f} ({len(test)} pairs)")
    ranked = read("ranked_train.jsonl")
    sets = {
        "pairs_train.jsonl": [(r["chosen"], r["rejected"]) for r in read("pairs_train.jsonl")],
        "pairs_train_large.jsonl": [(r["chosen"], r["rejected"]) for r in read("pairs_train_large.jsonl")],
        "ranked_train.jsonl, 16 samples a prompt (all pairs)": ranked_pairs(first(ranked, 16)),
        "ranked_train.jsonl, 32 samples a prompt (all pairs)": ranked_pairs(ranked),
    }
    for name, pairs in sets.items():
        vocab = {w: i for i, w in enumerate(sorted({w for p in pairs for t in p for w in words(t)}))}
        x, x_test = counts(pairs, vocab), counts(test, vocab)
        scores = [f"l2 {l2:g}: {np.mean(x_test @ fit(x, l2) > 0):.3f}" for l2 in args.l2]
        print(f"bag of words on {name} ({len(pairs)} pairs, {len(vocab)} words): held-out", ", ".join(scores))


if __name__ == "__main__":
    main()
