"""MetricsLogger (JSON lines, TensorBoard events, progress bar) and the MFU helpers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.trackers import tensorboard_events

from jaxrlhf.train.metrics import MetricsLogger, device_peak_flops, mfu


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def event_tags(logdir: Path) -> set[str]:
    """Tags in the TensorBoard event files under `logdir`."""
    return {tag for _, tag, _ in tensorboard_events(logdir)}


def test_jsonl_tensorboard_and_bar(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=20) as logger:
        logger.log(1, {"loss": jnp.float32(0.5), "learning_rate": np.float64(1e-6), "tokens": 128})
        logger.log(2, {"loss": jnp.asarray(0.25), "grad_norm": float("nan")})
        logger.print("hello from the loop")
        logger.log(2, {"loss": 0.75, "rewards/accuracies": 0.5}, split="eval")
        logger.progress(5)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]
    assert rows[0]["loss"] == 0.5 and rows[0]["learning_rate"] == 1e-6 and rows[0]["tokens"] == 128.0
    assert rows[1]["loss"] == 0.25 and rows[1]["grad_norm"] is None  # non-finite: null (strict JSON)
    assert rows[2] == {
        "step": 2,
        "split": "eval",
        "time": rows[2]["time"],
        "loss": 0.75,
        "rewards/accuracies": 0.5,
    }
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in rows)
    tags = event_tags(tmp_path / "tensorboard")
    assert {
        "train/loss",
        "train/learning_rate",
        "train/tokens",
        "eval/loss",
        "eval/rewards/accuracies",
    } <= tags
    err = capsys.readouterr()
    assert "hello from the loop" in err.out + err.err
    assert "step 2 eval: loss=0.75" in err.out + err.err


def test_appends_on_resume(tmp_path):
    with MetricsLogger(tmp_path, total_steps=None, tensorboard=False, console=False) as logger:
        logger.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path, total_steps=None, tensorboard=False, console=False, start_step=1) as logger:
        logger.log(2, {"loss": 2.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_bar_without_total(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=None, tensorboard=False, process_index=0)
    for step in range(1, 4):
        logger.log(step, {"loss": 1.0 / step, "mfu": 0.3})
    logger.print("done")
    logger.close()
    logger.close()  # idempotent
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3


def test_only_process_zero_writes(tmp_path):
    out = tmp_path / "run"
    logger = MetricsLogger(out, total_steps=10, process_index=1)
    logger.log(1, {"loss": 1.0})
    logger.print("invisible")
    logger.close()
    assert not out.exists()


def test_bad_metrics(tmp_path):
    with MetricsLogger(tmp_path, total_steps=None, tensorboard=False, console=False) as logger:
        with pytest.raises(TypeError, match="metric 'v' must be a scalar"):
            logger.log(1, {"v": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 1.0})


def test_mfu():
    assert mfu(1000.0, 1_000_000_000, peak_flops=1e15) == pytest.approx(6e12 / 1e15)
    params = {"w": jnp.zeros((10, 10)), "b": np.zeros(10)}
    assert mfu(1.0, params, peak_flops=110.0 * 6) == pytest.approx(1.0)
    assert mfu(1.0, 10, peak_flops=80.0, flops_per_token_per_param=8) == pytest.approx(1.0)
    assert mfu(1000.0, 10, peak_flops=None) is None


@pytest.mark.parametrize(
    ("kind", "flops"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H20", 148e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Tesla T4", 65e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("Some Future Accelerator", None),
    ],
)
def test_device_peak_flops_table(kind, flops):
    assert device_peak_flops(SimpleNamespace(platform="gpu", device_kind=kind)) == flops


def test_device_peak_flops_cpu():
    assert device_peak_flops(SimpleNamespace(platform="cpu", device_kind="cpu")) is None
    if jax.devices()[0].platform == "cpu":
        assert device_peak_flops() is None
