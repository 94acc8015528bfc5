"""PPO for language models: KL-shaped per-token rewards, GAE, and the clipped policy / value losses.

Shapes are ``[B, T]`` (any leading shape works; time is the last axis) and masks mark the real
response tokens (1) versus the rest (0): padding at the end of a row, and in a multi-turn rollout
the tool messages between the policy's turns (not steps of the policy: GAE skips them). All
arithmetic is float32. Losses return ``(loss, metrics)`` with float32 scalar metrics under ``stop_gradient``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.losses.token import _concrete, _real, masked_mean

Array = jax.Array
Metrics = dict[str, Array]

__all__ = [
    "KL_KINDS",
    "kl_penalty",
    "per_token_rewards",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
]

KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_kl_kind(kind: str) -> None:
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}.")


def kl_penalty(logprobs: Array, ref_logprobs: Array, kind: str = "k1") -> Array:
    r"""Per-token estimator of KL(policy || reference) from sampled-token log-probs.

    With :math:`r = \log\pi_{ref}(y) - \log\pi(y)`:

    - ``k1``: :math:`-r = \log\pi - \log\pi_{ref}` (unbiased, high variance)
    - ``k2``: :math:`\tfrac12 r^2` (biased, low variance)
    - ``k3``: :math:`e^r - 1 - r` (unbiased, low variance, always >= 0)

    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
    """
    _check_kl_kind(kind)
    logprobs, ref_logprobs = _f32(logprobs), _f32(ref_logprobs)
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * jnp.square(logprobs - ref_logprobs)
    r = ref_logprobs - logprobs
    return jnp.expm1(r) - r  # == exp(r) - 1 - r, without cancellation for small r


def per_token_rewards(
    scores_B: Array,
    logprobs_BxT: Array,
    ref_logprobs_BxT: Array,
    mask_BxT: Array,
    *,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[Array, Array, Array]:
    r"""RLHF reward shaping: a per-token KL penalty plus the sequence score on the last real token.

    .. math::
       \mathrm{kl}_t = \mathrm{KL}_{kind}(t)\, m_t, \quad
       r_t = -\beta\, \mathrm{kl}_t + s\,[t = t_{last}]

    Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155. ``t_last`` is
    the last index where the mask is 1; a row with no real token gets no score. Everything is 0
    where the mask is 0.

    Returns:
      ``(rewards, non_score_rewards, kl)``, each float32 ``[B, T]``.
    """
    _check_kl_kind(kl_kind)
    real_BxT = _real(mask_BxT)
    mask_f_BxT = jnp.asarray(mask_BxT).astype(jnp.float32)
    # Zero padded log-probs first: garbage there must not give NaN gradients through where().
    logprobs_BxT = jnp.where(real_BxT, _f32(logprobs_BxT), 0.0)
    ref_logprobs_BxT = jnp.where(real_BxT, _f32(ref_logprobs_BxT), 0.0)
    kl_BxT = kl_penalty(logprobs_BxT, ref_logprobs_BxT, kl_kind) * mask_f_BxT
    kl_BxT = jnp.where(real_BxT, kl_BxT, 0.0)
    non_score_BxT = jnp.where(real_BxT, -kl_coef * kl_BxT, 0.0)

    T = real_BxT.shape[-1]
    # Index of the last real token = T - 1 - (first real index of the reversed row).
    last_B = T - 1 - jnp.argmax(real_BxT[..., ::-1], axis=-1)
    has_real_B = jnp.any(real_BxT, axis=-1)
    is_last_BxT = (jnp.arange(T) == last_B[..., None]) & has_real_B[..., None]
    scores_Bx1 = _f32(scores_B)[..., None]
    rewards_BxT = non_score_BxT + jnp.where(is_last_BxT, scores_Bx1, 0.0)
    return rewards_BxT, non_score_BxT, kl_BxT


def gae(
    rewards_BxT: Array,
    values_BxT: Array,
    mask_BxT: Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Array, Array]:
    r"""Generalized Advantage Estimation by a reverse ``jax.lax.scan`` over time.

    .. math::
       \delta_t = r_t + \gamma V_{t'} - V_t, \quad
       A_t = \delta_t + \gamma\lambda\, A_{t'}, \quad V_{t'} = A_{t'} = 0 \text{ after the last step}

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", arXiv:1506.02438. The steps are the slots where the mask is 1, and ``t'`` is the
    next of them: slots with mask 0 inside a row (a multi-turn rollout's tool messages, which the
    policy did not write) are skipped, so GAE runs over the policy's own tokens as one sequence; for a
    prefix mask ``t' = t + 1``. Returns ``(advantages, returns = A + V)``, both float32 ``[B, T]``
    and zeroed where the mask is 0. Advantages are not whitened here (see
    :func:`jaxrlhf.losses.masked_whiten`).
    """
    real_BxT = _real(mask_BxT)
    # Zero padding first, so NaN/inf in padded slots cannot reach real tokens through 0 * x.
    rewards_BxT = jnp.where(real_BxT, _f32(rewards_BxT), 0.0)
    values_BxT = jnp.where(real_BxT, _f32(values_BxT), 0.0)

    def step(carry: tuple[Array, Array], xs: tuple[Array, Array, Array]) -> tuple[Any, Array]:
        next_value_B, next_adv_B = carry  # of the next real step (0 after the last)
        reward_B, value_B, real_B = xs
        adv_B = reward_B + gamma * next_value_B - value_B + gamma * lam * next_adv_B
        # a slot that is not a step passes the next step's value and advantage on unchanged
        carry = (jnp.where(real_B, value_B, next_value_B), jnp.where(real_B, adv_B, next_adv_B))
        return carry, jnp.where(real_B, adv_B, 0.0)

    # Scan wants time as the leading axis.
    xs = tuple(jnp.moveaxis(x, -1, 0) for x in (rewards_BxT, values_BxT, real_BxT))
    zeros_B = jnp.zeros(xs[0].shape[1:], jnp.float32)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
    adv_BxT = jnp.moveaxis(adv_TxB, 0, -1)

    advantages_BxT = jnp.where(real_BxT, adv_BxT, 0.0)
    returns_BxT = jnp.where(real_BxT, adv_BxT + values_BxT, 0.0)
    return advantages_BxT, returns_BxT


def ppo_policy_loss(
    logprobs_BxT: Array,
    old_logprobs_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Array, Metrics]:
    r"""PPO clipped surrogate policy loss, token-level masked mean.

    .. math::
       \rho = e^{\log\pi - \log\pi_{old}}, \quad
       \ell = \max(-A\rho,\; -A\,\mathrm{clip}(\rho, 1-\epsilon_{lo}, 1+\epsilon_{hi}))

    and with dual clipping (c > 1), :math:`\ell \leftarrow \min(\ell, -cA)` where :math:`A < 0`.

    Schulman et al. 2017, arXiv:1707.06347; asymmetric "clip-higher" ``clip_eps_high`` from DAPO
    (Yu et al. 2025, arXiv:2503.14476); dual clip from Ye et al. 2020, arXiv:1912.09729.

    Metrics: ``approxkl`` = masked_mean(0.5 (log pi - log pi_old)^2), ``clipfrac`` =
    masked_mean(clipped term > unclipped term), ``ratio`` = masked_mean(rho).

    Raises:
      ValueError: ``clip_eps < 0``, ``clip_eps_high <= 0`` or ``dual_clip <= 1``.
    """
    eps_lo = _concrete(clip_eps)
    if eps_lo is not None and not eps_lo >= 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps!r}.")
    if clip_eps_high is not None:
        eps_hi = _concrete(clip_eps_high)
        if eps_hi is not None and not eps_hi > 0:
            raise ValueError(f"clip_eps_high must be > 0 (or None), got {clip_eps_high!r}.")
    if dual_clip is not None:
        c = _concrete(dual_clip)
        if c is not None and not c > 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}.")
    high = clip_eps if clip_eps_high is None else clip_eps_high

    real_BxT = _real(mask_BxT)
    # Padding may hold garbage log-probs: zero the log-ratio there so exp() cannot overflow into
    # an inf whose 0-weighted gradient would still be NaN.
    log_ratio_BxT = jnp.where(real_BxT, _f32(logprobs_BxT) - _f32(old_logprobs_BxT), 0.0)
    adv_BxT = jnp.where(real_BxT, _f32(advantages_BxT), 0.0)
    ratio_BxT = jnp.exp(log_ratio_BxT)

    pg1_BxT = -adv_BxT * ratio_BxT
    pg2_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + high)
    pg_BxT = jnp.maximum(pg1_BxT, pg2_BxT)
    if dual_clip is not None:
        # Bounds the loss for very large ratios on negative advantages.
        pg_BxT = jnp.where(adv_BxT < 0, jnp.minimum(pg_BxT, -dual_clip * adv_BxT), pg_BxT)
    loss = masked_mean(pg_BxT, mask_BxT)

    sg = jax.lax.stop_gradient
    metrics = {
        "approxkl": masked_mean(0.5 * jnp.square(sg(log_ratio_BxT)), mask_BxT),
        "clipfrac": masked_mean((sg(pg2_BxT) > sg(pg1_BxT)).astype(jnp.float32), mask_BxT),
        "ratio": masked_mean(sg(ratio_BxT), mask_BxT),
    }
    return loss, metrics


def ppo_value_loss(
    values_BxT: Array,
    old_values_BxT: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    *,
    clip: float = 0.2,
) -> tuple[Array, Metrics]:
    r"""Clipped value-function loss of PPO (OpenAI baselines PPO2; Ziegler et al. 2019).

    .. math::
       V^{clip} = V_{old} + \mathrm{clip}(V - V_{old}, -c, c), \quad
       \mathcal L = \tfrac12\, \mathrm{masked\_mean}\big(\max((V - R)^2, (V^{clip} - R)^2)\big)

    Schulman et al. 2017, arXiv:1707.06347 (value clipping as in the PPO2 reference code and
    Ziegler et al. 2019, arXiv:1909.08593).
    Metric ``vf_clipfrac`` = masked_mean(clipped > unclipped).

    Raises:
      ValueError: ``clip < 0``.
    """
    c = _concrete(clip)
    if c is not None and not c >= 0:
        raise ValueError(f"clip must be >= 0, got {clip!r}.")
    real_BxT = _real(mask_BxT)
    values_BxT = jnp.where(real_BxT, _f32(values_BxT), 0.0)
    old_values_BxT = jnp.where(real_BxT, _f32(old_values_BxT), 0.0)
    returns_BxT = jnp.where(real_BxT, _f32(returns_BxT), 0.0)

    vclip_BxT = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip, clip)
    l1_BxT = jnp.square(values_BxT - returns_BxT)
    l2_BxT = jnp.square(vclip_BxT - returns_BxT)
    loss = 0.5 * masked_mean(jnp.maximum(l1_BxT, l2_BxT), mask_BxT)
    metrics = {
        "vf_clipfrac": masked_mean(
            jax.lax.stop_gradient(l2_BxT > l1_BxT).astype(jnp.float32), mask_BxT
        ),
    }
    return loss, metrics
