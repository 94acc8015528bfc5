"""Pairwise preference losses: DPO and its variants, SimPO, ORPO and the Bradley-Terry reward loss.

All inputs are per-sequence values ``[B]`` (e.g. summed token log-probs from
:func:`jaxrlhf.losses.sequence_logprobs`). Every loss returns ``(loss, metrics)``: a float32 scalar
(the batch mean) and a dict of float32 scalar diagnostics computed under ``stop_gradient``.
The batch is the last axis, so ``jax.vmap`` over extra leading axes works as expected.

Python-level hyper-parameters (``loss_type``, ``beta``, ``label_smoothing``, ...) are validated when
the function is called (or traced, under ``jax.jit`` with those arguments static / closed over).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.losses.token import _concrete

Array = jax.Array
Metrics = dict[str, Array]

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "simpo_loss", "orpo_loss", "reward_loss"]

# Every loss_type accepted by dpo_loss, with the paper it comes from.
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",  # Rafailov et al. 2023, arXiv:2305.18290 (cDPO when label_smoothing > 0)
    "sigmoid_norm",  # length-normalised DPO, Lambert et al. 2024 (Tulu 3), arXiv:2411.15124
    "robust",  # Chowdhury et al. 2024, arXiv:2403.00409
    "exo_pair",  # Ji et al. 2024, arXiv:2402.00856
    "hinge",  # SLiC, Zhao et al. 2023, arXiv:2305.10425
    "ipo",  # Azar et al. 2023, arXiv:2310.12036
    "bco_pair",  # Jung et al. 2024, arXiv:2404.04656
    "sppo_hard",  # Wu et al. 2024, arXiv:2405.00675
    "nca_pair",  # Chen et al. 2024, arXiv:2402.05369
    "aot_unpaired",  # Melnyk et al. 2024, arXiv:2406.05882
    "aot",  # Melnyk et al. 2024, arXiv:2406.05882
    "apo_zero",  # D'Oosterlinck et al. 2024, arXiv:2408.06266
    "apo_down",  # D'Oosterlinck et al. 2024, arXiv:2408.06266
    "discopop",  # Lu et al. 2024, arXiv:2406.08414
)
# Types that divide the four log-probs by the sequence lengths first.
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")
# Types whose formula uses label_smoothing, and the range it may take.
_SMOOTHING_CLOSED_HALF = ("sigmoid", "sigmoid_norm", "aot", "aot_unpaired", "exo_pair")  # [0, 0.5]
_SMOOTHING_OPEN_HALF = ("robust",)  # [0, 0.5): the loss divides by 1 - 2 eps


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _div_lengths(x: Array, lengths: Array) -> Array:
    """x / lengths; a zero length (an empty sequence) gives 0 instead of inf/NaN."""
    lengths = _f32(lengths)
    ok = lengths > 0
    return jnp.where(ok, x / jnp.where(ok, lengths, 1.0), 0.0)


def _check_positive(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def _check_label_smoothing(label_smoothing, loss_type: str) -> None:
    eps = _concrete(label_smoothing)
    if eps is None:
        return
    if loss_type in _SMOOTHING_CLOSED_HALF:
        if not 0.0 <= eps <= 0.5:
            raise ValueError(
                f"label_smoothing must be in [0, 0.5] for loss_type={loss_type!r}, "
                f"got {label_smoothing!r}."
            )
    elif loss_type in _SMOOTHING_OPEN_HALF:
        if not 0.0 <= eps < 0.5:
            raise ValueError(
                f"label_smoothing must be in [0, 0.5) for loss_type={loss_type!r} "
                f"(the loss divides by 1 - 2 * label_smoothing), got {label_smoothing!r}."
            )
    elif eps != 0.0:
        raise ValueError(
            f"label_smoothing must be 0 for loss_type={loss_type!r} (it is only used by "
            f"{_SMOOTHING_CLOSED_HALF + _SMOOTHING_OPEN_HALF}), got {label_smoothing!r}."
        )


def _smoothed_sigmoid_loss(z: Array, eps) -> Array:
    """-logsigmoid(z)(1 - eps) - logsigmoid(-z) eps: the (conservative) DPO / BT loss."""
    return -jax.nn.log_sigmoid(z) * (1.0 - eps) - jax.nn.log_sigmoid(-z) * eps


def _reward_metrics(chosen_rewards: Array, rejected_rewards: Array) -> Metrics:
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
    }


def dpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float | Array | None = None,
) -> tuple[Array, Metrics]:
    r"""Direct Preference Optimization and its variants (Rafailov et al. 2023, arXiv:2305.18290).

    With policy log-probs :math:`p_c, p_r` and reference log-probs :math:`r_c, r_r` (0 when
    ``reference_free`` or when both reference arrays are None):

    .. math::
       c = p_c - r_c, \quad r = p_r - r_r, \quad h = c - r, \quad \epsilon = \text{label\_smoothing}

    and the per-example loss ``l`` by ``loss_type`` (the returned loss is ``mean(l)``):

    - ``sigmoid`` (DPO; cDPO when eps > 0, Mitchell 2023) and ``sigmoid_norm`` (length-normalised,
      arXiv:2411.15124): :math:`-\log\sigma(\beta h)(1-\epsilon) - \log\sigma(-\beta h)\epsilon`
    - ``robust`` (arXiv:2403.00409):
      :math:`(-\log\sigma(\beta h)(1-\epsilon) + \log\sigma(-\beta h)\epsilon) / (1-2\epsilon)`
    - ``exo_pair`` (arXiv:2402.00856): :math:`e = \epsilon` if :math:`\epsilon > 0` else 1e-3;
      :math:`\sigma(\beta h)(\log\sigma(\beta h) - \log(1-e))
      + \sigma(-\beta h)(\log\sigma(-\beta h) - \log e)`
    - ``hinge`` (SLiC, arXiv:2305.10425): :math:`\max(0, 1 - \beta h)`
    - ``ipo`` (arXiv:2310.12036): :math:`(h - 1/(2\beta))^2`
    - ``bco_pair`` (arXiv:2404.04656): :math:`-\log\sigma(\beta c - \delta) - \log\sigma(-(\beta r -
      \delta))`, :math:`\delta` = ``bco_delta`` or ``stop_gradient(mean([beta c, beta r]))``
    - ``sppo_hard`` (arXiv:2405.00675): :math:`(c - 1/(2\beta))^2 + (r + 1/(2\beta))^2`
    - ``nca_pair`` (arXiv:2402.05369): :math:`-\log\sigma(\beta c) - \tfrac12\log\sigma(-\beta c)
      - \tfrac12\log\sigma(-\beta r)`
    - ``aot_unpaired`` / ``aot`` (arXiv:2406.05882): the sigmoid loss on
      :math:`d = \mathrm{sort}(c) - \mathrm{sort}(r)` / :math:`d = \mathrm{sort}(p_c - p_r) -
      \mathrm{sort}(r_c - r_r)` (ascending over the batch)
    - ``apo_zero`` / ``apo_down`` (arXiv:2408.06266):
      :math:`1 - \sigma(\beta c) + \sigma(\beta r)` / :math:`\sigma(\beta c) + 1 - \sigma(\beta h)`
    - ``discopop`` (arXiv:2406.08414): :math:`z = \beta h, m = \sigma(z/\tau)`;
      :math:`-\log\sigma(z)(1-m) + e^{-z} m`

    For ``ipo`` and ``sigmoid_norm`` all four log-probs are first divided by ``chosen_lengths`` /
    ``rejected_lengths`` (token counts, required).

    Args:
      chosen_logps, rejected_logps: policy sequence log-probs ``[B]``.
      ref_chosen_logps, ref_rejected_logps: reference sequence log-probs ``[B]`` or both None.
      beta: inverse temperature of the implicit reward (> 0).
      loss_type: one of :data:`DPO_LOSS_TYPES`.
      label_smoothing: assumed label-flip probability (see the ranges in Raises).
      reference_free: treat the reference log-probs as 0 (ignoring any given).
      chosen_lengths, rejected_lengths: token counts ``[B]``; required for ipo / sigmoid_norm.
      discopop_tau: temperature of the discopop mixing gate.
      bco_delta: fixed reward shift for bco_pair (default: the detached batch mean).

    Returns:
      ``(loss, metrics)`` with metrics ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/accuracies``, ``rewards/margins`` (rewards = beta * logratios, after length
      normalisation if any) and ``logps/chosen``, ``logps/rejected`` (raw policy log-probs).

    Raises:
      ValueError: unknown ``loss_type``; ``beta <= 0``; ``label_smoothing`` outside [0, 0.5] for
        sigmoid / sigmoid_norm / aot / aot_unpaired / exo_pair, outside [0, 0.5) for robust, or
        non-zero for any other type; missing lengths for ipo / sigmoid_norm; only one of the two
        reference arrays given while ``reference_free`` is False.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}.")
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing, loss_type)
    _check_positive("discopop_tau", discopop_tau)
    if loss_type in _LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type={loss_type!r} length-normalises the log-probs: chosen_lengths and "
            "rejected_lengths are required."
        )
    if not reference_free and (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps must be given together (or both None / "
            "reference_free=True to use a zero reference); got only one of them."
        )

    pc, pr = _f32(chosen_logps), _f32(rejected_logps)
    if reference_free or ref_chosen_logps is None:
        rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
    else:
        rc, rr = _f32(ref_chosen_logps), _f32(ref_rejected_logps)
    raw_pc, raw_pr = pc, pr

    if loss_type in _LENGTH_NORMALISED:
        pc, rc = _div_lengths(pc, chosen_lengths), _div_lengths(rc, chosen_lengths)
        pr, rr = _div_lengths(pr, rejected_lengths), _div_lengths(rr, rejected_lengths)

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    log_sig = jax.nn.log_sigmoid

    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = _smoothed_sigmoid_loss(beta * h, eps)
    elif loss_type == "robust":
        z = beta * h
        losses = (-log_sig(z) * (1.0 - eps) + log_sig(-z) * eps) / (1.0 - 2.0 * eps)
    elif loss_type == "exo_pair":
        # EXO needs a non-degenerate target distribution; 1e-3 is the paper's / TRL's default.
        e = jnp.where(jnp.asarray(eps) > 0, eps, 1e-3).astype(jnp.float32)
        z = beta * h
        losses = jax.nn.sigmoid(z) * (log_sig(z) - jnp.log1p(-e)) + jax.nn.sigmoid(-z) * (
            log_sig(-z) - jnp.log(e)
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    elif loss_type == "bco_pair":
        cr, rr_ = beta * chosen_logratios, beta * rejected_logratios
        if bco_delta is None:
            delta = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([cr, rr_], axis=-1)))
        else:
            delta = _f32(bco_delta)
        losses = -log_sig(cr - delta) - log_sig(-(rr_ - delta))
    elif loss_type == "sppo_hard":
        target = 1.0 / (2.0 * beta)
        losses = jnp.square(chosen_logratios - target) + jnp.square(rejected_logratios + target)
    elif loss_type == "nca_pair":
        cr, rr_ = beta * chosen_logratios, beta * rejected_logratios
        losses = -log_sig(cr) - 0.5 * log_sig(-cr) - 0.5 * log_sig(-rr_)
    elif loss_type == "aot_unpaired":
        d = jnp.sort(chosen_logratios, axis=-1) - jnp.sort(rejected_logratios, axis=-1)
        losses = _smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "aot":
        d = jnp.sort(pc - pr, axis=-1) - jnp.sort(rc - rr, axis=-1)
        losses = _smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "apo_zero":
        losses = (1.0 - jax.nn.sigmoid(beta * chosen_logratios)) + jax.nn.sigmoid(
            beta * rejected_logratios
        )
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * chosen_logratios) + (1.0 - jax.nn.sigmoid(beta * h))
    else:  # discopop
        z = beta * h
        # exp(-z) * sigmoid(z / tau) written as one exp so it cannot become inf * 0 = NaN.
        gated_exp = jnp.exp(-z + log_sig(z / discopop_tau))
        mix = jax.nn.sigmoid(z / discopop_tau)
        losses = -log_sig(z) * (1.0 - mix) + gated_exp

    metrics = _reward_metrics(beta * chosen_logratios, beta * rejected_logratios)
    metrics["logps/chosen"] = jnp.mean(jax.lax.stop_gradient(raw_pc))
    metrics["logps/rejected"] = jnp.mean(jax.lax.stop_gradient(raw_pr))
    return jnp.mean(losses), metrics


def simpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Array, Metrics]:
    r"""SimPO: reference-free, length-normalised preference loss with a target margin.

    .. math::
       \bar p = \text{logps} / \text{lengths}, \quad z = \beta(\bar p_c - \bar p_r) - \gamma, \quad
       l = -\log\sigma(z)(1-\epsilon) - \log\sigma(-z)\epsilon

    Meng, Xia & Chen 2024, arXiv:2405.14734. Metrics use the rewards ``beta * avg``.

    Raises:
      ValueError: ``beta <= 0`` or ``label_smoothing`` outside [0, 0.5].
    """
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing, "sigmoid")
    avg_c = _div_lengths(_f32(chosen_logps), chosen_lengths)
    avg_r = _div_lengths(_f32(rejected_logps), rejected_lengths)
    z = beta * (avg_c - avg_r) - gamma
    losses = _smoothed_sigmoid_loss(z, label_smoothing)
    return jnp.mean(losses), _reward_metrics(beta * avg_c, beta * avg_r)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, accurate near 0 (Maechler 2012)."""
    # Clamp just below 0 so a log-prob of exactly 0 (a certain token) gives a large finite value
    # rather than -inf, which would turn the ORPO log-odds into inf - inf = NaN.
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    r"""ORPO: SFT on the chosen response plus an odds-ratio preference term.

    .. math::
       \bar p = \text{logps}/\text{lengths}, \quad
       \log\mathrm{odds} = (\bar p_c - \bar p_r) - (\log(1 - e^{\bar p_c}) - \log(1 - e^{\bar p_r}))

    .. math::
       \mathcal L = \underbrace{-\textstyle\sum p_c / \sum \text{len}_c}_{\text{nll}}
       - \beta\, \mathrm{mean}(\log\sigma(\log\mathrm{odds}))

    Hong, Lee & Thorne 2024, arXiv:2403.07691. ``chosen_logps`` / ``rejected_logps`` are summed
    token log-probs ``[B]``; the NLL is the token-mean over all chosen tokens of the batch.

    Metrics: ``nll_loss``, ``log_odds_ratio`` (mean log-sigmoid term), ``log_odds_chosen`` (mean
    log-odds) and the ``rewards/*`` of ``beta * avg``.

    Raises:
      ValueError: ``beta < 0`` (beta is the weight of the odds-ratio term; 0 gives plain SFT).
    """
    b = _concrete(beta)
    if b is not None and not b >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}.")
    pc, pr = _f32(chosen_logps), _f32(rejected_logps)
    avg_c = _div_lengths(pc, chosen_lengths)
    avg_r = _div_lengths(pr, rejected_lengths)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    or_term = jax.nn.log_sigmoid(log_odds)

    total_len = jnp.sum(_f32(chosen_lengths))
    ok = total_len > 0
    nll = jnp.where(ok, -jnp.sum(pc) / jnp.where(ok, total_len, 1.0), 0.0)
    loss = nll - beta * jnp.mean(or_term)

    metrics = _reward_metrics(beta * avg_c, beta * avg_r)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    metrics["log_odds_ratio"] = jnp.mean(jax.lax.stop_gradient(or_term))
    metrics["log_odds_chosen"] = jnp.mean(jax.lax.stop_gradient(log_odds))
    return loss, metrics


def reward_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    *,
    margin: float | Array | None = None,
    center_rewards_coefficient: float | None = None,
    weights: Array | None = None,
) -> tuple[Array, Metrics]:
    r"""Bradley-Terry pairwise loss for training a scalar reward model.

    .. math::
       \mathcal L = \mathrm{mean}\big(-\log\sigma(r_c - r_r - m)\big)
       + \lambda\, \mathrm{mean}\big((r_c + r_r)^2\big)

    Bradley & Terry 1952; RLHF reward model of Ouyang et al. 2022 (arXiv:2203.02155); the optional
    per-pair ``margin`` m is from Llama 2 (Touvron et al. 2023, arXiv:2307.09288); the optional
    centring term with coefficient lambda follows TRL's ``center_rewards_coefficient`` (Eisenstein
    et al. 2023, arXiv:2312.09244). ``weights`` (e.g. 0 for padding comparisons) make every mean a
    weighted one, ``sum(w * x) / sum(w)``.

    Metrics: ``accuracy`` = mean(r_c > r_r), ``margin`` = mean(r_c - r_r), ``rewards/chosen``,
    ``rewards/rejected``.
    """
    rc, rr = _f32(chosen_rewards), _f32(rejected_rewards)
    m = 0.0 if margin is None else _f32(margin)
    if weights is None:
        mean = jnp.mean
    else:
        w = _f32(weights)

        def mean(x: Array) -> Array:
            return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-12)

    loss = mean(-jax.nn.log_sigmoid(rc - rr - m))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * mean(jnp.square(rc + rr))

    rc_sg, rr_sg = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    metrics = {
        "accuracy": mean((rc_sg > rr_sg).astype(jnp.float32)),
        "margin": mean(rc_sg - rr_sg),
        "rewards/chosen": mean(rc_sg),
        "rewards/rejected": mean(rr_sg),
    }
    return loss, metrics
