"""LoRA adapters in and out of Hugging Face PEFT's format, and merged into the base weights.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with, per
adapted module, `base_model.model.<module>.lora_A.weight [r, in]` and `lora_B.weight [out, r]`
(torch's `[out, in]` layout: our `A [in, r]` and `B [r, out]` transposed). A reward model's score
head is trained in full and travels as `base_model.model.score.weight` (PEFT's `modules_to_save`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.hf_io import CheckpointError
from jaxrlhf.models.lora import LoRASpec, is_adapter
from jaxrlhf.models.quant import dequantize
from jaxrlhf.parallel.partition import host_array

Path = tuple[Any, ...]

_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip


def _flat(model: Any) -> dict[Path, jax.Array]:
    _, state = nnx.split(model, nnx.Param)
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def merged_params(model: Any) -> list[tuple[Path, jax.Array]]:
    """The model's parameters with every adapter folded into its kernel, `W + A B alpha / r` (one
    targeted kernel at a time; a quantized kernel is dequantized first), and the adapter matrices
    dropped: a plain base-layout state that `save_pretrained` writes as a Hugging Face model."""
    cfg = model.config
    spec: LoRASpec | None = cfg.lora
    flat = _flat(model)
    out = []
    for path, value in flat.items():
        if is_adapter(path) or path[-1] == "qscale":
            continue
        if path[-1] == "qkernel":
            path = (*path[:-1], "kernel")
            value = dequantize(value, flat[(*path[:-1], "qscale")], cfg.quantize, cfg.param_dtype)
        a = flat.get((*path[:-1], "lora_a")) if path[-1] == "kernel" else None
        if a is not None and spec is not None:
            b = flat[(*path[:-1], "lora_b")]
            delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * spec.scale
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
        out.append((path, value))
    return out


def _layer_modules(model: Any) -> list[tuple[int, str, Path]]:
    """(layer index, PEFT module name, our path prefix) of every adapted linear layer."""
    cfg = model.config
    out = []
    for name in cfg.lora.targets:
        for i in range(cfg.num_layers):
            block = _BLOCK[name]
            prefix: Path = ("layers", block, name) if cfg.scan_layers else ("layers", i, block, name)
            out.append((i, f"model.layers.{i}.{_BLOCK[name]}.{name}", prefix))
    return out


def save_adapter(model: Any, directory: str, *, base_model: str | None = None) -> None:
    """Write the model's adapters as a PEFT LoRA directory that `peft.PeftModel.from_pretrained(
    base, directory)` loads (plus the score head of a reward model)."""
    from safetensors.numpy import save

    cfg = model.config
    spec: LoRASpec | None = cfg.lora
    if spec is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (from_pretrained(..., lora=...))")
    flat = _flat(model)
    tensors: dict[str, np.ndarray] = {}
    for i, module, prefix in _layer_modules(model):
        a, b = (host_array(flat[(*prefix, n)]).astype(np.float32) for n in ("lora_a", "lora_b"))
        if cfg.scan_layers:
            a, b = a[i], b[i]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    score = model.head_type == "score"
    if score:
        head = host_array(flat[("score", "kernel")]).astype(np.float32)
        tensors["base_model.model.score.weight"] = np.ascontiguousarray(head.T)
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if score else "CAUSAL_LM", "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": list(spec.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": ["score"] if score else None,
        "base_model_name_or_path": base_model, "inference_mode": True,
    }  # fmt: skip
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)  # weights first, config last: a config means complete
    weights = save(tensors, metadata={"format": "pt"})
    _write_atomic(os.path.join(directory, "adapter_model.safetensors"), weights)
    _write_atomic(os.path.join(directory, "adapter_config.json"), json.dumps(config, indent=2).encode())


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_adapter_config(directory: str) -> LoRASpec:
    """The `LoRASpec` of a PEFT LoRA directory; errors name the file and the unsupported setting."""
    path = os.path.join(directory, "adapter_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read a PEFT adapter config ({e})") from e
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise CheckpointError(f"{path}: {key}=true is not supported")
    if config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{path}: bias / rank_pattern / alpha_pattern adapters are not supported")
    targets = config.get("target_modules")
    try:
        return LoRASpec.build(config["r"], config["lora_alpha"], targets, config.get("lora_dropout", 0.0))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_adapter(model: Any, directory: str) -> Any:
    """Fill `model`'s adapters (built with `read_adapter_config(directory)`'s spec) from a PEFT
    LoRA directory; a reward model's score head too when the adapter carries one. Returns `model`."""
    from safetensors.numpy import load_file

    file = os.path.join(directory, "adapter_model.safetensors")
    try:
        tensors = load_file(file)
    except Exception as e:  # missing file, not safetensors
        raise CheckpointError(f"{file}: cannot read the adapter weights ({e})") from e
    cfg = model.config
    _, state = nnx.split(model, nnx.Param)
    variables = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    stacked: dict[Path, list[np.ndarray]] = {}
    for _, module, prefix in _layer_modules(model):
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = f"base_model.model.{module}.{theirs}.weight"
            if key not in tensors:
                raise CheckpointError(f"{file}: tensor {key!r} is missing")
            value = tensors[key].astype(np.float32).T
            var = variables[(*prefix, ours)]
            want = var.get_value().shape[1:] if cfg.scan_layers else var.get_value().shape
            if value.shape != tuple(want):
                raise CheckpointError(
                    f"{file}: {key!r} has shape {list(value.T.shape)}, expected {list(want)[::-1]}"
                )
            if cfg.scan_layers:
                stacked.setdefault((*prefix, ours), []).append(value)
            else:
                _assign(var, value)
    for path, layers in stacked.items():
        _assign(variables[path], np.stack(layers))
    if model.head_type == "score" and "base_model.model.score.weight" in tensors:
        _assign(variables[("score", "kernel")], tensors["base_model.model.score.weight"].astype(np.float32).T)
    nnx.update(model, state)
    return model


def _assign(var: Any, value: np.ndarray) -> None:
    old = var.get_value()
    new = jnp.asarray(value, old.dtype)
    sharding = getattr(old, "sharding", None)
    var.set_value(jax.device_put(new, sharding) if sharding is not None else new)
