"""Shared test set-up: quiet transformers, deterministic CPU JAX, one XLA compilation cache per run."""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Many tests compile the same tiny-model programs again: a resumed run, the second process of a CLI
# test, the same trainer in another test file. JAX's persistent compilation cache lets every later
# compile of an identical program load the executable instead (tests/train/test_trainer.py: 265 s
# -> 180 s). The environment carries it to pytest-xdist workers, CLI subprocesses and notebook
# kernels alike. A run gets a fresh directory unless JAX_COMPILATION_CACHE_DIR is set (set it to keep
# the cache between runs).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxrlhf-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:  # only the process that made it (the xdist controller) removes it
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
