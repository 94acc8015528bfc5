"""`jaxrlhf.losses.group_advantages` and `grpo_loss` against the numpy references of
`tests/helpers/grpo_reference.py` (written from the formulas, independently), plus gradients, jit,
vmap and bfloat16 inputs."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.grpo_reference import np_group_advantages, np_grpo_loss, self_check
from jax.test_util import check_grads

from jaxrlhf.losses import GRPO_LOSS_TYPES, group_advantages, grpo_loss

# rows of different lengths, a fully padded row and a one-token row
MASK = np.array(
    [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0],
     [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], np.float32,
)  # fmt: skip
B, T = MASK.shape


def _inputs(seed: int, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, (B, T)).astype(np.float32)
    logps = (old + rng.normal(0, spread, (B, T))).astype(np.float32)  # ratios inside and outside the clip
    ref = (old + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1, (B,)).astype(np.float32)
    return logps, old, ref, adv


def test_numpy_references_give_the_hand_computed_values():
    """The references themselves, on small cases worked out by hand."""
    self_check()


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_against_numpy(estimator, scale):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(12,)).astype(np.float32)
    rewards[4:8] = 0.5  # a group with zero spread: advantage 0
    for g in (2, 4, 6):
        want = np_group_advantages(rewards, g, scale=scale, estimator=estimator)
        got = np.asarray(group_advantages(jnp.asarray(rewards), g, scale=scale, estimator=estimator))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    zero = np.asarray(group_advantages(jnp.asarray(rewards), 4, scale=scale, estimator=estimator))[4:8]
    np.testing.assert_array_equal(zero, 0.0)
    jitted = jax.jit(lambda r: group_advantages(r, 4, scale=scale, estimator=estimator))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(rewards))), np_group_advantages(
        rewards, 4, scale=scale, estimator=estimator), rtol=2e-5, atol=2e-5)  # fmt: skip


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="rloo needs"):
        group_advantages(jnp.zeros(6), 1, estimator="rloo")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.zeros(6), 2, scale="std")


CASES = list(itertools.product(GRPO_LOSS_TYPES, ["token", "sequence"], [None, 0.28], [0.0, 0.04]))


@pytest.mark.parametrize("loss_type,level,eps_high,beta", CASES)
def test_grpo_loss_against_numpy(loss_type, level, eps_high, beta):
    logps, old, ref, adv = _inputs(1)
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high, beta=beta,
              importance_sampling_level=level, max_completion_length=8)  # fmt: skip
    want, want_m = np_grpo_loss(logps, old, adv, MASK, ref_logps=ref, **kw)
    got, got_m = jax.jit(lambda *a: grpo_loss(*a[:4], ref_logps=a[4], **kw))(logps, old, adv, MASK, ref)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    assert set(got_m) == set(want_m)
    for k in want_m:
        np.testing.assert_allclose(float(got_m[k]), want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if level == "token":  # the inputs put some ratios outside the clip range on both sides
        assert want_m["clip_ratio/low_mean"] > 0 and want_m["clip_ratio/high_mean"] > 0


def test_grpo_loss_gradients_and_vmap():
    logps, old, ref, adv = _inputs(2, spread=0.05)  # ratios near 1: away from the clip kinks

    old_, adv_, mask_, ref_ = (jnp.asarray(x) for x in (old, adv, MASK, ref))

    def f(lp):
        return grpo_loss(lp, old_, adv_, mask_, ref_logps=ref_, beta=0.1, loss_type="grpo")[0]

    check_grads(f, (jnp.asarray(logps),), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    g = np.asarray(jax.grad(f)(jnp.asarray(logps)))
    assert np.all(g[MASK == 0] == 0) and np.abs(g[MASK == 1]).max() > 0  # padding gets no gradient
    # on-policy (logps == old) and beta = 0: the gradient is -A / (token count) per token (dapo)
    lp_ = jnp.asarray(logps)
    g = np.asarray(jax.grad(lambda lp: grpo_loss(lp, lp_, adv_, mask_)[0])(lp_))
    np.testing.assert_allclose(g, -adv[:, None] * MASK / MASK.sum(), rtol=1e-5, atol=1e-7)
    # vmap over three different rows of log-probs: each result is the un-vmapped call on that row
    rng = np.random.default_rng(7)
    rows = jnp.asarray(old[None] + rng.normal(0, 0.3, (3, B, T)), jnp.float32)
    loss = lambda lp: grpo_loss(lp, old_, adv_, mask_, ref_logps=ref_, beta=0.1)[0]  # noqa: E731
    batched = np.asarray(jax.vmap(loss)(rows))
    want = np.array([float(loss(rows[i])) for i in range(3)])
    assert np.ptp(want) > 1e-3, want  # the rows really give different losses
    np.testing.assert_allclose(batched, want, rtol=1e-6, atol=1e-7)


def test_grpo_loss_bfloat16_inputs_compute_in_float32():
    logps, old, ref, adv = _inputs(3)
    to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    got, m = grpo_loss(to_bf16(logps), to_bf16(old), to_bf16(adv), jnp.asarray(MASK),
                       ref_logps=to_bf16(ref), beta=0.04)  # fmt: skip
    assert got.dtype == jnp.float32 and m["kl"].dtype == jnp.float32
    as_f32 = [np.asarray(to_bf16(x), np.float32) for x in (logps, old, adv, ref)]
    want, _ = np_grpo_loss(*as_f32[:3], MASK, ref_logps=as_f32[3], beta=0.04)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_dapo_normalises_by_the_generation_batch_tokens_and_errors():
    logps, old, _, adv = _inputs(4)
    total, _ = grpo_loss(logps, old, adv, MASK, loss_type="dapo", num_items=3 * MASK.sum())
    bnpo, _ = grpo_loss(logps, old, adv, MASK, loss_type="bnpo")
    np.testing.assert_allclose(float(total), float(bnpo) / 3, rtol=1e-6)  # one of 3 minibatches
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, adv, MASK, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, old, adv, MASK, loss_type="ppo")
