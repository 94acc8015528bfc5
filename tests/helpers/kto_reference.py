"""Plain numpy (float64) reference implementation of the KTO loss and its data plumbing.

Written from the KTO paper (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7) and TRL's semantics
(``KTOTrainer._compute_loss``, ``add_kl_completion_ids`` and ``trl.data_utils.unpair_preference_dataset``),
independently of jaxrlhf's implementation. Everything is loop-based where that makes the formula
obvious and computed in float64; inputs are converted with ``np.asarray(x, np.float64)`` so callers
can pass the exact float32 arrays the JAX functions receive.

Per row i with logratio r_i = policy_logps[i] - reference_logps[i]:

* ``loss_type="kto"``: z0 = max(mean_i(kl_policy_logps[i] - kl_reference_logps[i]), 0);
  desirable rows lose ``desirable_weight * (1 - sigmoid(beta * (r_i - z0)))``, undesirable rows lose
  ``undesirable_weight * (1 - sigmoid(beta * (z0 - r_i)))``.
* ``loss_type="apo_zero_unpaired"``: no KL term (z0 = 0); desirable rows lose
  ``desirable_weight * (1 - sigmoid(beta * r_i))``, undesirable rows
  ``undesirable_weight * sigmoid(beta * r_i)``.

The loss is the mean of the per-row losses over all B rows (TRL: ``losses.nanmean()`` of the
concatenated, weighted chosen and rejected losses). Metrics use TRL's names; where TRL would not log a
metric (a class absent from the batch) this reference reports 0.0 instead.
"""

import math
from typing import Any

import numpy as np

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
UNPAIR_BATCH_SIZE = 1000  # datasets.Dataset.map(batched=True) default batch_size, used by TRL's unpairing


def f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def sigmoid(x: float) -> float:
    """Numerically careful logistic function: only ever exponentiates -|x|."""
    x = float(x)
    e = math.exp(-abs(x))
    if x >= 0:
        return 1.0 / (1.0 + e)
    return e / (1.0 + e)


def kto_loss_reference(
    policy_logps: Any,
    reference_logps: Any,
    labels: Any,
    kl_policy_logps: Any,
    kl_reference_logps: Any,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[float, dict[str, float]]:
    """KTO loss (mean over all rows) and TRL-named metrics, in float64.

    ``labels`` is truthy for desirable (chosen) rows. ``kl_*_logps`` are the sequence log-probs of the
    mismatched (prompt, completion) pairs; they are ignored for ``apo_zero_unpaired``.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    pol = f64(policy_logps)
    ref = f64(reference_logps)
    lab = [bool(v) for v in np.asarray(labels).reshape(-1).tolist()]
    n = len(lab)
    if pol.shape != (n,) or ref.shape != (n,):
        raise ValueError(f"policy/reference logps must have shape ({n},), got {pol.shape} and {ref.shape}")
    if n == 0:
        raise ValueError("empty batch")
    beta = float(beta)

    if loss_type == "kto":
        kl_pol = f64(kl_policy_logps)
        kl_ref = f64(kl_reference_logps)
        if kl_pol.shape != (n,) or kl_ref.shape != (n,):
            raise ValueError(f"KL logps must have shape ({n},), got {kl_pol.shape} and {kl_ref.shape}")
        kl_sum = 0.0
        for i in range(n):
            kl_sum += float(kl_pol[i]) - float(kl_ref[i])
        z0 = max(kl_sum / n, 0.0)
    else:
        z0 = 0.0

    losses: list[float] = []
    chosen_rewards: list[float] = []
    rejected_rewards: list[float] = []
    chosen_logps: list[float] = []
    rejected_logps: list[float] = []
    for i in range(n):
        r = float(pol[i]) - float(ref[i])
        if lab[i]:
            if loss_type == "kto":
                loss_i = desirable_weight * (1.0 - sigmoid(beta * (r - z0)))
            else:
                loss_i = desirable_weight * (1.0 - sigmoid(beta * r))
            chosen_rewards.append(beta * r)
            chosen_logps.append(float(pol[i]))
        else:
            if loss_type == "kto":
                loss_i = undesirable_weight * (1.0 - sigmoid(beta * (z0 - r)))
            else:
                loss_i = undesirable_weight * sigmoid(beta * r)
            rejected_rewards.append(beta * r)
            rejected_logps.append(float(pol[i]))
        losses.append(float(loss_i))

    def _mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    loss = sum(losses) / n
    metrics = {
        "kl": float(z0),
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "logps/chosen": _mean(chosen_logps),
        "logps/rejected": _mean(rejected_logps),
        "count/chosen": float(len(chosen_rewards)),
        "count/rejected": float(len(rejected_rewards)),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return float(loss), metrics


def make_unpaired_from_pairs(
    prompts: list[Any], chosen: list[Any], rejected: list[Any], *, batch_size: int = UNPAIR_BATCH_SIZE
) -> list[dict]:
    """Unpair preference rows exactly as TRL's ``unpair_preference_dataset`` orders them.

    TRL maps ``_unpair_row`` with ``batched=True`` (datasets' default batch_size 1000), and each batch
    becomes ``chosen_0..chosen_{k-1}`` (label True) followed by ``rejected_0..rejected_{k-1}`` (label False),
    each with its own prompt. So for up to 1000 pairs: all chosen rows first, then all rejected rows.
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError("prompts, chosen and rejected must have the same length")
    rows: list[dict] = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        for i in range(start, stop):
            rows.append({"prompt": prompts[i], "completion": chosen[i], "label": True})
        for i in range(start, stop):
            rows.append({"prompt": prompts[i], "completion": rejected[i], "label": False})
    return rows


def kl_mismatch_indices(n: int) -> list[int]:
    """Index of the completion TRL pairs with row i's prompt for the KL estimate.

    TRL: ``KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]`` within a batch, so row i gets
    completion i-1 and row 0 gets the last one.
    """
    return [(i - 1) % n for i in range(n)]
