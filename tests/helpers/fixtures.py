"""Session fixtures: saved tiny models and data files, built once per test process and only read."""

from __future__ import annotations

import os

import pytest

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "dpo_demo")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer random llama with SmolLM2's vocabulary and tokenizer (chat template included)."""
    from helpers.tiny_hf import save_tiny_smollm

    return save_tiny_smollm(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory):
    """A 1-layer random llama (hidden size 16) with SmolLM2's vocabulary and tokenizer."""
    from helpers.tiny_hf import save_tiny_smollm

    return save_tiny_smollm(str(tmp_path_factory.mktemp("tiny")), hidden=16, layers=1, heads=2, kv_heads=1)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """(train, eval) preference files: 32 and 8 rows of the shipped DPO demo data."""
    d = tmp_path_factory.mktemp("data")
    with open(os.path.join(ASSETS, "train.jsonl")) as f:
        rows = f.readlines()
    (d / "train.jsonl").write_text("".join(rows[:32]))
    (d / "eval.jsonl").write_text("".join(rows[32:40]))
    return str(d / "train.jsonl"), str(d / "eval.jsonl")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(kind)`: (the `make_hf_model(kind)` transformers model, the directory it was
    saved to), made once per kind."""
    from helpers.tiny_hf import saved_hf_model

    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = saved_hf_model(kind, tmp_path_factory)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_llama(hf_checkpoint):
    """The directory of the saved tiny `make_hf_model("llama")`."""
    return hf_checkpoint("llama")[1]
