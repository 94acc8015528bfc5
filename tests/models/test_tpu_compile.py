"""The model's attention backends and special layers through the real TPU compiler, without a TPU.

libtpu describes a slice (`jaxrlhf.plan.target.tpu_target("v5e:2x2")`); `jit(...).lower(...)` on a
mesh over its devices and `.compile()` run XLA:TPU and Mosaic (the Pallas TPU compiler), nothing
is executed. Tiny models in bfloat16 with `attention="auto"` resolved for TPU
(`ModelConfig.for_platform("tpu")`: splash, ragged experts), their parameters and batches abstract
and sharded over `fsdp x tensor`, each compiled as a gradient of summed token log-probs:

* dense families: GQA, head dims 64 / 128 / 256, padded (left and right) and packed DPO rows, sliding
  windows (Mistral; Gemma 2 / 3 local layers), Gemma 2's soft-capped scores, also on v6e;
* scanned layers under every remat policy; the sampler's prefill and decode (`_generate`);
* mixture of experts (`ragged_dot`) and QLoRA (int8 / nf4 base, LoRA adapters).

Each compile is checked for the Mosaic kernels it must contain (splash's forward, and its dq / dkv
kernels in a gradient) and for a memory analysis that matches the sharded inputs and outputs.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from typing import Any

# libtpu takes a lock file per process (/tmp/libtpu_lockfile) unless told not to; compiling needs
# no exclusive chip, and another process (an xdist worker, a plan) may hold it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import libtpu  # noqa: E402, F401  (the TPU compiler: a test dependency, not an optional one)
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxrlhf.generation.sampling import _generate  # noqa: E402
from jaxrlhf.models import CausalLM, ModelConfig  # noqa: E402
from jaxrlhf.models.lora import LoRAParam, LoRASpec  # noqa: E402
from jaxrlhf.parallel import activation_sharding, batch_axes, make_mesh, param_sharding  # noqa: E402
from jaxrlhf.plan.target import tpu_target  # noqa: E402
from jaxrlhf.train.objectives import packed_mask  # noqa: E402

V5E, V6E = "v5e:2x2", "v6e:2x2"
B = 4  # rows: two per device on fsdp=2, one on fsdp=4
T = 320  # not a multiple of splash's 128-blocks: the padding path compiles too


@pytest.fixture(autouse=True, scope="module")
def _no_persistent_cache() -> Any:
    """tests/conftest.py's persistent compilation cache would store these TPU executables, and a
    process without a TPU client cannot load them back (a warning, then a recompile)."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)


@functools.cache
def _mesh(topology: str, fsdp: int, tensor: int) -> Mesh:
    """An `fsdp x tensor` mesh over the first `fsdp * tensor` chips of the slice."""
    return make_mesh(1, fsdp, tensor, devices=tpu_target(topology).devices[: fsdp * tensor])


def _config(family: str = "llama", **overrides: Any) -> ModelConfig:
    """A tiny bfloat16 model of `family` with attention and MoE dispatch "auto", resolved for TPU."""
    base: dict[str, Any] = dict(
        model_type=family, vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024, dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
    )  # fmt: skip
    if family == "qwen3":  # q/k norms, 4 query heads per key head
        base.update(qk_norm=True, head_dim=128, num_heads=8)
    if family == "mistral":  # a window shorter than the rows
        base.update(head_dim=128, sliding_window=100)
    if family in ("gemma2", "gemma3_text"):
        base.update(
            head_dim=256, embed_scale=True, norm_offset=1.0, sandwich_norm=True, query_pre_attn_scalar=256.0,
            tie_word_embeddings=True, activation="gelu_pytorch_tanh", sliding_window=100,
        )  # fmt: skip
    if family == "gemma2":  # soft caps; local and global layers alternate
        base.update(attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_layers=(True, False))
    if family == "gemma3_text":  # q/k norms, local layers with their own RoPE base
        base.update(
            qk_norm=True, num_layers=3, sliding_layers=(True, False, True), local_rope_theta=10_000.0
        )  # fmt: skip
    if family == "qwen3_moe":
        base.update(
            qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True
        )  # fmt: skip
    cfg = ModelConfig(**{**base, **overrides})
    assert cfg.attention == "auto"
    return cfg.for_platform("tpu")


def _plain(keypath: Any) -> tuple[Any, ...]:
    """A state key path as the partition rules read it (`layers`, 0, `kernel`)."""
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)


def _abstract_model(cfg: ModelConfig, mesh: Mesh, *filters: Any) -> tuple[Any, ...]:
    """`(graphdef, *states)`: `nnx.split(model, *filters)` as sharded `ShapeDtypeStruct`s, the
    model set up on `mesh` as `from_pretrained(mesh=...)` does (residuals pinned, splash kernel
    under `shard_map` over the mesh)."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    model.activation_sharding = activation_sharding(mesh)
    model.set_mesh(mesh)
    graphdef, *states = nnx.split(model, *filters)

    def place(keypath: Any, x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=param_sharding(_plain(keypath), x.shape, mesh))

    return (graphdef, *(jax.tree_util.tree_map_with_path(place, s) for s in states))


def _rows(mesh: Mesh, shape: tuple[int, ...], dtype: Any = jnp.int32) -> jax.ShapeDtypeStruct:
    """A batch array split over the mesh's batch axes on its first dimension."""
    spec = P(batch_axes(mesh), *(None,) * (len(shape) - 1))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _per_device_bytes(tree: Any) -> int:
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _batch(mesh: Mesh, rows: str) -> dict[str, jax.ShapeDtypeStruct]:
    """Padded rows (`attention_mask [B, T]`, any side) or packed DPO rows (`segment_ids`: prompt 1,
    chosen 2, rejected 3, padding 0; positions restart for the rejected segment)."""
    batch = {"input_ids": _rows(mesh, (B, T)), "positions": _rows(mesh, (B, T))}
    batch["segment_ids" if rows == "packed" else "attention_mask"] = _rows(mesh, (B, T))
    return batch


def _summed_logps(model: CausalLM, batch: dict[str, jax.Array]) -> jax.Array:
    """Sum of the next-token log-probs over real tokens: a stand-in for any trainer's loss."""
    ids = batch["input_ids"]
    if "segment_ids" in batch:
        mask, valid = packed_mask(batch["segment_ids"]), batch["segment_ids"] != 0
    else:
        mask, valid = batch["attention_mask"], batch["attention_mask"] != 0
    logits = model(ids, mask, batch["positions"])
    logps = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token = jnp.take_along_axis(logps, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(token * valid[:, 1:])


def _compile_grad(cfg: ModelConfig, mesh: Mesh, rows: str = "padded", trainable: Any = nnx.Param) -> Any:
    """`jit(grad(summed log-probs))` compiled for the mesh's TPUs; the gradient of the `trainable`
    parameters (the rest, e.g. a quantized base, passed in frozen), sharded like them."""
    graphdef, params, *frozen = _abstract_model(cfg, mesh, trainable, ...)
    batch = _batch(mesh, rows)

    def loss(params: Any, frozen: Any, batch: dict[str, jax.Array]) -> jax.Array:
        return _summed_logps(nnx.merge(graphdef, params, *frozen), batch)

    grad = jax.jit(jax.grad(loss), out_shardings=jax.tree.map(lambda x: x.sharding, params))
    compiled = grad.lower(params, frozen, batch).compile()
    _check_memory(compiled, inputs=(params, frozen, batch), outputs=params)
    return compiled


def _check_memory(compiled: Any, *, inputs: Any, outputs: Any = None) -> None:
    """The compiler's argument (and output) sizes are the per-device bytes of the sharded inputs
    (and outputs), within 5%: TPU tiling pads small arrays; nothing is passed through host memory."""
    ma = compiled.memory_analysis()
    want_in = _per_device_bytes(inputs)
    assert want_in <= ma.argument_size_in_bytes <= 1.05 * want_in, (ma.argument_size_in_bytes, want_in)
    if outputs is not None:
        want_out = _per_device_bytes(outputs)
        assert want_out <= ma.output_size_in_bytes <= 1.05 * want_out, (ma.output_size_in_bytes, want_out)
    assert ma.host_argument_size_in_bytes == 0 and ma.host_output_size_in_bytes == 0


def _mosaic_kernels(compiled: Any) -> Counter[str]:
    """The Mosaic custom calls in the optimized HLO, by splash kernel (fwd, dq, dkv), "ragged"
    (XLA:TPU's own grouped matmul kernels for `ragged_dot`) and "other"."""
    kernels: Counter[str] = Counter()
    # an instruction spans lines (its kernel metadata); the op name that follows the target says
    # which jax function made the call
    for op_name in re.findall(r'custom_call_target="tpu_custom_call".*?op_name="([^"]*)"', compiled.as_text(),
                              flags=re.DOTALL):  # fmt: skip
        name = re.search(r"splash_mqa_(fwd|dq|dkv)|(ragged)", op_name)
        kernels[(name.group(1) or name.group(2)) if name else "other"] += 1
    return kernels


def _assert_splash_grad(compiled: Any) -> Counter[str]:
    """Splash forward and both backward kernels are Mosaic calls of the compiled gradient."""
    kernels = _mosaic_kernels(compiled)
    assert kernels["fwd"] >= 1 and kernels["dq"] >= 1 and kernels["dkv"] >= 1, kernels
    return kernels


def test_auto_attention_resolves_per_platform_not_per_process():
    """A CPU process resolves "auto" for itself (xla, dense experts); `for_platform` gives another
    platform's choice, which is how a plan for a TPU topology builds its model."""
    cfg = ModelConfig(
        model_type="qwen3_moe", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=64, max_position_embeddings=8, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=8, dtype=jnp.bfloat16,
    )  # fmt: skip
    assert jax.default_backend() == "cpu"
    assert (cfg.effective_attention, cfg.effective_moe_dispatch) == ("xla", "dense")
    tpu = cfg.for_platform("tpu")
    assert (tpu.attention, tpu.moe_dispatch, tpu.effective_attention) == ("splash", "ragged", "splash")
    assert cfg.for_platform("gpu").attention == "cudnn"
    assert cfg.replace(attn_logit_softcap=50.0).for_platform("gpu").attention == "xla"  # no soft cap in cuDNN
    assert cfg.for_platform("cpu").attention == "xla"
    assert cfg.replace(attention="xla").for_platform("tpu").attention == "xla"  # explicit choices stay


# (family, rows, mesh fsdp x tensor, topology): GQA with head dims 64 / 128 / 256, both row
# layouts, sliding windows and soft caps; heads split over `tensor` where the key heads allow.
DENSE = [
    ("llama", "padded", (2, 2), V5E),  # head dim 64, 2 query heads per key head
    ("qwen3", "packed", (4, 1), V5E),  # head dim 128, q/k norms, 4 query heads per key head
    ("mistral", "padded", (2, 2), V5E),  # head dim 128, every layer windowed
    ("gemma2", "packed", (2, 2), V5E),  # head dim 256, soft caps, local / global layers
    ("gemma2", "packed", (2, 2), V6E),
    ("gemma3_text", "padded", (2, 2), V5E),  # head dim 256, local layers with their own RoPE
]


@pytest.mark.parametrize("family, rows, shape, topology", DENSE, ids=[f"{f}-{r}-{t}" for f, r, _, t in DENSE])
def test_dense_gradient_compiles_with_splash(family, rows, shape, topology):
    cfg = _config(family)
    assert cfg.attention == "splash"
    compiled = _compile_grad(cfg, _mesh(topology, *shape), rows)
    kernels = _assert_splash_grad(compiled)
    # unrolled layers: one forward, dq and dkv kernel each (remat "auto" = none when unrolled)
    assert kernels == Counter(fwd=cfg.num_layers, dq=cfg.num_layers, dkv=cfg.num_layers), kernels


REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")


@pytest.mark.parametrize("remat", REMAT)
def test_scanned_gradient_compiles_under_every_remat_policy(remat):
    cfg = _config("llama", scan_layers=True, remat=remat)
    compiled = _compile_grad(cfg, _mesh(V5E, 2, 2), "packed")
    kernels = _assert_splash_grad(compiled)
    # The scan body is compiled once for all layers (offload_dots: XLA's host offloading makes two
    # copies of it, hence counts in ratios). Under every policy but "none" the splash
    # forward runs again in the backward pass: its residuals are no dot's output, so no dots_*
    # policy keeps them.
    assert kernels["dq"] == kernels["dkv"] == (2 if remat == "offload_dots" else 1), kernels
    assert kernels["fwd"] == (1 if remat == "none" else 2) * kernels["dq"], kernels
    host_temp = compiled.memory_analysis().host_temp_size_in_bytes
    assert (host_temp > 0) == (remat == "offload_dots"), host_temp  # offloaded matmul outputs


@pytest.mark.parametrize("scan, shape", [(True, (2, 2)), (False, (1, 1))], ids=["scanned", "unrolled-1chip"])
def test_sampler_prefill_and_decode_compile(scan, shape):
    """The rollout sampler: a splash prefill (P queries against the P + N cache slots), then
    one-token decode steps on XLA in a while loop, lowered as bench/memory_plan.py does. On one
    chip the kernel runs without `shard_map`, still compiled by Mosaic (not interpreted)."""
    mesh = _mesh(V5E, *shape)
    cfg = _config("llama", scan_layers=scan)
    graphdef, params = _abstract_model(cfg, mesh, nnx.Param)
    scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))  # noqa: E731
    prompts, prompt_mask = _rows(mesh, (B, 200)), _rows(mesh, (B, 200))
    inputs = (params, prompts, prompt_mask, scalar((2,), jnp.int32), scalar((), jnp.int32),
              scalar((2,), jnp.uint32))  # fmt: skip
    lowered = _generate.lower(
        graphdef, *inputs, max_new_tokens=56, temperature=1.0, top_k=0, top_p=1.0
    )  # fmt: skip
    compiled = lowered.compile()
    kernels = _mosaic_kernels(compiled)
    assert kernels == Counter(fwd=1 if scan else cfg.num_layers), kernels  # prefill only, no backward
    assert "while" in compiled.as_text()  # the decode loop
    _check_memory(compiled, inputs=inputs)


def test_moe_gradient_compiles_with_ragged_experts():
    """Qwen3-MoE-like: experts by `ragged_dot` (the "auto" dispatch on TPU), splash attention."""
    cfg = _config("qwen3_moe")
    assert cfg.moe_dispatch == "ragged"
    compiled = _compile_grad(cfg, _mesh(V5E, 2, 2), "packed")
    kernels = _assert_splash_grad(compiled)
    assert kernels["ragged"] >= 3 * cfg.num_layers, kernels  # gate, up, down: grouped, not dense


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_qlora_gradient_compiles(quant):
    """A quantized frozen base (codes and scales sharded like the kernels) with LoRA adapters on
    every projection; only the adapters get gradients."""
    lora = LoRASpec.build(8, 16.0)
    cfg = _config("llama", lora=lora, quantize=quant, scan_layers=True)
    compiled = _compile_grad(cfg, _mesh(V5E, 2, 2), "padded", trainable=LoRAParam)
    _assert_splash_grad(compiled)
    codes = "s8" if quant == "int8" else "u8"
    assert re.search(rf"{codes}\[2,\d+,\d+\]", compiled.as_text()), "the stacked codes are not inputs"
