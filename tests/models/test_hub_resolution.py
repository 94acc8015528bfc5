"""Hub IDs resolve through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

from helpers.tiny_hf import make_hf_model

SCRIPT = textwrap.dedent(
    """
    import jax.numpy as jnp, numpy as np
    from jaxrlhf.models import CheckpointError, from_pretrained
    model = from_pretrained("acme/tiny-llama")
    print("OK", model.config.model_type, model(jnp.ones((1, 4), jnp.int32)).shape)
    try:
        from_pretrained("acme/not-cached")
    except CheckpointError as e:
        print("MISSING", e)
    """
)


def test_hub_id_from_offline_cache(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama").save_pretrained(str(src))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK llama (1, 4, 96)" in proc.stdout
    assert "MISSING acme/not-cached: not a local directory and not available" in proc.stdout
