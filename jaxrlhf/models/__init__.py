"""Flax NNX decoders that load and save Hugging Face checkpoints exactly."""

from jaxrlhf.models.attention import (
    attend,
    dot_product_attention,
    resolve_backend,
    splash_attention,
    xla_attention,
)
from jaxrlhf.models.config import (
    ATTENTION_BACKENDS,
    REMAT_POLICIES,
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedModelError,
    from_hf_config,
)
from jaxrlhf.models.decoder import CausalLM, default_positions, make_attention_mask, remat_policy
from jaxrlhf.models.hf_io import CheckpointError
from jaxrlhf.models.lora import LORA_TARGETS, LoRAParam, LoRASpec, adapters_off
from jaxrlhf.models.moe import (
    RouterStats,
    add_router_aux,
    load_balancing_loss,
    load_balancing_loss_from_logits,
    route,
    router_aux_loss,
)
from jaxrlhf.models.peft_io import load_adapter, merged_params, read_adapter_config, save_adapter
from jaxrlhf.models.pretrained import (
    check_checkpoint,
    from_pretrained,
    load_tokenizer,
    resolve_checkpoint,
    save_pretrained,
    to_hf_config,
)
from jaxrlhf.models.trunk import shared_trunk, trunk_arrays

__all__ = [
    "ATTENTION_BACKENDS",
    "LORA_TARGETS",
    "REMAT_POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "CheckpointError",
    "LoRAParam",
    "LoRASpec",
    "ModelConfig",
    "RouterStats",
    "UnsupportedModelError",
    "adapters_off",
    "add_router_aux",
    "attend",
    "check_checkpoint",
    "default_positions",
    "dot_product_attention",
    "from_hf_config",
    "from_pretrained",
    "load_adapter",
    "load_balancing_loss",
    "load_balancing_loss_from_logits",
    "load_tokenizer",
    "make_attention_mask",
    "merged_params",
    "read_adapter_config",
    "remat_policy",
    "resolve_backend",
    "resolve_checkpoint",
    "route",
    "router_aux_loss",
    "save_adapter",
    "save_pretrained",
    "shared_trunk",
    "splash_attention",
    "to_hf_config",
    "trunk_arrays",
    "xla_attention",
]
