"""`jaxrlhf.plan.hlo_cost` on programs whose FLOPs, time and collectives are known by arithmetic.

The programs are compiled by the TPU compiler (libtpu) for a v5p slice, on this CPU-only machine. The
check the issue asked for: XLA's `cost_analysis()` counts a loop body once (a `lax.scan` of 8 matmuls
reports 1/8 of the FLOPs), while `analyze` counts every loop by its trip count, its FLOPs equal the
arithmetic exactly, and its time (the compiler's own per-instruction cycle estimates, summed) equals
the compiler's `optimal_seconds` for the loop-free program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.plan import hlo_cost
from jaxrlhf.plan.target import CHIPS, tpu_target

M, K, L = 4096, 2048, 8  # a chain of L bf16 matmuls [M, K] x [K, K]
CHAIN_FLOPS = 2 * M * K * K * L
V5P = CHIPS["v5p"]


@pytest.fixture(scope="module")
def devices() -> list:
    return tpu_target("v5p:2x2x1").devices  # 4 chips


def _abstract(mesh: Mesh, shape: tuple[int, ...], spec: P | None = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec or P()))


def unrolled(x: jax.Array, w: jax.Array) -> jax.Array:
    for i in range(w.shape[0]):
        x = x @ w[i]
    return x


def scanned(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]


def test_loops_are_counted_by_their_trip_counts(devices: list) -> None:
    mesh = Mesh(devices[:1], ("x",))
    x, w = _abstract(mesh, (M, K)), _abstract(mesh, (L, K, K))
    flat = jax.jit(unrolled).lower(x, w).compile()
    loop = jax.jit(scanned).lower(x, w).compile()
    # what the issue measured: XLA's own figure counts the scan's body once
    assert loop.cost_analysis()["flops"] == pytest.approx(CHAIN_FLOPS / L, rel=0.01)
    assert flat.cost_analysis()["flops"] == pytest.approx(CHAIN_FLOPS, rel=0.01)
    a, b = hlo_cost.analyze(flat.as_text()), hlo_cost.analyze(loop.as_text())
    assert a.flops == CHAIN_FLOPS and b.flops == CHAIN_FLOPS
    assert b.flops_once == CHAIN_FLOPS / L
    assert [n for _, n in b.loops] == [L] and not b.unknown_loops and not a.loops
    # time: the summed cycle estimates of the loop-free program are the compiler's optimal_seconds
    t_flat = a.compute_seconds(V5P.clock_hz)
    assert t_flat == pytest.approx(flat.cost_analysis()["optimal_seconds"], rel=0.05)
    # a sensible roofline: no faster than the chip's peak, no slower than half of it
    assert CHAIN_FLOPS / V5P.bf16_flops <= t_flat <= 2 * CHAIN_FLOPS / V5P.bf16_flops
    # the scan's estimate is the chain's plus a copy of the carry per step (measured: 1.42x), not 1/8 of it
    t_loop = b.compute_seconds(V5P.clock_hz)
    assert t_flat <= t_loop <= 1.5 * t_flat
    assert loop.cost_analysis()["optimal_seconds"] < t_flat / 4  # what the loop-blind figure says


def test_nested_loops_multiply(devices: list) -> None:
    """Micro-batches x layers, as the train step nests them: 3 x 8 bodies."""
    mesh = Mesh(devices[:1], ("x",))
    xs, w = _abstract(mesh, (3, M // 4, K)), _abstract(mesh, (L, K, K))

    def step(xs: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda acc, x: (acc + scanned(x, w), None), jnp.zeros_like(xs[0]), xs)[0]

    cost = hlo_cost.analyze(jax.jit(step).lower(xs, w).compile().as_text())
    assert cost.flops == 3 * 2 * (M // 4) * K * K * L
    assert sorted(n for _, n in cost.loops) == [3, L]


def test_fsdp_collectives_match_the_arithmetic(devices: list) -> None:
    """The gradient of the chain with its weights split over 4 devices (FSDP): each layer's weight
    is gathered (forward, and again for the backward unless kept), its gradient reduce-scattered."""
    mesh = Mesh(devices, ("fsdp",))
    x, w = _abstract(mesh, (M, K), P("fsdp")), _abstract(mesh, (L, K, K), P(None, "fsdp"))

    def loss(x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum(scanned(x, w).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=1), out_shardings=NamedSharding(mesh, P(None, "fsdp")))
    cost = hlo_cost.analyze(grad.lower(x, w).compile().as_text(), devices=4)
    layer = K * K * 2  # one weight in bf16
    gathered = sum(cost.collective_bytes.get(k, 0.0) for k in ("all-gather", "all-reduce"))
    assert L * layer <= gathered <= 2 * L * layer * 1.1, cost.collective_bytes
    scattered = cost.collective_bytes.get("reduce-scatter", 0.0)
    assert L * layer <= scattered <= 1.2 * L * layer, cost.collective_bytes  # padded to tiles at most
    # forward, and the backward's two matmuls per layer, each on a quarter of the rows
    assert cost.flops == pytest.approx(3 * CHAIN_FLOPS / 4, rel=0.01)
    assert cost.collective_traffic["reduce-scatter"] == pytest.approx(0.75 * scattered)


HLO = """HloModule handwritten, entry_computation_layout={(f32[8,16])->f32[8,16]}

%fused_dot (p0: f32[8,16], p1: f32[16,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_conv (p0: bf16[8,16,1], p1: bf16[4,2,16]) -> bf16[8,4,2] {
  %p0 = bf16[8,16,1]{1,0,2} parameter(0)
  %p1 = bf16[4,2,16]{2,1,0} parameter(1)
  ROOT %convolution.1 = bf16[8,4,2]{2,1,0} convolution(%p0, %p1), window={size=4 pad=3_3},
    dim_labels=bf0_0oi->b0f
}

%body (arg: (s32[], f32[8,16], f32[16,16])) -> (s32[], f32[8,16], f32[16,16]) {
  %arg = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %h = f32[8,16]{1,0} get-tuple-element(%arg), index=1
  %w = f32[16,16]{1,0} get-tuple-element(%arg), index=2
  %fusion.1 = f32[8,16]{1,0} fusion(%h, %w), kind=kOutput, calls=%fused_dot,
    backend_config={"window_config":{"estimated_cycles":"100"}}
  %kernel = (f32[8,16]{1,0}) custom-call(%fusion.1), custom_call_target="tpu_custom_call",
    backend_config={"custom_call_config": {"body": "abc",
"xprof_metadata":"{}"
}}, metadata={op_name="kernel"}
  %ag = (f32[2,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%h), channel_id=1,
    replica_groups=[1,4]<=[4], dimensions={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one), backend_config={"estimated_cycles":"2"}
  ROOT %t = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}) tuple(%next, %fusion.1, %w)
}

%cond (arg: (s32[], f32[8,16], f32[16,16])) -> pred[] {
  %arg = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}) parameter(0)
  %n = s32[] constant(5)
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %w = f32[16,16]{1,0} broadcast(), dimensions={}
  %c = bf16[8,4,2]{2,1,0} fusion(%x, %w), kind=kOutput, calls=%fused_conv,
    backend_config={"estimated_cycles":"7"}
  %init = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}) tuple(%zero, %x, %w)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}) while(%init), condition=%cond, body=%body
  %ar = f32[8,16]{1,0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%fused_dot
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_handwritten_module() -> None:
    """Parsing corner cases the TPU compiler's text has: a Mosaic kernel's config over several lines
    (one starts with `}}`), async all-gathers (a tuple result), iota replica groups, and a matmul
    written as a convolution over a 1-long spatial axis (only one of its 4 window taps is real)."""
    comps, entry = hlo_cost.parse_module(HLO)
    assert entry == "main" and len(comps["body"]) == 10
    cost = hlo_cost.analyze(HLO, devices=4)
    assert cost.loops == [("loop", 5)] and cost.unknown_loops == []
    dot = 2 * 8 * 16 * 16
    conv = 2 * (8 * 4 * 2) * 16 * 1  # output elements x input features x min(window 4, input 1)
    assert cost.flops == 5 * dot + conv + dot  # the all-reduce's to_apply is a reduction, counted once
    assert cost.flops_once == dot + conv + dot
    assert cost.cycles == 5 * (100 + 2) + 7  # the condition and fused bodies carry none
    assert cost.kernel_calls == 5
    assert cost.collective_bytes == {"all-gather": 5 * 8 * 16 * 4, "all-reduce": 8 * 16 * 4}
    assert cost.collective_traffic["all-gather"] == 5 * 8 * 16 * 4 * 3 / 4  # ring of 4
    assert cost.collective_traffic["all-reduce"] == 2 * 8 * 16 * 4 * 3 / 4
