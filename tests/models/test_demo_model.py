"""The embedded demo model: conversion from GGUF, exactness against transformers, greedy decoding."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from jaxrlhf.generation import generate
from jaxrlhf.models import demo as demo_mod
from jaxrlhf.models import from_pretrained, load_tokenizer


@pytest.fixture(scope="module")
def demo_dir():
    return demo_mod.demo_model_path()


def test_conversion_is_idempotent(demo_dir):
    assert demo_mod.demo_model_path() == demo_dir
    with open(os.path.join(demo_dir, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert "quantization_config" not in config


def test_interrupted_conversion_is_never_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXRLHF_CACHE_DIR", str(tmp_path))
    target = tmp_path / demo_mod.DEMO_MODEL_NAME

    def crash(source, out_dir):
        with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        demo_mod.demo_model_path()
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    # A directory left without the completion marker (e.g. by an older crash) is rebuilt.
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"stale")
    calls = []
    monkeypatch.setattr(demo_mod, "_convert", lambda s, o: calls.append(o))
    assert demo_mod.demo_model_path() == str(target)
    assert len(calls) == 1 and not (target / "model.safetensors").exists()
    assert (target / "jaxrlhf_conversion.json").exists()
    demo_mod.demo_model_path()
    assert len(calls) == 1  # now trusted


def test_tokenizer_pad_differs_from_eos(demo_dir):
    tok = load_tokenizer(demo_dir)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"  # the checkpoint's pad is EOS; unk is used instead
    assert tok.padding_side == "left"


@pytest.fixture(scope="module")
def both_models(demo_dir):
    hf = tf.AutoModelForCausalLM.from_pretrained(
        demo_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return hf, from_pretrained(demo_dir), load_tokenizer(demo_dir)


def _chat_ids(tok, text):
    msgs = [{"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_demo_logits_match_transformers(both_models):
    hf, ours, tok = both_models
    ids = np.array([_chat_ids(tok, "Name three primary colours.")], np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)))
    assert np.abs(got - ref).max() <= 1e-3
    assert np.abs(ref).max() > 10


def test_demo_greedy_agrees_with_transformers_generate(both_models):
    hf, ours, tok = both_models
    ids = np.array([_chat_ids(tok, "Write a short poem about the sea.")], np.int32)
    steps = 20
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.ones_like(torch.tensor(ids)),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].numpy()
    out = generate(
        ours,
        ids,
        np.ones_like(ids),
        max_new_tokens=steps,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        temperature=0.0,
    )
    got = np.asarray(out.tokens)[0]
    assert len(ref) == steps and tok.eos_token_id not in ref[:16]
    np.testing.assert_array_equal(got[:steps], ref)
