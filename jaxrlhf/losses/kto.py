"""KTO: Kahneman-Tversky Optimization, an unpaired (binary-feedback) alignment loss.

Ethayarajh, Xu, Muennighoff, Jurafsky & Kiela 2024, arXiv:2402.01306, computed as TRL's
``KTOTrainer._compute_loss`` does (``trl/trainer/kto_trainer.py``; hyper-parameters of
``KTOConfig``: ``loss_type``, ``beta``, ``desirable_weight``, ``undesirable_weight``).

Inputs are per-row values ``[B]``: each row is one (prompt, completion) example with a binary label
(desirable / undesirable) rather than a chosen/rejected pair. The batch is the last axis, so
``jax.vmap`` over extra leading axes works as expected. Returns ``(loss, metrics)`` like the losses
of :mod:`jaxrlhf.losses.preference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.losses.token import _concrete

Array = jax.Array
Metrics = dict[str, Array]

__all__ = ["KTO_LOSS_TYPES", "KTO_REDUCTIONS", "kto_loss"]

# Every loss_type accepted by kto_loss (TRL's KTOConfig.loss_type choices), with its paper.
KTO_LOSS_TYPES: tuple[str, ...] = (
    "kto",  # Ethayarajh et al. 2024, arXiv:2402.01306, Eqn (7)
    "apo_zero_unpaired",  # unpaired APO-zero, D'Oosterlinck et al. 2024, arXiv:2408.06266
)
KTO_REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def kto_loss(
    policy_logps_B: Array,
    reference_logps_B: Array,
    labels_B: Array,
    kl_policy_logps_B: Array | None,
    kl_reference_logps_B: Array | None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    mask_B: Array | None = None,
    reduction: str = "mean",
) -> tuple[Array, Metrics]:
    r"""The KTO loss (Ethayarajh et al. 2024, arXiv:2402.01306), exactly as TRL computes it.

    For each real row i (``mask_B[i] != 0``; all rows when ``mask_B`` is None) with policy and
    reference completion log-probs :math:`p_i, r_i`, implied reward :math:`\rho_i = p_i - r_i` and
    label :math:`y_i` (desirable when ``labels_B[i]`` is 1 / True):

    .. math::
       z_0 = \mathrm{sg}\Big(\max\big(0,\ \tfrac{1}{n}\textstyle\sum_{i\ \mathrm{real}}
             (p^{KL}_i - r^{KL}_i)\big)\Big)

    .. math::
       l_i = \begin{cases}
             \lambda_D\,\big(1 - \sigma(\beta(\rho_i - z_0))\big) & y_i \text{ desirable} \\
             \lambda_U\,\big(1 - \sigma(\beta(z_0 - \rho_i))\big) & y_i \text{ undesirable}
             \end{cases}
       \qquad \mathcal L = \frac{1}{n}\sum_{i\ \mathrm{real}} l_i

    where sg is ``stop_gradient``, n the number of real rows, :math:`\lambda_D, \lambda_U` =
    ``desirable_weight``, ``undesirable_weight``, and :math:`p^{KL}_i, r^{KL}_i` the policy and
    reference log-probs of the mismatched pair (prompt i, the completion of another row) that TRL
    builds to estimate the KL reference point :math:`z_0` (``KL_logps`` / ``ref_KL_logps``).

    ``loss_type="apo_zero_unpaired"`` (unpaired APO-zero, D'Oosterlinck et al. 2024,
    arXiv:2408.06266) has no reference point (:math:`z_0` reported as 0; the ``kl_*`` inputs are
    ignored and may be None): desirable :math:`1 - \sigma(\beta\rho_i)`, undesirable
    :math:`\sigma(\beta\rho_i)`, weighted and averaged as above.

    Mapping to TRL: ``policy_logps_B`` / ``reference_logps_B`` are TRL's ``completion_logps`` /
    ``ref_completion_logps`` (split there into ``chosen_logps`` / ``rejected_logps`` by label),
    ``kl_policy_logps_B`` / ``kl_reference_logps_B`` are ``KL_logps`` / ``ref_KL_logps``, ``z0`` is
    ``kl``, and the loss is TRL's ``losses.nanmean()`` over the concatenated weighted chosen and
    rejected losses, i.e. the mean over all real rows. TRL's ``kl`` is a mean over the micro-batch
    (and over data-parallel ranks) taken at each ``_compute_loss`` call; so here is z0: the mean over
    the real rows of the arrays given. Empty classes and an all-padding batch give 0, never NaN.

    Gradient accumulation: with ``reduction="mean"`` (default) the loss is the mean over the real
    rows of *this* call. ``reduction="sum"`` returns :math:`\sum_i l_i` instead, so a caller that
    accumulates micro-batches can sum those and divide by the total number of real rows itself
    (``count/chosen + count/rejected`` summed over the micro-batches); the per-class metrics can be
    re-averaged across micro-batches with ``count/chosen`` / ``count/rejected`` as weights.

    Args:
      policy_logps_B: summed completion log-probs of the policy ``[B]``.
      reference_logps_B: the same under the reference model ``[B]``.
      labels_B: 1 / True for a desirable row, 0 / False for an undesirable one ``[B]``.
      kl_policy_logps_B, kl_reference_logps_B: policy / reference summed log-probs of the
        mismatched (prompt, other completion) pairs ``[B]``; required for ``loss_type="kto"``.
      beta: inverse temperature of the implied reward (> 0).
      desirable_weight, undesirable_weight: weights of the desirable / undesirable losses (>= 0).
      loss_type: one of :data:`KTO_LOSS_TYPES`.
      mask_B: optional 1 (real row) / 0 (padding row) ``[B]``; padding rows count nowhere: not in
        the loss, the KL estimate nor the metrics (their values may be anything, even NaN).
      reduction: ``"mean"`` (over real rows, TRL's value) or ``"sum"`` (see above).

    Returns:
      ``(loss, metrics)``: a scalar in float32 (float64 for float64 inputs under x64) and these
      stop-gradient scalars, named as TRL logs them:

      - ``kl``: the reference point z0 (0 for ``apo_zero_unpaired``);
      - ``rewards/chosen`` / ``rewards/rejected``: mean of ``beta * (p - r)`` over the real
        desirable / undesirable rows (0 when the class is empty);
      - ``rewards/margins``: ``rewards/chosen - rewards/rejected``;
      - ``logps/chosen`` / ``logps/rejected``: mean policy log-prob per class (0 when empty);
      - ``count/chosen`` / ``count/rejected``: number of real desirable / undesirable rows.

    Raises:
      ValueError: unknown ``loss_type`` or ``reduction``; ``beta <= 0``; a negative weight;
        missing ``kl_*`` inputs for ``loss_type="kto"``; inputs of different shapes.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}.")
    if reduction not in KTO_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KTO_REDUCTIONS}, got {reduction!r}.")
    b = _concrete(beta)
    if b is not None and not b > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}.")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        v = _concrete(w)
        if v is not None and not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {w!r}.")
    use_kl = loss_type == "kto"
    if use_kl and (kl_policy_logps_B is None or kl_reference_logps_B is None):
        raise ValueError(
            "loss_type='kto' estimates the KL reference point: kl_policy_logps_B and "
            "kl_reference_logps_B are required."
        )

    arrays = {
        "policy_logps_B": policy_logps_B,
        "reference_logps_B": reference_logps_B,
        "labels_B": labels_B,
    }
    if use_kl:
        arrays.update(kl_policy_logps_B=kl_policy_logps_B, kl_reference_logps_B=kl_reference_logps_B)
    if mask_B is not None:
        arrays["mask_B"] = mask_B
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    shape = arrays["policy_logps_B"].shape
    for k, v in arrays.items():
        if v.shape != shape:
            raise ValueError(f"{k} has shape {v.shape}, expected {shape} (that of policy_logps_B).")
    if len(shape) < 1:
        raise ValueError("kto_loss expects inputs with a batch axis [B], got scalars.")

    # float32 at least (bfloat16 inputs are upcast); float64 inputs stay float64 under x64.
    dtype = jnp.promote_types(jnp.result_type(*(arrays[k] for k in arrays if "logps" in k)), jnp.float32)
    real_B = jnp.ones(shape, bool) if mask_B is None else arrays["mask_B"] != 0
    desirable_B = (arrays["labels_B"] != 0) & real_B
    undesirable_B = (arrays["labels_B"] == 0) & real_B

    def real_values(name: str) -> Array:
        # where, not a multiplication by the mask, so NaN/inf padding cannot reach value or gradient.
        return jnp.where(real_B, arrays[name].astype(dtype), 0.0)

    def mean_over(x: Array, rows: Array) -> tuple[Array, Array]:
        count = jnp.sum(rows.astype(dtype), axis=-1)
        total = jnp.sum(jnp.where(rows, x, 0.0), axis=-1)
        nonempty = count > 0
        return jnp.where(nonempty, total / jnp.where(nonempty, count, 1.0), 0.0), count

    logratio_B = real_values("policy_logps_B") - real_values("reference_logps_B")

    if use_kl:
        kl_B = real_values("kl_policy_logps_B") - real_values("kl_reference_logps_B")
        kl_mean, _ = mean_over(kl_B, real_B)
        z0 = jax.lax.stop_gradient(jnp.maximum(kl_mean, 0.0))
        desirable_losses_B = 1.0 - jax.nn.sigmoid(beta * (logratio_B - z0[..., None]))
        undesirable_losses_B = 1.0 - jax.nn.sigmoid(beta * (z0[..., None] - logratio_B))
    else:
        z0 = jnp.zeros(shape[:-1], dtype)
        desirable_losses_B = 1.0 - jax.nn.sigmoid(beta * logratio_B)
        undesirable_losses_B = jax.nn.sigmoid(beta * logratio_B)

    losses_B = jnp.where(
        desirable_B,
        desirable_weight * desirable_losses_B,
        jnp.where(undesirable_B, undesirable_weight * undesirable_losses_B, 0.0),
    )
    if reduction == "sum":
        loss = jnp.sum(losses_B, axis=-1)
    else:
        loss, _ = mean_over(losses_B, real_B)

    rewards_B = jax.lax.stop_gradient(beta * logratio_B)
    policy_B = jax.lax.stop_gradient(real_values("policy_logps_B"))
    rewards_chosen, count_chosen = mean_over(rewards_B, desirable_B)
    rewards_rejected, count_rejected = mean_over(rewards_B, undesirable_B)
    logps_chosen, _ = mean_over(policy_B, desirable_B)
    logps_rejected, _ = mean_over(policy_B, undesirable_B)
    metrics = {
        "kl": z0,
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": rewards_chosen - rewards_rejected,
        "logps/chosen": logps_chosen,
        "logps/rejected": logps_rejected,
        "count/chosen": count_chosen,
        "count/rejected": count_rejected,
    }
    return loss.astype(dtype), metrics
