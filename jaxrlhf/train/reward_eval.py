"""The runner's reward-KL evaluation (section `reward_eval`): the held-out prompts, the reward
functions and the reference model, loaded once; each evaluation writes
`<output_dir>/reward_eval/<stage>.json` and returns flat metrics (`reward_eval/reward`,
`reward_eval/kl`, ...) for metrics.jsonl (split "eval") and summary.json.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import jax

from jaxrlhf.data import DataError
from jaxrlhf.evaluation import RewardKLResult, evaluate_reward_kl
from jaxrlhf.train.common import import_function
from jaxrlhf.train.online import load_prompt_rows
from jaxrlhf.train.pipeline import resolve_data_files

if TYPE_CHECKING:
    from jaxrlhf.train.algorithms.base import Context

SCHEMA = "jaxrlhf.reward_eval/1"


class RewardEvaluator:
    """Built from the run's `Context` when `reward_eval.reward_funcs` is set."""

    def __init__(self, ctx: Context):
        cfg, r = ctx.cfg, ctx.cfg.reward_eval
        self.cfg, self.ctx = cfg, ctx
        files = resolve_data_files(r.prompt_files or cfg.data.eval_files or [])
        if not files:
            raise DataError("reward_eval needs held-out prompts: give reward_eval.prompt_files or "
                            "data.eval_files", field="eval_files")  # fmt: skip
        rows = load_prompt_rows(files, ctx.tokenizer, max_prompt_length=cfg.data.max_prompt_length)
        seen: set[bytes] = set()
        self.prompts, self.columns = [], []
        for ids, columns in rows:  # a preference file repeats a prompt once per pair
            if ids.tobytes() not in seen:
                seen.add(ids.tobytes())
                self.prompts.append(ids)
                self.columns.append(columns)
        if r.num_prompts is not None:
            self.prompts, self.columns = self.prompts[: r.num_prompts], self.columns[: r.num_prompts]
        self.funcs = [(spec.partition(":")[2] or spec, import_function(spec, "reward_eval.reward_funcs"))
                      for spec in r.reward_funcs]  # fmt: skip
        self.reference = ctx.load_frozen(r.reference or cfg.model.path, head="lm")
        self.results: dict[str, RewardKLResult] = {}

    def __call__(self, policy: Any, stage: str) -> RewardKLResult:
        r = self.cfg.reward_eval
        result = evaluate_reward_kl(
            policy, self.reference, self.ctx.tokenizer, self.prompts, self.columns, self.funcs,
            weights=r.reward_weights, samples_per_prompt=r.samples_per_prompt,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature, batch_size=r.batch_size, seed=r.seed, num_shown=r.num_shown,
            mesh=self.ctx.mesh,
        )  # fmt: skip
        self.results[stage] = result
        if jax.process_index() == 0:
            path = os.path.join(self.cfg.train.output_dir, "reward_eval", f"{stage}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            report = {"schema": SCHEMA, "stage": stage, "model": self.cfg.model.path,
                      "reference": r.reference or self.cfg.model.path, "reward_funcs": r.reward_funcs,
                      "prompts": len(self.prompts), "samples_per_prompt": r.samples_per_prompt,
                      "max_new_tokens": r.max_new_tokens, **result.summary(), "shown": result.shown,
                      "rows": result.rows}  # fmt: skip
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1, ensure_ascii=False)
            os.replace(tmp, path)
        return result
