"""Hugging Face safetensors <-> our NNX parameter tree.

Every parameter of `CausalLM` maps to (a slice of) one Hugging Face tensor, described by a `TensorMap`.
Loading reads, for each device shard, only the slice that shard needs (`safe_open(...).get_slice`), so a
sharded model is built tensor by tensor without a second full copy in host memory. Saving writes the
exact `*ForCausalLM` / `*ForSequenceClassification` layout that transformers loads as is.
Only safetensors files are read: no pickle.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.parallel.partition import host_array, is_stacked

Path = tuple[Any, ...]

_GPT2_NAMES = {
    "embed_tokens": "wte",
    "embed_positions": "wpe",
    "layers": "h",
    "input_layernorm": "ln_1",
    "self_attn": "attn",
    "post_attention_layernorm": "ln_2",
    "norm": "ln_f",
    "up_proj": "c_fc",
    "down_proj": "c_proj",
    "o_proj": "c_proj",
}
_LEAF_NAMES = {"embedding": "weight", "scale": "weight", "kernel": "weight", "bias": "bias"}
# Mixture-of-experts modules: our `mlp/router`, `mlp/experts/<e>/{gate,up,down}_proj` by family.
_MOE_NAMES = {
    "mixtral": {
        "mlp": "block_sparse_moe", "router": "gate", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"
    },
    "qwen3_moe": {"router": "gate"},
}
# Where a multimodal checkpoint keeps its text tower (Gemma 3: transformers v5, then v4 layout).
_TOWER_PREFIXES = ("model.language_model.", "language_model.model.")


class CheckpointError(ValueError):
    """A checkpoint cannot be read as the model it claims to be (missing/misshapen tensor, bad file)."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """Where our parameter `path` (shape `shape`) lives in the Hugging Face checkpoint."""

    path: Path
    name: str  # Hugging Face tensor name, relative to the base-model prefix unless `top_level`
    top_level: bool  # `lm_head.*` / `score.*` live outside the base model ("model." / "transformer.")
    transpose: bool  # torch nn.Linear stores [out, in]; we store [in, out]
    offset: int  # where our last axis starts inside the HF tensor's last axis (gpt2's fused c_attn)
    shape: tuple[int, ...]  # our shape
    hf_shape: tuple[int, ...]  # the whole HF tensor's shape

    def hf_index(self, index: tuple[slice, ...]) -> tuple[slice, ...]:
        """The HF slice that holds `param[index]` (before transposing back)."""
        bounds = [s.indices(n) for s, n in zip(index, self.shape, strict=True)]
        ranges = [slice(a, b) for a, b, _ in bounds]
        if self.offset:
            last = ranges[-1]
            ranges[-1] = slice(last.start + self.offset, last.stop + self.offset)
        return tuple(reversed(ranges)) if self.transpose else tuple(ranges)


def base_prefix(cfg: ModelConfig) -> str:
    return "transformer." if cfg.model_type == "gpt2" else "model."


def tensor_map(cfg: ModelConfig, path: Path, shape: tuple[int, ...]) -> TensorMap:
    """Translate one of our parameter paths to its Hugging Face tensor."""
    parts = [str(p) for p in path]
    top_level = parts[0] in ("lm_head", "score")
    leaf = _LEAF_NAMES[parts[-1]]
    is_kernel = parts[-1] == "kernel"
    offset, transpose = 0, is_kernel
    if cfg.model_type == "gpt2" and not top_level:
        transpose = False  # GPT-2's Conv1D already stores [in, out]
        module = parts[-2]
        if module in ("q_proj", "k_proj", "v_proj"):  # fused into c_attn: [D, 3D]
            offset = ("q_proj", "k_proj", "v_proj").index(module) * cfg.hidden_size
            parts[-2] = "c_attn"
        parts = [_GPT2_NAMES.get(p, p) for p in parts]
    if cfg.num_experts and "mlp" in parts and ("router" in parts or "experts" in parts):
        names = _MOE_NAMES.get(cfg.model_type, {})
        parts = [names.get(p, p) for p in parts]
    name = ".".join(parts[:-1] + [leaf])
    hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
    if offset or (cfg.model_type == "gpt2" and parts[-2] == "c_attn"):
        hf_shape = hf_shape[:-1] + (3 * cfg.hidden_size,)
    return TensorMap(tuple(path), name, top_level, transpose, offset, tuple(shape), hf_shape)


class SafetensorsReader:
    """Reads tensors (or slices of them) from a single-file or sharded safetensors checkpoint."""

    def __init__(self, directory: str):
        self.directory = directory
        index_file = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index_file):
            try:
                with open(index_file) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index_file}: unreadable safetensors index ({e})") from e
            self.files = {name: os.path.join(directory, fn) for name, fn in weight_map.items()}
        elif os.path.exists(single):
            self.files = {name: single for name in self._keys(single)}
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            pickles = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = f" (found {pickles}: pickle checkpoints are not read)" if pickles else ""
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _keys(file: str) -> list[str]:
        try:
            with safe_open(file, framework="np") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: listed in the safetensors index but missing")
            try:
                self._handles[file] = safe_open(file, framework="np")
            except Exception as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        return self._handles[file]

    def check_file(self, file: str) -> None:
        """Open `file` (parsing its header): a missing, corrupt or truncated file raises here."""
        self._handle(file)

    def resolve(self, name: str, prefix: str, top_level: bool) -> str | None:
        """The checkpoint key for `name`: with the base prefix first, then bare (e.g. `GPT2Model`)."""
        candidates = [name] if top_level else [prefix + name, name] + [p + name for p in _TOWER_PREFIXES]
        return next((c for c in candidates if c in self.files), None)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[key]).get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        file = self.files[key]
        try:
            sl = self._handle(file).get_slice(key)
            return np.asarray(sl[index] if index is not None else sl[:])
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from e

    def close(self) -> None:
        self._handles.clear()


def load_params(
    flat_abstract: list[tuple[Path, jax.ShapeDtypeStruct]],
    cfg: ModelConfig,
    directory: str,
    *,
    sharding_for: Callable[[Path, tuple[int, ...]], jax.sharding.Sharding | None],
    missing_ok: Callable[[Path], bool] = lambda path: False,
) -> dict[Path, jax.Array]:
    """Load every parameter listed in `flat_abstract` from `directory`.

    `sharding_for(path, shape)` gives each parameter's target sharding (or None for the default device);
    each device shard is read straight from the file. Parameters for which `missing_ok(path)` is true may
    be absent (the caller initialises them); any other absence or shape mismatch raises `CheckpointError`.
    """
    reader = SafetensorsReader(directory)
    prefix = base_prefix(cfg)
    out: dict[Path, jax.Array] = {}

    def locate(path: Path, shape: tuple[int, ...]) -> tuple[TensorMap, str] | None:
        tmap = tensor_map(cfg, path, shape)
        key = reader.resolve(tmap.name, prefix, tmap.top_level)
        if key is None:
            if missing_ok(path):
                return None
            shown = tmap.name if tmap.top_level else prefix + tmap.name
            raise CheckpointError(f"{directory}: tensor {shown!r} is missing from the checkpoint")
        found = reader.shape(key)
        if found != tmap.hf_shape:
            raise CheckpointError(
                f"{reader.files[key]}: tensor {key!r} has shape {list(found)}, "
                f"expected {list(tmap.hf_shape)} for {cfg.model_type} with this config"
            )
        return tmap, key

    def read(tmap: TensorMap, key: str, index: tuple[slice, ...], dtype: Any) -> np.ndarray:
        part = reader.read(key, tmap.hf_index(index))
        return np.ascontiguousarray((part.T if tmap.transpose else part).astype(dtype))

    try:
        for path, abstract in flat_abstract:
            shape, dtype = tuple(abstract.shape), abstract.dtype
            lead = leading_axes(path)
            if lead:  # [L, ...] / [E, ...] / [L, E, ...]: one HF tensor per layer / expert
                grid = list(itertools.product(*(range(n) for n in shape[:lead])))
                each = {at: locate(indexed_path(path, at), shape[lead:]) for at in grid}
                if any(p is None for p in each.values()):
                    continue

                def read_slice(
                    index: tuple[slice, ...], each: Any = each, sizes: Any = shape[:lead], dtype: Any = dtype
                ) -> Any:
                    lead = len(sizes)
                    ranges = [range(*sl.indices(n)) for sl, n in zip(index[:lead], sizes, strict=True)]
                    parts = [read(*each[at], index[lead:], dtype) for at in itertools.product(*ranges)]
                    return np.stack(parts).reshape(*(len(r) for r in ranges), *parts[0].shape)
            else:
                found = locate(path, shape)
                if found is None:
                    continue

                def read_slice(index: tuple[slice, ...], found: Any = found, dtype: Any = dtype) -> Any:
                    return read(*found, index, dtype)

            sharding = sharding_for(path, shape)
            if sharding is None:
                out[path] = jax.device_put(read_slice(tuple(slice(None) for _ in shape)))
            else:
                out[path] = jax.make_array_from_callback(shape, sharding, read_slice)
    finally:
        reader.close()
    return out



def parse_size(size: int | str) -> int:
    """`"5GB"`, `"500MB"`, `"10KiB"` or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3}[unit[0]]
    return int(float(m.group(1)) * base**power)


def leading_axes(path: Path) -> int:
    """How many leading axes of our parameter index separate HF tensors: the layer axis of a
    scanned model (`layers/...` stacked `[L, ...]`) and the expert axis of an MoE kernel
    (`experts/<proj>/kernel` `[E, in, out]`)."""
    parts = [str(p) for p in path]
    return int(is_stacked(path)) + int("experts" in parts and parts[-1] == "kernel")


def indexed_path(path: Path, at: tuple[int, ...]) -> Path:
    """One HF tensor's path: `layers/self_attn/...` (stacked) with `at=(3,)` -> `layers/3/...`;
    an expert kernel `.../experts/gate_proj/kernel` with `(e,)` -> `.../experts/<e>/gate_proj/kernel`
    (with `(layer, e)` when both)."""
    out, rest = list(path), list(at)
    if is_stacked(path):
        i = [str(p) for p in out].index("layers")
        out.insert(i + 1, rest.pop(0))
    if rest:
        i = [str(p) for p in out].index("experts")
        out.insert(i + 1, rest.pop(0))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """`stacked[index]` of a parameter with leading layer / expert axes, gathered only when written."""

    stacked: jax.Array
    index: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stacked.shape[len(self.index) :])

    @property
    def dtype(self) -> Any:
        return self.stacked.dtype


def _host(value: jax.Array | LayerSlice) -> np.ndarray:
    if isinstance(value, LayerSlice):
        return host_array(value.stacked[value.index])
    return host_array(value)


def _hf_tensors(
    flat_params: list[tuple[Path, jax.Array]], cfg: ModelConfig
) -> dict[str, list[tuple[TensorMap, Any]]]:
    """Group our parameters by the HF tensor they form (GPT-2's q, k, v form one c_attn); a stacked
    parameter of a scanned model becomes one entry per layer, an expert kernel one per expert."""
    prefix = base_prefix(cfg)
    groups: dict[str, list[tuple[TensorMap, Any]]] = {}
    entries: list[tuple[Path, Any]] = []
    for path, value in flat_params:
        lead = leading_axes(path)
        if lead:
            grid = itertools.product(*(range(n) for n in value.shape[:lead]))
            entries += [(indexed_path(path, at), LayerSlice(value, at)) for at in grid]
        else:
            entries.append((path, value))
    for path, value in entries:
        tmap = tensor_map(cfg, path, tuple(value.shape))
        key = tmap.name if tmap.top_level else prefix + tmap.name
        groups.setdefault(key, []).append((tmap, value))
    return groups


def _assemble(parts: list[tuple[TensorMap, jax.Array]]) -> np.ndarray:
    first = parts[0][0]
    if (
        len(parts) == 1
        and not first.offset
        and first.hf_shape == (tuple(reversed(first.shape)) if first.transpose else first.shape)
    ):
        host = _host(parts[0][1])
        return np.ascontiguousarray(host.T if first.transpose else host)
    full = np.empty(first.hf_shape, dtype=parts[0][1].dtype)
    for tmap, value in parts:
        host = _host(value)
        full[tmap.hf_index(tuple(slice(None) for _ in tmap.shape))] = host.T if tmap.transpose else host
    return full


def write_safetensors(
    flat_params: list[tuple[Path, jax.Array]],
    cfg: ModelConfig,
    out_dir: str,
    *,
    config_json: dict[str, Any],
    max_shard_size: int | str = "5GB",
    extra_files: Callable[[str], None] | None = None,
) -> None:
    """Write `config.json` and safetensors (sharded with an index above `max_shard_size`).

    Files are staged in a temporary directory and moved into place, the config last, so an interrupted
    save never leaves a half-written checkpoint that looks complete. Only process 0 writes.
    """
    groups = _hf_tensors(flat_params, cfg)
    limit = parse_size(max_shard_size)
    sizes = {
        k: int(np.prod(parts[0][0].hf_shape)) * np.dtype(parts[0][1].dtype).itemsize
        for k, parts in groups.items()
    }
    shards: list[list[str]] = [[]]
    used = 0
    for key in groups:
        if shards[-1] and used + sizes[key] > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    writer = jax.process_index() == 0
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".jaxrlhf-save-", dir=parent) if writer else None
    try:
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map: dict[str, str] = {}
        for fname, keys in zip(names, shards, strict=True):
            tensors = {k: _assemble(groups[k]) for k in keys}  # every process joins the gathers
            if writer:
                save_file(tensors, os.path.join(stage, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
            del tensors
        if not writer:
            return
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            with open(os.path.join(stage, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        if extra_files is not None:
            extra_files(stage)
        with open(os.path.join(stage, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
        _move_into_place(stage, out_dir)
        stage = None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _move_into_place(stage: str, out_dir: str) -> None:
    if not os.path.exists(out_dir):
        os.rename(stage, out_dir)  # one atomic step
        return
    # Existing directory (e.g. holding a tokenizer): drop stale weights, move files in, config last.
    for stale in _iter_weight_files(out_dir):
        os.remove(stale)
    staged = sorted(os.listdir(stage), key=lambda n: n == "config.json")
    for name in staged:
        os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    os.rmdir(stage)


def _iter_weight_files(directory: str) -> Iterator[str]:
    for name in os.listdir(directory):
        if name.startswith("model") and (
            name.endswith(".safetensors") or name == "model.safetensors.index.json"
        ):
            yield os.path.join(directory, name)
