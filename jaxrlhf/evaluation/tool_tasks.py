"""Task accuracy with tools: greedy multi-turn episodes (`jaxrlhf.train.multiturn.run_episodes`) on
held-out task prompts, each episode's last assistant message judged by its family's checker, as
`evaluate_tasks` judges a single reply. Also counts how often the policy called a tool and how many
turns it took, and keeps every conversation (docs/tools.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jaxrlhf.evaluation.checkers import check
from jaxrlhf.evaluation.tasks import TaskPrompt
from jaxrlhf.generation.turns import TurnCache
from jaxrlhf.tools import Environment
from jaxrlhf.train.multiturn import ToolTurnTemplate, episode_metrics, reset_environments, run_episodes


def evaluate_with_tools(
    model: Any, tokenizer: Any, prompts: Sequence[TaskPrompt], environment: Callable[[], Environment], *,
    eos_ids: Sequence[int], pad_id: int, max_turns: int = 2, turn_tokens: int = 32, max_tokens: int = 96,
    batch_size: int = 32,
) -> dict[str, Any]:  # fmt: skip
    """Accuracy overall and by family, the tool metrics, and every episode's messages."""
    template = ToolTurnTemplate.of(tokenizer)
    episodes, rows = [], []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        real = len(batch)
        batch += [batch[-1]] * (batch_size - real)  # one shape: no recompilation for the last batch
        envs = reset_environments(environment, [{"family": p.family, "answer": p.answer} for p in batch])
        width = max(len(p.ids) for p in batch)
        sample = TurnCache.of_model(model, batch_size, width, max_tokens=max_tokens, turn_tokens=turn_tokens,
                                    eos_ids=eos_ids, pad_id=pad_id, temperature=0.0)  # fmt: skip
        done = run_episodes(sample, tokenizer, [p.ids.tolist() for p in batch], envs, eos_ids=eos_ids,
                            max_turns=max_turns, max_tokens=max_tokens,
                            turn_tokens=turn_tokens, template=template)  # fmt: skip
        episodes += done[:real]
        rows += batch[:real]
    correct = [check(p.family, e.messages[-1]["content"] if e.messages else "", p.answer)
               for p, e in zip(rows, episodes, strict=True)]  # fmt: skip
    families = sorted({p.family for p in rows})
    by_family = {f: sum(c for c, p in zip(correct, rows, strict=True) if p.family == f)
                 / sum(p.family == f for p in rows) for f in families}  # fmt: skip
    return {
        "accuracy": sum(correct) / max(len(correct), 1), "by_family": by_family, **episode_metrics(episodes),
        "episodes": [{"prompt": p.prompt, "answer": p.answer, "correct": c, "messages": e.messages}
                     for p, e, c in zip(rows, episodes, correct, strict=True)],
    }  # fmt: skip
