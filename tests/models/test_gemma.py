"""Gemma-specific settings are each exercised: with any one of them switched off in config.json
the logits leave transformers' (the exactness tests in test_exactness.py show they match with
all on), and the multimodal Gemma 3 checkpoint loads as its text tower."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from helpers.tiny_hf import hf_logits, make_hf_model, padded_batch

from jaxrlhf.models import from_pretrained, save_pretrained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _with_config(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def _gap(path, ref, ids, mask, pos):
    got = np.asarray(from_pretrained(path)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    return np.abs(got - ref)[mask.astype(bool)].max()


@pytest.mark.parametrize(
    "kind,changes",
    [
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma2", {"final_logit_softcapping": None}),
        ("gemma2", {"query_pre_attn_scalar": 16}),  # = head_dim
        ("gemma2", {"sliding_window": 64}),  # longer than the rows
        ("gemma3", {"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},  # local base = global
        }}),
        ("gemma3", {"rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},  # no scaling on global
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
        }}),
    ],
)  # fmt: skip
def test_each_gemma_setting_changes_the_logits(kind, changes, tmp_path):
    hf = make_hf_model(kind)
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    ids, mask, pos = padded_batch("left", seed=1)
    ref = hf_logits(hf, ids, mask, pos)
    assert _gap(src, ref, ids, mask, pos) <= 1e-4
    assert _gap(_with_config(src, str(tmp_path / "changed"), **changes), ref, ids, mask, pos) > 1e-3


def test_gemma3_multimodal_checkpoint_loads_its_text_tower(tmp_path):
    """A `gemma3` (image-text) checkpoint: the text tower's weights under `model.language_model.`,
    read as gemma3_text; exported back as a Gemma3ForCausalLM transformers loads."""
    text = make_hf_model("gemma3")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)  # fmt: skip
    cfg = tf.Gemma3Config(text_config=text.config.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    mm = tf.Gemma3ForConditionalGeneration(cfg).eval()
    missing = mm.model.language_model.load_state_dict(text.model.state_dict(), strict=False)
    assert not missing.missing_keys
    src = str(tmp_path / "mm")
    mm.save_pretrained(src)
    ours = from_pretrained(src)
    assert ours.config.model_type == "gemma3_text"
    ids, mask, pos = padded_batch("right", seed=2)
    ref = hf_logits(text, ids, mask, pos)
    assert _gap(src, ref, ids, mask, pos) <= 1e-4
    out = str(tmp_path / "text")
    save_pretrained(ours, out)
    again = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(again).__name__ == "Gemma3ForCausalLM"
    assert np.abs(hf_logits(again, ids, mask, pos) - ref)[mask.astype(bool)].max() <= 1e-4
