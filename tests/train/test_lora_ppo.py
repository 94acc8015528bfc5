"""PPO with LoRA (`lora.rank > 0`, `kind: ppo`).

* the reference is the base with the policy's adapters off: the rollout's reference log-probs equal
  those of a separately loaded base model;
* only adapters (and the critic's score head) are trained; the frozen base never changes, and the
  LoRA critic holds no copy of it (its frozen arrays are the policy's);
* through the CLI: a run resumed from a checkpoint reproduces an uninterrupted run's metrics, and
  the export is a PEFT adapter plus a merged model transformers loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx
from helpers.ppo import EOS, PAD, low_token_fraction, random_prompts
from helpers.runs import ppo_cli_args

from jaxrlhf.models import from_pretrained
from jaxrlhf.models.lora import LoRASpec
from jaxrlhf.parallel import make_mesh
from jaxrlhf.train.config import PPOConfig
from jaxrlhf.train.ppo import PPOEngine, response_logprobs
from jaxrlhf.train.step import make_optimizer, make_schedule

SPEC = LoRASpec.build(rank=4, alpha=16.0, target_modules=["q_proj", "v_proj", "up_proj"])


def _names(params):
    return {f"{k}/" + "/".join(map(str, p)) for k, v in params.items() for p, _ in nnx.to_flat_state(v)}


def test_lora_ppo_reference_is_the_base_and_only_adapters_train(tiny_llama):
    mesh = make_mesh(devices=jax.devices()[:1])
    policy = from_pretrained(tiny_llama, mesh=mesh, lora=SPEC)
    critic = from_pretrained(tiny_llama, head="score", init_score_head=True, mesh=mesh, lora=SPEC)
    cfg = PPOConfig(response_length=6, temperature=0.9, kl_coef=0.05, missing_eos_penalty=None,
                    num_ppo_epochs=2, num_mini_batches=2)  # fmt: skip
    optimizer = make_optimizer(make_schedule(3e-3, 100, kind="constant"), eps=1e-5)
    engine = PPOEngine(policy, critic, None, cfg, optimizer, mesh, eos_token_ids=[EOS], pad_token_id=PAD)
    assert engine.ref_params is None  # no copy of the policy
    trained = _names(engine.state.params)
    assert all(n.split("/")[-1] in ("lora_a", "lora_b") or n.startswith("critic/score") for n in trained)
    assert any(n.startswith("critic/score") for n in trained)
    policy_base = dict(nnx.to_flat_state(engine.frozen["policy"]))
    critic_base = list(nnx.to_flat_state(engine.frozen["critic"]))
    assert critic_base and all(policy_base[p] is v for p, v in critic_base)  # shared, not copied
    before = {p: np.asarray(v.get_value()) for p, v in policy_base.items()}

    prompts, mask = random_prompts(n=8)
    for _ in range(3):
        metrics = engine.step(prompts, mask, low_token_fraction)
    assert np.isfinite(metrics["loss/policy_avg"]) and metrics["objective/kl"] != 0.0
    for p, v in nnx.to_flat_state(engine.frozen["policy"]):
        np.testing.assert_array_equal(np.asarray(v.get_value()), before[p])  # the base never moves

    r = engine.last_rollout
    base = from_pretrained(tiny_llama, mesh=mesh)  # a separate frozen reference copy
    p = prompts.shape[1]
    want = response_logprobs(base, r.ids, r.mask, r.positions, p, cfg.temperature)
    m = np.asarray(r.response_mask, bool)
    np.testing.assert_allclose(np.asarray(r.ref_logprobs)[m], np.asarray(want)[m], atol=2e-5)
    moved = response_logprobs(engine.policy_model(), r.ids, r.mask, r.positions, p, cfg.temperature)
    assert np.abs(np.asarray(moved) - np.asarray(want))[m].max() > 1e-3  # the adapters trained


def _run(args, env, extra):
    cmd = [sys.executable, "-m", "jaxrlhf", "train", "ppo", *args, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _train_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


def test_lora_ppo_cli_resumes_exactly_and_exports_an_adapter(tmp_path):
    import transformers as tf

    lora = ["lora.rank=2", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]", "lora.dropout=0.1",
            "optim.schedule=constant", "data.eval_fraction=0", "train.eval_every=0"]  # fmt: skip
    whole = str(tmp_path / "whole")
    args, env = ppo_cli_args(tmp_path, whole)
    proc = _run(args, env, lora)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = json.loads(open(os.path.join(whole, "export", "adapter_config.json")).read())
    assert adapter["r"] == 2 and adapter["lora_dropout"] == 0.1
    merged = tf.AutoModelForCausalLM.from_pretrained(os.path.join(whole, "export_merged"))
    assert merged.config.num_hidden_layers == 2

    parts = str(tmp_path / "parts")
    args, env = ppo_cli_args(tmp_path, parts)
    lora_parts = [*lora, "train.export=false"]
    assert _run(args, env, [*lora_parts, "train.max_steps=1"]).returncode == 0
    proc = _run(args, env, [*lora_parts, "train.max_steps=2"])
    assert proc.returncode == 0 and "resumed from step 1" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    a, b = _train_rows(whole), _train_rows(parts)
    for key in ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores"):
        assert a[2][key] == b[2][key], (key, a[2][key], b[2][key])
