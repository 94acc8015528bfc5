"""The KV cache carried across the turns of a multi-turn rollout (`jaxrlhf.generation.turns`):

* greedy episodes with tool messages of different lengths per row are the same token for token, with
  the same log-probs, whether the cache is carried, rebuilt every turn (a cache too small to carry),
  or every turn's context is re-prefilled with the single-turn sampler; on a plain model, a
  sliding-window one and one with scanned layers;
* each policy token's log-prob equals transformers' log-softmax over the whole row (PyTorch, fp32);
* a second rollout of the same shapes compiles nothing new: turns move a traced write slot.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxrlhf.generation import generate
from jaxrlhf.generation import turns as turns_module
from jaxrlhf.generation.turns import TurnCache
from jaxrlhf.models import from_pretrained
from jaxrlhf.tools import ToolCall
from jaxrlhf.train import multiturn
from jaxrlhf.train.multiturn import ToolTurnTemplate, reprefill, run_episodes

EOS = list(range(1, 24))  # turns end after a few tokens, at different lengths per row
PROMPTS = [[5, 40, 41], [6, 50, 51, 52, 53, 54, 55], [7, 60], [8, 70, 71, 72, 73]]


class LengthTokenizer:
    """A tool message of k characters is k + 1 ids: rows get tool messages of different lengths."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [30 + (i % 40) for i in range(len(text) + 1)]}


class RowEnv:
    tools = ()

    def reset(self, row):
        self.k = row["k"]

    def step(self, calls):
        self.k = (self.k * 3 + 1) % 11
        return ["x" * self.k for _ in calls]


def episodes_of(sample, *, max_tokens=28, turn_tokens=6):
    envs = []
    for k in range(len(PROMPTS)):
        env = RowEnv()
        env.reset({"k": k + 2})
        envs.append(env)
    return run_episodes(sample, LengthTokenizer(), PROMPTS, envs, eos_ids=EOS, max_turns=4,
                        max_tokens=max_tokens, turn_tokens=turn_tokens, template=ToolTurnTemplate("", ""))


@pytest.mark.parametrize("kind,scan", [("llama", False), ("mistral", False), ("llama", True)])
def test_carried_cache_equals_rebuilt_and_reprefilled_and_pytorch(hf_checkpoint, monkeypatch, kind, scan):
    monkeypatch.setattr(multiturn, "parse_tool_calls", lambda text: [ToolCall("t")])
    hf, path = hf_checkpoint(kind)
    model = from_pretrained(path, scan_layers=scan)
    width = max(map(len, PROMPTS))
    kw = {"eos_ids": EOS, "pad_id": 0, "temperature": 0.0}
    carried = TurnCache.of_model(model, len(PROMPTS), width, max_tokens=28, turn_tokens=6, **kw)
    a = episodes_of(carried)
    tight = TurnCache.of_model(model, len(PROMPTS), width, max_tokens=28, turn_tokens=6, **kw)
    tight.length = 64 + 6  # a rebuild (of a context of at most 64 tokens) and one turn: nothing more
    b = episodes_of(tight)

    def single_turn(ids, mask, n):
        return generate(model, ids, mask, max_new_tokens=n, eos_token_ids=EOS, pad_token_id=0,
                        temperature=0.0)

    c = episodes_of(reprefill(single_turn, 0))
    assert carried.rebuilds == 0 and tight.rebuilds >= 2
    assert carried.segment_tokens < tight.segment_tokens  # carried: only the new tokens are prefilled
    assert max(e.turns for e in a) >= 3 and len({len(e.tokens) for e in a}) > 1
    for x, y, z in zip(a, b, c, strict=True):
        assert x.tokens == y.tokens == z.tokens and x.policy == y.policy == z.policy
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
        np.testing.assert_allclose(x.logprobs, z.logprobs, atol=1e-5)
    for prompt, e in zip(PROMPTS, a, strict=True):  # the whole row in one PyTorch forward
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([prompt + e.tokens])).logits[0].double(), -1)
        want = np.array([float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(e.tokens)])
        k = np.array(e.policy, bool)
        np.testing.assert_allclose(np.array(e.logprobs)[k], want[k], atol=2e-4)


def test_turns_compile_once_per_shape(hf_checkpoint, monkeypatch):
    """The write slot is traced: a second rollout (other tool-message lengths, other turns) of the
    same batch, turn budget and segment widths compiles nothing new."""
    monkeypatch.setattr(multiturn, "parse_tool_calls", lambda text: [ToolCall("t")])
    model = from_pretrained(hf_checkpoint("llama")[1])
    kw = {"eos_ids": EOS, "pad_id": 0, "temperature": 0.0}
    before = turns_module._extend._cache_size()  # (other tests' shapes too)
    first = episodes_of(TurnCache.of_model(model, len(PROMPTS), 8, max_tokens=28, turn_tokens=6, **kw))
    compiled = turns_module._extend._cache_size()
    monkeypatch.setattr(RowEnv, "step", lambda self, calls: ["xy" for _ in calls])
    second = episodes_of(TurnCache.of_model(model, len(PROMPTS), 8, max_tokens=28, turn_tokens=6, **kw))
    assert [e.tokens for e in first] != [e.tokens for e in second]
    # at most one per width: the prompts' (64), tool segments of 8 and 16
    assert turns_module._extend._cache_size() == compiled <= before + 3
