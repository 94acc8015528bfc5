"""End-to-end trainer runs on a tiny random model with the real SmolLM2 tokenizer (CLI and Python):
exact resume after a crash, SIGTERM saves, bad input errors, reward/SFT/DPO exports."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import transformers as tf
from helpers.runs import logged_losses, overrides, run_cli

from jaxrlhf.train import load_config, train


def test_resume_after_crash_is_exact(tiny_dir, data_files, tmp_path):
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    proc = run_cli(["dpo", *overrides(tiny_dir, data_files, straight, **{"train.max_steps": 6})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = ["dpo", *overrides(tiny_dir, data_files, crashed, **{"train.max_steps": 6})]
    proc = run_cli(args, env={"JAXRLHF_CRASH_AFTER_STEP": "3"})
    assert proc.returncode == 17, proc.stderr[-3000:]  # killed right after the step-3 checkpoint
    assert sorted(logged_losses(crashed)) == [1, 2, 3]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 3" in proc.stdout + proc.stderr
    a, b = logged_losses(straight), logged_losses(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bit-identical
    assert abs(a[1] - 0.6931471805599453) < 1e-6  # policy == reference at the first step


def test_sigterm_saves_a_checkpoint_before_exit(tiny_dir, data_files, tmp_path):
    out = str(tmp_path / "run")
    args = [
        "dpo",
        *overrides(tiny_dir, data_files, out, **{"train.num_epochs": 1000, "train.save_every": 0}),
    ]
    proc = subprocess.Popen([sys.executable, "-m", "jaxrlhf", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and len(logged_losses(out)) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted: checkpoint saved at step" in output
    steps = [int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit()]
    assert steps and max(steps) >= 2


def test_bad_input_names_file_row_and_field(tiny_dir, data_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    with open(data_files[0]) as f:
        rows = [json.loads(line) for line in f]
    del rows[5]["rejected"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    args = overrides(tiny_dir, data_files, out, **{"data.train_files": str(bad), "train.max_steps": 1})
    proc = run_cli(["dpo", *args])
    assert proc.returncode == 2
    # rows[5] is on line 6 of the file; the error is the last line of stderr, without a traceback
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}, line 6, field 'rejected': missing"
    assert "Traceback" not in proc.stderr
    proc = run_cli(["dpo", *args, "data.skip_invalid=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train/rows_skipped_invalid=1" in proc.stdout + proc.stderr


def test_unknown_config_key_suggests(tiny_dir, data_files, tmp_path):
    proc = run_cli(["dpo", "--config", "configs/dpo_demo.yaml", "optim.learning_rat=1e-5"])
    assert proc.returncode == 2 and "optim.learning_rate" in proc.stderr


@pytest.mark.parametrize("kind", ["reward", "sft", "sft_packed", "dpo"])
def test_python_api_trains_and_exports(kind, tiny_dir, data_files, tmp_path):
    files, packed = data_files, kind == "sft_packed"
    kind = "sft" if packed else kind
    if kind == "sft":  # conversations: the prompts and their chosen answers
        sft = tmp_path / "sft.jsonl"
        with open(data_files[0]) as f:
            rows = [json.loads(line) for line in f]
        sft.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in rows))
        files = (str(sft), str(sft))
    out = str(tmp_path / kind)
    # evaluate on the training pairs themselves: a deterministic measure that training fits them
    extra = {"train.max_steps": 6, "train.export": True, "train.resume": False, "data.eval_files": files[0],
             **({"sft.packing": True, "data.max_length": 192} if packed else {})}  # fmt: skip
    result = train(load_config(None, overrides(tiny_dir, files, out, **extra), kind=kind))
    if packed:  # fewer rows than examples, each within max_length
        with open(os.path.join(out, "summary.json")) as f:
            data = json.load(f)["data"]
        assert 0 < data["train/packed_rows"] < data["train/examples"]
    assert result.steps == 6 and result.export_dir
    assert all(math.isfinite(m["loss"]) for m in result.train_metrics)
    before, after = result.eval_before, result.eval_after
    assert after["loss"] < before["loss"] - 1e-3, (before, after)
    if kind == "reward":
        assert "accuracy" in result.eval_after
        model = tf.AutoModelForSequenceClassification.from_pretrained(result.export_dir)
        assert model.config.num_labels == 1
    else:
        tf.AutoModelForCausalLM.from_pretrained(result.export_dir)
    assert os.path.exists(os.path.join(result.export_dir, "tokenizer_config.json"))


def test_fresh_start_moves_old_run_aside(tmp_path):
    from jaxrlhf.train.common import fresh_start

    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    fresh_start(str(tmp_path), resume=True)
    assert (tmp_path / "checkpoints").exists() and (tmp_path / "metrics.jsonl").exists()
    fresh_start(str(tmp_path), resume=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoints" not in names and "metrics.jsonl" not in names
    assert any(n.startswith("checkpoints.old-") for n in names) and any(
        n.startswith("metrics.jsonl.old-") for n in names
    )
