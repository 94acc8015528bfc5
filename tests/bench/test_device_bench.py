"""bench/device_bench.py on CPU with a tiny shape, so the accelerator script cannot rot: every row
runs (XLA and the splash kernel in interpret mode), the backends agree on the first loss, and the
KV-cache sampler and transformers `generate` decode the same greedy tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "device_bench.py")


def test_device_bench_tiny_on_cpu(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--json", str(out)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    by = {(r["what"], r.get("attention")): r for r in results}
    for backend in ("xla", "splash"):
        for what in ("sft", "dpo_packed", "dpo_unpacked", "generate", "grpo"):
            assert by[(what, backend)]["tokens_per_s"] > 0
    for what in ("sft", "dpo_packed", "dpo_unpacked"):
        splash, xla = by[(what, "splash")]["first_loss"], by[(what, "xla")]["first_loss"]
        np.testing.assert_allclose(splash, xla, rtol=1e-3)
    assert by[("generate", "xla")]["first_tokens"] == by[("generate_transformers", None)]["first_tokens"]
    assert "| dpo_packed | xla |" in proc.stdout
    assert any(line.startswith("generation (") for line in json.loads(out.read_text())["summary"])
    if importlib.util.find_spec("trl") and importlib.util.find_spec("datasets"):  # the bench extra
        trl = next(r for r in results if r["what"] == "dpo_trl")
        assert trl["tokens_per_s"] > 0 and abs(trl["first_loss"] - np.log(2)) < 1e-4
