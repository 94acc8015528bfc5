"""Random tokenized preference pairs over the tiny models' vocabulary."""

from __future__ import annotations

import numpy as np

from jaxrlhf.data import TokenizedPair


def random_pairs(n: int, seed: int = 0, vocab: int = 96) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)

    def toks(lo: int, hi: int) -> np.ndarray:
        return rng.integers(3, vocab, rng.integers(lo, hi)).astype(np.int32)

    return [TokenizedPair(toks(2, 12), toks(1, 9), toks(1, 9), float(rng.normal())) for _ in range(n)]
