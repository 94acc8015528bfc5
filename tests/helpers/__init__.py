"""Shared test code: tiny models, numpy references, trainer-run helpers and session fixtures."""
