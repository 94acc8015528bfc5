"""QLoRA's quantized base (`jaxrlhf.models.quant`) against numpy written from the definitions:

* int8: per output column, codes = round(127 w / absmax); w ~ codes absmax / 127;
* nf4: per block of b inputs of a column, codes = the nearest of the 16 NF4 levels to w / absmax,
  packed two per byte; w ~ level absmax;
* a QLoRA model equals the same model with its kernels replaced by the dequantized ones; its logit
  error against the float base is reported and bounded; gradients reach only the adapters; the
  merged export (dequantized + adapters) loads in transformers with our logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from flax import nnx
from helpers.tiny_hf import hf_logits, padded_batch

from jaxrlhf.models import from_pretrained, save_pretrained
from jaxrlhf.models.lora import LoRAParam, LoRASpec, trainable
from jaxrlhf.models.quant import NF4_LEVELS, dequantize, nf4_block, quantize

SPEC = LoRASpec.build(4, 8.0, ["q_proj", "down_proj"])


def _np_int8(w):
    absmax = np.abs(w).max(axis=0, keepdims=True)
    codes = np.clip(np.round(w / np.where(absmax == 0, 1, absmax) * 127), -127, 127)
    return codes * absmax / 127


def _np_nf4(w, block):
    d_in, d_out = w.shape
    out = np.empty_like(w)
    for j in range(d_out):
        for s in range(0, d_in, block):
            x = w[s : s + block, j]
            m = np.abs(x).max() or 1.0
            nearest = np.abs(x[:, None] / m - NF4_LEVELS[None, :]).argmin(axis=1)
            out[s : s + block, j] = NF4_LEVELS[nearest] * m
    return out


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantizers_against_numpy(kind):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, size=(128, 24)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    codes, scales = quantize(jnp.asarray(w), kind)
    got = np.asarray(dequantize(codes, scales, kind, jnp.float32))
    want = _np_int8(w) if kind == "int8" else _np_nf4(w, nf4_block(128))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    assert codes.nbytes == (w.size if kind == "int8" else w.size // 2)
    rel = np.abs(got - w).mean() / np.abs(w).mean()
    assert rel < (0.01 if kind == "int8" else 0.12), rel
    stacked = quantize(jnp.stack([jnp.asarray(w), 2 * jnp.asarray(w)]), kind)  # [L, in, out]: per layer
    second = dequantize(*quantize(2 * jnp.asarray(w), kind), kind, jnp.float32)
    np.testing.assert_allclose(np.asarray(dequantize(*stacked, kind, jnp.float32))[1], np.asarray(second))


@pytest.fixture(scope="module")
def path(tiny_llama):
    """The saved tiny llama (a session fixture)."""
    return tiny_llama


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("scan", [False, True])
def test_qlora_model_is_the_dequantized_base_plus_adapters(path, tmp_path, kind, scan):
    ids, mask, pos = padded_batch("right", seed=1)
    real = mask.astype(bool)
    q = from_pretrained(path, lora=SPEC, quantize_base=kind, scan_layers=scan)
    layer = q.layers.self_attn.q_proj if scan else q.layers[0].self_attn.q_proj
    assert not hasattr(layer, "kernel")
    assert layer.qkernel[...].dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    base = from_pretrained(path, lora=SPEC, scan_layers=scan)
    # the float model with every projection kernel replaced by its dequantized value
    for p, var in nnx.to_flat_state(nnx.state(base, nnx.Param)):
        if p[-1] == "kernel" and p[-2].endswith("_proj"):
            var.set_value(dequantize(*quantize(var.get_value(), kind), kind, jnp.float32))
    want = np.asarray(base(ids, mask, pos))
    got = np.asarray(q(ids, mask, pos))
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)
    float_logits = np.asarray(from_pretrained(path, scan_layers=scan)(ids, mask, pos))
    err = np.abs(got - float_logits)[real].max() / np.abs(float_logits)[real].max()
    assert err < (0.03 if kind == "int8" else 0.35), err  # tiny random model; the demo model's: docs/lora.md
    for _, var in nnx.to_flat_state(nnx.state(q, LoRAParam)):  # trained adapters (B = 0 hides A's grads)
        var.set_value(var.get_value() + 0.05)
    # gradients: adapters only (the codes are integers)
    graphdef, train, frozen = nnx.split(q, trainable("lm"), nnx.Param)
    kinds = [p[-1] for p, _ in nnx.to_flat_state(train)]
    assert set(kinds) <= {"lora_a", "lora_b"}
    per_kind = len(SPEC.targets) * (1 if scan else q.config.num_layers)  # scanned: one stacked leaf each
    assert kinds.count("lora_a") == kinds.count("lora_b") == per_kind > 0, kinds
    grads = jax.grad(lambda t: jnp.sum(nnx.merge(graphdef, t, frozen)(ids, mask, pos) ** 2))(train)
    assert all(np.abs(np.asarray(g.get_value())).max() > 0 for _, g in nnx.to_flat_state(grads))
    # the merged export: dequantized kernels + adapters, a plain transformers model
    save_pretrained(q, str(tmp_path / "merged"))
    hf = hf_logits(tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), ids, mask, pos)
    assert np.abs(hf - np.asarray(q(ids, mask, pos)))[real].max() <= 1e-4
