"""What the online methods share (PPO, GRPO / RLOO, online DPO): the prompts of the data files (with
the rows' other columns, which reward functions receive), prompt batches, decoded rollouts, and
`EngineLearner` -- an engine as the runner (`train/run.py`) drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import BatchIterator, DataError, bucket_length, check_roles, left_pad, load_rows
from jaxrlhf.data.preference import template_kwargs as row_template_kwargs
from jaxrlhf.data.preference import to_chatml
from jaxrlhf.train.algorithms.base import Context, Learner

Print = Callable[[str], None]


def load_prompt_rows(
    files: list[str], tokenizer: Any, *, max_prompt_length: int, template_kwargs: dict[str, Any] | None = None
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Token ids of every row's `prompt` (conversations get the chat template and a generation
    prompt, with `template_kwargs` and the row's own `tools` / `chat_template_kwargs`), truncated
    from the left to `max_prompt_length`, each with the row's other columns. Bad rows raise
    `DataError` naming the file, row and field."""
    out: list[tuple[np.ndarray, dict[str, Any]]] = []
    extra = template_kwargs
    for file in files:
        rows = load_rows(file)
        for i in range(len(rows)):
            row = to_chatml(rows[i])
            prompt = row.get("prompt")
            if isinstance(prompt, list):
                try:
                    check_roles(prompt, tokenizer, "prompt")
                    kwargs = {**(extra or {}), **row_template_kwargs(row)}
                    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                         **kwargs)  # fmt: skip
                except DataError as e:
                    raise e.located(*rows.locate(i)) from None
                except Exception as e:  # malformed messages
                    error = DataError(f"cannot render the conversation ({e})", field="prompt")
                    raise error.located(*rows.locate(i)) from e
            elif isinstance(prompt, str) and prompt.strip():
                text = prompt
            else:
                got = "missing" if prompt is None else f"a {type(prompt).__name__}"
                error = DataError(f"expected a non-empty string or a list of messages, got {got}",
                                  field="prompt")  # fmt: skip
                raise error.located(*rows.locate(i))
            # a rendered conversation holds its special tokens; text gets the tokenizer's own (TRL's rule)
            special = not isinstance(prompt, list)
            ids = np.asarray(tokenizer(text, add_special_tokens=special)["input_ids"], np.int32)
            out.append((ids[-max_prompt_length:], {k: v for k, v in row.items() if k != "prompt"}))
    return out


def load_prompts(files: list[str], tokenizer: Any, *, max_prompt_length: int) -> list[np.ndarray]:
    """The token ids of `load_prompt_rows`, without the other columns."""
    return [ids for ids, _ in load_prompt_rows(files, tokenizer, max_prompt_length=max_prompt_length)]


def decode_rollout(ids: np.ndarray, response_mask: np.ndarray, tokenizer: Any) -> tuple[list[str], list[str]]:
    """Prompt and completion texts of a rollout (`ids` [B, P+N], `response_mask` [B, N]), without
    special tokens."""
    n = response_mask.shape[1]
    prompts = tokenizer.batch_decode(ids[:, :-n], skip_special_tokens=True)
    completions = [
        tokenizer.decode(row[m == 1], skip_special_tokens=True)
        for row, m in zip(ids[:, -n:], response_mask, strict=True)
    ]
    return prompts, completions


def prompt_batches(
    prompts: list[np.ndarray], pad_id: int, buckets: Any, batch_size: int, *, seed: int = 0,
    train: bool = True,
) -> BatchIterator:  # fmt: skip
    """This host's share of global prompt batches: `prompt_ids` / `prompt_mask` left-padded to the
    bucketed width of the longest prompt in the global batch, and `index` (the prompts' positions in
    `prompts`, -1 on padding rows). `train`: shuffled, endless, whole batches; else one pass in order,
    the last batch padded."""

    def collate(items: list[tuple[int, np.ndarray]], *, batch_size: int, min_length: int) -> dict[str, Any]:
        rows = [ids for _, ids in items]
        width = bucket_length(max([min_length, *(len(r) for r in rows)]), buckets)
        ids, mask = left_pad(rows, pad_id, width=width, batch_size=batch_size)
        index = np.full((batch_size,), -1, np.int32)
        index[: len(items)] = [i for i, _ in items]
        return {"prompt_ids": ids, "prompt_mask": mask, "index": index}

    order = dict(seed=seed, drop_last=True) if train else dict(shuffle=False, drop_last=False, num_epochs=1)
    return BatchIterator(
        list(enumerate(prompts)), collate, global_batch_size=batch_size, length_fn=lambda it: len(it[1]),
        shard_index=jax.process_index(), num_shards=jax.process_count(), **order,
    )  # fmt: skip


class EngineLearner(Learner):
    """An online engine (a `RolloutEngine`: `state`, `policy_model()`, `last_rollout`) as the
    runner drives it: `step` runs one engine iteration on a global prompt batch."""

    def __init__(self, ctx: Context, engine: Any, batches: BatchIterator, total_steps: int):
        self.ctx, self.engine, self.batches, self.total_steps = ctx, engine, batches, total_steps

    @property
    def state(self) -> Any:
        return self.engine.state

    @state.setter
    def state(self, value: Any) -> None:
        self.engine.state = value

    def policy_model(self) -> Any:
        return self.engine.policy_model()

    def show_samples(self, step: int, say: Print) -> None:
        """A few prompts and completions of the last rollout, with their rewards."""
        rows, rewards, mask = self.last_samples()
        prompts, completions = decode_rollout(rows, mask, self.ctx.tokenizer)
        say(f"step {step} samples ({self.reward_name} | prompt end | completion):")
        for i in self.shown_rows(len(completions)):
            say(f"  {rewards[i]:+.2f} | ...{prompts[i].strip()[-60:]!r} | {completions[i]!r}")

    def completion_table(self, rows: int | None) -> tuple[list[str], list[list[Any]]]:
        ids, rewards, mask = self.last_samples()
        n = len(ids) if rows is None else min(rows, len(ids))
        prompts, completions = decode_rollout(ids[:n], mask[:n], self.ctx.tokenizer)
        return ["prompt", "completion", self.reward_name], [
            [p, c, float(r)] for p, c, r in zip(prompts, completions, rewards[:n], strict=True)
        ]

    reward_name = "reward"

    def last_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, rewards, completion mask) of the last rollout, on every process (a collective)."""
        raise NotImplementedError

    def shown_rows(self, n: int) -> range:
        return range(min(3, n))
