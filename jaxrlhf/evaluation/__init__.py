"""Task accuracy: answer checkers for the shipped task families, and greedy held-out evaluation."""

from jaxrlhf.evaluation.checkers import CHECKERS, check, count_items, list_items, numbers_in, task_reward
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
    "SCHEMA",
    "TaskEvalResult",
    "TaskPrompt",
    "check",
    "count_items",
    "evaluate_tasks",
    "format_samples",
    "format_task_report",
    "generate_greedy",
    "has_task_columns",
    "list_items",
    "load_task_prompts",
    "numbers_in",
    "task_reward",
    "write_task_eval",
]
