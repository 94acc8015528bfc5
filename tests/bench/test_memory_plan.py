"""bench/memory_plan.py: XLA's per-device memory analysis of the real steps agrees with the arithmetic
of docs/scaling.md on a small shape (2 layers of the Llama-3.1-8B widths, 8 fake CPU devices).

The plan runs in a subprocess (the device count must be set before jax is imported) and writes JSON.
Tolerances: arguments (parameters + Adam state + batch) within 10% of the arithmetic, which assumes
every parameter and moment split over the 8 devices, so dropping a sharding fails (8x); the donated
state aliased into the outputs; the peak within a factor of 2 of the arithmetic total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory_plan  # noqa: E402

ARGS_TOLERANCE = 0.10
PEAK_FACTOR = 2.0


def problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled row against the arithmetic (empty: agrees)."""
    est = row["estimate"]
    out = []
    if abs(row["argument"] / est["args"] - 1) > ARGS_TOLERANCE:
        out.append(f"{row['step']}: arguments {row['argument']:.3e} B vs arithmetic {est['args']:.3e} B")
    state = sum(row["inputs"].get(k, 0.0) for k in ("params", "opt_state", "reference"))
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
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
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
    """Unsharded parameters and moments would be 8x the per-device arithmetic: the check fails."""
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
