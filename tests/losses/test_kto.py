"""Tests for jaxrlhf.losses.kto: the KTO / unpaired APO-zero loss as TRL computes it.

Values are checked against the independent float64 numpy reference in
``tests/helpers/kto_reference.py`` (written from the formula, not from the JAX code), on inputs drawn
on a binary grid so that the differences the formula takes are exact in float32; gradients against
central finite differences in float64 (under ``jax.enable_x64``).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.kto_reference import kto_loss_reference

from jaxrlhf.losses import KTO_LOSS_TYPES, kto_loss

TRL_METRICS = {
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}
ALL_METRICS = TRL_METRICS | {"count/chosen", "count/rejected"}
RTOL = 1e-6
ATOL = 1e-6  # for metrics near 0 (margins, a clamped kl, a rewards mean of mixed signs)
SEEDS = range(5)


def on_grid(x, bits=10):
    """Round to a multiple of 2**-bits, as float32 (exact for |x| < 2**(23 - bits))."""
    return (np.round(np.asarray(x, np.float64) * 2.0**bits) / 2.0**bits).astype(np.float32)


def make_batch(seed, batch=9, *, labels="mixed", kl_shift=0.0):
    """Policy / reference / KL log-probs on a grid; `kl_shift` moves the KL estimate's sign."""
    rng = np.random.default_rng(seed)
    ref = on_grid(rng.uniform(-30.0, -5.0, batch))
    pol = on_grid(ref + rng.normal(0.0, 3.0, batch))
    kl_ref = on_grid(rng.uniform(-40.0, -10.0, batch))
    kl_pol = on_grid(kl_ref + kl_shift + rng.normal(0.0, 1.0, batch))
    if labels == "mixed":
        lab = rng.integers(0, 2, batch).astype(bool)
        lab[0], lab[1] = True, False  # both classes present
    elif labels == "all_desirable":
        lab = np.ones(batch, bool)
    else:
        lab = np.zeros(batch, bool)
    return pol, ref, lab, kl_pol, kl_ref


def assert_metrics_match(got, want, what=""):
    assert TRL_METRICS <= set(want), f"reference lacks {TRL_METRICS - set(want)}"
    for k in set(got) & set(want):
        np.testing.assert_allclose(
            np.float64(got[k]), np.float64(want[k]), rtol=RTOL, atol=ATOL, err_msg=f"{what} {k}"
        )


# ------------------------------------------------------------------ against the numpy reference


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("labels", ["mixed", "all_desirable", "all_undesirable"])
@pytest.mark.parametrize("kl_shift", [1.5, -1.5])  # KL estimate > 0 and clamped to 0
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_reference(seed, kl_shift, labels, loss_type):
    pol, ref, lab, kl_pol, kl_ref = make_batch(seed, labels=labels, kl_shift=kl_shift)
    rng = np.random.default_rng(100 + seed)
    kw = dict(
        beta=float(rng.choice([0.05, 0.1, 0.5, 2.0])),
        desirable_weight=float(rng.choice([1.0, 0.7, 1.33])),
        undesirable_weight=float(rng.choice([1.0, 1.5, 0.4])),
        loss_type=loss_type,
    )
    loss, metrics = kto_loss(pol, ref, lab, kl_pol, kl_ref, **kw)
    want_loss, want_metrics = kto_loss_reference(pol, ref, lab, kl_pol, kl_ref, **kw)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert set(metrics) == ALL_METRICS
    np.testing.assert_allclose(np.float64(loss), want_loss, rtol=RTOL, atol=1e-7)
    assert_metrics_match(metrics, want_metrics, f"seed={seed}")
    n_des = int(lab.sum())
    assert float(metrics["count/chosen"]) == n_des
    assert float(metrics["count/rejected"]) == len(lab) - n_des
    if loss_type == "apo_zero_unpaired":
        assert float(metrics["kl"]) == 0.0
    else:
        assert float(metrics["kl"]) >= 0.0
        if kl_shift < 0:  # the negative KL estimate is clamped
            assert float(metrics["kl"]) == 0.0


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_mask_matches_reference_on_real_rows(seed, loss_type):
    pol, ref, lab, kl_pol, kl_ref = make_batch(seed, batch=12, kl_shift=0.8)
    rng = np.random.default_rng(200 + seed)
    mask = rng.random(12) < 0.6
    mask[0] = mask[1] = True  # one real row of each class
    mask[-1] = False
    kw = dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.9, loss_type=loss_type)
    want_loss, want_metrics = kto_loss_reference(
        pol[mask], ref[mask], lab[mask], kl_pol[mask], kl_ref[mask], **kw
    )
    # Padding rows hold garbage (NaN, inf, huge values): none of it may leak anywhere.
    garbage = np.where(rng.random(12) < 0.5, np.nan, np.inf).astype(np.float32)
    args = [np.where(mask, a, g) for a, g in zip((pol, ref), (garbage, -garbage), strict=True)]
    kl_args = [np.where(mask, a, g) for a, g in zip((kl_pol, kl_ref), (1e30, -garbage), strict=True)]
    lab_pad = np.where(mask, lab, rng.integers(0, 2, 12).astype(bool))
    for m in (mask, mask.astype(np.float32)):
        loss, metrics = kto_loss(*args, lab_pad, *kl_args, mask_B=m, **kw)
        np.testing.assert_allclose(np.float64(loss), want_loss, rtol=RTOL, atol=1e-7)
        assert_metrics_match(metrics, want_metrics, "masked")
        assert float(metrics["count/chosen"] + metrics["count/rejected"]) == mask.sum()

    g = jax.grad(lambda p: kto_loss(p, args[1], lab_pad, *kl_args, mask_B=mask, **kw)[0])(args[0])
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g)[~mask] == 0.0)


def test_reference_unmasked_equals_mask_of_ones():
    pol, ref, lab, kl_pol, kl_ref = make_batch(3)
    a = kto_loss(pol, ref, lab, kl_pol, kl_ref)
    b = kto_loss(pol, ref, lab, kl_pol, kl_ref, mask_B=np.ones(len(pol), np.float32))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------ a case worked out by hand


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_hand_computed_two_rows():
    # Row 0 desirable: p=-2, r=-3 -> rho_0 = 1.   Row 1 undesirable: p=-5, r=-4 -> rho_1 = -1.
    # KL pairs: (kl_p - kl_r) = (-6 - -7, -8 - -8) = (1, 0) -> mean 0.5 -> z0 = max(0.5, 0) = 0.5.
    # beta = 1, desirable_weight = 1, undesirable_weight = 2:
    #   l_0 = 1 * (1 - sigmoid(1 * (1 - 0.5)))    = 1 - sigmoid(0.5)        = 0.37754066880
    #   l_1 = 2 * (1 - sigmoid(1 * (0.5 - (-1)))) = 2 * (1 - sigmoid(1.5))  = 0.36485104762
    #   loss = (l_0 + l_1) / 2 = 0.37119585821
    # rewards/chosen = beta * rho_0 = 1, rewards/rejected = -1, margins = 2,
    # logps/chosen = -2, logps/rejected = -5, kl = 0.5, one row per class.
    args = (
        np.array([-2.0, -5.0], np.float32),
        np.array([-3.0, -4.0], np.float32),
        np.array([1, 0]),
        np.array([-6.0, -8.0], np.float32),
        np.array([-7.0, -8.0], np.float32),
    )
    kw = dict(beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    loss, m = kto_loss(*args, **kw)
    expected = ((1 - _sig(0.5)) + 2 * (1 - _sig(1.5))) / 2
    assert abs(expected - 0.37119585821) < 1e-10
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    want = {
        "kl": 0.5,
        "rewards/chosen": 1.0,
        "rewards/rejected": -1.0,
        "rewards/margins": 2.0,
        "logps/chosen": -2.0,
        "logps/rejected": -5.0,
        "count/chosen": 1.0,
        "count/rejected": 1.0,
    }
    assert {k: float(v) for k, v in m.items()} == pytest.approx(want, rel=1e-6)

    # With the KL pairs giving (0 - 1, -8 - -8) -> mean -0.5, the reference point is clamped to 0:
    #   loss = ((1 - sigmoid(1)) + 2 * (1 - sigmoid(0 + 1))) / 2 = 1.5 * (1 - sigmoid(1)) = 0.40341213
    neg_kl = (np.array([-7.0, -8.0], np.float32), np.array([-6.0, -8.0], np.float32))
    loss, m = kto_loss(*args[:3], *neg_kl, **kw)
    np.testing.assert_allclose(float(loss), 1.5 * (1 - _sig(1.0)), rtol=1e-6)
    assert float(m["kl"]) == 0.0

    # Unpaired APO-zero ignores the KL pairs: l_0 = 1 - sigmoid(1), l_1 = 2 * sigmoid(-1), which
    # is again 1.5 * (1 - sigmoid(1)) = 0.40341213; the kl metric is 0.
    loss, m = kto_loss(*args[:3], None, None, loss_type="apo_zero_unpaired", **kw)
    np.testing.assert_allclose(float(loss), 1.5 * (1 - _sig(1.0)), rtol=1e-6)
    assert float(m["kl"]) == 0.0


# ------------------------------------------------------------------ gradients


def _central_fd(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = eps
        g.flat[i] = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
    return g


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_grad_matches_finite_differences_float64(seed, masked, loss_type):
    pol, ref, lab, kl_pol, kl_ref = make_batch(seed, batch=7, kl_shift=1.0)
    # Smaller log-ratios so that beta * rho sits where the sigmoid has a sizeable slope.
    pol = ref + (pol - ref) / 3
    mask = np.array([1, 1, 0, 1, 1, 0, 1], np.float64) if masked else None
    kw = dict(beta=0.7, desirable_weight=1.3, undesirable_weight=0.8, loss_type=loss_type, mask_B=mask)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (pol, ref, kl_pol, kl_ref)]

        def f(p):
            return kto_loss(p, args[1], lab, args[2], args[3], **kw)[0]

        assert f(args[0]).dtype == jnp.float64
        g = np.asarray(jax.grad(f)(args[0]))
        g_fd = _central_fd(f, args[0])
        np.testing.assert_allclose(g, g_fd, rtol=1e-6, atol=1e-9)
        assert np.any(g != 0.0)
        if masked:
            assert np.all(g[mask == 0] == 0.0)
        # The reference log-probs enter only through p - r.
        g_ref = np.asarray(jax.grad(lambda r: kto_loss(args[0], r, lab, args[2], args[3], **kw)[0])(args[1]))
        np.testing.assert_allclose(g_ref, -g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_gradient_through_kl_term(reduction):
    pol, ref, lab, kl_pol, kl_ref = make_batch(5, kl_shift=2.0)

    def f(kp, kr):
        return kto_loss(pol, ref, lab, kp, kr, beta=0.5, reduction=reduction)[0]

    loss, m = kto_loss(pol, ref, lab, kl_pol, kl_ref, beta=0.5)
    assert float(m["kl"]) > 0  # the KL term is active (not clamped), yet passes no gradient
    g_kp, g_kr = jax.grad(f, argnums=(0, 1))(kl_pol, kl_ref)
    assert np.all(np.asarray(g_kp) == 0.0) and np.all(np.asarray(g_kr) == 0.0)
    # ... while the value does depend on the KL pairs.
    assert float(f(kl_pol + 1.0, kl_ref)) != float(f(kl_pol, kl_ref))


def test_metrics_carry_no_gradient():
    pol, ref, lab, kl_pol, kl_ref = make_batch(1)
    for k in TRL_METRICS:
        g = jax.grad(lambda p, k=k: kto_loss(p, ref, lab, kl_pol, kl_ref)[1][k])(pol)
        assert np.all(np.asarray(g) == 0.0), k


# ------------------------------------------------------------------ jit / vmap


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_jit_equals_eager(loss_type, reduction):
    pol, ref, lab, kl_pol, kl_ref = make_batch(7)
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1], np.float32)
    f = functools.partial(
        kto_loss, beta=0.2, undesirable_weight=1.4, loss_type=loss_type, reduction=reduction
    )
    eager = f(pol, ref, lab, kl_pol, kl_ref, mask_B=mask)
    jitted = jax.jit(f)(pol, ref, lab, kl_pol, kl_ref, mask_B=mask)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), eager, jitted)
    # Hyper-parameters may also be traced (only their validation is skipped then).
    g = jax.jit(lambda b, w: kto_loss(pol, ref, lab, kl_pol, kl_ref, beta=b, desirable_weight=w)[0])
    np.testing.assert_allclose(
        g(0.2, 0.9), kto_loss(pol, ref, lab, kl_pol, kl_ref, beta=0.2, desirable_weight=0.9)[0], rtol=1e-6
    )


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_vmap_equals_loop(loss_type):
    batches = [make_batch(s, batch=6, kl_shift=(-1.0) ** s) for s in range(4)]
    stacked = [np.stack(parts) for parts in zip(*batches, strict=True)]
    masks = np.ones((4, 6), np.float32)
    masks[1, 4:] = 0
    masks[3, 0] = 0
    f = functools.partial(kto_loss, beta=0.25, desirable_weight=0.8, loss_type=loss_type)
    v_loss, v_metrics = jax.vmap(lambda *a: f(*a[:5], mask_B=a[5]))(*stacked, masks)
    assert v_loss.shape == (4,)
    for i, b in enumerate(batches):
        loss, metrics = f(*b, mask_B=masks[i])
        np.testing.assert_allclose(v_loss[i], loss, rtol=1e-6, atol=1e-7)
        for k in ALL_METRICS:
            np.testing.assert_allclose(v_metrics[k][i], metrics[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # The grad of the vmapped sum is the per-batch grads stacked.
    gv = jax.grad(lambda p: jnp.sum(jax.vmap(lambda *a: f(*a[:5], mask_B=a[5])[0])(p, *stacked[1:], masks)))(
        stacked[0]
    )
    for i, b in enumerate(batches):
        gi = jax.grad(lambda p, b=b, i=i: f(p, *b[1:], mask_B=masks[i])[0])(b[0])
        np.testing.assert_allclose(gv[i], gi, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ reduction / accumulation


def test_sum_reduction_is_mean_times_count():
    pol, ref, lab, kl_pol, kl_ref = make_batch(2, batch=10, kl_shift=0.5)
    mask = np.array([1, 1, 1, 1, 0, 1, 1, 0, 1, 1], np.float32)
    mean, m = kto_loss(pol, ref, lab, kl_pol, kl_ref, mask_B=mask, beta=0.3)
    total, m_sum = kto_loss(pol, ref, lab, kl_pol, kl_ref, mask_B=mask, beta=0.3, reduction="sum")
    n = float(m["count/chosen"] + m["count/rejected"])
    assert n == 8
    np.testing.assert_allclose(float(total), float(mean) * n, rtol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, m, m_sum)


def test_sum_reduction_accumulates_micro_batches():
    """Summed losses / total real rows over micro-batches == the full-batch mean.

    Exact for apo_zero_unpaired; for kto only when every micro-batch has the same reference point
    (TRL, like this loss, estimates z0 per micro-batch), so this uses unpaired APO-zero, and kto
    with the KL pairs shared so that z0 is the same everywhere.
    """
    pol, ref, lab, kl_pol, kl_ref = make_batch(4, batch=12, kl_shift=1.0)
    mask = np.ones(12, np.float32)
    mask[[3, 10]] = 0
    kl_same = np.full(12, float(np.mean(kl_pol - kl_ref)), np.float32)
    zeros = np.zeros(12, np.float32)
    for loss_type in KTO_LOSS_TYPES:
        kw = dict(beta=0.4, desirable_weight=1.1, undesirable_weight=0.6, loss_type=loss_type)
        full, full_m = kto_loss(pol, ref, lab, kl_same, zeros, mask_B=mask, **kw)
        total, n, wsum = 0.0, 0.0, {k: 0.0 for k in ("chosen", "rejected")}
        for sl in (slice(0, 5), slice(5, 12)):
            s, m = kto_loss(
                pol[sl], ref[sl], lab[sl], kl_same[sl], zeros[sl], mask_B=mask[sl], reduction="sum", **kw
            )
            total += float(s)
            n += float(m["count/chosen"] + m["count/rejected"])
            for c in wsum:
                wsum[c] += float(m[f"rewards/{c}"] * m[f"count/{c}"])
        np.testing.assert_allclose(total / n, float(full), rtol=1e-6)
        for c in wsum:
            np.testing.assert_allclose(
                wsum[c] / float(full_m[f"count/{c}"]), float(full_m[f"rewards/{c}"]), rtol=1e-5
            )


# ------------------------------------------------------------------ edge cases and validation


def test_all_padding_batch_is_zero_not_nan():
    pol, ref, lab, kl_pol, kl_ref = make_batch(0, batch=4)
    mask = np.zeros(4, np.float32)
    for reduction in ("mean", "sum"):
        loss, m = kto_loss(pol, ref, lab, kl_pol, kl_ref, mask_B=mask, reduction=reduction)
        assert float(loss) == 0.0
        assert all(float(v) == 0.0 for v in m.values())
        g = jax.grad(
            lambda p, r=reduction: kto_loss(p, ref, lab, kl_pol, kl_ref, mask_B=mask, reduction=r)[0]
        )(pol)
        assert np.all(np.asarray(g) == 0.0)


def test_empty_class_metrics_are_zero():
    pol, ref, _, kl_pol, kl_ref = make_batch(0, batch=5)
    _, m = kto_loss(pol, ref, np.ones(5, bool), kl_pol, kl_ref)
    assert float(m["rewards/rejected"]) == 0.0 and float(m["logps/rejected"]) == 0.0
    assert float(m["count/rejected"]) == 0.0 and float(m["count/chosen"]) == 5.0
    np.testing.assert_allclose(float(m["rewards/margins"]), float(m["rewards/chosen"]))


def test_bfloat16_inputs_compute_in_float32():
    pol, ref, lab, kl_pol, kl_ref = make_batch(0)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (pol, ref, kl_pol, kl_ref)]
    loss, m = kto_loss(bf[0], bf[1], lab, bf[2], bf[3])
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m.values())
    want, _ = kto_loss(
        *(np.asarray(a, np.float32) for a in bf[:2]), lab, *(np.asarray(a, np.float32) for a in bf[2:])
    )
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(loss_type="bco"), "loss_type"),
        (dict(reduction="none"), "reduction"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(desirable_weight=-0.1), "desirable_weight"),
        (dict(undesirable_weight=-2.0), "undesirable_weight"),
    ],
)
def test_invalid_hyper_parameters(kw, match):
    pol, ref, lab, kl_pol, kl_ref = make_batch(0)
    with pytest.raises(ValueError, match=match):
        kto_loss(pol, ref, lab, kl_pol, kl_ref, **kw)


def test_invalid_inputs():
    pol, ref, lab, kl_pol, kl_ref = make_batch(0)
    with pytest.raises(ValueError, match="kl_policy_logps_B"):
        kto_loss(pol, ref, lab, None, None)
    with pytest.raises(ValueError, match="shape"):
        kto_loss(pol, ref[:-1], lab, kl_pol, kl_ref)
    with pytest.raises(ValueError, match="shape"):
        kto_loss(pol, ref, lab, kl_pol, kl_ref, mask_B=np.ones(3))
    # apo_zero_unpaired needs no KL pairs.
    loss, m = kto_loss(pol, ref, lab, None, None, loss_type="apo_zero_unpaired")
    assert np.isfinite(float(loss)) and float(m["kl"]) == 0.0
