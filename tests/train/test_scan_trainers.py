"""Scanned layers through the trainers: SFT, reward, DPO and PPO (policy, critic, reference, reward
model) give the unrolled model's losses step by step; a scanned run resumes from its checkpoint and
exports per-layer Hugging Face tensors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import transformers as tf
from helpers.runs import crash_and_resume, files_for, train_losses

from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
from jaxrlhf.train.config import PPOConfig
from jaxrlhf.train.ppo import PPOEngine
from jaxrlhf.train.step import make_optimizer, make_schedule


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo"])
def test_scanned_trainer_matches_unrolled(kind, tiny_dir, data_files, tmp_path):
    files = files_for(kind, data_files, tmp_path)
    a, _ = train_losses(kind, tiny_dir, files, str(tmp_path / "unrolled"))
    scanned = {"model.scan_layers": True, "model.remat": "full", "train.export": True}
    b, result = train_losses(kind, tiny_dir, files, str(tmp_path / "scanned"), **scanned)
    assert len(a) == 3 and np.abs(a - a[0]).max() > 1e-3  # the losses move
    np.testing.assert_allclose(b, a, atol=2e-5)
    for run, scan in (("unrolled", False), ("scanned", True)):  # the option reached the model
        with open(tmp_path / run / "summary.json") as f:
            assert json.load(f)["model"]["scan_layers"] is scan, run
    auto = tf.AutoModelForSequenceClassification if kind == "reward" else tf.AutoModelForCausalLM
    exported = auto.from_pretrained(result.export_dir)
    assert "model.layers.1.self_attn.q_proj.weight" in exported.state_dict()


def test_scanned_dpo_resumes_exactly(tiny_dir, data_files, tmp_path):
    """Killed right after the step-2 checkpoint, the scanned run resumes to the same losses."""
    a, b, _ = crash_and_resume(tiny_dir, data_files, tmp_path, {"model.scan_layers": True})
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]  # bit-identical


def test_scanned_ppo_matches_unrolled(tmp_path):
    from helpers.tiny_hf import make_hf_model

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
