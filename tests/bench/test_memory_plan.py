"""bench/memory_plan.py: XLA's per-device memory analysis of the real steps agrees with the arithmetic
of docs/scaling.md on a small shape (2 layers of the Llama-3.1-8B widths, 8 fake CPU devices).

The plan runs in a subprocess (the device count must be set before jax is imported) and writes JSON.
The state is placed by the library (`param_sharding`, `step.optimizer_state_shardings`), so the
checks also cover it: the compiled per-device arguments, less the batch, are 1/8 of the unsharded
state (parameters, Adam moments, frozen reference) within 5% -- replicated moments would be ~6x
that -- and within 10% of the arithmetic; the donated state is aliased into the outputs; the peak is
within a factor of 2 of the arithmetic total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from helpers.scripts import ROOT, load_script

memory_plan = load_script("bench/memory_plan.py")

ARGS_TOLERANCE = 0.10
SHARD_TOLERANCE = 0.05
DEVICES = 8
PEAK_FACTOR = 2.0


def problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled row against the arithmetic (empty: agrees)."""
    est = row["estimate"]
    out = []
    if abs(row["argument"] / est["args"] - 1) > ARGS_TOLERANCE:
        out.append(f"{row['step']}: arguments {row['argument']:.3e} B vs arithmetic {est['args']:.3e} B")
    inputs = row["inputs"]
    if "state_unsharded" in inputs:  # the train steps and the PPO update (score reads no Adam state)
        split = (row["argument"] - inputs["batch"]) / (inputs["state_unsharded"] / DEVICES)
        if abs(split - 1) > SHARD_TOLERANCE:
            out.append(f"{row['step']}: state per device is {split:.2f}x 1/{DEVICES} of the whole")
    state = sum(inputs.get(k, 0.0) for k in ("params", "opt_state", "reference"))
    if row["step"] != "score" and row["alias"] < 0.99 * state:
        out.append(f"{row['step']}: only {row['alias']:.3e} B of the {state:.3e} B state donated")
    total_est = est["total"] + est.get("resident", 0.0)
    if not 1 / PEAK_FACTOR <= row["total"] / total_est <= PEAK_FACTOR:
        out.append(f"{row['step']}: peak {row['total']:.3e} B vs arithmetic {total_est:.3e} B")
    return out


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    cmd = [
        sys.executable, os.path.join(ROOT, "bench", "memory_plan.py"),
        "--model", "tiny", "--layers", "2", "--vocab", "16384", "--mesh", "fsdp=8",
        "--batch", "8", "--seq", "256", "--steps", "dpo,dpo_same_step,ppo", "--remat", "full",
        "--no-search", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def test_compiled_memory_matches_arithmetic(plan: dict[str, Any]) -> None:
    rows = plan["rows"]
    assert [r["step"] for r in rows] == ["dpo", "dpo_same_step", "ppo"]
    assert all(r["devices"] == 8 and r["scanned"] for r in rows)
    for row in rows:
        assert not problems(row), problems(row)
    dpo, same_step, _ = rows
    # The frozen reference adds one more float32 copy of the parameters, split 8 ways.
    extra = same_step["argument"] - dpo["argument"]
    assert extra == pytest.approx(dpo["inputs"]["params"], rel=0.02)


def test_checks_catch_a_dropped_sharding(plan: dict[str, Any]) -> None:
    """Replicated Adam moments (what `jit(optimizer.init)` alone gives) or unsharded state would
    exceed 1/8 of the whole state per device: the checks fail."""
    for row in plan["rows"]:
        inputs = row["inputs"]
        replicated = dict(row, argument=row["argument"] + inputs["opt_state"] * (DEVICES - 1))
        assert any("1/8" in p for p in problems(replicated)), row["step"]
        assert any("arguments" in p for p in problems(replicated)), row["step"]
    row = dict(plan["rows"][0])
    row["argument"] *= 8
    assert any("arguments" in p for p in problems(row))
    row = dict(plan["rows"][0], alias=0)
    assert any("donated" in p for p in problems(row))


def test_arithmetic_orders_the_remat_policies() -> None:
    d = memory_plan.Dims(V=128256, D=4096, F=14336, L=32, N=32, K=8, H=128)
    assert d.params("lm") == 8_030_261_248  # Llama-3.1-8B
    saved = [memory_plan.saved_per_token(d, r, 2048, 1) for r in
             ("full", "dots_with_no_batch_dims_saveable", "dots_saveable", "none")]  # fmt: skip
    assert saved == sorted(saved) and saved[0] == 2 * d.D
    # Tensor parallelism splits heads and MLP width, not the D-sized residual stream.
    assert memory_plan.saved_per_token(d, "full", 2048, 4) == 2 * d.D
    assert memory_plan.saved_per_token(d, "none", 2048, 4) < saved[-1] / 2


def test_qlora_plan_keeps_only_adapters_and_a_quantized_base(plan: dict[str, Any], tmp_path) -> None:
    """The same DPO step with nf4 QLoRA r=8: no reference copy, Adam for the adapters only, the base
    in ~0.56 bytes per projection weight: far fewer argument bytes per device than full DPO's."""
    out = tmp_path / "qlora.json"
    cmd = [
        sys.executable, os.path.join(ROOT, "bench", "memory_plan.py"),
        "--model", "tiny", "--layers", "2", "--vocab", "16384", "--mesh", "fsdp=8",
        "--batch", "8", "--seq", "256", "--steps", "dpo_same_step", "--remat", "full",
        "--lora-rank", "8", "--quantize", "nf4", "--no-search", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    (full,) = [r for r in plan["rows"] if r["step"] == "dpo_same_step"]
    assert row["lora_rank"] == 8 and row["quantize"] == "nf4" and "frozen_base" in row["inputs"]
    assert row["inputs"]["opt_state"] < 0.05 * full["inputs"]["opt_state"]  # adapters' Adam only
    assert "reference" not in row["inputs"]  # the base with adapters off is the reference
    assert row["argument"] < 0.4 * full["argument"], (row["argument"], full["argument"])
    assert row["alias"] >= 0.99 * (row["inputs"]["params"] + row["inputs"]["opt_state"])  # donated
