"""Decoding: the compiled KV-cache sampler (greedy, temperature, top-k, top-p)."""

from jaxrlhf.generation.sampling import Generation, filter_logits, generate, sample_tokens

__all__ = ["Generation", "filter_logits", "generate", "sample_tokens"]
