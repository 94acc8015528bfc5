"""LoRA adapters in the decoder (`jaxrlhf.models.lora`).

* a targeted linear layer computes `x W + (x A) B alpha / r`, checked against numpy on the layer's
  own arrays; untargeted layers are untouched;
* with `B = 0` (fresh adapters) the logits equal the base model's exactly, unrolled and scanned;
* with trained (non-zero) adapters the logits equal a model whose kernels are `W + A B alpha / r`
  (the merged weights, computed independently in numpy);
* gradients taken over the trainable split reach only the adapters (and a score head);
* a scanned model's adapters are stacked `[L, ...]` and give the unrolled model's logits;
* LoRA dropout: inverted-dropout masks of the stated rate, only with a dropout key (passed to the
  forward pass, or bound with `with_lora_dropout`), per layer and per projection, the same masks
  scanned and unrolled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.lora import randomize_b
from helpers.tiny_hf import padded_batch

from jaxrlhf.models import from_pretrained
from jaxrlhf.models.lora import (
    LORA_TARGETS,
    LoRASpec,
    adapters_off,
    dropout_input,
    trainable,
)

SPEC = LoRASpec.build(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def path(tiny_llama):
    """The saved tiny llama (a session fixture)."""
    return tiny_llama


def test_spec_names_and_errors():
    assert LoRASpec.build(8, 16).targets == LORA_TARGETS and LoRASpec.build(8, 16).scale == 2.0
    assert LoRASpec.build(8, 16, ["v_proj", "q_proj"]).targets == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="c_attn"):
        LoRASpec.build(8, 16, ["c_attn"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRASpec.build(0, 16)


def test_linear_layer_against_numpy(path):
    model = randomize_b(from_pretrained(path, lora=SPEC))
    layer = model.layers[1]
    x = np.random.default_rng(1).normal(size=(2, 5, model.config.hidden_size)).astype(np.float32)
    q = layer.self_attn.q_proj
    w, a, b = (np.asarray(v[...]) for v in (q.kernel, q.lora_a, q.lora_b))
    assert a.shape == (model.config.hidden_size, 4) and np.abs(b).max() > 0
    want = x @ w + (x @ a) @ b * (8.0 / 4)
    if q.bias is not None:
        want = want + np.asarray(q.bias[...])
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    assert layer.self_attn.k_proj.lora_a is None and layer.mlp.up_proj.lora_a is None
    assert layer.mlp.down_proj.lora_a.shape == (model.config.intermediate_size, 4)


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapters_give_the_base_and_trained_ones_the_merged_weights(path, scan):
    ids, mask, pos = padded_batch("left", seed=2)
    base = from_pretrained(path, scan_layers=scan)
    want = np.asarray(base(ids, mask, pos))
    fresh = from_pretrained(path, scan_layers=scan, lora=SPEC)
    np.testing.assert_array_equal(np.asarray(fresh(ids, mask, pos)), want)
    adapted = randomize_b(fresh)
    got = np.asarray(adapted(ids, mask, pos))
    assert np.abs(got - want)[mask.astype(bool)].max() > 1e-3  # the adapters change the output
    graphdef, state = nnx.split(adapted)
    off = nnx.merge(graphdef, adapters_off(state))  # the reference of a LoRA run: adapters off
    np.testing.assert_array_equal(np.asarray(off(ids, mask, pos)), want)
    # merged weights, in numpy: W + A B alpha / r in each targeted kernel of the base model
    merged = from_pretrained(path, scan_layers=scan)
    for mod_path, var in nnx.to_flat_state(nnx.state(merged, nnx.Param)):
        if mod_path[-1] != "kernel" or mod_path[-2] not in SPEC.targets:
            continue
        owner = adapted
        for k in mod_path[:-1]:
            owner = owner[k] if isinstance(k, int) else getattr(owner, k)
        a, b = np.asarray(owner.lora_a[...]), np.asarray(owner.lora_b[...])
        var.set_value(jnp.asarray(np.asarray(var.get_value()) + np.matmul(a, b) * SPEC.scale))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], np.asarray(merged(ids, mask, pos))[real], atol=2e-5)


def test_scanned_adapters_are_stacked_and_match_unrolled(path):
    ids, mask, pos = padded_batch("right", seed=3)
    unrolled = randomize_b(from_pretrained(path, lora=SPEC), seed=7)
    scanned = from_pretrained(path, lora=SPEC, scan_layers=True)
    cfg = scanned.config
    assert scanned.layers.self_attn.q_proj.lora_a.shape == (cfg.num_layers, cfg.hidden_size, 4)
    for block, lin in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
        for name in ("lora_a", "lora_b"):  # the unrolled adapters, stacked
            layers = [getattr(getattr(getattr(x, block), lin), name)[...] for x in unrolled.layers]
            getattr(getattr(getattr(scanned.layers, block), lin), name).set_value(jnp.stack(layers))
    real = mask.astype(bool)
    a, b = np.asarray(unrolled(ids, mask, pos)), np.asarray(scanned(ids, mask, pos))
    np.testing.assert_allclose(b[real], a[real], atol=1e-5)


@pytest.mark.parametrize("head", ["lm", "score"])
def test_gradients_reach_only_the_trainable_split(path, head):
    model = randomize_b(from_pretrained(path, lora=SPEC, head=head, init_score_head=True))
    graphdef, train, frozen = nnx.split(model, trainable(head), nnx.Param)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(train)}
    assert all(n.endswith(("lora_a", "lora_b")) or n.startswith("score") for n in names)
    assert (head == "score") == any(n.startswith("score") for n in names)
    per_kind = len(SPEC.targets) * model.config.num_layers  # q_proj, v_proj, down_proj in every layer
    assert len(SPEC.targets) == 3 and model.config.num_layers >= 2
    assert sum(n.endswith("lora_a") for n in names) == sum(n.endswith("lora_b") for n in names) == per_kind
    ids, mask, pos = padded_batch("right", seed=4)
    grads = jax.grad(lambda t: jnp.sum(nnx.merge(graphdef, t, frozen)(ids, mask, pos) ** 2))(train)
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert flat.keys() == names and all(np.abs(g).max() > 0 for g in flat.values())


def test_dropout_input_is_inverted_dropout_of_the_stated_rate():
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, size=(40, 500)), jnp.float32)
    assert dropout_input(x, 0.3, None, site=0) is x  # no key: no dropout (sampling, evaluation)
    key = jax.random.key(1)
    assert dropout_input(x, 0.0, key, site=0) is x
    y = np.asarray(dropout_input(x, 0.3, key, site=0))
    y_other_site = np.asarray(dropout_input(x, 0.3, key, site=1))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.7, rtol=1e-6)
    n, p = y.size, 0.3  # dropped fraction within 5 binomial standard deviations of the rate
    assert abs((~kept).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert ((y_other_site != 0) != kept).mean() > 0.3  # another projection draws its own mask


def test_linear_dropout_acts_on_the_adapter_path_only(path):
    spec = LoRASpec.build(rank=4, alpha=8.0, target_modules=["q_proj"], dropout=0.5)
    model = randomize_b(from_pretrained(path, lora=spec))
    q = model.layers[0].self_attn.q_proj
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, model.config.hidden_size)), jnp.float32)
    w, a, b = (np.asarray(v[...]) for v in (q.kernel, q.lora_a, q.lora_b))
    bias = 0.0 if q.bias is None else np.asarray(q.bias[...])
    key = jax.random.key(3)
    got = np.asarray(q(x, key))
    dropped = np.asarray(dropout_input(x, 0.5, key, site=LORA_TARGETS.index("q_proj")))
    assert (dropped == 0).any() and not np.allclose(dropped, np.asarray(x))
    want = np.asarray(x) @ w + (dropped @ a) @ b * spec.scale + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    no_dropout = np.asarray(x) @ w + (np.asarray(x) @ a) @ b * spec.scale + bias
    np.testing.assert_allclose(np.asarray(q(x)), no_dropout, rtol=1e-5, atol=1e-5)  # no key: none


def test_model_dropout_masks_per_layer_and_equal_scanned_and_unrolled(path):
    spec = LoRASpec.build(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"], dropout=0.25)
    ids, mask, pos = padded_batch("right", seed=5)
    unrolled = randomize_b(from_pretrained(path, lora=spec), seed=9)
    scanned = from_pretrained(path, lora=spec, scan_layers=True)
    for block, lin in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
        for name in ("lora_a", "lora_b"):
            layers = [getattr(getattr(getattr(x, block), lin), name)[...] for x in unrolled.layers]
            getattr(getattr(getattr(scanned.layers, block), lin), name).set_value(jnp.stack(layers))
    real = mask.astype(bool)
    plain = np.asarray(unrolled(ids, mask, pos))
    key = jax.random.key(4)
    a = np.asarray(unrolled(ids, mask, pos, dropout_key=key))
    b = np.asarray(scanned(ids, mask, pos, dropout_key=key))
    c = np.asarray(unrolled(ids, mask, pos, dropout_key=jax.random.key(5)))
    np.testing.assert_allclose(b[real], a[real], atol=1e-5)  # same masks: the layer folds the key
    assert np.abs(a - plain)[real].max() > 1e-4 and np.abs(c - a)[real].max() > 1e-4
    np.testing.assert_array_equal(np.asarray(unrolled(ids, mask, pos)), plain)  # no key: no dropout
    # a key bound to a copy of the model: the same masks, and the model itself is left as it was
    bound = unrolled.with_lora_dropout(key)
    np.testing.assert_array_equal(np.asarray(bound(ids, mask, pos)), a)
    passed = unrolled.hidden_states(ids, mask, pos, dropout_key=key)
    np.testing.assert_array_equal(np.asarray(bound.hidden_states(ids, mask, pos)), np.asarray(passed))
    assert unrolled.dropout_key is None
    np.testing.assert_array_equal(np.asarray(unrolled(ids, mask, pos)), plain)
    np.testing.assert_array_equal(np.asarray(bound.with_lora_dropout(None)(ids, mask, pos)), plain)
    # every layer draws its own masks: layer 0's and layer 1's differ on the same input
    x = jnp.ones((2, 3, unrolled.config.hidden_size), jnp.float32)
    m0 = np.asarray(dropout_input(x, 0.25, jax.random.fold_in(key, 0), site=0))
    m1 = np.asarray(dropout_input(x, 0.25, jax.random.fold_in(key, 1), site=0))
    assert ((m0 == 0) != (m1 == 0)).any()


def test_bound_dropout_key_under_jit(path):
    """The train steps' pattern: a model merged inside the traced function, a key bound to it, the
    forward called without one: equal to passing the key, and a function of the key only."""
    spec = LoRASpec.build(rank=4, alpha=8.0, target_modules=["q_proj", "down_proj"], dropout=0.5)
    model = randomize_b(from_pretrained(path, lora=spec), seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    ids, mask, pos = padded_batch("left", seed=2)

    @jax.jit
    def run(params, key):
        m = nnx.merge(graphdef, params)
        return m.with_lora_dropout(key)(ids, mask, pos), m(ids, mask, pos, dropout_key=key), m(ids, mask, pos)

    bound, passed, plain = (np.asarray(a) for a in run(params, jax.random.key(7)))
    np.testing.assert_array_equal(bound, passed)
    assert np.abs(bound - plain).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(run(params, jax.random.key(7))[0]), bound)
