"""RL on the tiny llama (`tiny_llama`): its special ids, random prompts and a closed-form reward."""

from __future__ import annotations

import numpy as np

EOS, PAD = 1, 0


def low_token_fraction(ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """The closed-form reward: the fraction of response tokens with id < 48 (half the vocabulary)."""
    response = ids[:, -response_mask.shape[1] :]
    return ((response < 48) * response_mask).sum(1) / np.maximum(response_mask.sum(1), 1)


def random_prompts(n=16, length=6, seed=0):
    """`n` unpadded prompts of `length` random tokens, and their attention mask."""
    ids = np.random.default_rng(seed).integers(3, 96, (n, length)).astype(np.int32)
    return ids, np.ones_like(ids)
