"""Held-out evaluation: task accuracy (answer checkers for the shipped task families, greedy replies)
and the reward-KL point of a policy (sampled continuations scored by reward functions, sequence KL to
the reference)."""

from jaxrlhf.evaluation.checkers import CHECKERS, check, count_items, list_items, numbers_in, task_reward
from jaxrlhf.evaluation.reward_kl import (
    RewardKLResult,
    evaluate_reward_kl,
    format_reward_kl,
    response_kl,
    response_logprobs,
)
from jaxrlhf.evaluation.tasks import (
    SCHEMA,
    TaskEvalResult,
    TaskPrompt,
    evaluate_tasks,
    format_samples,
    format_task_report,
    generate_greedy,
    has_task_columns,
    load_task_prompts,
    write_task_eval,
)

__all__ = [
    "CHECKERS",
    "RewardKLResult",
    "SCHEMA",
    "TaskEvalResult",
    "TaskPrompt",
    "check",
    "count_items",
    "evaluate_reward_kl",
    "evaluate_tasks",
    "format_reward_kl",
    "format_samples",
    "format_task_report",
    "generate_greedy",
    "has_task_columns",
    "list_items",
    "load_task_prompts",
    "numbers_in",
    "response_kl",
    "response_logprobs",
    "task_reward",
    "write_task_eval",
]
