"""Multi-turn rollouts with tools (`max_turns > 1` in the grpo, ppo or online_dpo section): the
policy writes a turn, its tool calls are run by the episode's environment, the results are appended
as a tool message, and the policy goes on, until a turn without a call, `max_turns` turns, or the
completion budget.

Layout: everything after the prompt is the "completion" of the engine's `[B, N]` arrays (N = the
completion budget): the policy's turns and, between them, the tool messages with the
template's tokens around them. `completion_mask` is 1 on all of it (the context every later token
was sampled in), `policy_mask` only on the policy's own tokens, which alone enter the loss, the KL and
the token counts of the loss's normalisation. The sampler's log-probs of a policy token are those of
the whole context before it, so they equal what a forward pass over the full row recomputes.

Samplers: `run_episodes` asks a sampler for the next turn of every active row, given each row's
context (prompt + completion so far). The default, `jaxrlhf.generation.turns.TurnCache`, carries
the KV cache across turns and prefills only what it has not seen (the tool message); `reprefill`
re-prefills every context, left-padded to a bucketed width, with the single-turn sampler (one
forward over the context per turn). Both give the same episodes; docs/tools.md has their cost
against single-turn generation.

Tool messages: the tokens between an assistant turn's EOS and the next assistant turn are the chat
template's own rendering of a tool message (`ToolTurnTemplate`, read once from the template with a
placeholder result); several calls of one turn answer in one tool message, one line each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxrlhf.data import bucket_length, left_pad
from jaxrlhf.data.preference import trim_after_eos
from jaxrlhf.parallel import host_array
from jaxrlhf.tools import Environment, parse_tool_calls

MARK = "@@TOOL_RESULT@@"


@dataclasses.dataclass(frozen=True)
class ToolTurnTemplate:
    """The text the chat template writes from an assistant turn's end (its EOS) to the next
    assistant turn's first token, around a tool message's content: `before + result + after`."""

    before: str
    after: str

    @classmethod
    def of(cls, tokenizer: Any, **template_kwargs: Any) -> ToolTurnTemplate:
        msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        render = tokenizer.apply_chat_template
        base = render(msgs, tokenize=False, **template_kwargs)
        full = render([*msgs, {"role": "tool", "content": MARK}], tokenize=False, add_generation_prompt=True,
                      **template_kwargs)  # fmt: skip
        eos = tokenizer.eos_token or ""
        end = trim_after_eos(base, eos)
        if not (eos and end.endswith(eos) and full.startswith(end) and full.count(MARK) == 1):
            raise ValueError(
                "the chat template does not render a tool message after an assistant turn that ends "
                "with EOS: multi-turn tool use needs a template with a tool role"
            )
        before, after = full[len(end) :].split(MARK)
        return cls(before, after)

    def token_ids(self, tokenizer: Any, content: str) -> list[int]:
        return list(tokenizer(self.before + content + self.after, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass
class Episode:
    """One completion's multi-turn trajectory (host side)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    policy: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    entropy: list[float] = dataclasses.field(default_factory=list)
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    active: bool = True

    def add(self, ids: Sequence[int], policy: bool, logprobs: Sequence[float] = (),
            entropy: Sequence[float] = ()) -> None:  # fmt: skip
        self.tokens += list(ids)
        self.policy += [int(policy)] * len(ids)
        self.logprobs += list(logprobs) if policy else [0.0] * len(ids)
        self.entropy += list(entropy) if policy else [0.0] * len(ids)


# (contexts, active, max_new_tokens) -> Generation: the next turn of each active row given its context
Sample = Callable[[list[list[int]], list[bool], int], Any]


def reprefill(generate: Callable[[np.ndarray, np.ndarray, int], Any], pad_id: int,
              buckets: Sequence[int] | None = None) -> Sample:  # fmt: skip
    """A `Sample` that re-prefills every row's whole context each turn with `generate(ids, mask,
    max_new_tokens)` (the single-turn sampler), left-padded to a bucketed width."""

    def sample(contexts: list[list[int]], active: list[bool], n: int) -> Any:
        width = bucket_length(max(map(len, contexts)), buckets)
        ids, mask = left_pad(contexts, pad_id, width=width)
        return generate(ids, mask, n)

    return sample


def run_episodes(
    sample: Sample, tokenizer: Any, prompts: Sequence[Sequence[int]], environments: Sequence[Environment],
    *, eos_ids: Sequence[int], max_turns: int, max_tokens: int, turn_tokens: int, template: ToolTurnTemplate,
) -> list[Episode]:  # fmt: skip
    """Roll out one episode per prompt (each with its own, already reset, environment): `sample`
    writes the turns (`TurnCache`, or `reprefill` of a single-turn sampler)."""
    eos = set(int(e) for e in eos_ids)
    episodes = [Episode() for _ in prompts]
    for turn in range(max_turns):
        if not any(e.active for e in episodes):
            break
        contexts = [list(p) + e.tokens for p, e in zip(prompts, episodes, strict=True)]
        gen = sample(contexts, [e.active for e in episodes], turn_tokens)
        tokens, cmask = host_array(gen.tokens), host_array(gen.completion_mask)
        logps, ents = host_array(gen.logprobs), host_array(gen.entropy)
        for i, (episode, env) in enumerate(zip(episodes, environments, strict=True)):
            if not episode.active:
                continue
            n = min(int(cmask[i].sum()), max_tokens - len(episode.tokens))
            new = tokens[i, :n].tolist()
            episode.add(new, True, logps[i, :n].tolist(), ents[i, :n].tolist())
            episode.turns += 1
            text = tokenizer.decode(new, skip_special_tokens=True)
            episode.messages.append({"role": "assistant", "content": text})
            parse = getattr(env, "parse_calls", None) or parse_tool_calls  # its own format, or Hermes
            calls = parse(text) if new and new[-1] in eos else []
            if not calls or turn == max_turns - 1:
                episode.active = False  # a final answer, a cut-off turn, or no turns left
                continue
            results = env.step(calls)
            episode.tool_calls += len(calls)
            episode.tool_errors += sum(r.startswith("Error:") for r in results)
            content = "\n".join(results)
            episode.messages.append({"role": "tool", "content": content})
            tool_ids = template.token_ids(tokenizer, content)
            room = max_tokens - len(episode.tokens)
            episode.add(tool_ids[:room], False)
            if len(tool_ids) >= room:  # no room left for a reply
                episode.active = False
    return episodes


def episode_arrays(episodes: Sequence[Episode], n: int, pad_id: int) -> dict[str, np.ndarray]:
    """`[B, n]` arrays of the episodes: tokens (pad after the end), completion_mask, policy_mask,
    logprobs and entropy (0 off the policy's tokens)."""
    b = len(episodes)
    out = {"tokens": np.full((b, n), pad_id, np.int32), "completion_mask": np.zeros((b, n), np.int32),
           "policy_mask": np.zeros((b, n), np.int32), "logprobs": np.zeros((b, n), np.float32),
           "entropy": np.zeros((b, n), np.float32)}  # fmt: skip
    for i, e in enumerate(episodes):
        k = len(e.tokens)
        out["tokens"][i, :k], out["completion_mask"][i, :k] = e.tokens, 1
        out["policy_mask"][i, :k] = e.policy
        out["logprobs"][i, :k], out["entropy"][i, :k] = e.logprobs, e.entropy
    return out


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    n = max(len(episodes), 1)
    calls = sum(e.tool_calls for e in episodes)
    return {
        "tools/turns_per_episode": sum(e.turns for e in episodes) / n,
        "tools/calls_per_episode": calls / n,
        "tools/episodes_with_calls": sum(e.tool_calls > 0 for e in episodes) / n,
        "tools/error_rate": sum(e.tool_errors for e in episodes) / max(calls, 1),
    }


def reset_environments(
    factory: Callable[[], Environment], rows: Sequence[Mapping[str, Any]]
) -> list[Environment]:
    """One environment per completion, reset with its prompt row's columns."""
    envs = []
    for row in rows:
        env = factory()
        env.reset(row)
        envs.append(env)
    return envs
