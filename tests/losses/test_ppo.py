"""Tests for jaxrlhf.losses.ppo: KL penalties, reward shaping, GAE, clipped policy/value losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrlhf.losses import (
    gae,
    kl_penalty,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)

GRAD_KW = dict(order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

# Prefix masks: a full row, a partial row, an empty row, a length-1 row.
MASK = np.array(
    [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=np.float32
)
B, T = MASK.shape


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def _rand(seed, shape=(B, T), scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------ kl_penalty


def test_kl_penalty_kinds():
    lp, ref = _rand(0), _rand(1)
    d = lp.astype(np.float64) - ref
    np.testing.assert_allclose(kl_penalty(lp, ref), d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kl_penalty(lp, ref, "k1"), d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kl_penalty(lp, ref, "k2"), 0.5 * d**2, rtol=1e-5, atol=1e-6)
    k3 = kl_penalty(lp, ref, "k3")
    np.testing.assert_allclose(k3, np.exp(-d) - 1 + d, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(k3) >= 0)
    for kind in ("k1", "k2", "k3"):
        check_grads(functools.partial(kl_penalty, kind=kind), (lp, ref), **GRAD_KW)
        out = kl_penalty(lp.astype(jnp.bfloat16), ref.astype(jnp.bfloat16), kind)
        assert out.dtype == jnp.float32 and _all_finite(out)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k4")


# ----------------------------------------------------------------------- per_token_rewards


def test_per_token_rewards():
    scores = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    lp, ref = _rand(2), _rand(3)
    rewards, non_score, kl = per_token_rewards(scores, lp, ref, MASK, kl_coef=0.1, kl_kind="k3")
    r = ref.astype(np.float64) - lp
    kl_ref = (np.exp(r) - 1 - r) * MASK
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(non_score, -0.1 * kl_ref, rtol=1e-5, atol=1e-6)
    expected = -0.1 * kl_ref
    expected[0, 4] += 1.0  # the score lands on the last real token of each row
    expected[1, 2] += 2.0
    expected[3, 0] += 4.0  # the empty row (index 2) gets no score
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-6)
    for out in (rewards, non_score, kl):
        assert out.shape == (B, T) and out.dtype == jnp.float32
        assert np.all(np.asarray(out)[MASK == 0] == 0.0)

    # NaN in padded slots does not leak into outputs or gradients.
    lp_nan = np.where(MASK > 0, lp, np.nan).astype(np.float32)
    out = per_token_rewards(scores, lp_nan, ref, MASK, kl_coef=0.1, kl_kind="k3")
    assert _all_finite(out)
    g = jax.grad(lambda x: per_token_rewards(scores, x, ref, MASK, kl_coef=0.1,
                                             kl_kind="k3")[0].sum())(lp_nan)
    assert _all_finite(g)

    check_grads(
        lambda s, x: per_token_rewards(s, x, ref, MASK, kl_coef=0.1)[0], (scores, lp), **GRAD_KW
    )
    jitted = jax.jit(functools.partial(per_token_rewards, kl_coef=0.1, kl_kind="k3"))
    for a, b in zip(jitted(scores, lp, ref, MASK), (rewards, non_score, kl), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="k1"):
        per_token_rewards(scores, lp, ref, MASK, kl_coef=0.1, kl_kind="full")


# ------------------------------------------------------------------------------------- gae


def _loop_gae(rewards, values, mask, gamma, lam):
    """The GAE recursion as a plain Python double loop (float64), straight from the definition."""
    rewards, values, mask = (np.asarray(a, np.float64) for a in (rewards, values, mask))
    n_rows, n_steps = rewards.shape
    adv = np.zeros_like(rewards)
    for b in range(n_rows):
        next_adv, next_value, next_mask = 0.0, 0.0, 0.0
        for t in reversed(range(n_steps)):
            delta = rewards[b, t] + gamma * next_value * next_mask - values[b, t]
            adv[b, t] = delta + gamma * lam * next_mask * next_adv
            next_adv, next_value, next_mask = adv[b, t], values[b, t], mask[b, t]
    returns = (adv + values) * mask
    return adv * mask, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_against_a_plain_loop(gamma, lam):
    rewards, values = _rand(4), _rand(5)
    adv, ret = gae(rewards, values, MASK, gamma=gamma, lam=lam)
    adv_ref, ret_ref = _loop_gae(rewards, values, MASK, gamma, lam)
    assert adv.shape == (B, T) and adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[2] == 0.0) and np.all(np.asarray(ret)[2] == 0.0)  # empty row


def test_gae_grads_jit_vmap_and_padding():
    rewards, values = _rand(6), _rand(7)
    check_grads(lambda r, v: gae(r, v, MASK, gamma=0.9, lam=0.9), (rewards, values), **GRAD_KW)
    jitted = jax.jit(functools.partial(gae, gamma=0.9, lam=0.9))
    for a, b in zip(jitted(rewards, values, MASK), gae(rewards, values, MASK, gamma=0.9, lam=0.9),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # vmap over an extra leading axis == a Python loop
    rs, vs, ms = np.stack([rewards, values]), np.stack([values, rewards]), np.stack([MASK, MASK])
    vm = jax.vmap(gae)(rs, vs, ms)
    for i in range(2):
        for a, b in zip((vm[0][i], vm[1][i]), gae(rs[i], vs[i], ms[i]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # NaN/inf padding cannot leak into real tokens; bf16 inputs give float32.
    r_bad = np.where(MASK > 0, rewards, np.inf).astype(np.float32)
    v_bad = np.where(MASK > 0, values, np.nan).astype(np.float32)
    for a, b in zip(gae(r_bad, v_bad, MASK), gae(rewards, values, MASK), strict=True):
        np.testing.assert_allclose(a, b)
    assert _all_finite(jax.grad(lambda v: gae(r_bad, v, MASK)[0].sum())(v_bad))
    out = gae(rewards.astype(jnp.bfloat16), values.astype(jnp.bfloat16), MASK)
    assert out[0].dtype == jnp.float32 and _all_finite(out)


# ------------------------------------------------------------------------- ppo_policy_loss

# Log-ratios kept away from the clip edges (log 0.8, log 1.2, log 0.9, log 1.3) and the dual-clip
# edge (log 2) so finite differences never straddle a kink; [0, 3] is dual-clipped (A < 0).
LOG_RATIO = np.array(
    [[0.05, -0.5, 0.5, 1.0, -0.05], [0.4, -0.4, 0.1, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3],
     [-0.6, 0.0, 0.0, 0.0, 0.0]], np.float32
)
OLD = _rand(8, scale=0.5) - 2.0
ADV = np.array(
    [[1.0, -1.0, 2.0, -0.5, 0.7], [-2.0, 1.5, -0.3, 0.2, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0],
     [-1.2, 0.0, 0.0, 0.0, 0.0]], np.float32
)


def _np_policy(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None):
    lp, old, adv = (np.asarray(a, np.float64) for a in (lp, old, adv))
    ratio = np.exp(lp - old)
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps))
    pg = np.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = np.where(adv < 0, np.minimum(pg, -dual_clip * adv), pg)
    m = mask > 0
    return pg[m].mean(), (0.5 * (lp - old) ** 2)[m].mean(), (pg2 > pg1)[m].mean(), ratio[m].mean()


@pytest.mark.parametrize(
    "kw", [{}, {"clip_eps": 0.1, "clip_eps_high": 0.3}, {"dual_clip": 2.0}]
)
def test_ppo_policy_loss_values_and_grads(kw):
    lp = OLD + LOG_RATIO
    loss, metrics = ppo_policy_loss(lp, OLD, ADV, MASK, **kw)
    ref, approxkl, clipfrac, ratio = _np_policy(lp, OLD, ADV, MASK, **kw)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"approxkl", "clipfrac", "ratio"}
    np.testing.assert_allclose(metrics["approxkl"], approxkl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac"], clipfrac, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio"], ratio, rtol=1e-5)
    for v in (loss, *metrics.values()):
        assert v.shape == () and v.dtype == jnp.float32
    check_grads(lambda x: ppo_policy_loss(x, OLD, ADV, MASK, **kw)[0], (lp,), **GRAD_KW)
    jitted = jax.jit(functools.partial(ppo_policy_loss, **kw))
    for a, b in zip(jax.tree_util.tree_leaves(jitted(lp, OLD, ADV, MASK)),
                    jax.tree_util.tree_leaves((loss, metrics)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_dual_clip_bounds_negative_advantage_loss():
    # ratio = e^3 on a negative advantage: plain PPO loss is 20.1, dual clip caps it at c * |A|.
    lp, old, adv, mask = (jnp.array([[x]]) for x in (3.0, 0.0, -1.0, 1.0))
    assert float(ppo_policy_loss(lp, old, adv, mask)[0]) > 20.0
    np.testing.assert_allclose(ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0)[0], 3.0)


def test_ppo_losses_all_masked_and_padding():
    zero = np.zeros_like(MASK)
    lp = OLD + LOG_RATIO
    loss, metrics = ppo_policy_loss(lp, OLD, ADV, zero)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    g = jax.grad(lambda x: ppo_policy_loss(x, OLD, ADV, zero)[0])(lp)
    np.testing.assert_array_equal(g, np.zeros_like(lp))
    vloss, vmetrics = ppo_value_loss(lp, OLD, ADV, zero)
    assert float(vloss) == 0.0 and float(vmetrics["vf_clipfrac"]) == 0.0
    assert _all_finite(jax.grad(lambda x: ppo_value_loss(x, OLD, ADV, zero)[0])(lp))
    # Garbage (huge log-ratios, NaN) in padding: finite loss and gradients equal to clean inputs.
    lp_bad = np.where(MASK > 0, lp, 1e4).astype(np.float32)
    adv_bad = np.where(MASK > 0, ADV, np.nan).astype(np.float32)
    np.testing.assert_allclose(ppo_policy_loss(lp_bad, OLD, adv_bad, MASK)[0],
                               ppo_policy_loss(lp, OLD, ADV, MASK)[0])
    g_bad = jax.grad(lambda x: ppo_policy_loss(x, OLD, adv_bad, MASK)[0])(lp_bad)
    g = jax.grad(lambda x: ppo_policy_loss(x, OLD, ADV, MASK)[0])(lp)
    np.testing.assert_allclose(g_bad, g)


def test_ppo_policy_loss_vmap_bf16_and_errors():
    lp = OLD + LOG_RATIO
    stack = [np.stack([a, a[::-1]]) for a in (lp, OLD, ADV, MASK)]
    vm_loss, vm_metrics = jax.vmap(ppo_policy_loss)(*stack)
    for i in range(2):
        loss_i, metrics_i = ppo_policy_loss(*(s[i] for s in stack))
        np.testing.assert_allclose(vm_loss[i], loss_i, rtol=1e-6)
        np.testing.assert_allclose(vm_metrics["clipfrac"][i], metrics_i["clipfrac"], rtol=1e-6)
    out = ppo_policy_loss(*(a.astype(jnp.bfloat16) for a in (lp, OLD, ADV)), MASK)
    assert out[0].dtype == jnp.float32 and _all_finite(out)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            ppo_policy_loss(lp, OLD, ADV, MASK, dual_clip=bad)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(lp, OLD, ADV, MASK, clip_eps=-0.1)
    with pytest.raises(ValueError, match="clip_eps_high"):
        ppo_policy_loss(lp, OLD, ADV, MASK, clip_eps_high=0.0)


# -------------------------------------------------------------------------- ppo_value_loss


def test_ppo_value_loss():
    old = _rand(9)
    # value moves kept >= 0.1 away from the clip edges +-0.2
    values = old + np.array(
        [[0.05, -0.5, 0.5, 0.0, -0.05], [0.4, -0.4, 0.1, 0.0, 0.0], [0.3] * 5, [-0.6, 0, 0, 0, 0]],
        np.float32,
    )
    returns = _rand(10)
    loss, metrics = ppo_value_loss(values, old, returns, MASK, clip=0.2)
    v, o, r = (np.asarray(a, np.float64) for a in (values, old, returns))
    vclip = o + np.clip(v - o, -0.2, 0.2)
    l1, l2 = (v - r) ** 2, (vclip - r) ** 2
    m = MASK > 0
    np.testing.assert_allclose(loss, 0.5 * np.maximum(l1, l2)[m].mean(), rtol=1e-5)
    assert set(metrics) == {"vf_clipfrac"}
    np.testing.assert_allclose(metrics["vf_clipfrac"], (l2 > l1)[m].mean(), rtol=1e-6)
    check_grads(lambda x: ppo_value_loss(x, old, returns, MASK)[0], (values,), **GRAD_KW)
    jitted = jax.jit(functools.partial(ppo_value_loss, clip=0.2))
    np.testing.assert_allclose(jitted(values, old, returns, MASK)[0], loss, rtol=1e-6)
    vm = jax.vmap(ppo_value_loss)(np.stack([values, old]), np.stack([old, values]),
                                  np.stack([returns, returns]), np.stack([MASK, MASK]))[0]
    np.testing.assert_allclose(vm[0], ppo_value_loss(values, old, returns, MASK)[0], rtol=1e-6)
    np.testing.assert_allclose(vm[1], ppo_value_loss(old, values, returns, MASK)[0], rtol=1e-6)
    out = ppo_value_loss(*(a.astype(jnp.bfloat16) for a in (values, old, returns)), MASK)
    assert out[0].dtype == jnp.float32 and _all_finite(out)
    with pytest.raises(ValueError, match="clip"):
        ppo_value_loss(values, old, returns, MASK, clip=-0.1)
