"""Multi-turn rollouts with tools (`jaxrlhf.train.multiturn`, `jaxrlhf.tools`): tool calls parsed,
tools that raise, hang or return garbage answered with an error message, the episode loop on a
scripted sampler, GRPO and PPO rollouts of several turns on a tiny model whose policy log-probs and
masks are recomputed with transformers in PyTorch (PPO's advantages with the numpy GAE loop on the
policy's tokens), a scripted environment trained to its optimum, CLI runs of every online method
with the calculator, and exact resume mid-run."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
import torch
from helpers.ppo import random_prompts

from jaxrlhf.generation.sampling import Generation
from jaxrlhf.tools import ToolCall, ToolEnvironment, calculator, parse_tool_calls, tool_schema
from jaxrlhf.train import multiturn
from jaxrlhf.train.multiturn import ToolTurnTemplate, episode_arrays, reprefill, run_episodes


def test_parse_tool_calls():
    text = "".join([
        'Let me compute.<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}',
        "\n</tool_call>",
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{oops}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "g", "arguments": [1]}</tool_call>',
    ])
    calls = parse_tool_calls(text)
    assert calls[0] == ToolCall("calculator", {"expression": "2+3"})
    assert calls[1] == ToolCall("f", {"x": 1})  # arguments written as a JSON string
    assert "not valid JSON" in calls[2].error and "needs" in calls[3].error
    assert "JSON object" in calls[4].error
    assert parse_tool_calls("no call here") == [] and parse_tool_calls("<tool_call>{} unfinished") == []


def test_tools_that_raise_hang_or_return_garbage_answer_with_an_error():
    def boom(x: int) -> str:
        """Fail.

        Args:
            x: anything.
        """
        raise RuntimeError("broken")

    def hang() -> str:
        """Never return."""
        time.sleep(3)  # abandoned after the time limit (a daemon thread: it cannot hold up the exit)
        return "late"

    def garbage() -> str:
        """Return a non-text value."""
        return {"not": "text"}  # type: ignore[return-value]

    env = ToolEnvironment([boom, hang, garbage, calculator], timeout=0.3)
    start = time.perf_counter()
    got = env.step([ToolCall("boom", {"x": 1}), ToolCall("hang"), ToolCall("garbage"), ToolCall("nope"),
                    ToolCall("calculator", {"expression": "(12 + 3) * 4"}), ToolCall("calculator", {"y": 1}),
                    ToolCall("", {}, "the tool call is not valid JSON")])  # fmt: skip
    assert time.perf_counter() - start < 5  # the hung call is abandoned after its time limit
    assert got[0] == "Error: boom raised RuntimeError: broken"
    assert got[1] == "Error: hang did not return within 0.3 s"
    assert got[2] == "Error: garbage returned dict, not text"
    assert got[3].startswith("Error: no tool named 'nope'")
    assert got[4] == "60"
    assert got[5].startswith("Error: bad arguments for calculator")
    assert got[6] == "Error: the tool call is not valid JSON"
    schema = tool_schema(calculator)["function"]
    assert schema["name"] == "calculator" and schema["parameters"]["required"] == ["expression"]


def test_calculator_is_arithmetic_only():
    assert calculator("7 * 8 - 6 / 3") == "54" and calculator("2 ** 10") == "1024"
    assert calculator("-3 // 2") == "-2"
    assert calculator("1 / 4") == "0.25"
    for bad in ("__import__('os').system('ls')", "x + 1", "open('f')", "2 ** 1000", "[1, 2]"):
        with pytest.raises((ValueError, SyntaxError)):
            calculator(bad)


def test_tool_turn_template_from_the_chat_template(tiny_dir):
    from jaxrlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    t = ToolTurnTemplate.of(tokenizer)
    assert (t.before, t.after) == ("\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    whole = tokenizer.apply_chat_template([*msgs, {"role": "tool", "content": "42"}], tokenize=False,
                                          add_generation_prompt=True)  # fmt: skip
    start = tokenizer.apply_chat_template(msgs, tokenize=False).rstrip()
    assert whole == start + t.before + "42" + t.after  # the template's own rendering, token for token


class FakeTokenizer:
    """Ids as text: decode writes them, a tool message is three fixed ids."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [90, 91, 92]}


class EchoEnv:
    tools = ()

    def __init__(self):
        self.calls = 0

    def reset(self, row):
        self.row = row

    def step(self, calls):
        self.calls += len(calls)
        return ["r"] * len(calls)


def scripted_rollout(episodes, eos, *, turn_tokens, max_tokens=16):
    """An engine `rollout` of up to 3 turns whose every turn is answered by `EchoEnv` (parsing is
    patched by the caller); the episodes are kept in `episodes`."""

    def rollout(engine, ids, m):
        rows = [r[k == 1].tolist() for r, k in zip(np.asarray(ids), np.asarray(m), strict=True)]

        sample = engine.turn_cache(len(rows), ids.shape[1], max_tokens=max_tokens, turn_tokens=turn_tokens)
        episodes[:] = run_episodes(sample, FakeTokenizer(), rows, [EchoEnv() for _ in rows], eos_ids=eos,
                                   max_turns=3, max_tokens=max_tokens, turn_tokens=turn_tokens,
                                   template=ToolTurnTemplate("", ""))  # fmt: skip
        arrays = episode_arrays(episodes, max_tokens, 0)
        return Generation(**{k: jax.numpy.asarray(v) for k, v in arrays.items()})

    return rollout


def test_episode_loop_on_a_scripted_sampler(monkeypatch):
    """Row 0: a call, the tool's answer, a final reply. Row 1: a reply that is cut off by the token
    budget. The sampler sees each row's prompt + completion so far, left-padded."""
    def calls(text):
        return [ToolCall("t")] if text.startswith("10") else []

    monkeypatch.setattr(multiturn, "parse_tool_calls", calls)
    script = {0: [[10, 11, 1], [20, 21, 22, 23]], 1: [[30, 31, 32, 33]]}
    seen = []

    def sample(ids, mask, n):
        seen.append([row[m == 1].tolist() for row, m in zip(ids, mask, strict=True)])
        turn = len(seen) - 1
        tokens = np.zeros((2, n), np.int32)
        cmask = np.zeros((2, n), np.int32)
        for i in (0, 1):
            if turn < len(script[i]):
                out = script[i][turn][:n]
                tokens[i, : len(out)], cmask[i, : len(out)] = out, 1
        lp = -cmask.astype(np.float32) * 0.5
        return Generation(tokens, cmask, lp, -lp)

    envs = [EchoEnv(), EchoEnv()]
    episodes = run_episodes(reprefill(sample, 0), FakeTokenizer(), [[5, 6], [7]], envs, eos_ids=[1],
                            max_turns=3, max_tokens=9, turn_tokens=4,
                            template=ToolTurnTemplate("", ""))  # fmt: skip
    assert seen[0] == [[5, 6], [7]] and seen[1][0] == [5, 6, 10, 11, 1, 90, 91, 92]
    e0, e1 = episodes
    assert e0.tokens == [10, 11, 1, 90, 91, 92, 20, 21, 22]  # the reply cut to the 9-token budget
    assert e0.policy == [1, 1, 1, 0, 0, 0, 1, 1, 1] and e0.turns == 2 and e0.tool_calls == 1
    assert [m["role"] for m in e0.messages] == ["assistant", "tool", "assistant"]
    assert e1.tokens == [30, 31, 32, 33] and e1.turns == 1 and envs[1].calls == 0
    arrays = episode_arrays(episodes, 10, pad_id=0)
    assert arrays["completion_mask"][0].tolist() == [1] * 9 + [0]
    assert arrays["policy_mask"][0].tolist() == e0.policy + [0]
    assert arrays["logprobs"][0].tolist() == [-0.5] * 3 + [0.0] * 3 + [-0.5] * 3 + [0.0]


def test_multi_turn_grpo_rollout_against_pytorch(hf_checkpoint, monkeypatch):
    """A GRPO step whose rollout has several turns (every turn ends at one of many "EOS" ids and is
    answered by a tool message): the sampler's log-prob of each policy token equals transformers'
    log-softmax(logits / T) over the whole row, tool tokens included as context; only the policy's
    tokens are in the loss mask; the rescored old log-probs equal the sampler's."""
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.config import GRPOConfig
    from jaxrlhf.train.grpo import GRPOEngine
    from jaxrlhf.train.step import make_optimizer, make_schedule

    hf, path = hf_checkpoint("llama")
    eos = list(range(1, 30))  # turns end soon
    cfg = GRPOConfig(num_generations=2, max_completion_length=16, temperature=0.8, rescore_policy=True)
    mesh = make_mesh(devices=jax.devices()[:1])
    engine = GRPOEngine(from_pretrained(path, mesh=mesh), cfg, make_optimizer(make_schedule(0.0, 10)), mesh,
                        eos_token_ids=eos, pad_token_id=0, num_reward_funcs=1)  # fmt: skip
    monkeypatch.setattr(multiturn, "parse_tool_calls", lambda text: [ToolCall("t")] if text else [])
    prompts, mask = random_prompts(n=3, length=5, seed=1)
    episodes = []

    engine.rollout = scripted_rollout(episodes, eos, turn_tokens=5)
    metrics = engine.step(prompts, mask, lambda ids, m: np.zeros((len(ids), 1)), ["zero"])
    assert np.isfinite(metrics["loss"])
    assert any(e.turns >= 2 for e in episodes)
    r = {k: np.asarray(v) for k, v in engine.last_rollout.flat().items() if v is not None}
    policy = episode_arrays(episodes, 16, 0)["policy_mask"]
    np.testing.assert_array_equal(r["loss_mask"], policy)  # tool tokens: context, never trained
    for i, e in enumerate(episodes):
        ids = torch.tensor([prompts[i // 2].tolist() + e.tokens])
        with torch.no_grad():
            logits = hf(ids).logits[0].double() / cfg.temperature
        logp = torch.log_softmax(logits, -1)
        p = prompts.shape[1]
        want = np.array([float(logp[p + t - 1, tok]) for t, tok in enumerate(e.tokens)])
        k = np.array(e.policy, bool)
        np.testing.assert_allclose(np.array(e.logprobs)[k], want[k], atol=2e-4)
        np.testing.assert_allclose(r["old_logprobs"][i, : len(e.tokens)][k], want[k], atol=2e-4)


TOOL_RUNS = {  # kind: (config, that kind's section and completion budget key, extra overrides)
    "grpo": ("grpo_demo.yaml", "grpo", "max_completion_length", ["grpo.num_generations=2"]),
    "rloo": ("grpo_demo.yaml", "grpo", "max_completion_length", ["kind=rloo", "grpo.num_generations=2"]),
    "online_dpo": ("online_dpo_demo.yaml", "online_dpo", "max_new_tokens", []),
    "ppo": ("ppo_tasks.yaml", "ppo", "response_length", [
        "ppo.reward_model=null", "ppo.reward_fn=jaxrlhf.rewards:accuracy_reward", "ppo.critic_init=policy",
        "ppo.missing_eos_score=null", "data.eval_files=[]", "data.eval_fraction=0.05", "data.buckets=null",
        "train.eval_every=1",
    ]),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(TOOL_RUNS))
def test_cli_run_with_tools(tiny_dir, tmp_path, kind):
    """Every online method with `tools` end to end: the calculator's environment per completion,
    episodes of up to two turns, rewards on the conversations (PPO's `reward_fn` gets the rows'
    `family` / `answer` columns by name), the tool metrics logged; PPO's held-out evaluation runs
    episodes too."""
    import json
    import os

    from helpers.runs import GRPO_DATA

    from jaxrlhf.train import load_config, train

    config, s, budget, extra = TOOL_RUNS[kind]
    out = str(tmp_path / "run")
    overrides = [
        f"model.path={tiny_dir}", f"train.output_dir={out}", "train.max_steps=2", "train.save_every=0",
        "train.batch_size=2", "train.tensorboard=false", "train.export=false", "task_eval.enabled=false",
        f"data.train_files={GRPO_DATA}/test.jsonl", f"{s}.{budget}=12", f"{s}.max_turn_tokens=6",
        f"{s}.max_turns=2", f"{s}.tools=[jaxrlhf.tools:calculator]", *extra,
    ]  # fmt: skip
    if kind != "ppo":
        overrides.append("train.eval_every=0")
    result = train(load_config(os.path.join("configs", config), overrides))
    assert result.steps == 2
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    trained = [r for r in rows if r["split"] == "train"]
    assert len(trained) == 2 and all(1 <= r["tools/turns_per_episode"] <= 2 for r in trained)
    assert all(np.isfinite(r["loss" if kind != "ppo" else "loss/policy_avg"]) for r in trained)
    if kind == "ppo":  # held out before, at every step, after: episodes too
        held_out = [r for r in rows if r["split"] == "eval"]
        assert len(held_out) >= 3 and all(1 <= r["tools/turns_per_episode"] <= 2 for r in held_out)


def test_tool_settings_are_checked_together():
    from jaxrlhf.train.algorithms.grpo import GRPOConfig
    from jaxrlhf.train.config import ConfigError

    assert GRPOConfig(max_turns=3, tools=["jaxrlhf.tools:calculator"]).max_turns == 3
    for bad in ({"tools": ["jaxrlhf.tools:calculator"]}, {"max_turns": 2},
                {"max_turns": 2, "tools": ["a:b"], "environment": "c:d"}):  # fmt: skip
        with pytest.raises(ConfigError, match="grpo"):
            GRPOConfig(**bad)


def test_multi_turn_grpo_learns_a_scripted_environment(hf_checkpoint, monkeypatch):
    """A scripted environment with a known optimum: every turn is answered by the tool (its tokens
    are context, not trained), and the reward is the share of the policy's own tokens below 48 (1 at
    the optimum). Stated: 8 prompts x 4 episodes of up to 3 turns, lr 1e-3, 25 iterations: the mean
    reward of the last 5 is >= 0.15 above the first 5 (measured: 0.55 -> 0.84, 2.3 turns per episode)."""
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.config import GRPOConfig
    from jaxrlhf.train.grpo import GRPOEngine
    from jaxrlhf.train.step import make_optimizer, make_schedule

    _, path = hf_checkpoint("llama")
    eos = list(range(1, 12))
    cfg = GRPOConfig(num_generations=4, max_completion_length=16, num_iterations=2, num_mini_batches=2)
    mesh = make_mesh(devices=jax.devices()[:1])
    engine = GRPOEngine(from_pretrained(path, mesh=mesh), cfg, make_optimizer(make_schedule(1e-3, 100)), mesh,
                        eos_token_ids=eos, pad_token_id=0, num_reward_funcs=1)  # fmt: skip
    monkeypatch.setattr(multiturn, "parse_tool_calls", lambda text: [ToolCall("t")] if text else [])
    episodes = []

    def low_policy_tokens(ids, mask):
        return np.array([[np.mean([t < 48 for t, p in zip(e.tokens, e.policy, strict=True) if p] or [0.0])]
                         for e in episodes])  # fmt: skip

    engine.rollout = scripted_rollout(episodes, eos, turn_tokens=6)
    prompts, mask = random_prompts(n=8)
    history = [engine.step(prompts, mask, low_policy_tokens, ["low"]) for _ in range(25)]
    rewards = [h["reward"] for h in history]
    assert np.mean(rewards[-5:]) >= np.mean(rewards[:5]) + 0.15, rewards
    assert np.mean([e.turns for e in episodes]) > 1.2  # the episodes really had several turns


def test_multi_turn_ppo_masks_logprobs_and_gae_against_pytorch(hf_checkpoint, monkeypatch):
    """A PPO step on a rollout of several turns: the trained mask is the policy's tokens only; the
    sampler's and the reference's log-probs of those tokens equal transformers' log-softmax over the
    whole row (tool tokens as context); the KL and the rewards are 0 on tool tokens, the score sits
    on the last policy token (the final EOS); and the advantages equal the plain GAE loop (numpy) on
    each row's policy tokens taken out as one sequence, before whitening."""
    from helpers import numpy_reference as ref

    from jaxrlhf.losses import masked_whiten
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.config import PPOConfig
    from jaxrlhf.train.ppo import PPOEngine
    from jaxrlhf.train.step import make_optimizer, make_schedule

    hf, path = hf_checkpoint("llama")
    eos = list(range(1, 30))
    cfg = PPOConfig(response_length=16, temperature=0.8, kl_coef=0.1, missing_eos_penalty=None,
                    num_ppo_epochs=1, gamma=0.99, lam=0.9, rescore_policy=True)  # fmt: skip
    mesh = make_mesh(devices=jax.devices()[:1])
    policy = from_pretrained(path, mesh=mesh)
    critic = from_pretrained(path, head="score", init_score_head=True, mesh=mesh)
    engine = PPOEngine(policy, critic, None, cfg, make_optimizer(make_schedule(0.0, 10)), mesh,
                       eos_token_ids=eos, pad_token_id=0)  # fmt: skip
    monkeypatch.setattr(multiturn, "parse_tool_calls", lambda text: [ToolCall("t")] if text else [])
    prompts, mask = random_prompts(n=4, length=5, seed=2)
    episodes = []
    engine.rollout = scripted_rollout(episodes, eos, turn_tokens=5)
    metrics = engine.step(prompts, mask, lambda ids, m: np.linspace(-1, 1, len(ids)))
    assert np.isfinite(metrics["loss/policy_avg"]) and any(e.turns >= 2 for e in episodes)
    r = jax.tree.map(np.asarray, engine.last_rollout)
    policy_mask = episode_arrays(episodes, 16, 0)["policy_mask"]
    np.testing.assert_array_equal(r.response_mask, policy_mask)
    assert np.all(r.kl[policy_mask == 0] == 0) and np.all(r.advantages[policy_mask == 0] == 0)
    p = prompts.shape[1]
    raw = np.zeros_like(r.advantages, np.float64)
    for i, e in enumerate(episodes):
        with torch.no_grad():
            logits = hf(torch.tensor([prompts[i].tolist() + e.tokens])).logits[0].double() / cfg.temperature
        logp = torch.log_softmax(logits, -1)
        want = np.array([float(logp[p + t - 1, tok]) for t, tok in enumerate(e.tokens)])
        k = np.array(e.policy, bool)
        np.testing.assert_allclose(np.array(e.logprobs)[k], want[k], atol=2e-4)  # the sampler's
        np.testing.assert_allclose(r.logprobs[i, : len(k)][k], want[k], atol=2e-4)  # rescored
        np.testing.assert_allclose(r.ref_logprobs[i, : len(k)][k], want[k], atol=2e-4)  # reference = policy
        last = np.flatnonzero(policy_mask[i])[-1]
        assert r.rewards[i, last] == pytest.approx(r.scores[i] - cfg.kl_coef * r.kl[i, last], abs=1e-5)
        m = policy_mask[i] == 1
        adv, _ = ref.gae(r.rewards[i, m][None], r.values[i, m][None], np.ones((1, m.sum())), gamma=0.99,
                         lam=0.9)  # fmt: skip
        raw[i, m] = adv[0]
    whitened = np.asarray(masked_whiten(jax.numpy.asarray(raw, jax.numpy.float32), policy_mask))
    np.testing.assert_allclose(r.advantages, whitened, atol=1e-4)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_tool_runs_resume_exactly_mid_run(tiny_dir, tmp_path, kind):
    """A multi-turn run (every turn answered by `helpers.tool_envs:EveryTurnIsACall`) killed after
    its step-2 checkpoint and resumed logs what the run that went straight through logged: the
    losses, the rewards and the tool metrics (turns per episode) of every step. The CLI runs in a
    subprocess where every 4th token id counts as an EOS, so that the tiny random model ends turns."""
    import json
    import os
    import subprocess
    import sys

    from helpers.runs import GRPO_DATA

    script = ("import sys; from jaxrlhf.train.algorithms.base import Context; "
              "Context.eos_ids = property(lambda self: list(range(0, len(self.tokenizer), 4))); "
              "from jaxrlhf.cli import main; sys.exit(main(['train', *sys.argv[1:]]))")  # fmt: skip

    def run_cli(argv, env=None):
        return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                              timeout=600, env={**os.environ, **(env or {})})  # fmt: skip

    config, s, budget, extra = TOOL_RUNS[kind]

    def args(out: str) -> list[str]:
        return ["--config", os.path.join("configs", config), kind, f"model.path={tiny_dir}",
                f"train.output_dir={out}", "train.max_steps=3", "train.save_every=2", "train.batch_size=2",
                "train.tensorboard=false",
                "train.export=false", "task_eval.enabled=false", f"data.train_files={GRPO_DATA}/test.jsonl",
                f"{s}.{budget}=64", f"{s}.max_turn_tokens=4", f"{s}.max_turns=3", "optim.learning_rate=1e-3",
                f"{s}.environment=helpers.tool_envs:EveryTurnIsACall", "train.eval_every=0",
                *[e for e in extra if not e.startswith("train.eval_every")]]  # fmt: skip

    def train_rows(out: str) -> dict[int, dict[str, float]]:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]

        def timing(k: str) -> bool:
            return k in ("time", "step_seconds", "mfu") or k.startswith(("time/", "perf/")) or "second" in k

        return {r["step"]: {k: v for k, v in r.items() if not timing(k)}
                for r in rows if r["split"] == "train"}  # fmt: skip

    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    proc = run_cli(args(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_cli(args(crashed), env={"JAXRLHF_CRASH_AFTER_STEP": "2"}).returncode == 17
    proc = run_cli(args(crashed))
    assert proc.returncode == 0 and "resumed from step 2" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    want, got = train_rows(straight), train_rows(crashed)
    assert sorted(got) == [1, 2, 3] and max(r["tools/turns_per_episode"] for r in want.values()) > 1.5
    for step in (1, 2, 3):
        assert set(got[step]) == set(want[step])
        for k, v in want[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
