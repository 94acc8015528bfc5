"""Attention backends (`jaxrlhf.models.attention`) against the XLA path, which the model tests check
against transformers.

* the splash kernel (Pallas interpret mode on CPU) equals XLA on outputs and gradients for left and
  right padding, packed DPO rows, sliding windows, lengths that are not a multiple of its blocks,
  and the KV-cache prefill shape (fewer queries than keys);
* the cuDNN path's call (`jax.nn.dot_product_attention` with our mask, run here with its XLA
  implementation) equals XLA; the cuDNN kernel itself runs only in bench/device_bench.py;
* a model with `attention="splash"` gives the XLA model's logits, gradients and greedy tokens,
  unrolled and scanned, and on 8 CPU devices under `shard_map` the single-device numbers;
* "auto" resolves per platform and dtype; bad names and cuDNN in float32 fail with a clear error.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.tiny_hf import padded_batch, run_with_cpu_devices

from jaxrlhf.generation import generate
from jaxrlhf.models import (
    dot_product_attention,
    from_pretrained,
    make_attention_mask,
    resolve_backend,
    splash_attention,
    xla_attention,
)
from jaxrlhf.train.objectives import packed_mask

B, N, K, H = 3, 4, 2, 16


def _qkv(t, s, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, s, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, s, K, H)), jnp.float32)
    return q, k, v


def _padded_mask(side, t, window=None):
    lengths = (t, t // 2, 3)
    mask = np.zeros((B, t), np.int32)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, t - n :] = 1
        else:
            mask[i, :n] = 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return make_attention_mask(jnp.asarray(mask), jnp.asarray(pos), window=window), mask


def _packed(t, seed=0):
    """`[prompt][chosen][rejected][pad]` rows as the DPO collator lays them out: segment ids 1/2/3/0."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, t), np.int32)
    pos = np.zeros((B, t), np.int32)
    for b in range(B):
        p, c, r = rng.integers(2, t // 3, size=3)
        seg[b, :p], seg[b, p : p + c], seg[b, p + c : p + c + r] = 1, 2, 3
        pos[b, : p + c] = np.arange(p + c)
        pos[b, p + c : p + c + r] = p + np.arange(r)
    mask = make_attention_mask(packed_mask(jnp.asarray(seg)), jnp.asarray(pos))
    return mask, (seg != 0).astype(np.int32)


def _check(fn, mask, valid, t, s, seed=0, **kw):
    """`fn` equals the XLA path where the query sees a key (outputs and q/k/v gradients)."""
    q, k, v = _qkv(t, s, seed)
    scale = 1.0 / math.sqrt(H)
    w = jnp.asarray(valid, jnp.float32)[:, :, None, None]
    want = xla_attention(q, k, v, mask, scale=scale, **kw)
    got = jax.jit(lambda q, k, v: fn(q, k, v, mask, scale=scale, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got * w), np.asarray(want * w), atol=2e-5)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask, scale=scale, **kw)) * w)

    g_want = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_got, g_want, strict=True):
        assert np.abs(np.asarray(b)).max() > 1e-2
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, err_msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("t", [16, 200])
def test_splash_matches_xla_on_padded_rows(side, t):
    mask, valid = _padded_mask(side, t)
    _check(splash_attention, mask, valid, t, t)


def test_splash_matches_xla_on_packed_rows_and_sliding_window():
    mask, valid = _packed(96, seed=1)
    _check(splash_attention, mask, valid, 96, 96, seed=1)
    mask, valid = _padded_mask("right", 160, window=7)
    _check(splash_attention, mask, valid, 160, 160, seed=2)


def test_splash_soft_cap_matches_xla():
    """Gemma 2's score soft-capping (a cap that binds: scores reach ~5) with a sliding window."""
    mask, valid = _padded_mask("left", 128, window=9)
    _check(splash_attention, mask, valid, 128, 128, seed=3, soft_cap=1.5)
    q, k, v = _qkv(8, 8)
    full = make_attention_mask(None, jnp.broadcast_to(jnp.arange(8), (B, 8)))
    capped = xla_attention(q, k, v, full, scale=0.25, soft_cap=1.5)
    assert np.abs(np.asarray(capped - xla_attention(q, k, v, full, scale=0.25))).max() > 1e-2


def test_splash_prefill_shape_fewer_queries_than_keys():
    """The KV-cache prefill: T prompt queries against S >= T cache slots (the rest not yet valid)."""
    t, s = 12, 40
    q_slot, k_slot = np.arange(t), np.arange(s)
    mask = np.broadcast_to((k_slot[None] <= q_slot[:, None])[None], (B, t, s)).copy()
    mask[1, :, :4] = False  # left padding of row 1
    valid = np.ones((B, t), np.int32)
    valid[1, :4] = 0
    _check(splash_attention, jnp.asarray(mask), valid, t, s)


def test_cudnn_call_matches_xla_with_its_xla_implementation():
    for mask, valid in (_packed(48, seed=3), _padded_mask("left", 24), _padded_mask("right", 24, window=5)):
        t = mask.shape[1]
        _check(
            lambda *a, **kw: dot_product_attention(*a, implementation="xla", **kw), mask, valid, t, t
        )


def test_resolve_backend_and_errors():
    assert resolve_backend("auto", jnp.float32, 64) == "xla"  # this machine: CPU
    assert resolve_backend("auto", jnp.float32, 64, "tpu") == "splash"
    assert resolve_backend("auto", jnp.bfloat16, 64, "gpu") == "cudnn"
    assert resolve_backend("auto", jnp.float32, 64, "gpu") == "xla"  # cuDNN flash is fp16/bf16 only
    assert resolve_backend("auto", jnp.bfloat16, 512, "gpu") == "xla"
    assert resolve_backend("splash", jnp.float32, 64, "gpu") == "splash"
    # cuDNN's fused kernel has no score soft-capping (Gemma 2): auto avoids it, explicit is refused
    assert resolve_backend("auto", jnp.bfloat16, 64, "gpu", soft_cap=50.0) == "xla"
    assert resolve_backend("auto", jnp.bfloat16, 64, "tpu", soft_cap=50.0) == "splash"
    with pytest.raises(ValueError, match="soft-capping"):
        resolve_backend("cudnn", jnp.bfloat16, 64, "gpu", soft_cap=50.0)
    with pytest.raises(ValueError, match="attention must be one of auto, xla, splash, cudnn"):
        resolve_backend("flash", jnp.float32, 64)
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match="model.dtype=bfloat16"):
        dot_product_attention(q, k, v, jnp.ones((B, 8, 8), bool), scale=0.25)


@pytest.fixture(scope="module")
def tiny_paths(hf_checkpoint):
    return {kind: hf_checkpoint(kind)[1] for kind in ("llama", "mistral", "gemma2")}


def _loss_and_grads(model, ids, mask, pos):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids, mask, pos)
        return jnp.sum(jax.nn.log_softmax(logits, -1)[..., 5] * mask), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), {str(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}


# mistral: a sliding window shorter than the rows; gemma2: soft-capped scores, two kinds of layers,
# checked scanned only (its layers alternate inside the scan)
@pytest.mark.parametrize("kind, scan", [("llama", False), ("llama", True), ("mistral", False),
                                        ("mistral", True), ("gemma2", True)])
def test_splash_model_matches_xla_model(tiny_paths, kind, scan):
    path = tiny_paths[kind]
    for side in ("left", "right"):
        ids, mask, pos = padded_batch(side, seed=4)
        want_logits, want = _loss_and_grads(from_pretrained(path, scan_layers=scan), ids, mask, pos)
        model = from_pretrained(path, scan_layers=scan, attention="splash")
        assert model.config.effective_attention == "splash"
        got_logits, got = _loss_and_grads(model, ids, mask, pos)
        real = mask.astype(bool)
        np.testing.assert_allclose(got_logits[real], want_logits[real], atol=1e-5)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-4, err_msg=f"{side} {name}")


def test_splash_packed_rows_and_greedy_generation(tiny_paths):
    path = tiny_paths["llama"]
    xla_model, splash_model = from_pretrained(path), from_pretrained(path, attention="splash")
    mask, valid = _packed(24, seed=5)
    ids = jnp.asarray(np.random.default_rng(5).integers(3, 100, size=(B, 24)), jnp.int32)
    seg_pos = jnp.asarray(np.maximum(np.cumsum(valid, axis=1) - 1, 0), jnp.int32)
    want = np.asarray(xla_model.hidden_states(ids, mask, seg_pos))
    got = np.asarray(splash_model.hidden_states(ids, mask, seg_pos))
    real = valid.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)
    ids, mask, _ = padded_batch("left", seed=6, lengths=(9, 4, 1), total=9)
    kw = dict(max_new_tokens=6, eos_token_ids=[1], pad_token_id=0, temperature=0.0)
    a = generate(xla_model, ids, mask, **kw)
    b = generate(splash_model, ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_allclose(np.asarray(b.logprobs), np.asarray(a.logprobs), atol=1e-5)


def test_splash_under_shard_map_on_8_devices_matches_one(tiny_paths):
    script = f"""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.integers(3, 100, size=(8, 20)), jnp.int32)
mask = np.ones((8, 20), np.int32); mask[::2, :5] = 0
mask = jnp.asarray(mask)
def run(mesh):
    model = from_pretrained({tiny_paths["llama"]!r}, mesh=mesh, attention="splash")
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask) * mask[..., None])
    return jax.jit(jax.value_and_grad(loss))(params)
one = run(None)
for shape in (dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=8, tensor=1)):
    many = run(make_mesh(**shape))
    np.testing.assert_allclose(float(many[0]), float(one[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(many[1]), jax.tree.leaves(one[1])):  # gradients up to ~30
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
print("OK")
"""
    run_with_cpu_devices(script)
