"""Bad checkpoints give clear errors that name the file and the tensor; nothing is guessed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrlhf.models import CheckpointError, UnsupportedModelError, from_pretrained


@pytest.fixture(scope="module")
def ckpt(tiny_llama):
    """The saved tiny llama (a session fixture)."""
    return Path(tiny_llama)


def _copy(ckpt, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


def test_unsupported_model_type(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "c", edit_config=lambda c: c.update(model_type="falcon"))
    with pytest.raises(UnsupportedModelError, match="'falcon'") as err:
        from_pretrained(bad)
    for supported in ("gemma2", "gemma3_text", "mixtral", "qwen3_moe"):  # the message lists them
        assert supported in str(err.value)


def test_unsupported_rope_type(ckpt, tmp_path):
    bad = _copy(
        ckpt,
        tmp_path / "c",
        edit_config=lambda c: c.update(
            rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
        ),
    )
    with pytest.raises(UnsupportedModelError, match="yarn"):
        from_pretrained(bad)


def test_missing_tensor_is_named(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "c", edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        from_pretrained(bad)


def test_wrong_shape_names_file_and_tensor(ckpt, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)

    bad = _copy(ckpt, tmp_path / "c", edit_tensors=shrink)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    msg = str(err.value)
    assert "model.safetensors" in msg and "model.layers.0.mlp.up_proj.weight" in msg
    assert "[95, 64]" in msg and "[96, 64]" in msg


def test_unreadable_file(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "c")
    with open(os.path.join(bad, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(bad)


def test_pickle_checkpoints_are_not_read(ckpt, tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        from_pretrained(str(d))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(str(tmp_path))


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError):
        from_pretrained(str(tmp_path / "does" / "not" / "exist"))


def test_demo_model_override_names_a_checkpoint(ckpt, tmp_path, monkeypatch):
    """$JAXRLHF_DEMO_MODEL stands in for the demo model where "demo" is accepted; a directory without a
    config.json is refused with its path, never converted or guessed."""
    from jaxrlhf.models.demo import demo_model_path
    from jaxrlhf.train.common import model_directory

    monkeypatch.setenv("JAXRLHF_DEMO_MODEL", str(ckpt))
    assert demo_model_path() == str(ckpt) and model_directory("demo") == str(ckpt)
    monkeypatch.setenv("JAXRLHF_DEMO_MODEL", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: .*JAXRLHF_DEMO_MODEL.*config.json"):
        demo_model_path()
