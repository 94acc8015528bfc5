"""Our Flax logits against transformers PyTorch (float32) for every supported model type."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from helpers.tiny_hf import MODEL_TYPES, hf_logits, make_hf_model, padded_batch

from jaxrlhf.models import from_pretrained, save_pretrained

TOL = 1e-4


def _ours(model, ids, mask, pos):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))


@pytest.fixture(scope="module", params=MODEL_TYPES)
def hf_pair(request, hf_checkpoint):
    """(kind, transformers model, its checkpoint dir, our model loaded from it)."""
    hf, path = hf_checkpoint(request.param)
    return request.param, hf, path, from_pretrained(path)


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers(hf_pair, side):
    kind, hf, _, ours = hf_pair
    ids, mask, pos = padded_batch(side, seed=1)
    ref = hf_logits(hf, ids, mask, pos)
    got = _ours(ours, ids, mask, pos)
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() <= TOL, kind
    assert np.abs(ref[real]).max() > 0.5  # the comparison is not between near-zero tensors


def test_default_positions_skip_left_padding(hf_pair):
    """Without explicit positions, a left-padded row gets the logits of the same row unpadded."""
    _, _, _, ours = hf_pair
    ids, mask, _ = padded_batch("left", seed=2)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    n = int(mask[1].sum())
    alone = np.asarray(ours(jnp.asarray(ids[1:2, -n:])))
    np.testing.assert_allclose(got[1, -n:], alone[0], atol=TOL)


def test_round_trip_through_transformers(hf_pair, tmp_path):
    kind, hf, _, ours = hf_pair
    out = str(tmp_path / "export")
    save_pretrained(ours, out)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, pos = padded_batch("right", seed=3)
    ref = hf_logits(hf, ids, mask, pos)
    again = hf_logits(reloaded, ids, mask, pos)
    real = mask.astype(bool)
    assert np.abs(again - ref)[real].max() <= TOL, kind
    # and our own loader reads our export back to the same parameters
    np.testing.assert_allclose(_ours(from_pretrained(out), ids, mask, pos), _ours(ours, ids, mask, pos))


def test_sharded_export_with_index(tmp_path):
    hf = make_hf_model("llama")
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    ours = from_pretrained(src)
    out = str(tmp_path / "sharded")
    save_pretrained(ours, out, max_shard_size="40KB")
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 3
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, pos = padded_batch("left", seed=4)
    real = mask.astype(bool)
    diff = np.abs(hf_logits(reloaded, ids, mask, pos) - hf_logits(hf, ids, mask, pos))[real]
    assert diff.max() <= TOL
    # our loader reads the sharded layout too
    np.testing.assert_allclose(
        _ours(from_pretrained(out), ids, mask, pos), _ours(ours, ids, mask, pos), atol=1e-6
    )


def test_sliding_window_is_applied(hf_checkpoint, tmp_path):
    """Mistral's window (5) is shorter than the test rows: our logits match transformers' with it,
    and leave them when config.json says "sliding_window": null (so the window is what we apply)."""
    hf, path = hf_checkpoint("mistral")
    assert hf.config.sliding_window == 5
    no_window = str(tmp_path / "no_window")
    shutil.copytree(path, no_window)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["sliding_window"] = None
    with open(os.path.join(no_window, "config.json"), "w") as f:
        json.dump(cfg, f)
    ids, mask, pos = padded_batch("right", seed=5)
    ref = hf_logits(hf, ids, mask, pos)
    real = mask.astype(bool)
    assert np.abs(_ours(from_pretrained(path), ids, mask, pos) - ref)[real].max() <= TOL
    assert np.abs(_ours(from_pretrained(no_window), ids, mask, pos) - ref)[real].max() > 1e-3


@pytest.mark.parametrize(
    "kind", ["llama", "smollm2", "gpt2", "gemma", "gemma2", "gemma3", "mixtral", "qwen3_moe"]
)
def test_score_head_matches_sequence_classification(kind, tmp_path):
    hf = make_hf_model(kind, head="score")
    path = str(tmp_path / "rm")
    hf.save_pretrained(path)
    ours = from_pretrained(path, head="score")
    ids, mask, pos = padded_batch("right", seed=6)
    t = {
        k: torch.tensor(v, dtype=torch.long)
        for k, v in {"input_ids": ids, "attention_mask": mask, "position_ids": pos}.items()
    }
    base = hf.transformer if kind == "gpt2" else hf.model
    with torch.no_grad():
        per_pos = hf.score(base(**t).last_hidden_state)[..., 0].numpy()
        pooled = hf(**t).logits[:, 0].numpy()
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    assert got.shape == ids.shape
    real = mask.astype(bool)
    assert np.abs(got - per_pos)[real].max() <= TOL
    last = mask.sum(axis=1) - 1  # right padding: the last real token, where reward models read
    np.testing.assert_allclose(got[np.arange(len(ids)), last], pooled, atol=TOL)
    # export in the *ForSequenceClassification layout, loadable by transformers as is
    out = str(tmp_path / "export")
    save_pretrained(ours, out)
    again = tf.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_allclose(again.eval()(**t).logits[:, 0].numpy(), pooled, atol=TOL)


def test_score_head_initialised_from_lm_checkpoint(tmp_path):
    hf = make_hf_model("llama")
    path = str(tmp_path / "lm")
    hf.save_pretrained(path)
    with pytest.raises(ValueError, match="score.weight"):
        from_pretrained(path, head="score")
    rm = from_pretrained(path, head="score", init_score_head=True, seed=3)
    w = np.asarray(rm.score.kernel[...])
    assert w.shape == (64, 1) and 0.03 < w.std() < 0.25  # N(0, 1/sqrt(65)) ~ 0.124


def test_bfloat16_compute_close_to_float32(hf_pair):
    """bfloat16 compute with float32 master weights: logits within 0.05 absolute of float32 (logits
    of magnitude ~2 here; measured max differences 0.013-0.017 across the model types)."""
    kind, _, path, ours = hf_pair
    ids, mask, pos = padded_batch("left", seed=7)
    bf16 = from_pretrained(path, dtype=jnp.bfloat16)
    ref, got = _ours(ours, ids, mask, pos), _ours(bf16, ids, mask, pos)
    real = mask.astype(bool)
    assert np.isfinite(got).all()
    diff = np.abs(got - ref)[real]
    if ours.config.num_experts:  # a router score within bf16 rounding of a tie may pick another expert
        assert np.mean(diff.max(axis=-1) > 0.05) <= 0.15, kind
        assert np.median(diff) <= 0.01, kind
    else:
        assert diff.max() <= 0.05, kind
