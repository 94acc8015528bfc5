"""`jaxrlhf train grpo|rloo` end to end on a tiny model with the real tokenizer, the shipped
verifiable prompts (asset:grpo_demo) and the shipped reward functions: it trains, logs TRL's metric
names, measures task accuracy before and after, checkpoints, resumes and exports; bad reward
settings fail early with the key named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.runs import grpo_cli_args as _args
from helpers.runs import tiny_with_demo_tokenizer as _tiny

from jaxrlhf.train.config import ConfigError, load_config

GRPO_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "grpo_demo")


def _run(kind: str, args: list[str]) -> subprocess.CompletedProcess:
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    return subprocess.run([sys.executable, "-m", "jaxrlhf", "train", kind, *args], cwd=repo,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_grpo_cli_trains_evaluates_resumes_and_exports(tmp_path):
    tiny, out = _tiny(tmp_path), str(tmp_path / "run")
    proc = _run("grpo", [*_args(tiny, out), "train.export=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert "step 1 samples" in logs and "task accuracy" in logs.lower(), logs[-3000:]
    assert os.path.exists(os.path.join(out, "export", "config.json"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/accuracy_reward/mean",
                "rewards/format_reward/std", "completions/mean_length", "completions/clipped_ratio",
                "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "loss", "grad_norm"):  # fmt: skip
        assert key in train[0], key
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and "task/accuracy" in evals[0], evals
    proc = _run("grpo", [*_args(tiny, out), "train.max_steps=3"])
    assert proc.returncode == 0 and "resumed from step 2" in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_rloo_cli_runs(tmp_path):
    tiny, out = _tiny(tmp_path), str(tmp_path / "rloo")
    proc = _run("rloo", [*_args(tiny, out), "train.max_steps=1", "grpo.scale_rewards=none",
                         "task_eval.enabled=false"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["steps"] == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.reward_funcs=[jaxrlhf.rewards]", "grpo.reward_funcs"),
        ("grpo.reward_weights=[1.0]", "reward_weights has 1 weights for 2 rewards"),
        ("grpo.num_mini_batches=3", "multiple of grpo.num_mini_batches"),
    ],
)
def test_grpo_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("configs/grpo_demo.yaml", [override])


def test_grpo_unknown_reward_function_fails_before_training(tmp_path):
    bad = ["grpo.reward_funcs=[jaxrlhf.rewards:nope]", "grpo.reward_weights=null",
           f"train.output_dir={tmp_path}"]  # fmt: skip
    proc = _run("grpo", ["--config", "configs/grpo_demo.yaml", *bad])
    assert proc.returncode == 2 and "has no function 'nope'" in proc.stderr, proc.stderr[-2000:]
