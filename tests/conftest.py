"""Shared test set-up: quiet transformers, deterministic CPU JAX."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """transformers runs ~100x slower with 2 torch threads once XLA's CPU thread pool is live in the
    same process (2-core machine); one thread keeps the reference runs fast. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
