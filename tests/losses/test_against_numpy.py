"""Independent reference tests: `jaxrlhf.losses` (float32 JAX) against plain float64 numpy.

The numpy references live in ``tests/helpers/numpy_reference.py`` and were written from the agreed API
(spec/losses_api.md) and the papers / TRL formulas, not from the JAX implementation.

Precision policy. The JAX functions compute in float32, the references in float64 on the *same*
float32 inputs. Wherever possible inputs are drawn on a binary grid (multiples of 2**-10 or
2**-12 with small magnitude) so that the differences the formulas take (policy - reference,
chosen - rejected, logprobs - old_logprobs, values - old_values) are exact in float32; the only
float32 error left is then the rounding of products and transcendental functions, and values are
compared with ``rtol=1e-6``. ``atol`` is only there for results near zero; for means/sums of
mixed-sign terms it is ``1e-6`` times the mean magnitude of the summands (float32 summation error
is relative to the summands, not to a cancelled result). Every looser tolerance has a comment.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_reference as ref

from jaxrlhf.losses import (
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    orpo_loss,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reward_loss,
    sequence_logprobs,
    simpo_loss,
    token_logprobs,
    token_logprobs_from_hidden,
)

RTOL = 1e-6
F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def on_grid(x, bits=10):
    """Round to a multiple of 2**-bits and return float32 (exact for |x| < 2**(23-bits))."""
    return (np.round(np.asarray(x, np.float64) * 2.0**bits) / 2.0**bits).astype(np.float32)


def prefix_mask(rng, batch, steps, *, empty_row=True, dtype=np.float32):
    """1 on a prefix of each row (padding only at row ends); one full row, one all-masked row."""
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0] = steps
    if empty_row and batch > 1:
        lengths[-1] = 0
    mask = np.arange(steps)[None, :] < lengths[:, None]
    return mask.astype(dtype)


def to64(x):
    return np.asarray(x, dtype=np.float64)


def mean_abs_atol(*terms):
    """atol for a mean of mixed-sign terms: 1e-6 x mean magnitude of the summands."""
    total = sum(np.abs(to64(t)) for t in terms)
    return 1e-6 * float(np.mean(total)) + 1e-12


def assert_close(got, want, *, rtol=RTOL, atol=1e-7, what=""):
    got = np.asarray(got)
    assert np.all(np.isfinite(got)), f"{what}: non-finite result {got}"
    np.testing.assert_allclose(to64(got), to64(want), rtol=rtol, atol=atol, err_msg=what)


def assert_f32_scalar(value, name):
    arr = np.asarray(value)
    assert arr.shape == (), f"{name}: expected a scalar, got shape {arr.shape}"
    assert arr.dtype == np.float32, f"{name}: expected float32, got {arr.dtype}"


def check_metrics(got, want, atols=None, rtols=None):
    atols = atols or {}
    rtols = rtols or {}
    missing = sorted(set(want) - set(got))
    assert not missing, f"missing metrics {missing}; got {sorted(got)}"
    for key, value in want.items():
        assert_f32_scalar(got[key], key)
        assert_close(got[key], value, rtol=rtols.get(key, RTOL), atol=atols.get(key, 1e-7), what=key)


# ----------------------------------------------------------------------------------------------
# token.py
# ----------------------------------------------------------------------------------------------
LOGIT_SHAPES = [(5, 11), (3, 7, 64), (2, 3, 4, 257)]


def _logits(seed, shape):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=shape).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    return logits, labels


def _logit_atol(logits, temperature):
    # log-softmax is z - logsumexp(z) with z = logits / t; float32 rounding of z alone is up to
    # 2**-24 |z|, so a result near 0 (a dominant label) carries an absolute error ~eps32 * max|z|.
    return F32_EPS * float(np.max(np.abs(logits))) / temperature


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_token_logprobs(shape, temperature):
    logits, labels = _logits(1, shape)
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(labels), temperature=temperature)
    want = ref.token_logprobs(logits, labels, temperature)
    assert got.shape == labels.shape and got.dtype == jnp.float32
    assert_close(got, want, atol=_logit_atol(logits, temperature), what="token_logprobs")


def test_token_logprobs_bf16_input_gives_f32():
    logits, labels = _logits(2, (3, 5, 32))
    logits_bf16 = jnp.asarray(logits).astype(jnp.bfloat16)
    got = token_logprobs(logits_bf16, jnp.asarray(labels))
    assert got.dtype == jnp.float32
    # the reference sees exactly the bf16-rounded logits
    want = ref.token_logprobs(np.asarray(logits_bf16.astype(jnp.float32)), labels)
    assert_close(got, want, atol=_logit_atol(logits, 1.0), what="token_logprobs bf16")


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_entropy_from_logits(shape, temperature):
    logits, _ = _logits(3, shape)
    got = entropy_from_logits(jnp.asarray(logits), temperature=temperature)
    want = ref.entropy_from_logits(logits, temperature)
    assert got.shape == shape[:-1] and got.dtype == jnp.float32
    # entropy = logsumexp(z) - sum p z: same absolute error floor as log-softmax
    assert_close(got, want, atol=_logit_atol(logits, temperature), what="entropy")


def test_entropy_uniform_is_log_vocab():
    got = entropy_from_logits(jnp.zeros((2, 3, 50)))
    assert_close(got, np.full((2, 3), math.log(50)), what="uniform entropy")


@pytest.mark.parametrize("lead,chunk_size", [((2, 5), 1024), ((3, 7), 8), ((2, 8), 16), ((1, 9), 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_token_logprobs_from_hidden(lead, chunk_size, temperature):
    rng = np.random.default_rng(4)
    d_model, vocab = 32, 97
    hidden = rng.normal(size=lead + (d_model,)).astype(np.float32)
    lm_head = (rng.normal(size=(d_model, vocab)) * (2.0 / math.sqrt(d_model))).astype(np.float32)
    labels = rng.integers(0, vocab, size=lead).astype(np.int32)
    weights = rng.normal(size=lead).astype(np.float32)

    def f(h, w):
        return token_logprobs_from_hidden(
            h, w, jnp.asarray(labels), chunk_size=chunk_size, temperature=temperature
        )

    got = f(jnp.asarray(hidden), jnp.asarray(lm_head))
    want = ref.token_logprobs(to64(hidden) @ to64(lm_head), labels, temperature)
    assert got.shape == lead and got.dtype == jnp.float32
    # the float32 matmul (D=32 products per logit) adds ~sqrt(D) eps32 |h||w| to each logit
    # on top of the log-softmax floor, so the absolute floor here is 1e-6 rather than eps*max|z|.
    assert_close(got, want, rtol=RTOL, atol=1e-6, what="from_hidden logps")

    def objective(h, w):
        return jnp.sum(jnp.asarray(weights) * f(h, w))

    g_h, g_w = jax.grad(objective, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(lm_head))
    want_h, want_w = ref.token_logprobs_grads(hidden, lm_head, labels, weights, temperature)
    # gradients are sums over V (d_hidden) or over all N positions (d_lm_head) of mixed-sign
    # float32 products: compare relative to the magnitude of the gradient array.
    assert_close(g_h, want_h, rtol=1e-5, atol=1e-6 * np.max(np.abs(want_h)), what="d hidden")
    assert_close(g_w, want_w, rtol=1e-5, atol=1e-6 * np.max(np.abs(want_w)), what="d lm_head")


MASK_SHAPES = [(1, 9), (4, 16), (7, 33)]


def _masked_inputs(seed, shape, mask_dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 2.0, size=shape).astype(np.float32)
    mask = prefix_mask(rng, *shape, dtype=mask_dtype)
    return x, mask


@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("mask_dtype", [np.float32, np.bool_])
def test_masked_sum_and_mean(shape, axis, mask_dtype):
    x, mask = _masked_inputs(5, shape, mask_dtype)
    atol = 1e-6 * float(np.max(np.sum(np.abs(to64(x)) * to64(mask), axis=axis)) + 1.0)
    got_sum = masked_sum(jnp.asarray(x), jnp.asarray(mask), axis=axis)
    assert_close(got_sum, ref.masked_sum(x, mask, axis), atol=atol, what="masked_sum")
    got_mean = masked_mean(jnp.asarray(x), jnp.asarray(mask), axis=axis)
    want_mean = ref.masked_mean(x, mask, axis)
    assert np.shape(got_mean) == np.shape(want_mean)
    assert_close(got_mean, want_mean, atol=mean_abs_atol(x), what="masked_mean")


def test_masked_mean_all_masked_is_zero():
    x = jnp.ones((3, 4))
    zeros = jnp.zeros((3, 4))
    assert float(masked_mean(x, zeros)) == 0.0
    np.testing.assert_array_equal(np.asarray(masked_mean(x, zeros, axis=1)), np.zeros(3))
    assert float(masked_sum(x, zeros)) == 0.0


@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var(shape, unbiased):
    x, mask = _masked_inputs(6, shape)
    got = masked_var(jnp.asarray(x), jnp.asarray(mask), unbiased=unbiased)
    assert_f32_scalar(got, "masked_var")
    assert_close(got, ref.masked_var(x, mask, unbiased=unbiased), what="masked_var")


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("n_real", [0, 1])
def test_masked_var_degenerate(unbiased, n_real):
    x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    mask = np.zeros((3, 4), np.float32)
    mask.flat[:n_real] = 1.0
    got = float(masked_var(x, jnp.asarray(mask), unbiased=unbiased))
    assert got == 0.0, f"n={n_real}, unbiased={unbiased}: expected 0, got {got}"


@pytest.mark.parametrize("shape", MASK_SHAPES[1:])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten(shape, shift_mean, unbiased):
    x, mask = _masked_inputs(7, shape)
    got = masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift_mean, unbiased=unbiased)
    want = ref.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased)
    assert got.shape == x.shape and got.dtype == jnp.float32
    # x - mean cancels for x near the mean: absolute floor 1e-6 of the O(1) whitened scale
    assert_close(got, want, atol=1e-6, what="masked_whiten")
    assert np.all(np.asarray(got)[mask == 0] == 0.0), "masked-out entries must be exactly 0"


@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs(shape, average):
    rng = np.random.default_rng(8)
    token_logps = (-rng.exponential(1.5, size=shape)).astype(np.float32)
    mask = prefix_mask(rng, *shape)
    got = sequence_logprobs(jnp.asarray(token_logps), jnp.asarray(mask), average=average)
    want = ref.sequence_logprobs(token_logps, mask, average=average)
    assert got.shape == shape[:1] and got.dtype == jnp.float32
    # all summands have the same sign, so a plain relative tolerance applies
    assert_close(got, want, what="sequence_logprobs")
    if shape[0] > 1:
        assert float(got[-1]) == 0.0, "all-masked row must give 0"


# ----------------------------------------------------------------------------------------------
# preference.py: dpo_loss
# ----------------------------------------------------------------------------------------------
def dpo_inputs(seed, batch):
    """Realistic DPO inputs on a 2**-10 grid so that every logratio difference is exact.

    Reference sequence logps in [-50, -5]; policy = reference + U(-8, 8) (log-ratios of both
    signs); lengths = |logp| / per-token-nll with a per-token nll in [0.3, 2].
    """
    rng = np.random.default_rng(seed)
    rc = on_grid(rng.uniform(-50, -5, batch))
    rr = on_grid(rng.uniform(-50, -5, batch))
    pc = on_grid(np.minimum(to64(rc) + rng.uniform(-8, 8, batch), -1.0))
    pr = on_grid(np.minimum(to64(rr) + rng.uniform(-8, 8, batch), -1.0))
    lc = np.maximum(np.round(-to64(pc) / rng.uniform(0.3, 2.0, batch)), 1).astype(np.int32)
    lr = np.maximum(np.round(-to64(pr) / rng.uniform(0.3, 2.0, batch)), 1).astype(np.int32)
    # guard against near-ties (float32 could flip `chosen > rejected`) in the length-normalised
    # rewards; the plain ones differ by >= 2**-10 on the grid, far above float32 rounding.
    norm_gap = (to64(pc) - to64(rc)) / lc - (to64(pr) - to64(rr)) / lr
    assert np.all(np.abs(norm_gap) > 1e-4), "seed gives a near-tie; pick another seed"
    return pc, pr, rc, rr, lc, lr


def _dpo_cases():
    cases = []
    for loss_type in ref.DPO_LOSS_TYPES:
        settings = [dict(beta=0.1), dict(beta=0.5), dict(beta=0.1, reference_free=True)]
        if loss_type in ref.SMOOTHING_TYPES:
            settings += [dict(beta=0.1, label_smoothing=0.1), dict(beta=0.2, label_smoothing=0.5)]
        if loss_type == "robust":
            settings += [dict(beta=0.1, label_smoothing=0.2), dict(beta=0.3, label_smoothing=0.45)]
        if loss_type == "bco_pair":
            settings += [dict(beta=0.1, bco_delta=0.3)]
        if loss_type == "discopop":
            settings += [dict(beta=0.1, discopop_tau=0.2), dict(beta=0.3, discopop_tau=1.0)]
        for i, kw in enumerate(settings):
            cases.append(pytest.param(loss_type, kw, id=f"{loss_type}-{i}"))
    return cases


DPO_BATCHES = [1, 8, 64]


def _with_lengths(loss_type, kw, lc, lr):
    kw = dict(kw)
    if loss_type in ref.LENGTH_NORMALISED_TYPES:
        kw.update(chosen_lengths=lc, rejected_lengths=lr)
    return kw


@pytest.mark.parametrize("batch", DPO_BATCHES)
@pytest.mark.parametrize("loss_type,kw", _dpo_cases())
def test_dpo_loss(loss_type, kw, batch):
    pc, pr, rc, rr, lc, lr = dpo_inputs(100 + batch, batch)
    kw = _with_lengths(loss_type, kw, lc, lr)
    jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    loss, metrics = dpo_loss(
        jnp.asarray(pc),
        jnp.asarray(pr),
        jnp.asarray(rc),
        jnp.asarray(rr),
        loss_type=loss_type,
        **jkw,
    )
    want_loss, want_metrics = ref.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **kw)
    assert_f32_scalar(loss, "loss")

    # per-example pieces, to scale absolute tolerances of (possibly cancelling) means
    ref_free = kw.get("reference_free", False)
    beta = kw["beta"]
    crc, rrc = (np.zeros_like(to64(rc)), np.zeros_like(to64(rr))) if ref_free else (rc, rr)
    if loss_type in ref.LENGTH_NORMALISED_TYPES:
        # the four quotients logp / length are each rounded in float32 before differencing
        c_scale = beta * (np.abs(to64(pc)) + np.abs(to64(crc))) / lc
        r_scale = beta * (np.abs(to64(pr)) + np.abs(to64(rrc))) / lr
    else:
        c_scale = beta * np.abs(to64(pc) - to64(crc))
        r_scale = beta * np.abs(to64(pr) - to64(rrc))

    # loss: rtol 1e-6; atol 1e-6 for a loss near 0 (hinge all-inactive, exo_pair near its
    # optimum, apo's 1 - sigmoid, ...). For ipo the loss is (h - 1/(2 beta))^2 where h is built
    # from float32-rounded quotients: its float32 error is 2 |h - 1/(2b)| * err(h), scaled below.
    loss_atol = 1e-6
    if loss_type == "ipo":
        h_err = F32_EPS * (c_scale + r_scale) / beta
        per_example, _, _ = ref.dpo_per_example(
            pc, pr, crc, rrc, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr
        )
        loss_atol += float(np.mean(2 * np.sqrt(per_example) * h_err))  # 2 |h - 1/(2b)| err(h)
    assert_close(loss, want_loss, atol=loss_atol, what=f"{loss_type} loss")

    check_metrics(
        metrics,
        want_metrics,
        atols={
            "rewards/chosen": mean_abs_atol(c_scale),
            "rewards/rejected": mean_abs_atol(r_scale),
            "rewards/margins": mean_abs_atol(c_scale, r_scale),
            "rewards/accuracies": 0.0,
        },
    )


def _per_example_f64(loss_type, kw, pc, pr, rc, rr, lc, lr, bco_delta=None):
    kw = dict(kw)
    ref_free = kw.pop("reference_free", False)
    if ref_free:
        rc, rr = np.zeros_like(rc), np.zeros_like(rr)
    if bco_delta is not None and kw.get("bco_delta") is None:
        kw["bco_delta"] = bco_delta
    loss, _, _ = ref.dpo_per_example(
        pc, pr, rc, rr, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr, **kw
    )
    return float(np.mean(loss))


@pytest.mark.parametrize("loss_type,kw", _dpo_cases())
def test_dpo_loss_gradients(loss_type, kw):
    """jax.grad w.r.t. the policy logps vs central differences of the float64 reference.

    bco_pair's delta is under stop_gradient in the spec, so the reference derivative keeps
    delta fixed at its value at the evaluation point.
    """
    batch = 6
    pc, pr, rc, rr, lc, lr = dpo_inputs(200, batch)
    kw = _with_lengths(loss_type, kw, lc, lr)
    call_kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    if loss_type == "hinge":
        # keep clear of the relu kink at beta * h = 1, where the derivative is undefined
        h = (to64(pc) - to64(rc)) - (to64(pr) - to64(rr))
        if kw.get("reference_free"):
            h = to64(pc) - to64(pr)
        assert np.all(np.abs(1 - kw["beta"] * h) > 1e-3)

    def jloss(c, r):
        return dpo_loss(c, r, jnp.asarray(rc), jnp.asarray(rr), loss_type=loss_type, **call_kw)[0]

    g_c, g_r = jax.grad(jloss, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))

    ref_kw = {k: v for k, v in kw.items() if k not in ("chosen_lengths", "rejected_lengths")}
    delta = None
    if loss_type == "bco_pair" and kw.get("bco_delta") is None:
        c0 = to64(pc) - (0.0 if kw.get("reference_free") else to64(rc))
        r0 = to64(pr) - (0.0 if kw.get("reference_free") else to64(rr))
        delta = float(np.mean(np.concatenate([kw["beta"] * c0, kw["beta"] * r0])))
    pc64, pr64, rc64, rr64 = to64(pc), to64(pr), to64(rc), to64(rr)
    step = 1e-5
    want_c = np.zeros(batch)
    want_r = np.zeros(batch)
    for i in range(batch):
        e = np.zeros(batch)
        e[i] = step
        args = (loss_type, ref_kw)
        tail = (rc64, rr64, lc, lr)
        want_c[i] = (
            _per_example_f64(*args, pc64 + e, pr64, *tail, bco_delta=delta)
            - _per_example_f64(*args, pc64 - e, pr64, *tail, bco_delta=delta)
        ) / (2 * step)
        want_r[i] = (
            _per_example_f64(*args, pc64, pr64 + e, *tail, bco_delta=delta)
            - _per_example_f64(*args, pc64, pr64 - e, *tail, bco_delta=delta)
        ) / (2 * step)
    # float32 backward pass vs a float64 central difference (truncation error ~1e-10): the
    # gradient entries are products/sums of several float32-rounded factors, each ~1e-7
    # relative; 1e-5 relative to the largest gradient entry is a safe floor.
    scale = max(np.max(np.abs(want_c)), np.max(np.abs(want_r)), 1e-3)
    assert_close(g_c, want_c, rtol=1e-5, atol=1e-6 * scale, what=f"{loss_type} d/d chosen")
    assert_close(g_r, want_r, rtol=1e-5, atol=1e-6 * scale, what=f"{loss_type} d/d rejected")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("batch", [1, 16])
def test_dpo_sigmoid_equal_policy_and_reference_is_ln2(label_smoothing, batch):
    rng = np.random.default_rng(9)
    pc = on_grid(rng.uniform(-50, -5, batch))
    pr = on_grid(rng.uniform(-50, -5, batch))
    loss, metrics = dpo_loss(
        jnp.asarray(pc),
        jnp.asarray(pr),
        jnp.asarray(pc),
        jnp.asarray(pr),
        beta=0.1,
        loss_type="sigmoid",
        label_smoothing=label_smoothing,
    )
    # -logsigmoid(0) = ln 2 exactly per example; the batch mean of B equal float32 values adds
    # summation rounding (a 16-term float32 sum of 0.693 lands a couple of ulps away), so allow
    # 4 float32 ulps rather than 1.
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=4 * F32_EPS, atol=0)
    assert float(metrics["rewards/margins"]) == 0.0
    assert float(metrics["rewards/accuracies"]) == 0.0  # strict `>`


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot", "discopop"])
def test_dpo_reference_free_ignores_reference(loss_type):
    pc, pr, rc, rr, lc, lr = dpo_inputs(300, 8)
    kw = _with_lengths(loss_type, dict(beta=0.1, loss_type=loss_type), lc, lr)
    jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    pc_j, pr_j = jnp.asarray(pc), jnp.asarray(pr)
    results = {
        "refs given": dpo_loss(pc_j, pr_j, jnp.asarray(rc), jnp.asarray(rr), reference_free=True, **jkw),
        "refs None": dpo_loss(pc_j, pr_j, reference_free=True, **jkw),
        "zero refs": dpo_loss(pc_j, pr_j, jnp.zeros_like(pc_j), jnp.zeros_like(pr_j), **jkw),
    }
    want, want_metrics = ref.dpo_loss(pc, pr, reference_free=True, **kw)
    for name, (loss, metrics) in results.items():
        assert_close(loss, want, atol=1e-6, what=f"{loss_type} {name}")
        for key in ("rewards/chosen", "rewards/rejected"):
            assert_close(metrics[key], want_metrics[key], atol=1e-6, what=f"{name} {key}")


def test_dpo_jit_and_metrics_stop_gradient():
    pc, pr, rc, rr, lc, lr = dpo_inputs(400, 8)
    args = tuple(jnp.asarray(a) for a in (pc, pr, rc, rr))
    for loss_type in ref.DPO_LOSS_TYPES:
        kw = dict(beta=0.1, loss_type=loss_type)
        if loss_type in ref.LENGTH_NORMALISED_TYPES:
            kw.update(chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr))
        fn = functools.partial(dpo_loss, **kw)
        eager_loss, _ = fn(*args)
        jit_loss, _ = jax.jit(fn)(*args)
        assert_close(jit_loss, eager_loss, rtol=1e-6, atol=1e-7, what=f"{loss_type} jit")
    # metrics are computed under stop_gradient
    g = jax.grad(lambda c: dpo_loss(c, *args[1:], beta=0.1)[1]["rewards/chosen"])(args[0])
    np.testing.assert_array_equal(np.asarray(g), np.zeros(8))


def test_dpo_errors():
    pc, pr, rc, rr, lc, lr = (jnp.asarray(a) for a in dpo_inputs(500, 4))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="not_a_loss")
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(pc, pr, rc, rr, beta=beta)
    bad_smoothing = {t: [-0.1, 0.51] for t in ref.SMOOTHING_TYPES}
    bad_smoothing["robust"] = [-0.1, 0.5, 0.7]
    for loss_type in ref.DPO_LOSS_TYPES:
        if loss_type not in bad_smoothing:
            bad_smoothing[loss_type] = [0.1]
    for loss_type, values in bad_smoothing.items():
        kw = {}
        if loss_type in ref.LENGTH_NORMALISED_TYPES:
            kw = dict(chosen_lengths=lc, rejected_lengths=lr)
        for eps in values:
            with pytest.raises(ValueError, match="label_smoothing"):
                dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=eps, **kw)
    for loss_type in ref.LENGTH_NORMALISED_TYPES:
        for kw in ({}, dict(chosen_lengths=lc), dict(rejected_lengths=lr)):
            with pytest.raises(ValueError, match="length"):
                dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **kw)
    # only one of the two reference arrays given
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, None)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, None, rr)


def test_dpo_boundary_smoothing_is_accepted():
    pc, pr, rc, rr, lc, lr = (jnp.asarray(a) for a in dpo_inputs(600, 4))
    for loss_type in ref.SMOOTHING_TYPES:
        kw = {}
        if loss_type in ref.LENGTH_NORMALISED_TYPES:
            kw = dict(chosen_lengths=lc, rejected_lengths=lr)
        for eps in (0.0, 0.5):
            loss, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=eps, **kw)
            assert np.isfinite(float(loss))
    loss, _ = dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.49)
    assert np.isfinite(float(loss))


# ----------------------------------------------------------------------------------------------
# preference.py: simpo, orpo, reward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", DPO_BATCHES)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(beta=2.5, gamma=1.0), dict(beta=2.0, gamma=0.3, label_smoothing=0.2)],
    ids=["default", "beta2.5-gamma1", "smoothing"],
)
def test_simpo_loss(batch, kw):
    pc, pr, _, _, lc, lr = dpo_inputs(700 + batch, batch)
    loss, metrics = simpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(lc), jnp.asarray(lr), **kw)
    want_loss, want_metrics = ref.simpo_loss(pc, pr, lc, lr, **kw)
    assert_f32_scalar(loss, "loss")
    assert_close(loss, want_loss, atol=1e-6, what="simpo loss")
    beta = kw.get("beta", 2.0)
    cr = beta * to64(pc) / lc
    rr = beta * to64(pr) / lr
    check_metrics(
        metrics,
        want_metrics,
        atols={"rewards/margins": mean_abs_atol(cr, rr), "rewards/accuracies": 0.0},
    )


@pytest.mark.parametrize("batch", DPO_BATCHES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss(batch, beta):
    pc, pr, _, _, lc, lr = dpo_inputs(800 + batch, batch)
    loss, metrics = orpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(lc), jnp.asarray(lr), beta=beta)
    want_loss, want_metrics = ref.orpo_loss(pc, pr, lc, lr, beta=beta)
    assert_f32_scalar(loss, "loss")
    assert_close(loss, want_loss, atol=1e-6, what="orpo loss")
    avg_c = to64(pc) / lc
    avg_r = to64(pr) / lr
    # log_odds = (a_c - a_r) - (log1p(-e^a_c) - log1p(-e^a_r)): float32 rounding of each piece
    # (|a| and |log1p(-e^a)|) sets the absolute floor of its mean.
    lo_pieces = (avg_c, avg_r, np.log1p(-np.exp(avg_c)), np.log1p(-np.exp(avg_r)))
    check_metrics(
        metrics,
        want_metrics,
        atols={
            "log_odds_chosen": mean_abs_atol(*lo_pieces),
            "log_odds_ratio": mean_abs_atol(*lo_pieces),
            "rewards/margins": mean_abs_atol(beta * avg_c, beta * avg_r),
            "rewards/accuracies": 0.0,
        },
    )


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("margin", [None, "scalar", "array"])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss(batch, margin, center):
    rng = np.random.default_rng(900 + batch)
    chosen = on_grid(rng.normal(0.5, 2.0, batch))
    rejected = on_grid(rng.normal(-0.5, 2.0, batch))
    if margin == "scalar":
        margin = 0.5
    elif margin == "array":
        margin = on_grid(rng.uniform(0.0, 2.0, batch))
    jmargin = jnp.asarray(margin) if isinstance(margin, np.ndarray) else margin
    loss, metrics = reward_loss(
        jnp.asarray(chosen),
        jnp.asarray(rejected),
        margin=jmargin,
        center_rewards_coefficient=center,
    )
    want_loss, want_metrics = ref.reward_loss(
        chosen, rejected, margin=margin, center_rewards_coefficient=center
    )
    assert_f32_scalar(loss, "loss")
    assert_close(loss, want_loss, atol=1e-6, what="reward loss")
    check_metrics(
        metrics,
        want_metrics,
        atols={
            "margin": mean_abs_atol(chosen, rejected),
            "rewards/chosen": mean_abs_atol(chosen),
            "rewards/rejected": mean_abs_atol(rejected),
            "accuracy": 0.0,
        },
    )


# ----------------------------------------------------------------------------------------------
# ppo.py
# ----------------------------------------------------------------------------------------------
PPO_SHAPES = [(1, 7), (4, 16), (6, 33)]


def _logprob_pair(rng, shape, spread=0.3):
    """logprobs in [-8, -0.05] and a second set shifted by N(0, spread), on a 2**-12 grid."""
    lp = on_grid(rng.uniform(-8.0, -0.05, shape), bits=12)
    other = on_grid(np.minimum(to64(lp) + rng.normal(0.0, spread, shape), -0.01), bits=12)
    return lp, other


@pytest.mark.parametrize("shape", PPO_SHAPES)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty(shape, kind):
    rng = np.random.default_rng(1000)
    lp, rlp = _logprob_pair(rng, shape)
    got = kl_penalty(jnp.asarray(lp), jnp.asarray(rlp), kind=kind)
    want = ref.kl_penalty(lp, rlp, kind)
    assert got.shape == shape and got.dtype == jnp.float32
    # k3 = exp(r) - 1 - r ~ r^2/2 is a cancellation: float32 exp(r) ~ 1 carries an absolute
    # error ~eps32, so k3's float32 floor is absolute (~2e-7), not relative, for small r.
    atol = 3e-7 if kind == "k3" else 1e-7
    assert_close(got, want, atol=atol, what=f"kl {kind}")


def test_kl_penalty_unknown_kind():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(x, x, kind="k4")


@pytest.mark.parametrize("shape", PPO_SHAPES)
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mask_dtype", [np.float32, np.bool_])
def test_per_token_rewards(shape, kl_kind, mask_dtype):
    rng = np.random.default_rng(1100)
    lp, rlp = _logprob_pair(rng, shape)
    mask = prefix_mask(rng, *shape, dtype=mask_dtype)
    scores = rng.normal(0.0, 1.0, shape[0]).astype(np.float32)
    rewards, non_score, kl = per_token_rewards(
        jnp.asarray(scores),
        jnp.asarray(lp),
        jnp.asarray(rlp),
        jnp.asarray(mask),
        kl_coef=0.05,
        kl_kind=kl_kind,
    )
    want_rewards, want_non_score, want_kl = ref.per_token_rewards(
        scores, lp, rlp, mask, kl_coef=0.05, kl_kind=kl_kind
    )
    kl_atol = 3e-7 if kl_kind == "k3" else 1e-7  # see test_kl_penalty
    assert_close(kl, want_kl, atol=kl_atol, what="kl")
    assert_close(non_score, want_non_score, atol=0.05 * kl_atol, what="non_score_rewards")
    # score + small kl term: absolute floor eps32 * |score|
    assert_close(rewards, want_rewards, atol=1e-7 + 0.05 * kl_atol, what="rewards")
    off = ~np.asarray(mask, bool)
    for name, arr in (("rewards", rewards), ("non_score", non_score), ("kl", kl)):
        assert np.all(np.asarray(arr)[off] == 0.0), f"{name} must be 0 where mask is 0"


def test_per_token_rewards_unknown_kind():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="kind"):
        per_token_rewards(jnp.zeros(2), x, x, jnp.ones((2, 3)), kl_coef=0.1, kl_kind="bogus")


def _gae_inputs(seed, shape):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(rng, *shape)
    # padding entries hold garbage that must not leak into real positions
    rewards = np.where(mask > 0, rng.normal(0, 0.2, shape), rng.normal(0, 10, shape))
    rewards[np.arange(shape[0]), np.maximum(mask.sum(1).astype(int) - 1, 0)] += rng.normal(0, 1, shape[0])
    values = np.where(mask > 0, rng.normal(0, 1, shape), rng.normal(0, 10, shape))
    return rewards.astype(np.float32), values.astype(np.float32), mask


@pytest.mark.parametrize("shape", PPO_SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae(shape, gamma, lam):
    rewards, values, mask = _gae_inputs(1200, shape)
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
    want_adv, want_ret = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.shape == shape and ret.shape == shape and adv.dtype == jnp.float32
    # A_t accumulates up to T float32 terms (delta_s weighted by (gamma lam)^(s-t)); its
    # rounding error grows ~ T eps32 |terms|, so the floor is relative to the summed magnitude
    # (cumulative |delta| from t to the end), not to the possibly-cancelled A_t.
    m = to64(mask)
    delta_mag = np.abs(to64(rewards) * m) + 2 * np.abs(to64(values) * m)
    tail = np.cumsum(delta_mag[:, ::-1], axis=1)[:, ::-1]
    atol = 1e-6 * tail + 1e-7
    np.testing.assert_array_less(np.abs(to64(adv) - want_adv), atol + RTOL * np.abs(want_adv))
    np.testing.assert_array_less(np.abs(to64(ret) - want_ret), atol + RTOL * np.abs(want_ret))
    off = mask == 0
    assert np.all(np.asarray(adv)[off] == 0.0) and np.all(np.asarray(ret)[off] == 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9)])
def test_gae_skips_the_holes_of_a_multi_turn_mask(gamma, lam):
    """A mask with holes (a multi-turn rollout's tool messages between the policy's turns) and
    padding: GAE equals the plain loop on each row's policy tokens taken out as one sequence, put
    back in place; the holes get 0."""
    rng = np.random.default_rng(1250)
    b, t = 6, 20
    mask = np.zeros((b, t), np.float32)
    for i in range(b):
        end = rng.integers(4, t + 1)
        mask[i, :end] = 1
        for _ in range(i % 3):  # 0-2 holes of 1-4 slots
            start = rng.integers(1, max(end - 1, 2))
            mask[i, start : start + rng.integers(1, 5)] = 0
    rewards = np.where(mask > 0, rng.normal(0, 0.5, (b, t)), rng.normal(0, 10, (b, t))).astype(np.float32)
    values = np.where(mask > 0, rng.normal(0, 1, (b, t)), rng.normal(0, 10, (b, t))).astype(np.float32)
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
    assert any(0 in m[: np.flatnonzero(m)[-1]] for m in mask)  # holes inside rows, not only padding
    for i in range(b):
        k = mask[i] > 0
        want_adv, want_ret = ref.gae(rewards[i, k][None], values[i, k][None], np.ones((1, k.sum())),
                                     gamma=gamma, lam=lam)  # fmt: skip
        np.testing.assert_allclose(np.asarray(adv)[i, k], want_adv[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ret)[i, k], want_ret[0], rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(adv)[i, ~k] == 0) and np.all(np.asarray(ret)[i, ~k] == 0)


def test_gae_lam1_gamma1_is_reward_to_go_minus_value():
    rewards, values, mask = _gae_inputs(1300, (5, 12))
    adv, ret = jax.jit(functools.partial(gae, gamma=1.0, lam=1.0))(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask)
    )
    m = to64(mask)
    rtg = np.cumsum((to64(rewards) * m)[:, ::-1], axis=1)[:, ::-1]
    atol = 1e-6 * np.cumsum(np.abs(to64(rewards) * m)[:, ::-1], axis=1)[:, ::-1] + 1e-6
    np.testing.assert_array_less(np.abs(to64(ret) - rtg * m), atol + RTOL * np.abs(rtg))
    want_adv = (rtg - to64(values)) * m
    np.testing.assert_array_less(
        np.abs(to64(adv) - want_adv), atol + 1e-6 * np.abs(to64(values)) + RTOL * np.abs(want_adv)
    )


def _ppo_inputs(seed, shape, clip_low, clip_high, mask_dtype=np.float32):
    rng = np.random.default_rng(seed)
    lp, old = _logprob_pair(rng, shape, spread=0.2)
    # a few large moves so that the dual clip (ratio > c for A < 0) actually triggers
    big = rng.random(shape) < 0.1
    old = np.where(big, on_grid(to64(lp) - rng.choice([-1.5, 1.5], shape), bits=12), old)
    old = old.astype(np.float32)
    adv = rng.normal(0.0, 1.0, shape).astype(np.float32)
    mask = prefix_mask(rng, *shape, dtype=mask_dtype)
    # a float32 ratio within rounding of a clip bound could flip the clipfrac comparison: move
    # such entries (rare) by 2**-9 in log space, away from the bound
    for bound in (1 - clip_low, 1 + clip_high):
        log_ratio = to64(lp) - to64(old)
        near = np.abs(log_ratio - math.log(bound)) < 1e-4
        old = np.where(near, old - np.float32(2.0**-9), old).astype(np.float32)
    ratio = np.exp(to64(lp) - to64(old))
    for bound in (1 - clip_low, 1 + clip_high):
        assert np.all(np.abs(ratio / bound - 1) > 1e-5)
    return lp, old, adv, mask


@pytest.mark.parametrize("shape", PPO_SHAPES)
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(clip_eps=0.1),
        dict(clip_eps=0.2, clip_eps_high=0.28),
        dict(clip_eps=0.2, dual_clip=3.0),
        dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=2.0),
    ],
    ids=["default", "eps0.1", "eps_high", "dual", "eps_high-dual"],
)
@pytest.mark.parametrize("mask_dtype", [np.float32, np.bool_])
def test_ppo_policy_loss(shape, kw, mask_dtype):
    clip_low = kw.get("clip_eps", 0.2)
    clip_high = kw.get("clip_eps_high") or clip_low
    lp, old, adv, mask = _ppo_inputs(1400, shape, clip_low, clip_high, mask_dtype)
    loss, metrics = ppo_policy_loss(
        jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), **kw
    )
    want_loss, want_metrics = ref.ppo_policy_loss(lp, old, adv, mask, **kw)
    assert_f32_scalar(loss, "loss")
    m = to64(mask)
    ratio = np.exp(to64(lp) - to64(old))
    # masked means of mixed-sign pg terms: floor relative to the mean |A| * ratio
    pg_scale = np.sum(np.abs(to64(adv)) * ratio * m) / max(np.sum(m), 1.0)
    assert_close(loss, want_loss, atol=1e-6 * pg_scale + 1e-12, what="pg loss")
    check_metrics(metrics, want_metrics, atols={"clipfrac": 0.0})


def test_ppo_policy_loss_all_masked_and_jit_and_errors():
    lp, old, adv, _ = _ppo_inputs(1500, (3, 8), 0.2, 0.2)
    zeros = jnp.zeros((3, 8))
    loss, metrics = ppo_policy_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), zeros)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    mask = jnp.ones((3, 8))
    fn = functools.partial(ppo_policy_loss, clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0)
    args = (jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), mask)
    eager, _ = fn(*args)
    jitted, _ = jax.jit(fn)(*args)
    assert_close(jitted, eager, atol=1e-7, what="jit")
    g = jax.grad(lambda x: ppo_policy_loss(x, *args[1:])[1]["ratio"])(args[0])
    np.testing.assert_array_equal(np.asarray(g), np.zeros((3, 8)))
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            ppo_policy_loss(*args, dual_clip=bad)


@pytest.mark.parametrize("shape", PPO_SHAPES)
@pytest.mark.parametrize("clip", [0.2, 0.5])
def test_ppo_value_loss(shape, clip):
    rng = np.random.default_rng(1600)
    old = on_grid(rng.normal(0.0, 1.0, shape), bits=12)
    values = on_grid(to64(old) + rng.normal(0.0, 0.4, shape), bits=12)
    returns = on_grid(to64(old) + rng.normal(0.0, 1.0, shape), bits=12)
    mask = prefix_mask(rng, *shape)
    # keep away from the clip boundary and from l1 ~= l2 near-ties (clipfrac comparisons)
    step = np.abs(to64(values) - to64(old))
    assert np.all(np.abs(step - clip) > 1e-5)
    vclip = to64(old) + np.clip(to64(values) - to64(old), -clip, clip)
    l1 = (to64(values) - to64(returns)) ** 2
    l2 = (vclip - to64(returns)) ** 2
    assert np.all((l1 == l2) | (np.abs(l1 - l2) > 1e-5 * np.maximum(l1, l2)))
    loss, metrics = ppo_value_loss(
        jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), jnp.asarray(mask), clip=clip
    )
    want_loss, want_metrics = ref.ppo_value_loss(values, old, returns, mask, clip=clip)
    assert_f32_scalar(loss, "loss")
    assert_close(loss, want_loss, atol=1e-7, what="vf loss")
    check_metrics(metrics, want_metrics, atols={"vf_clipfrac": 0.0})


@pytest.mark.parametrize("center", [None, 0.01])
def test_weighted_reward_loss_is_the_loss_of_rows_repeated_by_weight(center):
    """Integer weights: the weighted means equal numpy's plain means over each row repeated `w` times
    (weight 0 drops it), the margin an array."""
    rng = np.random.default_rng(77)
    chosen, rejected = on_grid(rng.normal(0.5, 2.0, 12)), on_grid(rng.normal(-0.5, 2.0, 12))
    margin, weights = on_grid(rng.uniform(0.0, 1.0, 12)), rng.integers(0, 3, 12).astype(np.float32)
    loss, metrics = reward_loss(jnp.asarray(chosen), jnp.asarray(rejected), margin=jnp.asarray(margin),
                                center_rewards_coefficient=center, weights=jnp.asarray(weights))  # fmt: skip
    rep = np.repeat(np.arange(12), weights.astype(int))
    want_loss, want_metrics = ref.reward_loss(chosen[rep], rejected[rep], margin=margin[rep],
                                              center_rewards_coefficient=center)  # fmt: skip
    assert_close(loss, want_loss, atol=1e-6, what="weighted reward loss")
    check_metrics(metrics, want_metrics, atols={"margin": 1e-5, "rewards/chosen": 1e-5,
                                                "rewards/rejected": 1e-5, "accuracy": 1e-6})  # fmt: skip
