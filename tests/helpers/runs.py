"""Short trainer runs on the tiny models: config overrides, the CLI in a subprocess, logged losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from jaxrlhf.train import load_config, train

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
GRPO_DATA = os.path.join(REPO, "jaxrlhf", "assets", "grpo_demo")


def overrides(tiny_dir, data_files, out, **extra):
    """`key=value` overrides for a few-step run on `tiny_dir` with (train, eval) `data_files`."""
    base = {
        "model.path": tiny_dir, "data.train_files": data_files[0], "data.eval_files": data_files[1],
        "data.max_length": 96, "data.max_prompt_length": 64, "optim.learning_rate": 1e-3,
        "optim.warmup_steps": 1, "train.batch_size": 4, "train.grad_accum_steps": 2, "train.log_every": 1,
        "train.save_every": 3, "train.output_dir": out, "train.tensorboard": False, "train.export": False,
        "train.resume": True,
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(args, env=None, **kw):
    """`python -m jaxrlhf train ARGS` (`env` added to this process's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "jaxrlhf", "train", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})}, **kw,
    )  # fmt: skip


def logged_losses(out):
    """{step: loss} of the train rows of `out/metrics.jsonl`."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def files_for(kind, data_files, tmp_path):
    """The preference `data_files`, or for SFT prompt + chosen answer as conversations."""
    if kind != "sft":
        return data_files
    sft = tmp_path / "sft.jsonl"  # prompt + chosen answer as a conversation
    with open(data_files[0]) as f:
        rows = [json.loads(line) for line in f]
    sft.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in rows))
    return str(sft), str(sft)


def train_losses(kind, tiny_dir, files, out, **extra):
    """A 3-step in-process run (lr 1e-2): its per-step losses and the `train` result."""
    common = {"train.max_steps": 3, "train.save_every": 0, "optim.learning_rate": 1e-2,
              "optim.warmup_steps": 0, "task_eval.enabled": False, "train.resume": False,
              **extra}  # fmt: skip
    result = train(load_config(None, overrides(tiny_dir, files, out, **common), kind=kind))
    return np.array([m["loss"] for m in result.train_metrics]), result


def crash_and_resume(tiny_dir, data_files, tmp_path, extra, kind="dpo"):
    """A 4-step run of `kind` straight, and one killed right after its step-2 checkpoint and resumed:
    their per-step losses `(straight, resumed)` and the resumed run's output directory."""
    extra = {**extra, "train.max_steps": 4, "train.save_every": 2}
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    assert run_cli([kind, *overrides(tiny_dir, data_files, straight, **extra)]).returncode == 0
    args = [kind, *overrides(tiny_dir, data_files, crashed, **extra)]
    assert run_cli(args, env={"JAXRLHF_CRASH_AFTER_STEP": "2"}).returncode == 17
    proc = run_cli(args)
    assert proc.returncode == 0 and "resumed from step 2" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return logged_losses(straight), logged_losses(crashed), crashed


def ppo_cli_args(tmp_path, out: str) -> tuple[list[str], dict[str, str]]:
    """CLI overrides and environment for `jaxrlhf train ppo` on a tiny model that uses the real
    tokenizer (prompts from the shipped data) with the `helpers.ppo_rewards:digit_fraction` reward
    (importable: tests/conftest.py puts tests/ on PYTHONPATH)."""
    from helpers.tiny_hf import save_tiny_smollm

    tiny = str(tmp_path / "tiny")
    if not os.path.exists(tiny):
        save_tiny_smollm(tiny, full_vocab=True)
    train_file = os.path.join(REPO, "jaxrlhf", "assets", "dpo_demo", "test.jsonl")
    args = overrides(
        tiny,
        (train_file, train_file),
        out,
        **{
            "train.max_steps": 2,
            "train.save_every": 1,
            "train.export": True,
            "ppo.reward_fn": "helpers.ppo_rewards:digit_fraction",
            "ppo.response_length": 8,
            "ppo.num_ppo_epochs": 2,
            "ppo.num_mini_batches": 2,
            "ppo.critic_init": "policy",
            "data.eval_fraction": 0.1,  # 6 of the 64 prompts held out: batches of 4 and 2 (+2 padding rows)
            "train.eval_every": 1,
        },
    )
    args = [a for a in args if not a.startswith(("data.eval_files", "train.grad_accum_steps"))]
    return args, dict(os.environ)


def tiny_with_demo_tokenizer(tmp_path) -> str:
    """A 2-layer random Llama with the demo model's tokenizer (its real vocabulary) in `tmp_path/tiny`."""
    import transformers as tf

    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    tiny = str(tmp_path / "tiny")
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tiny)
    load_tokenizer(demo_model_path()).save_pretrained(tiny)
    return tiny


def grpo_cli_args(tiny: str, out: str, kind: str = "grpo") -> list[str]:
    """A 2-step `configs/grpo_demo.yaml` run of `tiny` on the shipped GRPO prompts, writing to `out`."""
    return [
        "--config", "configs/grpo_demo.yaml", f"model.path={tiny}", f"train.output_dir={out}",
        "train.max_steps=2", "train.save_every=1", "train.batch_size=2", "train.eval_every=0",
        "train.tensorboard=false", "grpo.num_generations=4", "grpo.max_completion_length=6",
        "grpo.num_mini_batches=2", "grpo.beta=0.04", f"data.eval_files={GRPO_DATA}/test.jsonl",
        "task_eval.max_new_tokens=4", f"data.train_files={GRPO_DATA}/test.jsonl",
    ]  # fmt: skip
