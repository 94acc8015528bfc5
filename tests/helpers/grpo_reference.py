"""Plain numpy (float64) reference implementations of the GRPO formulas.

Written from the formulas (DeepSeekMath GRPO, DAPO, Dr. GRPO, GSPO) and TRL's
``GRPOTrainer._compute_loss`` / advantage computation, independently of the JAX implementation.
Everything is deliberately loop-based where that makes the formula obvious and computed in
float64. Inputs are converted with ``np.asarray(x, np.float64)`` so callers can pass the exact
float32 arrays that the JAX functions receive.
"""

import math

import numpy as np

STD_EPS = 1e-4  # TRL: advantages / (std_rewards + 1e-4)
SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


def f64(x):
    return np.asarray(x, dtype=np.float64)


def _sample_std(values):
    """Sample standard deviation (ddof=1), written out."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------
def np_group_advantages(rewards, group_size, scale="group", estimator="grpo"):
    """Group-relative advantages, one per completion.

    ``rewards`` is 1-D of length P*G, prompt-major: rows ``p*G .. p*G+G-1`` are prompt p's G samples.

    estimator "grpo": ``A_i = r_i - mean(r over i's group)`` (TRL GRPOTrainer).
    estimator "rloo": ``A_i = r_i - mean(r over the OTHER G-1 members of i's group)``
        (leave-one-out baseline; equals ``G/(G-1) * (r_i - group mean)``).

    Then, for BOTH estimators, the same scale rule, always based on the standard deviation of the
    *rewards* (never of the advantages):
        "group": divide by (sample std, ddof=1, of i's group's rewards) + 1e-4
        "batch": divide by (sample std, ddof=1, of all rewards in the batch) + 1e-4
        "none":  no division.
    Note: this rloo scaling is a choice of this project; TRL's GRPOTrainer has no rloo estimator,
    and TRL's separate RLOOTrainer instead optionally re-normalises the advantages themselves
    ((A - mean(A)) / (std(A) + 1e-4) over the batch).

    As in TRL, a group (or batch) of a single reward has std 0 (advantage 0 / 1e-4 = 0).

    Raises ValueError when len(rewards) is not a multiple of group_size, group_size < 1,
    group_size < 2 for rloo, or for unknown scale / estimator.
    """
    r = f64(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {r.shape}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}")
    G = int(group_size)
    if G < 1:
        raise ValueError("group_size must be >= 1")
    if estimator == "rloo" and G < 2:
        raise ValueError("rloo needs group_size >= 2")
    n = r.shape[0]
    if n % G != 0:
        raise ValueError(f"len(rewards)={n} is not a multiple of group_size={G}")
    num_groups = n // G

    # TRL: a single reward (G == 1 for "group", one reward in the batch for "batch") has std 0,
    # so its advantage is 0 / (0 + 1e-4) = 0 rather than an error.
    batch_std = (_sample_std(r) if n > 1 else 0.0) if scale == "batch" else None

    adv = np.zeros(n, dtype=np.float64)
    for p in range(num_groups):
        group = [float(r[p * G + j]) for j in range(G)]
        group_sum = sum(group)
        for j in range(G):
            i = p * G + j
            if estimator == "grpo":
                baseline = group_sum / G
            else:  # rloo
                baseline = (group_sum - group[j]) / (G - 1)
            a = group[j] - baseline
            if scale == "group":
                group_std = _sample_std(group) if G > 1 else 0.0
                a = a / (group_std + STD_EPS)
            elif scale == "batch":
                a = a / (batch_std + STD_EPS)
            adv[i] = a
    return adv


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------
def np_grpo_loss(
    logps,
    old_logps,
    advantages,
    mask,
    ref_logps=None,
    loss_type="dapo",
    epsilon=0.2,
    epsilon_high=None,
    beta=0.0,
    importance_sampling_level="token",
    max_completion_length=None,
):
    """Clipped GRPO surrogate following TRL ``GRPOTrainer._compute_loss`` (single process,
    no gradient accumulation, no vLLM IS correction, no delta / entropy mask / off-policy mask).

    Shapes: logps, old_logps, mask, ref_logps: [B, T]; advantages: [B].
    Returns ``(loss: float, metrics: dict)``.

    Metrics follow TRL's ``global_masked_mean``:
      * token level: ``sum(x * mask) / max(sum(mask), 1)`` over the batch;
      * sequence level (GSPO): coef_1 has one value per sequence, so the clip metrics are the
        plain mean over the B sequences (``sum_b x_b / max(B, 1)``), NOT a token-weighted mean
        (sequences are equally weighted whatever their length, and fully masked rows count).
      * "kl" (only when beta > 0) is always a token-masked mean of the per-token KL.
    """
    logps = f64(logps)
    old_logps = f64(old_logps)
    adv = f64(advantages)
    mask = f64(mask)
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    B, T = logps.shape
    if old_logps.shape != (B, T) or mask.shape != (B, T) or adv.shape != (B,):
        raise ValueError("shape mismatch")
    eps_low = float(epsilon)
    eps_high = float(epsilon) if epsilon_high is None else float(epsilon_high)
    if beta > 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        ref = f64(ref_logps)
    L = T if max_completion_length is None else int(max_completion_length)

    per_token_loss = np.zeros((B, T))
    per_token_kl = np.zeros((B, T))
    # one "clip unit" per token (token level) or per sequence (sequence level)
    low_clipped = np.zeros((B, T)) if importance_sampling_level == "token" else np.zeros(B)
    high_clipped = np.zeros_like(low_clipped)

    for b in range(B):
        a = float(adv[b])
        n_b = sum(float(mask[b, t]) for t in range(T))
        if importance_sampling_level == "sequence":
            s = sum((logps[b, t] - old_logps[b, t]) * mask[b, t] for t in range(T))
            seq_log_w = s / max(n_b, 1.0)
            seq_coef_1 = math.exp(seq_log_w)
            low_clipped[b] = float(seq_coef_1 < 1.0 - eps_low and a < 0)
            high_clipped[b] = float(seq_coef_1 > 1.0 + eps_high and a > 0)
        for t in range(T):
            if importance_sampling_level == "token":
                coef_1 = math.exp(logps[b, t] - old_logps[b, t])
                low_clipped[b, t] = float(coef_1 < 1.0 - eps_low and a < 0)
                high_clipped[b, t] = float(coef_1 > 1.0 + eps_high and a > 0)
            else:
                coef_1 = seq_coef_1
            coef_2 = min(max(coef_1, 1.0 - eps_low), 1.0 + eps_high)
            loss = -min(coef_1 * a, coef_2 * a)
            if beta > 0.0:
                d = ref[b, t] - logps[b, t]
                kl = math.exp(d) - d - 1.0
                per_token_kl[b, t] = kl
                loss = loss + beta * kl
            per_token_loss[b, t] = loss

    total_tokens = float(np.sum(mask))
    masked_sum = sum(per_token_loss[b, t] * mask[b, t] for b in range(B) for t in range(T))
    if loss_type == "grpo":
        seq_means = []
        for b in range(B):
            n_b = sum(float(mask[b, t]) for t in range(T))
            seq_means.append(sum(per_token_loss[b, t] * mask[b, t] for t in range(T)) / max(n_b, 1.0))
        loss = sum(seq_means) / B
    elif loss_type in ("bnpo", "dapo"):
        # dapo: TRL divides by num_items_in_batch (active tokens of the whole generation batch);
        # for one batch on one process this is the batch's active-token count, i.e. == bnpo.
        loss = masked_sum / max(total_tokens, 1.0)
    else:  # dr_grpo
        loss = masked_sum / (B * L)

    def token_mean(x):
        return float(np.sum(x * mask) / max(total_tokens, 1.0))

    def clip_mean(x):
        if importance_sampling_level == "token":
            return token_mean(x)
        return float(np.sum(x) / max(B, 1))

    region = np.maximum(low_clipped, high_clipped)
    metrics = {
        "clip_ratio/low_mean": clip_mean(low_clipped),
        "clip_ratio/high_mean": clip_mean(high_clipped),
        "clip_ratio/region_mean": clip_mean(region),
    }
    if beta > 0.0:
        metrics["kl"] = token_mean(per_token_kl)
    return float(loss), metrics


# ----------------------------------------------------------------------------------------------
# hand-computed self checks
# ----------------------------------------------------------------------------------------------
def self_check() -> None:
    """Hand-computed values the references must give (run by tests/losses/test_grpo.py)."""
    # advantages: group [0, 1] -> mean 0.5, std(ddof=1) = sqrt(0.5)
    s = math.sqrt(0.5)
    a = np_group_advantages([0.0, 1.0], 2)
    assert np.allclose(a, [-0.5 / (s + 1e-4), 0.5 / (s + 1e-4)])
    a = np_group_advantages([0.0, 1.0], 2, scale="none", estimator="rloo")
    assert np.allclose(a, [-1.0, 1.0])
    a = np_group_advantages([0.0, 1.0, 2.0, 4.0], 2, scale="batch")
    bs = np.std([0.0, 1.0, 2.0, 4.0], ddof=1)
    assert np.allclose(a, np.array([-0.5, 0.5, -1.0, 1.0]) / (bs + 1e-4))
    a = np_group_advantages([1.0, 2.0, 6.0], 3, scale="none", estimator="rloo")
    assert np.allclose(a, [1 - 4.0, 2 - 3.5, 6 - 1.5])
    for bad in (
        lambda: np_group_advantages([1.0, 2.0, 3.0], 2),
        lambda: np_group_advantages([1.0, 2.0], 1, estimator="rloo"),
    ):
        try:
            bad()
        except ValueError:
            pass
        else:
            raise AssertionError("expected ValueError")

    # 1x2 token level, A = 1, ratios exp(0.5)=1.6487 (clipped at 1.2) and exp(-0.5)=0.6065:
    # token 0: -min(1.6487, 1.2) = -1.2 (high clipped);  token 1: -min(0.6065, 0.8) = -0.6065
    lp = [[0.5, -0.5]]
    old = [[0.0, 0.0]]
    loss, m = np_grpo_loss(lp, old, [1.0], [[1, 1]])
    assert math.isclose(loss, (-1.2 - math.exp(-0.5)) / 2)
    assert m == {"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.5, "clip_ratio/region_mean": 0.5}
    # A = -1: token 0: -min(-1.6487, -1.2) = 1.6487; token 1: -min(-0.6065, -0.8) = 0.8 (low clipped)
    loss, m = np_grpo_loss(lp, old, [-1.0], [[1, 1]], loss_type="grpo")
    assert math.isclose(loss, (math.exp(0.5) + 0.8) / 2)
    assert m["clip_ratio/low_mean"] == 0.5 and m["clip_ratio/high_mean"] == 0.0
    # dr_grpo with max_completion_length 4: sum / (1 * 4)
    loss, _ = np_grpo_loss(lp, old, [1.0], [[1, 1]], loss_type="dr_grpo", max_completion_length=4)
    assert math.isclose(loss, (-1.2 - math.exp(-0.5)) / 4)
    # masking: second token padded -> only token 0 counts
    loss, m = np_grpo_loss(lp, old, [1.0], [[1, 0]])
    assert math.isclose(loss, -1.2) and m["clip_ratio/high_mean"] == 1.0
    # sequence level: weight exp(mean(0.5, -0.5)) = 1 -> loss = -A, nothing clipped
    loss, m = np_grpo_loss(lp, old, [1.0], [[1, 1]], importance_sampling_level="sequence")
    assert math.isclose(loss, -1.0) and m["clip_ratio/region_mean"] == 0.0
    # KL: ref - logp = [-0.5, 0.5] -> kl = exp(-0.5)+0.5-1, exp(0.5)-0.5-1
    kl = [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5]
    loss, m = np_grpo_loss(lp, old, [1.0], [[1, 1]], ref_logps=[[0.0, 0.0]], beta=0.1)
    assert math.isclose(m["kl"], sum(kl) / 2)
    assert math.isclose(loss, (-1.2 - math.exp(-0.5)) / 2 + 0.1 * sum(kl) / 2)
    # epsilon_high: ratio 1.6487 < 1 + 0.8 -> not clipped
    loss, m = np_grpo_loss(lp, old, [1.0], [[1, 1]], epsilon_high=0.8)
    assert math.isclose(loss, (-math.exp(0.5) - math.exp(-0.5)) / 2) and m["clip_ratio/high_mean"] == 0.0
    # GSPO metrics are a plain mean over sequences (TRL), not token-weighted:
    # seq 0 (3 tokens): weight exp(0.5) > 1.2, A > 0 -> high clipped; seq 1 (1 token): weight 1.
    loss, m = np_grpo_loss(
        [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        [1.0, 1.0],
        [[1, 1, 1], [1, 0, 0]],
        importance_sampling_level="sequence",
    )
    assert m["clip_ratio/high_mean"] == 0.5  # token-weighted would give 0.75
    assert math.isclose(loss, (3 * -1.2 + -1.0) / 4)  # dapo: token-level sum / 4 active tokens
    assert np.allclose(np_group_advantages([3.0, 5.0], 1), [0.0, 0.0])


if __name__ == "__main__":
    self_check()
    print("grpo_reference self-checks passed")
