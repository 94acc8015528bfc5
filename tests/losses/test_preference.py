"""Tests for jaxrlhf.losses.preference: DPO (all loss types), SimPO, ORPO, reward loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrlhf.losses import DPO_LOSS_TYPES, dpo_loss, orpo_loss, reward_loss, simpo_loss

GRAD_KW = dict(order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)
DPO_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}
REWARD_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}

# Hand-picked so that no loss sits on a kink: beta*h stays away from the hinge at 1 and every
# quantity that aot / aot_unpaired sort is separated from its neighbours by >= 0.2.
RC = np.array([-10.8, -12.1, -8.9, -14.6], np.float32)
RR = np.array([-10.5, -12.6, -9.6, -16.1], np.float32)
PC = RC + np.array([0.6, -0.4, 0.8, -0.7], np.float32)
PR = RR + np.array([-0.5, 0.45, -0.2, 0.9], np.float32)
LEN_C = np.array([5.0, 7.0, 3.0, 9.0], np.float32)
LEN_R = np.array([6.0, 4.0, 8.0, 2.0], np.float32)
BETA = 0.5


def _kwargs(loss_type, **extra):
    """Arguments each loss type needs (lengths for the length-normalised ones)."""
    kw = dict(beta=BETA, loss_type=loss_type)
    if loss_type in ("ipo", "sigmoid_norm"):
        kw.update(chosen_lengths=jnp.asarray(LEN_C), rejected_lengths=jnp.asarray(LEN_R))
    kw.update(extra)
    return kw


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------- a float64 numpy reference of the spec


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, lc=None, lr=None, tau=0.05, delta=None):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    if loss_type in ("ipo", "sigmoid_norm"):
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    c, r = pc - rc, pr - rr
    h = c - r

    def smooth(z):
        return -_logsig(z) * (1 - eps) - _logsig(-z) * eps

    if loss_type in ("sigmoid", "sigmoid_norm"):
        l = smooth(beta * h)
    elif loss_type == "robust":
        l = (-_logsig(beta * h) * (1 - eps) + _logsig(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        e = eps if eps > 0 else 1e-3
        z = beta * h
        l = _sig(z) * (_logsig(z) - np.log(1 - e)) + _sig(-z) * (_logsig(-z) - np.log(e))
    elif loss_type == "hinge":
        l = np.maximum(0.0, 1 - beta * h)
    elif loss_type == "ipo":
        l = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        cr, rr_ = beta * c, beta * r
        d = np.concatenate([cr, rr_]).mean() if delta is None else delta
        l = -_logsig(cr - d) - _logsig(-(rr_ - d))
    elif loss_type == "sppo_hard":
        l = (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    elif loss_type == "nca_pair":
        l = -_logsig(beta * c) - 0.5 * _logsig(-beta * c) - 0.5 * _logsig(-beta * r)
    elif loss_type == "aot_unpaired":
        l = smooth(beta * (np.sort(c) - np.sort(r)))
    elif loss_type == "aot":
        l = smooth(beta * (np.sort(pc - pr) - np.sort(rc - rr)))
    elif loss_type == "apo_zero":
        l = (1 - _sig(beta * c)) + _sig(beta * r)
    elif loss_type == "apo_down":
        l = _sig(beta * c) + (1 - _sig(beta * h))
    elif loss_type == "discopop":
        z = beta * h
        m = _sig(z / tau)
        l = -_logsig(z) * (1 - m) + np.exp(-z) * m
    else:
        raise AssertionError(loss_type)
    return l.mean(), beta * c, beta * r


# -------------------------------------------------------------------------------- dpo_loss


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_matches_reference_formula_and_metrics(loss_type):
    eps = 0.1 if loss_type in ("sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot",
                               "aot_unpaired") else 0.0
    loss, metrics = dpo_loss(PC, PR, RC, RR, **_kwargs(loss_type, label_smoothing=eps))
    ref, cr, rr_ = _np_dpo(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, eps=eps, lc=LEN_C,
                           lr=LEN_R)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)

    assert set(metrics) == DPO_METRICS
    for v in metrics.values():
        assert v.shape == () and v.dtype == jnp.float32
    np.testing.assert_allclose(metrics["rewards/chosen"], cr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], rr_.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], (cr - rr_).mean(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracies"], (cr > rr_).mean())
    # logps/* are the raw policy log-probs, before any length normalisation.
    np.testing.assert_allclose(metrics["logps/chosen"], PC.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["logps/rejected"], PR.mean(), rtol=1e-6)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_grads_jit_and_extremes(loss_type):
    # bco_pair's default delta is a stop_gradient'ed batch mean, which finite differences would
    # see; a fixed delta makes the function the gradient check can compare against.
    extra = {"bco_delta": 0.1} if loss_type == "bco_pair" else {}
    kw = _kwargs(loss_type, **extra)
    args = tuple(jnp.asarray(a) for a in (PC, PR, RC, RR))
    check_grads(lambda *a: dpo_loss(*a, **kw)[0], args, **GRAD_KW)

    # jit (hyper-parameters closed over) agrees with eager, loss and metrics.
    jitted = jax.jit(functools.partial(dpo_loss, **_kwargs(loss_type)))
    eager = dpo_loss(*args, **_kwargs(loss_type))
    for a, b in zip(jax.tree_util.tree_leaves(jitted(*args)), jax.tree_util.tree_leaves(eager),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # Sequence log-probs of tokens with logits of +-1e4 are ~ -2e4: loss and grads stay finite.
    big = (jnp.array([-2e4, -1.0, 0.0, -3e3]), jnp.array([0.0, -2e4, -1e4, -2.0]),
           jnp.array([-1e4, 0.0, -2e4, -5.0]), jnp.array([-3.0, -1e4, 0.0, -2e4]))
    loss, metrics = dpo_loss(*big, **kw)
    assert _all_finite((loss, metrics))
    assert _all_finite(jax.grad(lambda *a: dpo_loss(*a, **kw)[0], argnums=(0, 1, 2, 3))(*big))

    # bfloat16 inputs: float32 outputs, finite.
    loss_bf16, metrics_bf16 = dpo_loss(*(a.astype(jnp.bfloat16) for a in args), **kw)
    assert loss_bf16.dtype == jnp.float32 and _all_finite((loss_bf16, metrics_bf16))
    np.testing.assert_allclose(loss_bf16, dpo_loss(*args, **kw)[0], rtol=0.1, atol=0.05)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_dpo_policy_equals_reference_gives_ln2(loss_type):
    x = jnp.asarray(PC)
    y = jnp.asarray(PR)
    for beta in (0.1, 1.0, 5.0):
        loss, metrics = dpo_loss(x, y, x, y, **_kwargs(loss_type, beta=beta))
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
        assert float(metrics["rewards/margins"]) == 0.0
        assert float(metrics["rewards/accuracies"]) == 0.0


def test_dpo_reference_handling():
    pc, pr = jnp.asarray(PC), jnp.asarray(PR)
    zeros = jnp.zeros_like(pc)
    expected = dpo_loss(pc, pr, zeros, zeros)[0]
    np.testing.assert_allclose(dpo_loss(pc, pr)[0], expected)  # both refs None -> 0
    np.testing.assert_allclose(dpo_loss(pc, pr, RC, RR, reference_free=True)[0], expected)
    assert not np.isclose(dpo_loss(pc, pr, RC, RR)[0], expected)
    with pytest.raises(ValueError, match="ref"):
        dpo_loss(pc, pr, RC, None)
    with pytest.raises(ValueError, match="ref"):
        dpo_loss(pc, pr, None, RR)


def test_dpo_length_normalisation():
    """ipo / sigmoid_norm on raw log-probs == the same type on pre-divided ones with unit lengths."""
    ones = jnp.ones(4)
    for loss_type in ("ipo", "sigmoid_norm"):
        a = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, chosen_lengths=LEN_C,
                     rejected_lengths=LEN_R)
        b = dpo_loss(PC / LEN_C, PR / LEN_R, RC / LEN_C, RR / LEN_R, beta=BETA,
                     loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
        np.testing.assert_allclose(a[1]["rewards/margins"], b[1]["rewards/margins"], rtol=1e-5)


def test_dpo_bco_default_delta_is_detached_batch_mean():
    cr, rr_ = BETA * (PC - RC), BETA * (PR - RR)
    delta = float(np.concatenate([cr, rr_]).mean())
    a = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="bco_pair")[0]
    b = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="bco_pair", bco_delta=delta)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    g_a = jax.grad(lambda x: dpo_loss(x, PR, RC, RR, beta=BETA, loss_type="bco_pair")[0])(PC)
    g_b = jax.grad(
        lambda x: dpo_loss(x, PR, RC, RR, beta=BETA, loss_type="bco_pair", bco_delta=delta)[0]
    )(PC)
    np.testing.assert_allclose(g_a, g_b, rtol=1e-5)


def test_dpo_vmap_matches_loop_and_static_jit():
    stack = [jnp.stack([jnp.asarray(a), jnp.asarray(a) * 0.9 + 0.3]) for a in (PC, PR, RC, RR)]
    for loss_type in ("sigmoid", "aot", "bco_pair", "ipo"):
        kw = _kwargs(loss_type)
        fn = functools.partial(dpo_loss, **kw)
        vm_loss, vm_metrics = jax.vmap(fn)(*stack)
        for i in range(2):
            loss_i, metrics_i = fn(*(s[i] for s in stack))
            np.testing.assert_allclose(vm_loss[i], loss_i, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(vm_metrics["rewards/margins"][i],
                                       metrics_i["rewards/margins"], rtol=1e-5, atol=1e-6)
    # loss_type / beta as static arguments of a user's jit.
    jit_static = jax.jit(dpo_loss, static_argnames=("loss_type", "beta", "label_smoothing"))
    np.testing.assert_allclose(
        jit_static(PC, PR, RC, RR, beta=0.3, loss_type="robust", label_smoothing=0.2)[0],
        dpo_loss(PC, PR, RC, RR, beta=0.3, loss_type="robust", label_smoothing=0.2)[0],
        rtol=1e-6,
    )
    # A traced beta cannot be validated at trace time, but must still work.
    traced = jax.jit(lambda b: dpo_loss(PC, PR, RC, RR, beta=b)[0])(0.3)
    np.testing.assert_allclose(traced, dpo_loss(PC, PR, RC, RR, beta=0.3)[0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="kto"), "loss_type"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(label_smoothing=0.6), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="aot", label_smoothing=0.51), "label_smoothing"),
        (dict(loss_type="exo_pair", label_smoothing=0.7), "label_smoothing"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="bco_pair", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="ipo"), "lengths"),
        (dict(loss_type="ipo", chosen_lengths=LEN_C), "lengths"),
        (dict(loss_type="sigmoid_norm", rejected_lengths=LEN_R), "lengths"),
    ],
)
def test_dpo_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(PC, PR, RC, RR, **kwargs)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.5), ("robust", 0.49), ("hinge", 0.0)])
def test_dpo_valid_edge_parameters_accepted(loss_type, eps):
    loss, metrics = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=eps)
    assert _all_finite((loss, metrics))
    ref, _, _ = _np_dpo(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, eps=eps)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ simpo_loss


def test_simpo():
    beta, gamma, eps = 2.0, 0.5, 0.1
    loss, metrics = simpo_loss(PC, PR, LEN_C, LEN_R, beta=beta, gamma=gamma,
                               label_smoothing=eps)
    ac, ar = PC.astype(np.float64) / LEN_C, PR.astype(np.float64) / LEN_R
    z = beta * (ac - ar) - gamma
    ref = (-_logsig(z) * (1 - eps) - _logsig(-z) * eps).mean()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert set(metrics) == REWARD_METRICS
    np.testing.assert_allclose(metrics["rewards/chosen"], (beta * ac).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margins"], (beta * (ac - ar)).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracies"], (ac > ar).mean())
    check_grads(lambda c, r: simpo_loss(c, r, LEN_C, LEN_R)[0], (PC, PR), **GRAD_KW)
    jitted = jax.jit(functools.partial(simpo_loss, beta=beta, gamma=gamma, label_smoothing=eps))
    np.testing.assert_allclose(jitted(PC, PR, LEN_C, LEN_R)[0], loss, rtol=1e-6)
    assert _all_finite(simpo_loss(jnp.array([-2e4, 0.0]), jnp.array([0.0, -2e4]),
                                  jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0])))
    for bad in (dict(beta=0.0), dict(beta=-1.0)):
        with pytest.raises(ValueError, match="beta"):
            simpo_loss(PC, PR, LEN_C, LEN_R, **bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(PC, PR, LEN_C, LEN_R, label_smoothing=0.6)


# ------------------------------------------------------------------------------- orpo_loss


def test_orpo():
    beta = 0.1
    loss, metrics = orpo_loss(PC, PR, LEN_C, LEN_R, beta=beta)
    pc, pr = PC.astype(np.float64), PR.astype(np.float64)
    ac, ar = pc / LEN_C, pr / LEN_R
    log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
    or_term = _logsig(log_odds)
    nll = -pc.sum() / LEN_C.sum()
    np.testing.assert_allclose(loss, nll - beta * or_term.mean(), rtol=1e-5)
    assert set(metrics) == REWARD_METRICS | {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
    np.testing.assert_allclose(metrics["nll_loss"], nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_ratio"], or_term.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_chosen"], log_odds.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], (beta * ac).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracies"], (ac > ar).mean())
    check_grads(lambda c, r: orpo_loss(c, r, LEN_C, LEN_R)[0], (PC, PR), **GRAD_KW)
    jitted = jax.jit(functools.partial(orpo_loss, beta=beta))
    np.testing.assert_allclose(jitted(PC, PR, LEN_C, LEN_R)[0], loss, rtol=1e-6)
    # A log-prob of exactly 0 (certain tokens, e.g. logits of +1e4) and a huge negative one.
    extreme = (jnp.array([0.0, -2e4]), jnp.array([-2e4, 0.0]), jnp.array([3.0, 3.0]),
               jnp.array([3.0, 3.0]))
    assert _all_finite(orpo_loss(*extreme))
    assert _all_finite(jax.grad(lambda c, r: orpo_loss(c, r, *extreme[2:])[0], (0, 1))(
        *extreme[:2]))
    bf16 = orpo_loss(PC.astype(jnp.bfloat16), PR.astype(jnp.bfloat16), LEN_C, LEN_R)
    assert bf16[0].dtype == jnp.float32 and _all_finite(bf16)
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(PC, PR, LEN_C, LEN_R, beta=-0.1)


# ----------------------------------------------------------------------------- reward_loss


def test_reward_loss():
    rc = np.array([1.0, -0.5, 2.0, 0.3], np.float32)
    rr = np.array([0.2, 0.5, -1.0, 0.1], np.float32)
    loss, metrics = reward_loss(rc, rr)
    d = rc.astype(np.float64) - rr
    np.testing.assert_allclose(loss, (-_logsig(d)).mean(), rtol=1e-6)
    assert set(metrics) == {"accuracy", "margin", "rewards/chosen", "rewards/rejected"}
    np.testing.assert_allclose(metrics["accuracy"], 0.75)
    np.testing.assert_allclose(metrics["margin"], d.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], rc.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], rr.mean(), rtol=1e-6)

    margin = np.array([0.0, 1.0, 0.5, 2.0], np.float32)
    loss_m, _ = reward_loss(rc, rr, margin=margin, center_rewards_coefficient=0.01)
    ref_m = (-_logsig(d - margin)).mean() + 0.01 * ((rc.astype(np.float64) + rr) ** 2).mean()
    np.testing.assert_allclose(loss_m, ref_m, rtol=1e-6)

    check_grads(
        lambda c, r: reward_loss(c, r, margin=margin, center_rewards_coefficient=0.01)[0],
        (jnp.asarray(rc), jnp.asarray(rr)),
        **GRAD_KW,
    )
    jitted = jax.jit(functools.partial(reward_loss, center_rewards_coefficient=0.01))
    np.testing.assert_allclose(jitted(rc, rr, margin=margin)[0], loss_m, rtol=1e-6)
    vm = jax.vmap(reward_loss)(jnp.stack([rc, rr]), jnp.stack([rr, rc]))[0]
    np.testing.assert_allclose(vm, [reward_loss(rc, rr)[0], reward_loss(rr, rc)[0]], rtol=1e-6)
    big = reward_loss(jnp.array([1e4, -1e4]), jnp.array([-1e4, 1e4]))
    assert _all_finite(big)
    bf16 = reward_loss(jnp.asarray(rc, jnp.bfloat16), jnp.asarray(rr, jnp.bfloat16))
    assert bf16[0].dtype == jnp.float32 and _all_finite(bf16)
