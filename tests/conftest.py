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

# The tiny test models take far longer to compile than to run: without LLVM's optimisation of XLA:CPU's
# kernels (-O0) a sample of trainer, engine and sampler tests ran 1.33x faster (201 s -> 152 s; the
# 135M demo model runs slower so, but only a few tests run it). Every process of the run inherits the
# flag; a value already in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# The shared test code is the package tests/helpers (`import helpers.tiny_hf`): pytest finds it through
# `pythonpath` in pyproject.toml; the processes tests start (CLI runs, `python -c` scripts) through
# PYTHONPATH, which gets tests/ first (once: xdist workers run this file again).
_TESTS = os.path.dirname(os.path.abspath(__file__))
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _TESTS:
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402

pytest.register_assert_rewrite("helpers")  # asserts in shared helpers report their values too
pytest_plugins = ["helpers.fixtures"]

# Tiers, assigned here and nowhere else. `make test-fast` runs `-m "not slow and not demo_model"`:
# losses against their references, models against transformers, data, config, objectives, engines and
# loop units, in-process. `slow` marks what is left out of it: whole files, or single tests by name
# (`file::test`, every parametrization), each with why. `make test` (CI) runs all but `demo_model`.
SLOW: dict[str, str] = {}


def pytest_configure(config):
    for key in SLOW:  # a renamed file or test must not drop out of its tier unnoticed
        file, _, test = key.partition("::")
        source = os.path.join(_TESTS, file)
        if not os.path.isfile(source) or (test and f"def {test}(" not in open(source).read()):
            raise pytest.UsageError(f"tests/conftest.py: SLOW names {key!r}, which does not exist")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = os.path.relpath(str(item.path), _TESTS).replace(os.sep, "/")
        if path in SLOW or f"{path}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)


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
