"""Online DPO (`kind: online_dpo`): the engine raises a closed-form reward on a tiny model, one
rollout's pair loss is recomputed in numpy from the rollout, and `jaxrlhf train online_dpo` trains,
logs TRL's metric names, resumes exactly and exports."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.numpy_reference import logsigmoid
from helpers.ppo import EOS, PAD, low_token_fraction, random_prompts
from helpers.runs import logged_losses, run_cli

from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
from jaxrlhf.train.algorithms.online_dpo import OnlineDPOConfig, OnlineDPOEngine
from jaxrlhf.train.rollout import response_logprobs
from jaxrlhf.train.step import make_optimizer, make_schedule

GRPO_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "grpo_demo")


def _engine(path, cfg, *, lr):
    mesh = make_mesh(devices=jax.devices()[:1])
    optimizer = make_optimizer(make_schedule(lr, 100, kind="constant"))
    return OnlineDPOEngine(from_pretrained(path, mesh=mesh), cfg, optimizer, mesh, eos_token_ids=[EOS],
                           pad_token_id=PAD, num_reward_funcs=1)  # fmt: skip


def low_tokens(ids, mask):  # one reward column
    return low_token_fraction(ids, mask)[:, None]


def test_online_dpo_raises_a_closed_form_reward(tiny_llama):
    """Stated: 8 prompts x 2 samples, 8-token completions, lr 3e-3, beta 0.1: within 30 steps the
    mean reward of the last 5 is >= 0.15 above the first 5."""
    engine = _engine(tiny_llama, OnlineDPOConfig(max_new_tokens=8, temperature=1.0, beta=0.1), lr=3e-3)
    prompts, mask = random_prompts(n=8)
    history = [engine.step(prompts, mask, low_tokens, ["low"]) for _ in range(30)]
    scores = [m["objective/scores"] for m in history]
    first, last = np.mean(scores[:5]), np.mean(scores[-5:])
    assert last >= first + 0.15, (first, last)
    assert history[-1]["rewards/accuracies"] > 0.5 and history[-1]["objective/kl"] > 0
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected", "objective/scores_margin", "objective/entropy", "val/contain_eos_token",
                "beta", "objective/non_score_reward", "objective/rlhf_reward"):  # fmt: skip
        assert np.isfinite(history[-1][key]), key


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_rollout_recomputed_in_numpy(tiny_llama, loss_type):
    """lr 0 and a perturbed reference: the logged loss is numpy's DPO loss on the rollout's pairs,
    chosen = the higher reward after the missing-EOS penalty (the first on a tie), with the log-probs
    of the raw logits (no temperature), summed over each completion's tokens."""
    cfg = OnlineDPOConfig(max_new_tokens=6, temperature=0.9, beta=0.2, loss_type=loss_type,
                          missing_eos_penalty=0.5)  # fmt: skip
    engine = _engine(tiny_llama, cfg, lr=0.0)
    leaves, treedef = jax.tree.flatten(engine.ref_params)  # the reference: a perturbed copy
    noise = [0.02 * jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, x in enumerate(leaves)]
    engine.ref_params = jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise, strict=True)])
    prompts, mask = random_prompts(n=6, seed=4)
    metrics = engine.step(prompts, mask, low_tokens, ["low"])
    r = {k: None if v is None else np.asarray(v) for k, v in engine.last_rollout.flat().items()}
    ids, completion, p = r["ids"], r["completion_mask"], prompts.shape[1]
    has_eos = ((ids[:, p:] == EOS) & (completion == 1)).any(1)
    rewards = low_token_fraction(ids, completion) - 0.5 * ~has_eos
    np.testing.assert_allclose(r["rewards"], rewards, rtol=1e-6)
    policy = engine.policy_model()
    ref_model = nnx.merge(engine.policy_def, engine.ref_params)
    seq = [np.sum(np.asarray(response_logprobs(m, ids, r["mask"], r["positions"], p, 1.0)) * completion, 1)
           for m in (policy, ref_model)]  # fmt: skip
    logps, ref = (x.reshape(-1, 2) for x in seq)
    rewards = rewards.reshape(-1, 2)
    first = rewards[:, 0] >= rewards[:, 1]
    c, rj = np.where(first, logps[:, 0], logps[:, 1]), np.where(first, logps[:, 1], logps[:, 0])
    rc, rr = np.where(first, ref[:, 0], ref[:, 1]), np.where(first, ref[:, 1], ref[:, 0])
    h = (c - rj) - (rc - rr)
    want = np.mean(-logsigmoid(0.2 * h)) if loss_type == "sigmoid" else np.mean((h - 1 / (2 * 0.2)) ** 2)
    assert abs(h).max() > 1e-3  # the reference differs from the policy: the loss is not trivial
    assert metrics["loss"] == pytest.approx(want, rel=1e-4, abs=2e-5)
    assert metrics["rewards/chosen"] == pytest.approx(np.mean(0.2 * (c - rc)), rel=1e-4, abs=2e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(np.mean(c - rc > rj - rr), abs=1e-6)
    assert metrics["objective/kl"] == pytest.approx(np.mean(logps - ref), rel=1e-4, abs=2e-5)
    assert metrics["objective/scores_margin"] == pytest.approx(np.mean(abs(rewards[:, 0] - rewards[:, 1])))
    assert metrics["val/contain_eos_token"] == pytest.approx(has_eos.mean(), abs=1e-6)


def test_online_dpo_cli_trains_resumes_exactly_and_exports(tiny_dir, tmp_path):
    """`jaxrlhf train online_dpo` with the shipped reward functions: TRL's metric names, held-out
    task accuracy, and a run killed after its step-2 checkpoint and resumed logs the losses of the
    run that went straight through."""
    tiny = tiny_dir  # SmolLM2's tokenizer (small vocabulary) on a 2-layer model

    def args(out: str, *extra: str) -> list[str]:
        return ["online_dpo", f"model.path={tiny}", f"train.output_dir={out}", "train.max_steps=3",
                "train.save_every=2", "train.batch_size=4", "train.log_every=1", "train.tensorboard=false",
                f"data.train_files={GRPO_DATA}/test.jsonl", f"data.eval_files={GRPO_DATA}/test.jsonl",
                "online_dpo.reward_funcs=[jaxrlhf.rewards:accuracy_reward,jaxrlhf.rewards:format_reward]",
                "online_dpo.max_new_tokens=6", "online_dpo.missing_eos_penalty=0.1",
                "optim.learning_rate=1e-3", "task_eval.max_new_tokens=4",
                "task_eval.samples_per_family=2", *extra]  # fmt: skip

    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    proc = run_cli(args(straight, "train.export=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1 samples" in proc.stdout + proc.stderr
    assert os.path.exists(os.path.join(straight, "export", "config.json"))
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"]
    for key in ("loss", "objective/scores", "objective/scores_margin", "rewards/accuracies",
                "rewards/margins", "rewards/accuracy_reward/mean", "logps/chosen", "val/contain_eos_token",
                "beta"):  # fmt: skip
        assert key in train[0], key
    assert "task/accuracy" in [r for r in rows if r["split"] == "eval"][0]
    crash = {"JAXRLHF_CRASH_AFTER_STEP": "2"}
    assert run_cli(args(crashed, "train.export=false"), env=crash).returncode == 17
    proc = run_cli(args(crashed, "train.export=false"))
    assert proc.returncode == 0 and "resumed from step 2" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    want, got = logged_losses(straight), logged_losses(crashed)
    assert sorted(got) == [1, 2, 3] and all(abs(got[s] - want[s]) <= 1e-5 for s in (1, 2, 3)), (want, got)


def test_online_dpo_config_errors_name_the_key():
    from jaxrlhf.train import ConfigError, load_config

    with pytest.raises(ConfigError, match="online_dpo.reward_funcs"):
        load_config(None, ["model.path=demo"], kind="online_dpo")
    with pytest.raises(ConfigError, match="online_dpo.loss_type"):
        load_config(None, ["online_dpo.loss_type=hinge", "online_dpo.reward_funcs=[a:b]"], kind="online_dpo")
