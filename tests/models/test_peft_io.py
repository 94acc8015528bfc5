"""LoRA adapters through Hugging Face PEFT, both ways, unrolled and scanned (fp32, tolerance 1e-4):

* our export (`save_adapter`) loaded by `peft.PeftModel.from_pretrained` on the transformers base
  gives our adapted model's logits; the merged export (`save_pretrained` of an adapted model) loaded
  by transformers gives the same;
* an adapter made by peft (random, non-zero B) loaded by us (`read_adapter_config` +
  `load_adapter`) gives peft's logits;
* a reward model's adapter carries its score head (`modules_to_save`);
* bad adapter directories fail with the file named.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers as tf
from helpers.lora import randomize_b
from helpers.tiny_hf import hf_logits, padded_batch

from jaxrlhf.models import CheckpointError, from_pretrained, save_pretrained
from jaxrlhf.models.lora import LoRASpec
from jaxrlhf.models.peft_io import load_adapter, read_adapter_config, save_adapter

SPEC = LoRASpec.build(4, 8.0, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
TOL = 1e-4


@pytest.fixture(scope="module")
def path(tiny_llama):
    """The saved tiny llama (a session fixture)."""
    return tiny_llama


def _randomize(model, seed=0):
    """Random non-zero adapters (fresh `B = 0` would hide a wrong transpose or scale)."""
    return randomize_b(model, seed)


@pytest.mark.parametrize("scan", [False, True])
def test_our_adapter_loads_in_peft_and_the_merged_export_in_transformers(path, tmp_path, scan):  # noqa: F811
    ids, mask, pos = padded_batch("right", seed=1)
    ours = _randomize(from_pretrained(path, lora=SPEC, scan_layers=scan))
    want = np.asarray(ours(ids, mask, pos))
    real = mask.astype(bool)
    save_adapter(ours, str(tmp_path / "adapter"), base_model=path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["task_type"] == "CAUSAL_LM"
    hf_base = tf.AutoModelForCausalLM.from_pretrained(path)
    hf = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter"))
    got = hf_logits(hf.eval(), ids, mask, pos)
    assert np.abs(got - want)[real].max() <= TOL
    base_logits = hf_logits(tf.AutoModelForCausalLM.from_pretrained(path), ids, mask, pos)
    assert np.abs(base_logits - want)[real].max() > 1e-2  # the adapters matter
    save_pretrained(ours, str(tmp_path / "merged"))
    merged = hf_logits(tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), ids, mask, pos)
    assert np.abs(merged - want)[real].max() <= TOL


@pytest.mark.parametrize("scan", [False, True])
def test_a_peft_made_adapter_loads_into_our_model(path, tmp_path, scan):  # noqa: F811
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False)  # random A and B  # fmt: skip
    hf = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(path), config)
    hf.save_pretrained(str(tmp_path / "theirs"))
    ids, mask, pos = padded_batch("left", seed=2)
    want = hf_logits(hf.eval(), ids, mask, pos)
    spec = read_adapter_config(str(tmp_path / "theirs"))
    assert spec == LoRASpec(rank=8, alpha=32.0, targets=("k_proj", "gate_proj", "down_proj"))
    ours = load_adapter(from_pretrained(path, lora=spec, scan_layers=scan), str(tmp_path / "theirs"))
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours(ids, mask, pos)) - want)[real].max() <= TOL


def test_reward_model_adapter_carries_the_score_head(path, tmp_path):  # noqa: F811
    ours = _randomize(from_pretrained(path, head="score", lora=SPEC, init_score_head=True))
    save_adapter(ours, str(tmp_path / "rm"))
    assert json.loads((tmp_path / "rm" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    fresh = from_pretrained(path, head="score", lora=SPEC, init_score_head=True, seed=9)
    again = load_adapter(fresh, str(tmp_path / "rm"))
    ids, mask, pos = padded_batch("right", seed=3)
    np.testing.assert_allclose(np.asarray(again(ids, mask, pos)), np.asarray(ours(ids, mask, pos)), atol=1e-6)
    cls = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    hf = peft.PeftModel.from_pretrained(cls, str(tmp_path / "rm")).eval()
    with torch.no_grad():
        scores = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    last = mask.sum(1) - 1  # transformers reads the last non-pad token
    np.testing.assert_allclose(scores, np.asarray(ours(ids, mask, pos))[np.arange(len(ids)), last], atol=TOL)


def test_bad_adapter_directories_name_the_file(path, tmp_path):  # noqa: F811
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        read_adapter_config(str(tmp_path))
    dora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(dora))
    with pytest.raises(CheckpointError, match="use_dora"):
        read_adapter_config(str(tmp_path))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_adapter(from_pretrained(path, lora=SPEC), str(tmp_path))
