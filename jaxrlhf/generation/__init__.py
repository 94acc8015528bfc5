"""Decoding: greedy generation (full-buffer, exact)."""

from jaxrlhf.generation.greedy import greedy_generate

__all__ = ["greedy_generate"]
