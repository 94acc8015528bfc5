"""`from_pretrained` / `save_pretrained` / `load_tokenizer`: Hugging Face checkpoints in and out."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.models.config import (
    ATTENTION_BACKENDS,
    GEMMA_TYPES,
    ModelConfig,
    UnsupportedModelError,
    from_hf_config,
)
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.models.hf_io import CheckpointError, SafetensorsReader, load_params, write_safetensors
from jaxrlhf.models.lora import LoRASpec, is_adapter
from jaxrlhf.models.peft_io import merged_params
from jaxrlhf.models.quant import QUANTIZATIONS, quantize
from jaxrlhf.parallel.partition import (
    DEFAULT_RULES,
    Rule,
    activation_sharding,
    batch_axes,
    param_sharding,
)

log = logging.getLogger(__name__)

_HF_ARCH = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gpt2": "GPT2",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
    "mixtral": "Mixtral",
    "qwen3_moe": "Qwen3Moe",
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_checkpoint(path_or_hub_id: str, *, allow_patterns: Sequence[str] | None = None) -> str:
    """A local directory for `path_or_hub_id`: the path itself, or the hub snapshot (through
    huggingface_hub's cache; `HF_HUB_OFFLINE=1` is respected)."""
    path = os.path.expanduser(str(path_or_hub_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path_or_hub_id}: not a directory (a checkpoint is a directory of files)")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise CheckpointError(f"{path_or_hub_id}: no such checkpoint directory")
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    try:
        return snapshot_download(path_or_hub_id, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, no network: all are "cannot get it"
        raise CheckpointError(
            f"{path_or_hub_id}: not a local directory and not available from the Hugging Face hub "
            f"or its cache ({type(e).__name__}: {e})"
        ) from e


def read_hf_config(directory: str) -> dict[str, Any]:
    file = os.path.join(directory, "config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read the model config ({e})") from e


def model_config(directory: str, **overrides: Any) -> ModelConfig:
    """`ModelConfig` of the checkpoint in `directory`; errors name its config.json."""
    hf = read_hf_config(directory)
    file = os.path.join(directory, "config.json")
    try:
        return from_hf_config(hf, **overrides)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{file}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: incomplete or invalid model config ({type(e).__name__}: {e})") from e


def check_checkpoint(path_or_hub_id: str) -> str:
    """The checkpoint's local directory, after checking, without loading any weight, that it can be
    loaded: config.json readable and of a supported model type, every safetensors file present and
    whole (headers parsed; a truncated file fails here). Raises `CheckpointError` or
    `UnsupportedModelError` naming the path; the trainers call this before reading data."""
    directory = resolve_checkpoint(path_or_hub_id)
    model_config(directory)
    reader = SafetensorsReader(directory)
    try:
        for file in sorted(set(reader.files.values())):
            reader.check_file(file)
    finally:
        reader.close()
    return directory


def _as_dtype(dtype: Any) -> Any:
    return _DTYPES[dtype] if isinstance(dtype, str) else dtype


def from_pretrained(
    path_or_hub_id: str,
    *,
    head: str = "lm",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Sequence[Rule] = DEFAULT_RULES,
    remat: bool | str = "auto",
    scan_layers: bool = False,
    frozen_layers: int = 0,
    attention: str = "auto",
    lora: LoRASpec | None = None,
    quantize_base: str = "none",
    init_score_head: bool = False,
    seed: int = 0,
    router_aux_loss_coef: float | None = None,
    moe_dispatch: str = "auto",
) -> CausalLM:
    """Load a Hugging Face checkpoint (safetensors only) as a Flax NNX `CausalLM`.

    Args:
      path_or_hub_id: a local directory with `config.json` and `model.safetensors` (or sharded with
        `model.safetensors.index.json`), or a hub ID resolved through huggingface_hub.
      head: `"lm"` for logits `[B, T, V]`, `"score"` for scalar scores `[B, T]` (reward models,
        critics), read from `score.weight` as in `*ForSequenceClassification`.
      dtype: compute dtype (`jnp.float32` or `jnp.bfloat16`); param_dtype: storage dtype of parameters.
      mesh: place each parameter directly at its `NamedSharding` under `rules`, reading only each
        shard's slice from disk.
      remat: what the backward pass keeps of each decoder layer: a `REMAT_POLICIES` name ("auto",
        "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots");
        True/False mean "full"/"none". "auto" keeps the matmul outputs of scanned layers and
        everything of unrolled ones (`ModelConfig.effective_remat`).
      scan_layers: stack the layers' parameters `[L, ...]` (each HF per-layer tensor read straight
        into its slice) and run them with one `lax.scan`: compile time no longer grows with depth.
      attention: the attention implementation, one of `ATTENTION_BACKENDS`: "xla" (einsums, the
        reference), "splash" (Pallas TPU kernel), "cudnn" (fused GPU kernel, bf16/fp16), or "auto"
        (splash on TPU, cudnn on GPU where the dtype allows, xla otherwise); see
        `jaxrlhf.models.attention`.
      lora: add low-rank adapters (`LoRASpec`: rank, alpha, target modules) to the targeted linear
        layers: `A` drawn as PEFT does (seeded by `seed`), `B = 0`, so the model starts as the base.
      quantize_base: with `lora`, store the frozen projection kernels as "int8" or "nf4" codes
        and dequantize them per call (QLoRA; `jaxrlhf.models.quant`); "none" keeps them as loaded.
      frozen_layers: stop the backward pass above the first N decoder layers (with
        `jaxrlhf.train.step.make_optimizer(frozen=frozen_params(N))` they are not trained).
      init_score_head: with `head="score"` and a checkpoint without `score.weight` (a causal LM), draw
        the score head from N(0, 1/sqrt(D+1)) (seeded by `seed`) instead of raising.
      router_aux_loss_coef: mixture-of-experts models: the weight of the load-balancing loss the
        trainers add (`jaxrlhf.models.moe`); None keeps the checkpoint's (its
        `router_aux_loss_coef` when `output_router_logits` is set, else 0).
      moe_dispatch: how MoE layers run their experts: "ragged" (sorted tokens, `ragged_dot`),
        "dense" (every expert on every token) or "auto" (ragged on TPU/GPU, dense on CPU).
    """
    if quantize_base not in QUANTIZATIONS:
        raise ValueError(f"quantize_base must be one of {', '.join(QUANTIZATIONS)}, got {quantize_base!r}")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    directory = resolve_checkpoint(path_or_hub_id)
    hf = read_hf_config(directory)
    cfg = model_config(directory, dtype=_as_dtype(dtype), param_dtype=_as_dtype(param_dtype), remat=remat,
                       scan_layers=scan_layers, frozen_layers=frozen_layers, attention=attention,
                       lora=lora, quantize=quantize_base, moe_dispatch=moe_dispatch)  # fmt: skip
    if router_aux_loss_coef is not None:
        cfg = cfg.replace(router_aux_loss_coef=float(router_aux_loss_coef))
    if not 0 <= frozen_layers <= cfg.num_layers:
        raise ValueError(f"frozen_layers must be in [0, {cfg.num_layers}], got {frozen_layers}")
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, head=head, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = [(tuple(path), var.get_value()) for path, var in nnx.to_flat_state(abstract_state)]

    def sharding_for(path: tuple[Any, ...], shape: tuple[int, ...]) -> Any:
        return None if mesh is None else param_sharding(path, shape, mesh, rules)

    def missing_ok(path: tuple[Any, ...]) -> bool:
        return init_score_head and path[0] == "score"

    # Adapters are made here; a quantized kernel is read as the float kernel, then quantized.
    quantized = {path[:-1]: value for path, value in flat if path[-1] == "qkernel"}
    base = [(p, v) for p, v in flat if not is_adapter(p) and p[-1] not in ("qkernel", "qscale")]
    for prefix, codes in quantized.items():
        *lead, rows, d_out = codes.shape
        d_in = 2 * rows if cfg.quantize == "nf4" else rows
        base.append(((*prefix, "kernel"), jax.ShapeDtypeStruct((*lead, d_in, d_out), cfg.param_dtype)))
    loaded = load_params(base, cfg, directory, sharding_for=sharding_for, missing_ok=missing_ok)
    for prefix in quantized:  # one kernel at a time: its float copy is dropped once quantized
        kernel = loaded.pop((*prefix, "kernel"))
        shapes = jax.eval_shape(lambda w: quantize(w, cfg.quantize), kernel)
        names = ("qkernel", "qscale")
        out = tuple(sharding_for((*prefix, n), x.shape) for n, x in zip(names, shapes, strict=True))
        fn = jax.jit(lambda w: quantize(w, cfg.quantize), out_shardings=None if mesh is None else out)
        loaded[(*prefix, "qkernel")], loaded[(*prefix, "qscale")] = fn(kernel)
        del kernel
    for i, (path, value) in enumerate(flat):
        if path not in loaded and is_adapter(path):  # fresh adapters: A as PEFT draws it, B = 0
            bound = 1.0 / math.sqrt(value.shape[-2])  # A is [..., in, r]
            key = jax.random.fold_in(jax.random.key(seed), i)
            init = jnp.zeros(value.shape, jnp.float32)
            if path[-1] == "lora_a":
                init = jax.random.uniform(key, value.shape, jnp.float32, -bound, bound)
            sharding = sharding_for(path, value.shape)
            init = init.astype(value.dtype)
            loaded[path] = jax.device_put(init, sharding) if sharding is not None else init
        elif path not in loaded:  # only the score head can get here (see missing_ok)
            std = 1.0 / math.sqrt(cfg.hidden_size + 1)
            init = std * jax.random.normal(jax.random.key(seed), value.shape, jnp.float32)
            sharding = sharding_for(path, value.shape)
            init = init.astype(value.dtype)
            loaded[path] = jax.device_put(init, sharding) if sharding is not None else init
            log.info("initialised %s from N(0, 1/sqrt(D+1))", "/".join(map(str, path)))
    pure: dict[Any, Any] = {}
    for path, value in loaded.items():
        node = pure
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    nnx.replace_by_pure_dict(abstract_state, pure)
    model = nnx.merge(graphdef, abstract_state)
    model.hf_config_json = json.dumps(hf, sort_keys=True)
    if mesh is not None and batch_axes(mesh) is not None:  # a batch split over devices: keep it so
        model.activation_sharding = activation_sharding(mesh)
    model.set_mesh(mesh)
    return model


def to_hf_config(model: CausalLM) -> dict[str, Any]:
    """The `config.json` dict transformers needs to load `model` as `*ForCausalLM` or
    `*ForSequenceClassification`; starts from the original config when the model was loaded from one."""
    cfg: ModelConfig = model.config
    hf: dict[str, Any] = json.loads(getattr(model, "hf_config_json", None) or "{}")
    if hf.get("model_type") == "gemma3":  # a multimodal checkpoint: its text tower is what we hold
        hf = {**hf.get("text_config", {}), "model_type": "gemma3_text"}
    if not hf:
        hf = _fresh_hf_config(cfg)
    arch = _HF_ARCH[cfg.model_type]
    if model.head_type == "score":
        text = "Text" if cfg.model_type == "gemma3_text" else ""
        hf["architectures"] = [f"{arch}{text}ForSequenceClassification"]
        hf["num_labels"] = 1
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        if cfg.score_pooling != "last":  # ours: transformers pools at the last token
            hf["jaxrlhf_score_pooling"] = cfg.score_pooling
    else:
        hf["architectures"] = [f"{arch}LMHeadModel" if arch == "GPT2" else f"{arch}ForCausalLM"]
    if model.head_type != "score" or cfg.score_pooling == "last":
        hf.pop("jaxrlhf_score_pooling", None)
    hf["tie_word_embeddings"] = cfg.tie_word_embeddings
    dtype_name = {jnp.dtype(v): k for k, v in _DTYPES.items()}[jnp.dtype(cfg.param_dtype)]
    hf["dtype"] = dtype_name
    hf.pop("torch_dtype", None)
    return hf


def _fresh_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.model_type == "gpt2":
        return {
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": cfg.activation,
        }
    rope = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
    hf: dict[str, Any] = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": cfg.activation,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "sliding_window": cfg.sliding_window,
    }
    if cfg.model_type in ("llama", "qwen3", "qwen3_moe", "mixtral") or cfg.model_type in GEMMA_TYPES:
        hf["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type in GEMMA_TYPES:
        hf.update(_gemma_fields(cfg))
    if cfg.num_experts:
        hf.update(num_local_experts=cfg.num_experts, num_experts=cfg.num_experts,
                  num_experts_per_tok=cfg.num_experts_per_tok,
                  router_aux_loss_coef=cfg.router_aux_loss_coef,
                  output_router_logits=cfg.router_aux_loss_coef > 0)  # fmt: skip
        if cfg.model_type == "qwen3_moe":
            flags = cfg.moe_layers or (True,) * cfg.num_layers
            dense = [i for i, f in enumerate(flags) if not f]
            hf.update(moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=dense)  # fmt: skip
    return hf


def _gemma_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The Gemma switches of a model built without a config.json (tests, fresh models)."""
    out: dict[str, Any] = {"hidden_activation": cfg.activation}
    if cfg.sliding_window is not None:
        flags = cfg.sliding_layers or (True,) * cfg.num_layers
        out["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
    if cfg.model_type != "gemma":
        out.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                   attn_logit_softcapping=cfg.attn_logit_softcap,
                   final_logit_softcapping=cfg.final_logit_softcap)  # fmt: skip
    if cfg.model_type == "gemma3_text":
        full = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    return out


def save_pretrained(
    model: CausalLM, out_dir: str, *, tokenizer: Any = None, max_shard_size: int | str = "5GB"
) -> None:
    """Write `config.json` + safetensors that `transformers.AutoModelForCausalLM` (LM head) or
    `AutoModelForSequenceClassification` (score head) load as is; sharded with an index above
    `max_shard_size`. The tokenizer, if given, is saved alongside. Atomic per file; config written last.
    A model with LoRA adapters is saved merged (`W + A B alpha / r`); `save_adapter` writes the
    adapters alone in PEFT's format."""
    if model.config.lora is not None:  # the adapters folded into the kernels: a plain HF model
        flat = merged_params(model)
    else:
        _, state = nnx.split(model, nnx.Param)
        flat = [(tuple(path), var.get_value()) for path, var in nnx.to_flat_state(state)]
    hf = to_hf_config(model)
    extra = (lambda d: tokenizer.save_pretrained(d)) if tokenizer is not None else None
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        hf.setdefault("pad_token_id", tokenizer.pad_token_id)
    write_safetensors(
        flat,
        model.config,
        out_dir,
        config_json=hf,
        max_shard_size=max_shard_size,
        extra_files=extra,
    )


def load_tokenizer(path_or_hub_id: str, *, pad_token: str | None = None) -> Any:
    """`transformers.AutoTokenizer` with a pad token that differs from EOS.

    Policy (PPO needs pad != EOS so that a real EOS is never mistaken for padding):
      1. `pad_token` given: use it (added to the vocabulary if new).
      2. the checkpoint's pad token exists and differs from EOS: keep it.
      3. otherwise (no pad, or pad == EOS): use `<|pad|>` if it is already in the vocabulary, else the
         tokenizer's `unk_token` if it is set and differs from EOS; otherwise add a new `<|pad|>` token
         (its id is `len(tokenizer)`, possibly past the embedding: padded positions are masked, and
         the model embeds out-of-vocabulary ids as id 0, so the vocabulary need not grow).
    Padding side is left (the layout generation wants); collators choose their own side explicitly.
    """
    from transformers import AutoTokenizer

    directory = resolve_checkpoint(path_or_hub_id)
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # missing files, a tokenizer class needing an uninstalled package, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{directory}: cannot load a tokenizer ({first})") from e
    eos = tok.eos_token
    if pad_token is not None:
        tok.add_special_tokens({"pad_token": pad_token})
    elif tok.pad_token is None or tok.pad_token == eos:
        vocab = tok.get_vocab()
        if "<|pad|>" in vocab:
            tok.pad_token = "<|pad|>"
        elif tok.unk_token is not None and tok.unk_token != eos:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    if eos is not None and tok.pad_token_id == tok.eos_token_id:
        raise ValueError(f"{path_or_hub_id}: pad token {tok.pad_token!r} equals EOS; pass pad_token=")
    tok.padding_side = "left"
    return tok
