"""Short DPO runs through the CLI on a tiny Gemma 2 and a tiny Qwen3-MoE (SmolLM2's tokenizer):
they train, the MoE run adds the router's load-balancing loss, and the exports load in transformers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import transformers as tf
from helpers.tiny_hf import save_tiny_smollm

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "dpo_demo")


@pytest.mark.parametrize("family", ["gemma2", "qwen3_moe"])
def test_cli_dpo_on_tiny_family(family, tmp_path):
    model = save_tiny_smollm(str(tmp_path / "model"), family=family)
    with open(os.path.join(ASSETS, "train.jsonl")) as f:
        rows = f.readlines()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(rows[:16]))
    out = str(tmp_path / "run")
    overrides = {
        "model.path": model, "data.train_files": str(data), "data.eval_files": str(data),
        "data.max_length": 96, "data.max_prompt_length": 64, "optim.learning_rate": 1e-3,
        "optim.warmup_steps": 1, "train.batch_size": 4, "train.max_steps": 4, "train.log_every": 1,
        "train.output_dir": out, "train.tensorboard": False, "train.export": True, "train.resume": False,
    }  # fmt: skip
    args = [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run([sys.executable, "-m", "jaxrlhf", "train", "dpo", *args], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    train = [m for m in metrics if m["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(m["loss"]) for m in train)
    evals = [m for m in metrics if m["split"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"]  # it fits the pairs it trains on
    if family == "qwen3_moe":
        aux = [m["router_aux_loss"] for m in train]
        assert all(1.0 <= a <= 4.0 for a in aux), aux  # k = 2 when balanced, E = 4 when collapsed
    export = os.path.join(out, "export")
    loaded = tf.AutoModelForCausalLM.from_pretrained(export)
    assert loaded.config.model_type == family
