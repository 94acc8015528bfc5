"""`ModelConfig`: the one description of a decoder that every supported Hugging Face model type maps to.

Hugging Face configs differ in field names (`n_embd` vs `hidden_size`), in where RoPE settings live
(`rope_parameters` in transformers v5, `rope_theta`/`rope_scaling` before) and in small architectural
switches (q/k/v bias, q/k norm, tied embeddings). `from_hf_config` reads all of them into one frozen
dataclass; the model code only ever looks at `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.models.attention import ATTENTION_BACKENDS, resolve_backend

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "gemma2", "gemma3_text", "gemma3", "mixtral",
    "qwen3_moe",
)  # fmt: skip
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen3_moe")

# What the backward pass keeps from each decoder layer's forward (jax.checkpoint_policies names):
# auto = dots_saveable with scanned layers, none unrolled (see ModelConfig.remat_policy);
# none = everything (no remat); full = only the layer's input; dots_saveable = matmul outputs;
# dots_with_no_batch_dims_saveable = matmuls against weights (not attention's QK^T / PV);
# offload_dots = those same matmul outputs, moved to pinned host memory between passes.
# (ATTENTION_BACKENDS, the attention implementations, is defined and resolved in
# jaxrlhf.models.attention and importable from here.)
REMAT_POLICIES = ("auto", "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")

# How MoE layers run their experts (jaxrlhf.models.moe): auto = ragged on TPU/GPU, dense on CPU.
MOE_DISPATCHES = ("auto", "ragged", "dense")

_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


class UnsupportedModelError(ValueError):
    """The checkpoint's `model_type` or one of its settings has no implementation here."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (all supported families)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    norm_type: str = "rms"  # "rms" (llama family) or "layernorm" (gpt2)
    position_embedding: str = "rope"  # "rope" or "learned" (gpt2)
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF rope dict
    activation: str = "silu"
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None  # per layer: does the window apply?
    # Gemma: embeddings times sqrt(D), RMSNorm weights applied as (1 + w), norms around attention
    # and MLP both ("sandwich"), attention scaled by query_pre_attn_scalar^-1/2 instead of
    # head_dim^-1/2, tanh soft-capping of attention scores and final logits, and (Gemma 3) a
    # separate RoPE base without scaling on the sliding-window layers.
    embed_scale: bool = False
    norm_offset: float = 0.0
    sandwich_norm: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    local_rope_theta: float | None = None
    # Mixture of experts (Mixtral, Qwen3-MoE): top-k routing over `num_experts` gated MLPs of width
    # `moe_intermediate_size`; `moe_layers` marks which layers are sparse (None: all).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] | None = None
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss the trainers add
    moe_dispatch: str = "auto"  # one of MOE_DISPATCHES (jaxrlhf.models.moe)
    # Numerics and memory; not part of the checkpoint.
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = "auto"  # per-layer rematerialisation policy: one of REMAT_POLICIES
    scan_layers: bool = False  # parameters stacked [L, ...] and applied with one lax.scan
    frozen_layers: int = 0  # the embeddings and layers 0..N-1 get no gradient (backward stops above them)
    attention: str = "auto"  # one of ATTENTION_BACKENDS
    lora: Any = None  # a jaxrlhf.models.lora.LoRASpec: low-rank adapters on the targeted linears
    # How a score head's per-token scores become one score: "last" (the last real token, as
    # transformers' *ForSequenceClassification) or "mean" (over the response tokens). Exported as
    # config.json's "jaxrlhf_score_pooling" so the RL trainers read a reward model as it was trained.
    score_pooling: str = "last"
    quantize: str = "none"  # the frozen projection kernels stored as "int8" / "nf4" (QLoRA)

    def __post_init__(self) -> None:
        if isinstance(self.remat, bool):  # the old switch: True = full, False = none
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.lora is not None and self.model_type == "gpt2":
            raise UnsupportedModelError(
                "LoRA uses PEFT's llama-style module names (q_proj ... down_proj); gpt2's fused "
                "c_attn / c_fc layers are not supported"
            )
        if self.score_pooling not in ("last", "mean"):
            raise ValueError(f"score_pooling must be last or mean, got {self.score_pooling!r}")
        if self.quantize not in ("none", "int8", "nf4"):
            raise ValueError(f"quantize must be none, int8 or nf4, got {self.quantize!r}")
        if self.quantize != "none" and self.lora is None:
            raise ValueError("a quantized base cannot be trained: quantize needs LoRA adapters")
        if self.moe_dispatch not in MOE_DISPATCHES:
            raise ValueError(
                f"moe_dispatch must be one of {', '.join(MOE_DISPATCHES)}, got {self.moe_dispatch!r}"
            )
        if self.num_experts:
            if self.lora is not None and set(self.lora.targets) & {"gate_proj", "up_proj", "down_proj"}:
                raise UnsupportedModelError(
                    "LoRA on mixture-of-experts MLPs is not supported: target the attention "
                    "projections (lora.target_modules: [q_proj, k_proj, v_proj, o_proj])"
                )
            if self.quantize != "none":
                raise UnsupportedModelError("quantize (QLoRA) is not supported for mixture-of-experts models")
            if self.scan_layers and self.moe_layers is not None and len(set(self.moe_layers)) > 1:
                raise UnsupportedModelError(
                    "scan_layers needs every layer alike; this checkpoint mixes dense and sparse "
                    "layers (mlp_only_layers / decoder_sparse_step): use scan_layers: false"
                )
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )

    @property
    def effective_remat(self) -> str:
        """`remat` resolved: "auto" is "dots_saveable" with scanned layers and "none" unrolled.

        In a scan every residual the backward pass keeps is written to an `[L, ...]` stack, so
        "none" stores each elementwise intermediate too (the MLP alone keeps five `[B, T, F]` per
        layer); unrolled, XLA fuses those into the backward pass instead. Keeping only the matmul
        outputs is what unrolled layers get for free: measured on the demo model's DPO step, the
        scanned step goes from 1.14x to 0.97-1.02x the unrolled one, with half the temporaries.
        """
        if self.remat == "auto":
            return "dots_saveable" if self.scan_layers else "none"
        return self.remat

    @property
    def effective_attention(self) -> str:
        """`attention` resolved for jax's default backend ("auto": splash on TPU, cudnn on GPU for
        bfloat16/float16 compute, xla otherwise)."""
        return resolve_backend(self.attention, self.dtype, self.head_dim, soft_cap=self.attn_logit_softcap)

    @property
    def effective_moe_dispatch(self) -> str:
        """`moe_dispatch` resolved: "auto" is "ragged" (grouped GEMM) on TPU/GPU and "dense" on CPU,
        where `ragged_dot` is lowered to a masked product over every group (see docs/models.md)."""
        if self.moe_dispatch != "auto":
            return self.moe_dispatch
        return "dense" if jax.default_backend() == "cpu" else "ragged"

    def for_platform(self, platform: str) -> ModelConfig:
        """This config with "auto" attention and MoE dispatch resolved for `platform` ("tpu", "gpu",
        "cpu") instead of jax's default backend. A CPU process compiling for a TPU topology (e.g.
        `jaxrlhf.plan`) builds its model from `cfg.for_platform("tpu")`, or "auto" would pick the
        CPU paths (XLA attention, dense experts)."""
        attention = resolve_backend(
            self.attention, self.dtype, self.head_dim, platform, soft_cap=self.attn_logit_softcap
        )
        dispatch = self.moe_dispatch
        if dispatch == "auto":
            dispatch = "dense" if platform == "cpu" else "ragged"
        return self.replace(attention=attention, moe_dispatch=dispatch)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: query_pre_attn_scalar^-1/2 (Gemma 2/3), else head_dim^-1/2."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_is_moe(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        return True if self.moe_layers is None else self.moe_layers[layer]

    def layer_uses_window(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return True if self.sliding_layers is None else self.sliding_layers[layer]


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """RoPE base and scaling from either the v5 `rope_parameters` or the v4 fields."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, tuple(sorted(params.items()))


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face `config.json` dict.

    Raises `UnsupportedModelError` for model types or settings that are not implemented, rather than
    guessing.
    """
    model_type = hf.get("model_type")
    if "jaxrlhf_score_pooling" in hf:
        overrides = {"score_pooling": hf["jaxrlhf_score_pooling"], **overrides}
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gpt2":
        hidden = int(hf["n_embd"])
        heads = int(hf["n_head"])
        act = hf.get("activation_function", "gelu_new")
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"gpt2 activation_function {act!r} is not supported")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UnsupportedModelError(
                "gpt2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported"
            )
        if hf.get("scale_attn_weights") is False:
            raise UnsupportedModelError("gpt2 scale_attn_weights=False is not supported")
        cfg = ModelConfig(
            model_type="gpt2",
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf.get("n_inner") or 4 * hidden),
            num_layers=int(hf["n_layer"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=int(hf["n_positions"]),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            norm_type="layernorm",
            position_embedding="learned",
            activation=act,
            gated_mlp=False,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
        return cfg.replace(**overrides)

    if model_type == "gemma3":  # the multimodal checkpoint: its text tower (vision is not used)
        text = dict(hf.get("text_config") or {})
        text["model_type"] = "gemma3_text"
        return from_hf_config(text, **overrides)
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention (an embedding model) is not supported")
    gemma = model_type in GEMMA_TYPES
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    act = _get(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh" if gemma else "silu")
    if model_type == "gemma" and act == "gelu":  # the released configs' legacy value means tanh
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported")
    rope_cfg, local_theta = hf, None
    if model_type == "gemma3_text":
        rope_cfg, local_theta = _gemma3_rope(hf)
    theta, scaling = _rope_settings(rope_cfg)
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = {"qwen2": True}.get(model_type, attention_bias)
    o_bias = {"qwen2": False}.get(model_type, attention_bias)
    num_layers = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    sliding_layers = None
    layer_types = hf.get("layer_types")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        if layer_types is None:  # v4 configs: the window applies to layers >= max_window_layers
            if hf.get("use_sliding_window"):
                first = int(hf.get("max_window_layers", 0))
                layer_types = [
                    "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
                ]
            else:
                window = None
    if model_type in ("gemma2", "gemma3_text"):
        window = hf.get("sliding_window", 4096)
        if layer_types is None:  # v4 configs: Gemma 2 alternates; Gemma 3 has 5 local : 1 global
            pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
            layer_types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
            ]
    if layer_types is not None:
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
        if not any(sliding_layers) or window is None:
            window, sliding_layers = None, None
            local_theta = None
    sandwich = model_type in ("gemma2", "gemma3_text")
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads", default=heads)),
        head_dim=int(_get(hf, "head_dim", default=hidden // heads)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        activation=act,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        sliding_window=int(window) if window is not None else None,
        sliding_layers=sliding_layers,
        embed_scale=gemma,
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norm=sandwich,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if sandwich else None,
        attn_logit_softcap=_softcap(hf, "attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
        final_logit_softcap=_softcap(hf, "final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        local_rope_theta=local_theta,
        **_moe_settings(hf, model_type, num_layers),
    )
    return cfg.replace(**overrides)


def _softcap(hf: dict[str, Any], name: str, default: float | None) -> float | None:
    value = hf.get(name, default)
    return float(value) if value else None


def _gemma3_rope(hf: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Gemma 3's two RoPEs: (settings of the global layers, base of the sliding-window layers).

    transformers v5 keys `rope_parameters` by layer type; v4 had `rope_theta` / `rope_scaling` for the
    global layers and `rope_local_base_freq` for the local ones."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        full.setdefault("rope_theta", 1_000_000.0)
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError("Gemma 3 sliding-window layers with rope scaling are not supported")
        return {"rope_parameters": full}, float(local.get("rope_theta", 10_000.0))
    global_cfg = {
        "rope_theta": hf.get("rope_theta", 1_000_000.0),
        "rope_scaling": hf.get("rope_scaling"),
        "rope_parameters": params or None,
    }
    return global_cfg, float(hf.get("rope_local_base_freq", 10_000.0))


def _moe_settings(hf: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """ModelConfig's expert fields: Mixtral (every layer sparse, top-k renormalised) and Qwen3-MoE
    (`norm_topk_prob`, dense layers by `mlp_only_layers` / `decoder_sparse_step`)."""
    if model_type not in MOE_TYPES:
        return {}
    experts = int(_get(hf, "num_local_experts", "num_experts", default=8))
    if model_type == "mixtral":
        width, norm, moe_layers = int(hf["intermediate_size"]), True, None
    else:
        width = int(hf["moe_intermediate_size"])
        norm = bool(hf.get("norm_topk_prob", False))
        dense = set(hf.get("mlp_only_layers") or [])
        step = int(hf.get("decoder_sparse_step", 1))
        flags = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        moe_layers = None if all(flags) else flags
    if hf.get("router_jitter_noise"):
        raise UnsupportedModelError("router_jitter_noise > 0 is not supported")
    # transformers adds the load-balancing loss only when output_router_logits is set (TRL too).
    coef = float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0
    return {
        "num_experts": experts,
        "num_experts_per_tok": int(hf.get("num_experts_per_tok", 2)),
        "moe_intermediate_size": width,
        "norm_topk_prob": norm,
        "moe_layers": moe_layers,
        "router_aux_loss_coef": coef,
    }
