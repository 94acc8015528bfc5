"""Pure-JAX losses for aligning language models (SFT, reward models, DPO-style, PPO, GRPO / RLOO).

Every function is a small pure ``jax.numpy`` function, safe under ``jit`` / ``grad`` / ``vmap``,
computing in float32. Losses return ``(loss, metrics)``. See ``docs/losses.md`` for the formulas
and papers.
"""

from jaxrlhf.losses.grpo import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    group_advantages,
    grpo_loss,
)
from jaxrlhf.losses.kto import KTO_LOSS_TYPES, KTO_REDUCTIONS, kto_loss
from jaxrlhf.losses.ppo import (
    KL_KINDS,
    gae,
    kl_penalty,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from jaxrlhf.losses.preference import (
    DPO_LOSS_TYPES,
    dpo_loss,
    orpo_loss,
    reward_loss,
    simpo_loss,
)
from jaxrlhf.losses.token import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    token_logprobs,
    token_logprobs_from_hidden,
)

__all__ = [
    # token.py
    "token_logprobs",
    "entropy_from_logits",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_logprobs_from_hidden",
    "sequence_logprobs",
    # preference.py
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "simpo_loss",
    "orpo_loss",
    "reward_loss",
    # kto.py
    "KTO_LOSS_TYPES",
    "KTO_REDUCTIONS",
    "kto_loss",
    # ppo.py
    "KL_KINDS",
    "kl_penalty",
    "per_token_rewards",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    # grpo.py
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_SCALES",
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "group_advantages",
    "grpo_loss",
]
