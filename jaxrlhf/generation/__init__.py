"""Decoding: the compiled KV-cache sampler (`generate`) and full-buffer greedy decoding."""

from jaxrlhf.generation.greedy import greedy_generate
from jaxrlhf.generation.sampling import Generation, filter_logits, generate, sample_tokens

__all__ = ["Generation", "filter_logits", "generate", "greedy_generate", "sample_tokens"]
