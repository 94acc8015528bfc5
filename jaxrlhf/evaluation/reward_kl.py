"""Held-out reward and KL: where a policy stands on the reward-KL plane (Rafailov et al. 2023,
arXiv:2305.18290, Figure 2 left).

`evaluate_reward_kl` samples `samples_per_prompt` continuations of each held-out prompt from the
policy (temperature T, a fixed seed, so two evaluations of one policy see the same random numbers),
scores them with reward functions (TRL's signature, e.g. `jaxrlhf.rewards:vader_sentiment`) and
estimates the sequence KL to the reference on the same samples:

    KL(pi || pi_ref) ~= mean_i sum_t [log pi_T(y_it | x_i, y_i<t) - log pi_ref,T(y_it | x_i, y_i<t)]

with `pi_T = softmax(logits / T)` for both models (`response_kl`), which is unbiased for the KL of
the sampled distributions because y_i ~ pi_T. Both log-probs come from the same full forward (not the
sampler's cached values), so a policy equal to the reference gives exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.data import left_pad
from jaxrlhf.evaluation.tasks import _place
from jaxrlhf.generation import generate
from jaxrlhf.models.decoder import default_positions
from jaxrlhf.models.trunk import shared_trunk
from jaxrlhf.parallel import host_array

RewardFunc = Callable[..., Sequence[float | None]]


@functools.partial(jax.jit, static_argnames=("graphdefs", "prompt_len", "temperature", "shared"))
def _response_logprobs(graphdefs, states, ids, mask, *, prompt_len: int, temperature: float, shared: bool):
    """Each model's `[B, N]` completion log-probs; with `shared`, one trunk for all of them."""
    models = [nnx.merge(g, s) for g, s in zip(graphdefs, states, strict=True)]
    positions = default_positions(mask, *mask.shape)
    trunk = models[0].trunk_states(ids, mask, positions) if shared else None
    out = []
    for model in models:
        hidden = model.hidden_states(ids, mask, positions, trunk=trunk)[:, prompt_len - 1 : -1]
        out.append(model.token_logprobs(hidden, ids[:, prompt_len:], temperature=temperature))
    return out


def _completion_logprobs(
    models: Sequence[Any], prompt_ids: Any, prompt_mask: Any, tokens: Any, completion_mask: Any,
    temperature: float, shared: bool = False,
) -> list[jax.Array]:  # fmt: skip
    ids = jnp.concatenate([jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(tokens, jnp.int32)], axis=1)
    cmask = jnp.asarray(completion_mask, jnp.int32)
    mask = jnp.concatenate([jnp.asarray(prompt_mask, jnp.int32), cmask], axis=1)
    graphdefs, states = zip(*(nnx.split(m) for m in models), strict=True)
    logps = _response_logprobs(graphdefs, states, ids, mask, prompt_len=int(prompt_ids.shape[1]),
                               temperature=float(temperature), shared=shared)  # fmt: skip
    return [jnp.where(cmask == 1, x, 0.0) for x in logps]


def response_logprobs(
    model: Any, prompt_ids: Any, prompt_mask: Any, tokens: Any, completion_mask: Any, *,
    temperature: float = 1.0,
) -> jax.Array:  # fmt: skip
    """`[B, N]` log-probs of the completion tokens under `softmax(logits / temperature)` of `model`,
    given left-padded prompts `[B, P]`; 0 where `completion_mask` is 0."""
    return _completion_logprobs([model], prompt_ids, prompt_mask, tokens, completion_mask, temperature)[0]


def response_kl(
    policy: Any, reference: Any, prompt_ids: Any, prompt_mask: Any, tokens: Any, completion_mask: Any,
    *, temperature: float = 1.0, shared: bool | None = None,
) -> np.ndarray:  # fmt: skip
    """Per row `[B]`: the summed log-ratio `sum_t log pi_T(y_t) - log pi_ref,T(y_t)` over the
    completion tokens (the k1 estimate of the sequence KL when the rows were sampled from pi_T).
    A policy trained above the reference's frozen layers (`model.frozen_layers`) shares its trunk:
    computed once (`jaxrlhf.models.shared_trunk`; `shared`: that check's answer when the caller has it)."""
    args = (prompt_ids, prompt_mask, tokens, completion_mask)
    if shared is None:
        shared = shared_trunk(policy, reference)
    policy_BxN, reference_BxN = _completion_logprobs([policy, reference], *args, temperature, shared)
    return host_array(jnp.sum(policy_BxN - reference_BxN, axis=1)).astype(np.float64)


@dataclasses.dataclass
class RewardKLResult:
    reward: float  # mean weighted reward over all samples
    kl: float  # mean sequence KL to the reference
    reward_sem: float  # standard errors of the two means (over prompts, samples averaged within)
    kl_sem: float
    by_function: dict[str, float]  # mean of each reward function (None values left out)
    length: float  # mean completion tokens
    eos_fraction: float  # fraction of completions that ended with EOS
    samples: int
    temperature: float
    shown: list[dict[str, Any]]  # the first sample of the first `num_shown` prompts
    rows: list[dict[str, Any]] = dataclasses.field(repr=False)  # every sample

    def summary(self, prefix: str = "reward_eval") -> dict[str, float]:
        """Flat metrics for metrics.jsonl and summary.json."""
        out = {f"{prefix}/reward": self.reward, f"{prefix}/kl": self.kl,
               f"{prefix}/reward_sem": self.reward_sem, f"{prefix}/kl_sem": self.kl_sem,
               f"{prefix}/length": self.length, f"{prefix}/eos_fraction": self.eos_fraction}  # fmt: skip
        out.update({f"{prefix}/{name}": v for name, v in self.by_function.items()})
        return out


def _sem(per_prompt: np.ndarray) -> float:
    return float(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))) if len(per_prompt) > 1 else 0.0


def evaluate_reward_kl(
    policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[np.ndarray],
    columns: Sequence[dict[str, Any]], funcs: Sequence[tuple[str, RewardFunc]], *,
    weights: Sequence[float] | None = None, samples_per_prompt: int = 2, max_new_tokens: int = 24,
    temperature: float = 1.0, batch_size: int = 64, seed: int = 0, num_shown: int = 4, mesh: Any = None,
) -> RewardKLResult:  # fmt: skip
    """Sample, score and measure KL as the module docstring says. `prompts`: token ids (rendered as
    in training); `columns`: each prompt row's other columns, passed to the reward functions. Every
    batch is padded to `batch_size` rows and the prompt width to a multiple of 16 (one compilation)."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    weights = list(weights) if weights is not None else [1.0] * len(funcs)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    width = -(-max(len(p) for p in prompts) // 16) * 16
    order = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    batch_size = min(batch_size, len(order))
    rows: list[dict[str, Any]] = []
    shared = shared_trunk(policy, reference)  # compares the frozen weights: once, not per batch
    for b, start in enumerate(range(0, len(order), batch_size)):
        index = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in index], tokenizer.pad_token_id, width=width,
                             batch_size=batch_size)  # fmt: skip
        ids, mask = _place(ids, mesh), _place(mask, mesh)
        gen = generate(policy, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                       pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                       rng=jax.random.fold_in(jax.random.key(seed), b))  # fmt: skip
        kl = response_kl(policy, reference, ids, mask, gen.tokens, gen.completion_mask,
                         temperature=temperature, shared=shared)  # fmt: skip
        tokens, cmask = host_array(gen.tokens), host_array(gen.completion_mask)
        n = len(index)
        prompt_text = tokenizer.batch_decode(host_array(ids)[:n], skip_special_tokens=True)
        completion_ids = [row[m == 1].tolist() for row, m in zip(tokens[:n], cmask[:n], strict=True)]
        completions = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        cols = {k: [columns[i].get(k) for i in index] for k in sorted({k for i in index for k in columns[i]})}
        scores = np.full((n, len(funcs)), np.nan)
        for j, (name, fn) in enumerate(funcs):
            values = fn(prompts=prompt_text, completions=completions, completion_ids=completion_ids, **cols)
            if len(values) != n:
                raise ValueError(f"reward function {name}: {len(values)} values for {n} completions")
            scores[:, j] = [np.nan if v is None else float(v) for v in values]
        for k, i in enumerate(index):
            ended = bool(eos) and len(completion_ids[k]) > 0 and completion_ids[k][-1] in eos
            rows.append({"prompt_index": i, "prompt": prompt_text[k], "completion": completions[k],
                         "reward": float(np.nansum(scores[k] * np.asarray(weights))),
                         "rewards": dict(zip([f for f, _ in funcs], scores[k].tolist(), strict=True)),
                         "kl": float(kl[k]), "length": len(completion_ids[k]), "eos": ended})  # fmt: skip
    reward_PxS = np.array([r["reward"] for r in rows]).reshape(len(prompts), samples_per_prompt)
    kl_PxS = np.array([r["kl"] for r in rows]).reshape(len(prompts), samples_per_prompt)
    by_function = {}
    for name, _ in funcs:
        values = np.array([r["rewards"][name] for r in rows])
        by_function[name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    shown = [rows[i * samples_per_prompt] for i in range(min(num_shown, len(prompts)))]
    return RewardKLResult(
        reward=float(reward_PxS.mean()), kl=float(kl_PxS.mean()), reward_sem=_sem(reward_PxS.mean(axis=1)),
        kl_sem=_sem(kl_PxS.mean(axis=1)), by_function=by_function,
        length=float(np.mean([r["length"] for r in rows])),
        eos_fraction=float(np.mean([r["eos"] for r in rows])),
        samples=len(rows), temperature=temperature, shown=shown, rows=rows,
    )  # fmt: skip


def format_reward_kl(before: RewardKLResult | None, after: RewardKLResult) -> str:
    """A before / after table of the held-out reward and KL, then the fixed samples of both."""
    lines = [f"{'held-out':<12}{'reward':>18}{'KL to reference':>22}"]
    for name, r in (("before", before), ("after", after)):
        if r is not None:
            lines.append(f"{name:<12}{r.reward:>+11.3f} ± {r.reward_sem:.3f}{r.kl:>15.2f} ± {r.kl_sem:.2f}")
    for i, a in enumerate(after.shown):
        lines.append(f"\nprompt: {a['prompt']}")
        if before is not None and i < len(before.shown):
            b = before.shown[i]
            lines.append(f"  before ({b['reward']:+.2f}): {b['completion']!r}")
        lines.append(f"  after  ({a['reward']:+.2f}): {a['completion']!r}")
    return "\n".join(lines)
