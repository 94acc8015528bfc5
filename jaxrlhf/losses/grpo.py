"""Critic-free policy-gradient losses: GRPO and its variants (DAPO, Dr. GRPO, GSPO) and RLOO.

A prompt is sampled G times; each completion's advantage comes from the rewards of its own group
instead of a learned value function. Rewards and advantages are laid out prompt-major: rows
`p * G .. p * G + G - 1` are prompt p's samples.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def group_advantages(
    rewards: Array, group_size: int, *, scale: str = "group", estimator: str = "grpo"
) -> Array:
    """Advantages `[P * G]` of prompt-major rewards `[P * G]`.

    `grpo` (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300): `A_i = r_i - mean(r_group)`.
    `rloo` (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019): `A_i = r_i - mean of the other
    G - 1 rewards of the group` = `G / (G - 1) (r_i - mean(r_group))`.
    Then `scale`: `group` divides by the group's reward standard deviation (ddof 1) + 1e-4 (GRPO),
    `batch` by the whole batch's (Hu 2025, REINFORCE++; TRL's `scale_rewards="batch"`), `none`
    not at all (Liu et al. 2025, Dr. GRPO, arXiv:2503.20783). A group whose rewards are all equal
    gets advantage 0 under every rule.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")
    if estimator == "rloo" and group_size < 2:
        raise ValueError("rloo needs group_size >= 2 (a leave-one-out mean of the others)")
    r_PxG = rewards.astype(jnp.float32).reshape(n // group_size, group_size)
    mean_Px1 = jnp.mean(r_PxG, axis=1, keepdims=True)
    a_PxG = r_PxG - mean_Px1
    if estimator == "rloo":
        a_PxG = a_PxG * (group_size / (group_size - 1))
    if scale == "group":
        std = jnp.std(r_PxG, axis=1, keepdims=True, ddof=1) if group_size > 1 else jnp.zeros_like(mean_Px1)
        a_PxG = a_PxG / (std + _STD_EPS)
    elif scale == "batch":
        std = jnp.std(r_PxG, ddof=1) if n > 1 else jnp.float32(0.0)
        a_PxG = a_PxG / (std + _STD_EPS)
    return a_PxG.reshape(n)


def _token_mean(x_BxT: Array, mask_BxT: Array) -> Array:
    return jnp.sum(x_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def grpo_loss(
    logps: Array,
    old_logps: Array,
    advantages: Array,
    mask: Array,
    *,
    ref_logps: Array | None = None,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The clipped GRPO surrogate (TRL's `GRPOTrainer`), from per-token log-probs `[B, T]` of the
    completions under the current (`logps`), sampling (`old_logps`) and reference policies, one
    advantage per completion `[B]` and the completion mask `[B, T]`.

    Ratio `r = exp(logps - old_logps)` per token, or with `importance_sampling_level="sequence"`
    (GSPO, Zheng et al. 2025, arXiv:2507.18071) `exp` of the sequence's mean log-ratio, the same for
    all its tokens. Per token `l = -min(r A, clip(r, 1 - eps, 1 + eps_high) A)` (`eps_high`: DAPO's
    clip-higher, Yu et al. 2025, arXiv:2503.14476; default `eps`), plus `beta * k3` with `k3 =
    exp(ref - logp) - (ref - logp) - 1` (Schulman's unbiased KL estimator) when `beta > 0`.

    Aggregation (`loss_type`): `grpo` (Shao et al. 2024) the mean over sequences of each sequence's
    token mean; `bnpo` the token mean over the batch; `dr_grpo` (Liu et al. 2025) the token sum over
    `B * max_completion_length` (default T); `dapo` the token sum over `num_items`, the number of
    completion tokens of the whole generation batch (default: this batch's, i.e. `bnpo`).

    Metrics (TRL's names): `clip_ratio/low_mean` (r < 1 - eps where A < 0), `clip_ratio/high_mean`
    (r > 1 + eps_high where A > 0), `clip_ratio/region_mean` (either): token means, or at sequence
    level means over sequences; `kl` (token mean of k3) when `beta > 0`.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference policy's log-probs)")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    logps, old_logps = logps.astype(jnp.float32), old_logps.astype(jnp.float32)
    m_BxT = mask.astype(jnp.float32)
    a_Bx1 = advantages.astype(jnp.float32)[:, None]
    log_ratio_BxT = logps - old_logps
    if importance_sampling_level == "sequence":
        lengths_B = jnp.maximum(jnp.sum(m_BxT, axis=1), 1.0)
        log_w = (jnp.sum(log_ratio_BxT * m_BxT, axis=1) / lengths_B)[:, None]  # [B, 1]
    else:
        log_w = log_ratio_BxT  # [B, T]
    coef_1 = jnp.exp(log_w)
    coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(coef_1 * a_Bx1, coef_2 * a_Bx1)
    per_token = jnp.broadcast_to(per_token, m_BxT.shape)
    metrics: dict[str, Any] = {}
    if beta > 0:
        d_BxT = ref_logps.astype(jnp.float32) - logps
        kl_BxT = jnp.exp(d_BxT) - d_BxT - 1.0
        per_token = per_token + beta * kl_BxT
        metrics["kl"] = _token_mean(kl_BxT, m_BxT)

    if loss_type == "grpo":
        per_seq = jnp.sum(per_token * m_BxT, axis=1) / jnp.maximum(jnp.sum(m_BxT, axis=1), 1.0)
        loss = jnp.mean(per_seq)
    elif loss_type == "bnpo":
        loss = _token_mean(per_token, m_BxT)
    elif loss_type == "dr_grpo":
        length = m_BxT.shape[1] if max_completion_length is None else max_completion_length
        loss = jnp.sum(per_token * m_BxT) / (m_BxT.shape[0] * length)
    else:  # dapo
        items = jnp.sum(m_BxT) if num_items is None else jnp.asarray(num_items, jnp.float32)
        loss = jnp.sum(per_token * m_BxT) / jnp.maximum(items, 1.0)

    low = ((coef_1 < 1.0 - eps_low) & (a_Bx1 < 0)).astype(jnp.float32)
    high = ((coef_1 > 1.0 + eps_high) & (a_Bx1 > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    if importance_sampling_level == "sequence":  # one ratio per sequence: a mean over sequences
        clip = {"low": jnp.mean(low), "high": jnp.mean(high), "region": jnp.mean(region)}
    else:
        clip = {k: _token_mean(v, m_BxT) for k, v in (("low", low), ("high", high), ("region", region))}
    metrics.update({f"clip_ratio/{k}_mean": v for k, v in clip.items()})
    return loss, metrics
