"""Plain numpy (float64) reference implementations of the `jaxrlhf.losses` formulas.

Written from the agreed API (spec/losses_api.md) and the papers / TRL formulas, independently of
the JAX implementation. Everything here is deliberately simple, loop-based where that makes the
formula obvious, and computed in float64. Inputs are converted with ``np.asarray(x, np.float64)``
so callers can pass the exact float32 arrays that the JAX functions receive.
"""

import math

import numpy as np

DPO_LOSS_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "robust",
    "exo_pair",
    "hinge",
    "ipo",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
)
# loss types whose label_smoothing may be in [0, 0.5]; robust: [0, 0.5); all others: must be 0.
SMOOTHING_TYPES = ("sigmoid", "sigmoid_norm", "aot", "aot_unpaired", "exo_pair")
LENGTH_NORMALISED_TYPES = ("ipo", "sigmoid_norm")


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# scalar helpers
# ----------------------------------------------------------------------------------------------
def logsigmoid(x):
    """log(sigmoid(x)) = -log(1 + exp(-x)), stable for both signs."""
    return -np.logaddexp(0.0, -f64(x))


def sigmoid(x):
    return np.exp(logsigmoid(x))


def relu(x):
    return np.maximum(f64(x), 0.0)


# ----------------------------------------------------------------------------------------------
# token.py
# ----------------------------------------------------------------------------------------------
def log_softmax(logits, temperature=1.0):
    z = f64(logits) / temperature
    zmax = np.max(z, axis=-1, keepdims=True)
    lse = zmax + np.log(np.sum(np.exp(z - zmax), axis=-1, keepdims=True))
    return z - lse


def token_logprobs(logits, labels, temperature=1.0):
    logp = log_softmax(logits, temperature)
    labels = np.asarray(labels)
    return np.take_along_axis(logp, labels[..., None].astype(np.int64), axis=-1)[..., 0]


def entropy_from_logits(logits, temperature=1.0):
    logp = log_softmax(logits, temperature)
    p = np.exp(logp)
    return -np.sum(p * logp, axis=-1)


def token_logprobs_grads(hidden, lm_head, labels, weights, temperature=1.0):
    """Analytic gradients of sum(weights * token_logprobs(hidden @ lm_head, labels)).

    d logp_label / d logits = (onehot(label) - softmax(logits / t)) / t.
    Returns (d_hidden, d_lm_head).
    """
    h = f64(hidden)
    w = f64(lm_head)
    logits = h @ w
    p = np.exp(log_softmax(logits, temperature))
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, np.asarray(labels)[..., None].astype(np.int64), 1.0, axis=-1)
    g_logits = f64(weights)[..., None] * (onehot - p) / temperature
    d_hidden = g_logits @ w.T
    d_lm_head = h.reshape(-1, h.shape[-1]).T @ g_logits.reshape(-1, g_logits.shape[-1])
    return d_hidden, d_lm_head


def masked_sum(x, mask, axis=None):
    return np.sum(f64(x) * f64(mask), axis=axis)


def masked_mean(x, mask, axis=None):
    s = np.sum(f64(x) * f64(mask), axis=axis)
    n = np.sum(f64(mask), axis=axis)
    n_safe = np.where(n > 0, n, 1.0)
    return np.where(n > 0, s / n_safe, 0.0)


def masked_var(x, mask, unbiased=True):
    x = f64(x)
    mask = f64(mask)
    n = float(np.sum(mask))
    mean = float(masked_mean(x, mask))
    var = float(masked_mean((x - mean) ** 2, mask))
    if unbiased:
        if n <= 1:
            return 0.0
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8):
    x = f64(x)
    mask = f64(mask)
    mean = float(masked_mean(x, mask))
    var = masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return np.where(mask > 0, out, 0.0)


def sequence_logprobs(token_logps, mask, average=False):
    s = np.sum(f64(token_logps) * f64(mask), axis=-1)
    if not average:
        return s
    n = np.sum(f64(mask), axis=-1)
    return np.where(n > 0, s / np.where(n > 0, n, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# preference.py
# ----------------------------------------------------------------------------------------------
def _smoothed_sigmoid_loss(z, eps):
    return -logsigmoid(z) * (1.0 - eps) - logsigmoid(-z) * eps


def dpo_per_example(
    pc,
    pr,
    rc,
    rr,
    *,
    beta,
    loss_type,
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    discopop_tau=0.05,
    bco_delta=None,
):
    """Per-example DPO-family losses plus the (possibly length-normalised) logratios.

    pc/pr/rc/rr are float64 arrays [B] (pass zeros for rc/rr in reference-free mode).
    Returns (per_example_loss [B], chosen_logratios [B], rejected_logratios [B]).
    """
    pc, pr, rc, rr = f64(pc), f64(pr), f64(rc), f64(rr)
    eps = float(label_smoothing)
    if loss_type in LENGTH_NORMALISED_TYPES:
        lc = f64(chosen_lengths)
        lr = f64(rejected_lengths)
        pc, rc = pc / lc, rc / lc
        pr, rr = pr / lr, rr / lr
    clr = pc - rc
    rlr = pr - rr
    h = clr - rlr

    if loss_type in ("sigmoid", "sigmoid_norm"):
        loss = _smoothed_sigmoid_loss(beta * h, eps)
    elif loss_type == "robust":
        loss = (-logsigmoid(beta * h) * (1 - eps) + logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        e = eps if eps > 0 else 1e-3
        z = beta * h
        loss = sigmoid(z) * (logsigmoid(z) - math.log(1 - e)) + sigmoid(-z) * (logsigmoid(-z) - math.log(e))
    elif loss_type == "hinge":
        loss = relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        cr = beta * clr
        rr_ = beta * rlr
        if bco_delta is None:
            delta = np.mean(np.concatenate([cr, rr_]))
        else:
            delta = float(bco_delta)
        loss = -logsigmoid(cr - delta) - logsigmoid(-(rr_ - delta))
    elif loss_type == "sppo_hard":
        loss = (clr - 1 / (2 * beta)) ** 2 + (rlr + 1 / (2 * beta)) ** 2
    elif loss_type == "nca_pair":
        cr = beta * clr
        rr_ = beta * rlr
        loss = -logsigmoid(cr) - 0.5 * logsigmoid(-cr) - 0.5 * logsigmoid(-rr_)
    elif loss_type == "aot_unpaired":
        d = np.sort(clr) - np.sort(rlr)
        loss = _smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "aot":
        d = np.sort(pc - pr) - np.sort(rc - rr)
        loss = _smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "apo_zero":
        loss = (1 - sigmoid(beta * clr)) + sigmoid(beta * rlr)
    elif loss_type == "apo_down":
        loss = sigmoid(beta * clr) + (1 - sigmoid(beta * (clr - rlr)))
    elif loss_type == "discopop":
        z = beta * h
        m = sigmoid(z / discopop_tau)
        loss = -logsigmoid(z) * (1 - m) + np.exp(-z) * m
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss, clr, rlr


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    reference_free=False,
    chosen_lengths=None,
    rejected_lengths=None,
    discopop_tau=0.05,
    bco_delta=None,
):
    pc = f64(chosen_logps)
    pr = f64(rejected_logps)
    if reference_free or ref_chosen_logps is None:
        rc = np.zeros_like(pc)
        rr = np.zeros_like(pr)
    else:
        rc = f64(ref_chosen_logps)
        rr = f64(ref_rejected_logps)
    loss, clr, rlr = dpo_per_example(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        discopop_tau=discopop_tau,
        bco_delta=bco_delta,
    )
    chosen_rewards = beta * clr
    rejected_rewards = beta * rlr
    metrics = {
        "rewards/chosen": np.mean(chosen_rewards),
        "rewards/rejected": np.mean(rejected_rewards),
        "rewards/accuracies": np.mean((chosen_rewards > rejected_rewards).astype(np.float64)),
        "rewards/margins": np.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": np.mean(pc),
        "logps/rejected": np.mean(pr),
    }
    return np.mean(loss), metrics


def simpo_loss(
    chosen_logps,
    rejected_logps,
    chosen_lengths,
    rejected_lengths,
    *,
    beta=2.0,
    gamma=0.5,
    label_smoothing=0.0,
):
    avg_c = f64(chosen_logps) / f64(chosen_lengths)
    avg_r = f64(rejected_logps) / f64(rejected_lengths)
    z = beta * (avg_c - avg_r) - gamma
    loss = _smoothed_sigmoid_loss(z, label_smoothing)
    cr = beta * avg_c
    rr = beta * avg_r
    metrics = {
        "rewards/chosen": np.mean(cr),
        "rewards/rejected": np.mean(rr),
        "rewards/accuracies": np.mean((cr > rr).astype(np.float64)),
        "rewards/margins": np.mean(cr - rr),
    }
    return np.mean(loss), metrics


def orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=0.1):
    pc = f64(chosen_logps)
    lc = f64(chosen_lengths)
    avg_c = pc / lc
    avg_r = f64(rejected_logps) / f64(rejected_lengths)
    log_odds = (avg_c - avg_r) - (np.log1p(-np.exp(avg_c)) - np.log1p(-np.exp(avg_r)))
    or_term = logsigmoid(log_odds)
    nll = -np.sum(pc) / np.sum(lc)
    loss = nll - beta * np.mean(or_term)
    cr = beta * avg_c
    rr = beta * avg_r
    metrics = {
        "nll_loss": nll,
        "log_odds_ratio": np.mean(or_term),
        "log_odds_chosen": np.mean(log_odds),
        "rewards/chosen": np.mean(cr),
        "rewards/rejected": np.mean(rr),
        "rewards/accuracies": np.mean((cr > rr).astype(np.float64)),
        "rewards/margins": np.mean(cr - rr),
    }
    return loss, metrics


def reward_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient=None):
    c = f64(chosen_rewards)
    r = f64(rejected_rewards)
    m = 0.0 if margin is None else f64(margin)
    loss = np.mean(-logsigmoid(c - r - m))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * np.mean((c + r) ** 2)
    metrics = {
        "accuracy": np.mean((c > r).astype(np.float64)),
        "margin": np.mean(c - r),
        "rewards/chosen": np.mean(c),
        "rewards/rejected": np.mean(r),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# ppo.py
# ----------------------------------------------------------------------------------------------
def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    lp = f64(logprobs)
    ref = f64(ref_logprobs)
    r = ref - lp
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return 0.5 * (lp - ref) ** 2
    if kind == "k3":
        return np.exp(r) - 1 - r
    raise ValueError(f"unknown kind {kind!r}")


def per_token_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, kl_kind="k1"):
    mask = f64(mask)
    kl = kl_penalty(logprobs, ref_logprobs, kl_kind) * mask
    non_score = -kl_coef * kl
    rewards = non_score.copy()
    scores = f64(scores)
    n_rows, n_steps = mask.shape
    for b in range(n_rows):
        last = -1
        for t in range(n_steps):
            if mask[b, t] > 0:
                last = t
        if last >= 0:
            rewards[b, last] += scores[b]
    rewards = rewards * mask
    non_score = non_score * mask
    return rewards, non_score, kl


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalised advantage estimation, written as a backwards loop over t for each row."""
    rewards = f64(rewards)
    values = f64(values)
    mask = f64(mask)
    n_rows, n_steps = rewards.shape
    adv = np.zeros((n_rows, n_steps))
    for b in range(n_rows):
        next_value = 0.0  # V_T = 0
        next_adv = 0.0  # A_T = 0
        next_mask = 0.0  # m_T = 0
        for t in reversed(range(n_steps)):
            delta = rewards[b, t] + gamma * next_value * next_mask - values[b, t]
            a = delta + gamma * lam * next_mask * next_adv
            adv[b, t] = a
            next_value = values[b, t]
            next_adv = a
            next_mask = mask[b, t]
    returns = adv + values
    return adv * mask, returns * mask


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, dual_clip=None
):
    lp = f64(logprobs)
    old = f64(old_logprobs)
    adv = f64(advantages)
    mask = f64(mask)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = np.exp(lp - old)
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, 1 - clip_eps, 1 + high)
    pg = np.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = np.where(adv < 0, np.minimum(pg, -dual_clip * adv), pg)
    loss = masked_mean(pg, mask)
    metrics = {
        "approxkl": masked_mean(0.5 * (lp - old) ** 2, mask),
        "clipfrac": masked_mean((pg2 > pg1).astype(np.float64), mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2):
    v = f64(values)
    old = f64(old_values)
    ret = f64(returns)
    mask = f64(mask)
    vclip = old + np.clip(v - old, -clip, clip)
    l1 = (v - ret) ** 2
    l2 = (vclip - ret) ** 2
    loss = 0.5 * masked_mean(np.maximum(l1, l2), mask)
    metrics = {"vf_clipfrac": masked_mean((l2 > l1).astype(np.float64), mask)}
    return loss, metrics
