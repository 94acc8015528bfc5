"""LoRA through the trainers (`lora.rank > 0`).

* DPO's reference is the base with the adapters switched off: the same-step losses equal those of
  a run whose reference log-probs were computed once, before training, by a separate pass;
* only the adapters (and a reward model's score head) are trained: the optimizer state is a small
  fraction of the parameters, and a checkpoint holds the adapters, not the base;
* a killed LoRA run (with dropout) resumes to bit-identical losses; resuming on another base is refused;
* `train.export`: `export/` is a PEFT adapter, `export_merged/` a model transformers loads, and
  `model.adapter` continues from an exported adapter (its eval equals the first run's final eval).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import transformers as tf
from helpers.runs import crash_and_resume, files_for, overrides, run_cli, train_losses

LORA = {"lora.rank": 2, "lora.alpha": 32.0, "lora.target_modules": "[q_proj,v_proj]",
        "optim.learning_rate": 3e-2}  # fmt: skip


def test_lora_dpo_reference_is_the_base(tiny_dir, data_files, tmp_path):
    a, result = train_losses("dpo", tiny_dir, data_files, str(tmp_path / "same"), **LORA)
    pre = {**LORA, "dpo.reference": "precompute"}
    b, _ = train_losses("dpo", tiny_dir, data_files, str(tmp_path / "pre"), **pre)
    assert np.abs(a - a[0]).max() > 1e-3  # the adapters train
    np.testing.assert_allclose(b, a, atol=2e-5)
    full, _ = train_losses("dpo", tiny_dir, data_files, str(tmp_path / "full"),
                           **{"optim.learning_rate": 3e-2})  # fmt: skip
    assert np.abs(full - a).max() > 1e-3  # a different run: LoRA is not full fine-tuning


@pytest.mark.parametrize("kind", ["sft", "reward"])
def test_lora_sft_and_reward_train_and_export(kind, tiny_dir, data_files, tmp_path):
    files = files_for(kind, data_files, tmp_path)
    out = tmp_path / kind
    losses, result = train_losses(kind, tiny_dir, files, str(out), **LORA, **{"train.export": True})
    assert np.abs(losses - losses[0]).max() > 1e-3
    config = json.loads((out / "export" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["task_type"] == ("SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    auto = tf.AutoModelForSequenceClassification if kind == "reward" else tf.AutoModelForCausalLM
    merged = auto.from_pretrained(str(out / "export_merged"))
    assert "model.layers.1.self_attn.q_proj.weight" in merged.state_dict()


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_lora_dpo_resumes_exactly_and_checkpoints_only_the_adapters(tiny_dir, data_files, tmp_path):
    # with LoRA dropout: its masks follow (seed, step), so the resumed run draws the same ones
    a, b, crashed = crash_and_resume(tiny_dir, data_files, tmp_path, {**LORA, "lora.dropout": 0.1})
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]  # bit-identical
    base = _dir_bytes(tiny_dir)
    step2 = os.path.join(crashed, "checkpoints", "2")
    assert _dir_bytes(step2) < 0.2 * base, (_dir_bytes(step2), base)  # adapters + their Adam state only
    other = tmp_path / "other_base"  # the same config, a different base: resuming is refused
    other.mkdir()
    for name in os.listdir(tiny_dir):
        data = open(os.path.join(tiny_dir, name), "rb").read()
        if name == "model.safetensors":
            data = data[:-8] + b"\x00" * 8  # other weights (the last float32 values), same header
        (other / name).write_bytes(data)
    extra = {**LORA, "train.max_steps": 6, "train.save_every": 2}
    proc = run_cli(["dpo", *overrides(str(other), data_files, crashed, **extra)])
    assert proc.returncode != 0 and "trained on base" in proc.stdout + proc.stderr


def test_model_adapter_continues_from_an_exported_adapter(tiny_dir, data_files, tmp_path):
    first = tmp_path / "first"
    _, r1 = train_losses("dpo", tiny_dir, data_files, str(first), **LORA, **{"train.export": True})
    adapter = str(first / "export")
    _, r2 = train_losses("dpo", tiny_dir, data_files, str(tmp_path / "second"), **{"model.adapter": adapter,
                    "optim.learning_rate": 3e-2, "dpo.reference": "precompute"})  # fmt: skip
    # The second run starts from the first one's final adapters: its policy log-probs of the eval
    # pairs before training equal the first run's after training (the references differ).
    for k in ("logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(r2.eval_before[k], r1.eval_after[k], rtol=1e-5, err_msg=k)
    assert r1.eval_before["logps/chosen"] != r1.eval_after["logps/chosen"]


def test_qlora_dpo_trains_on_an_nf4_base(tiny_dir, data_files, tmp_path):
    out = tmp_path / "qlora"
    extra = {**LORA, "lora.quantize_base": "nf4", "train.export": True}
    losses, _ = train_losses("dpo", tiny_dir, data_files, str(out), **extra)
    assert np.all(np.isfinite(losses)) and np.abs(losses - losses[0]).max() > 1e-3
    assert json.loads((out / "export" / "adapter_config.json").read_text())["r"] == 2
    merged = tf.AutoModelForCausalLM.from_pretrained(str(out / "export_merged"))  # dequantized + merged
    assert merged.config.num_hidden_layers == 2
