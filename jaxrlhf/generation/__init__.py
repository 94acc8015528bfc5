"""Decoding: the compiled KV-cache sampler (greedy, temperature, top-k, top-p), and the cache
carried across the turns of a multi-turn episode (`TurnCache`)."""

from jaxrlhf.generation.sampling import Generation, filter_logits, generate, sample_tokens
from jaxrlhf.generation.turns import TurnCache

__all__ = ["Generation", "TurnCache", "filter_logits", "generate", "sample_tokens"]
