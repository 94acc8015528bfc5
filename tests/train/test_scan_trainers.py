"""Scanned layers through the trainers: SFT, reward, DPO and PPO (policy, critic, reference, reward
model) give the unrolled model's losses step by step; a scanned run resumes from its checkpoint and
exports per-layer Hugging Face tensors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import transformers as tf
from test_trainer import _cli, _overrides, data_files, tiny_dir  # noqa: F401  (fixtures)
from test_trainer import _losses as _step_losses

from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
from jaxrlhf.train import load_config
from jaxrlhf.train.algorithms import train
from jaxrlhf.train.config import PPOConfig
from jaxrlhf.train.ppo import PPOEngine
from jaxrlhf.train.step import make_optimizer, make_schedule


def _files(kind, data_files, tmp_path):  # noqa: F811
    if kind != "sft":
        return data_files
    sft = tmp_path / "sft.jsonl"  # prompt + chosen answer as a conversation
    with open(data_files[0]) as f:
        rows = [json.loads(line) for line in f]
    sft.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in rows))
    return str(sft), str(sft)


def _losses(kind, tiny_dir, files, out, **extra):  # noqa: F811
    common = {"train.max_steps": 3, "train.save_every": 0, "optim.learning_rate": 1e-2,
              "optim.warmup_steps": 0, "task_eval.enabled": False, "train.resume": False,
              **extra}  # fmt: skip
    result = train(load_config(None, _overrides(tiny_dir, files, out, **common), kind=kind))
    return np.array([m["loss"] for m in result.train_metrics]), result


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo"])
def test_scanned_trainer_matches_unrolled(kind, tiny_dir, data_files, tmp_path):  # noqa: F811
    files = _files(kind, data_files, tmp_path)
    a, _ = _losses(kind, tiny_dir, files, str(tmp_path / "unrolled"))
    scanned = {"model.scan_layers": True, "model.remat": "full", "train.export": True}
    b, result = _losses(kind, tiny_dir, files, str(tmp_path / "scanned"), **scanned)
    assert len(a) == 3 and np.abs(a - a[0]).max() > 1e-3  # the losses move
    np.testing.assert_allclose(b, a, atol=2e-5)
    auto = tf.AutoModelForSequenceClassification if kind == "reward" else tf.AutoModelForCausalLM
    exported = auto.from_pretrained(result.export_dir)
    assert "model.layers.1.self_attn.q_proj.weight" in exported.state_dict()


def crash_and_resume(tiny_dir, data_files, tmp_path, extra):  # noqa: F811
    """A 4-step DPO run straight, and one killed right after its step-2 checkpoint and resumed:
    their per-step losses `(straight, resumed)` and the resumed run's output directory."""
    extra = {**extra, "train.max_steps": 4, "train.save_every": 2}
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    assert _cli(["dpo", *_overrides(tiny_dir, data_files, straight, **extra)]).returncode == 0
    args = ["dpo", *_overrides(tiny_dir, data_files, crashed, **extra)]
    assert _cli(args, env={"JAXRLHF_CRASH_AFTER_STEP": "2"}).returncode == 17
    proc = _cli(args)
    assert proc.returncode == 0 and "resumed from step 2" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return _step_losses(straight), _step_losses(crashed), crashed


def test_scanned_dpo_resumes_exactly(tiny_dir, data_files, tmp_path):  # noqa: F811
    """Killed right after the step-2 checkpoint, the scanned run resumes to the same losses."""
    a, b, _ = crash_and_resume(tiny_dir, data_files, tmp_path, {"model.scan_layers": True})
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]  # bit-identical


def test_scanned_ppo_matches_unrolled(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
    from tiny_hf import make_hf_model

    path = str(tmp_path / "m")
    make_hf_model("qwen2_mixed").save_pretrained(path)
    ids = np.random.default_rng(0).integers(3, 96, (8, 6)).astype(np.int32)

    def run(scan):
        mesh = make_mesh(devices=jax.devices()[:1])
        kw = dict(mesh=mesh, scan_layers=scan)
        engine = PPOEngine(
            from_pretrained(path, **kw), from_pretrained(path, head="score", init_score_head=True, **kw),
            from_pretrained(path, head="score", init_score_head=True, seed=1, **kw),
            PPOConfig(response_length=6, kl_coef=0.1, num_ppo_epochs=2, num_mini_batches=2),
            make_optimizer(make_schedule(3e-3, 10, kind="constant")), mesh,
            eos_token_ids=[1], pad_token_id=0, seed=0,
        )  # fmt: skip
        return [engine.step(ids, np.ones_like(ids)) for _ in range(3)]  # scored by the reward model

    a, b = run(False), run(True)
    for ma, mb in zip(a, b, strict=True):
        for k in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
            np.testing.assert_allclose(mb[k], ma[k], atol=1e-4, rtol=1e-4, err_msg=k)
    assert a[-1]["objective/kl"] != 0  # the policy moved away from the reference
