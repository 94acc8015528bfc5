"""The train state and the compiled, sharded train step `step(state, batch) -> (state, metrics)`.

The state is one pytree (`TrainState`): parameters, optax state, step counter, PRNG key and, for DPO
with a same-step reference, the frozen reference parameters. The step is compiled once per batch
shape with `jax.jit`, explicit input/output `NamedSharding`s and the state donated; gradient
accumulation runs inside it as a `lax.scan` over the leading micro-batch axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.models.lora import adapters_off
from jaxrlhf.models.moe import RouterStats, add_router_aux
from jaxrlhf.parallel.partition import batch_axes, is_stacked
from jaxrlhf.train.objectives import Objective


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # what is trained (everything, or with LoRA the adapters and a score head)
    opt_state: Any
    rng: jax.Array
    ref_params: nnx.State | None = None
    frozen: nnx.State | None = None  # with LoRA: the base weights (not differentiated, no optimizer state)
    # With LoRA, the reference model is the base: the trained parameters with the adapters zeroed.
    base_reference: bool = struct.field(pytree_node=False, default=False)


def all_params(state: TrainState) -> nnx.State:
    """Every parameter of the model (trained and frozen) as one state for `nnx.merge(graphdef, .)`."""
    return state.params if state.frozen is None else nnx.merge_state(state.params, state.frozen)


def make_schedule(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    kind: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0, then cosine or linear decay to `min_lr_ratio * lr`, or constant."""
    end = learning_rate * min_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, warmup_steps + decay_steps, end
        )
    if kind == "linear":
        decay = optax.linear_schedule(learning_rate, end, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"schedule must be cosine, linear or constant, got {kind!r}")
    if warmup_steps == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps]
    )


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    head_lr_scale: float | None = None,
    frozen: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; no weight decay on vectors (norm scales, biases).

    `head_lr_scale`: the score head's updates (reward models, PPO critics; parameters under
    `score`) are multiplied by it, i.e. the head follows the schedule at `head_lr_scale` times the
    learning rate (Adam's update does not depend on the gradient's scale, so this is exactly a
    separate learning rate with the same schedule shape).

    `frozen`: a function of the parameters giving a bool tree (e.g. `frozen_params(n)`); those
    parameters get no update and no optimizer state, and gradient clipping sees the others only."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    parts.append(adamw)
    if head_lr_scale is not None and head_lr_scale != 1.0:
        parts.append(optax.masked(optax.scale(head_lr_scale), is_score_head))
    n_stacked = getattr(frozen, "stacked_layers", 0)
    if n_stacked:  # scanned layers: the frozen layers are the first slices of each stacked array
        parts.append(zero_leading_layers(n_stacked))
    train = parts[0] if len(parts) == 1 else optax.chain(*parts)
    if frozen is None:
        return train
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train", frozen(params))  # noqa: E731
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def zero_leading_layers(num_layers: int) -> optax.GradientTransformation:
    """Zero the updates of layers `0 .. num_layers - 1` in stacked `[L, ...]` parameters (a scanned
    model's `layers/...`); other parameters pass through. Their gradients are already exactly zero
    (the forward stops the gradient above them), so this also cancels weight decay."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        def zero(path: Any, u: jax.Array) -> jax.Array:
            if not is_stacked(_keys(path)):
                return u
            keep = (jnp.arange(u.shape[0]) >= num_layers).reshape((-1,) + (1,) * (u.ndim - 1))
            return jnp.where(keep, u, jnp.zeros_like(u))

        return jax.tree_util.tree_map_with_path(zero, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _keys(path: Any) -> list[Any]:
    """The plain keys of a pytree path (its `DictKey` / `GetAttrKey` / `SequenceKey` entries) or
    of an nnx path (already plain)."""
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


def is_frozen_path(path: Any, num_layers: int) -> bool:
    """Is the parameter at `path` (a pytree or nnx path) below the trained part of a model with
    `frozen_layers=num_layers`: an embedding, or in decoder layer `0 .. num_layers - 1`."""
    keys = _keys(path)
    if num_layers <= 0:
        return False
    if any(k in ("embed_tokens", "embed_positions") for k in keys):
        return True
    pairs = zip(keys, keys[1:], strict=False)
    return any(k == "layers" and isinstance(i, int) and i < num_layers for k, i in pairs)


def frozen_params(num_layers: int, *, scan_layers: bool = False) -> Callable[[Any], Any]:
    """The parameters below the trained part of a model with `frozen_layers=num_layers`: the token
    and position embeddings (and so a tied LM head) and decoder layers `0 .. num_layers - 1`, found by
    path (`embed_tokens`, `embed_positions`, `layers/<i>`) wherever the model sits in the tree.

    With `scan_layers` the layers are slices of stacked arrays, which stay "trained" in this tree;
    `make_optimizer` then zeroes their first `num_layers` slices (`zero_leading_layers`), and their
    Adam moments exist but stay zero."""

    def frozen(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: is_frozen_path(path, num_layers), params)

    frozen.stacked_layers = num_layers if scan_layers else 0  # type: ignore[attr-defined]
    return frozen


def is_score_head(params: Any) -> Any:
    """A bool tree over `params`: True on the parameters of a score head (path component `score`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "score" in _keys(path), params)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Every leaf placed on `mesh`: leaves already there keep their sharding, others are replicated."""

    def place(x: Any) -> Any:
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, _replicated(mesh))

    return jax.tree.map(place, tree)


def create_state(
    model: CausalLM,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    seed: int = 0,
    with_reference: bool = False,
    reference_dtype: Any = None,
    trainable: Any = None,
) -> tuple[nnx.GraphDef, TrainState]:
    """Split `model` into its graph definition and a `TrainState` placed on `mesh`.

    Parameters keep the shardings they were loaded with (`from_pretrained(..., mesh=mesh)`); the
    optimizer state is created under `jit`, which gives its moments the parameters' shardings.
    `with_reference` adds a frozen copy of the parameters (DPO's same-step reference), stored in
    `reference_dtype` when given.

    `trainable` (an nnx filter, e.g. `jaxrlhf.models.lora.trainable(head)`): only the matching
    parameters are differentiated and get optimizer state; the rest is `state.frozen`. The
    reference is then the model with its adapters switched off (no copy of the base).
    """
    frozen = None
    if trainable is None:
        graphdef, params = nnx.split(model, nnx.Param)
    else:
        graphdef, params, frozen = nnx.split(model, trainable, nnx.Param)
        frozen = _on_mesh(frozen, mesh)
    params = _on_mesh(params, mesh)
    opt_state = init_optimizer_state(optimizer, params, mesh)
    ref = None
    if with_reference and trainable is None:  # a frozen copy, optionally narrower (forward only)
        ref = jax.tree.map(
            lambda p: p.astype(reference_dtype) if reference_dtype is not None else jnp.copy(p), params
        )
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), _replicated(mesh)),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), _replicated(mesh)),
        ref_params=ref,
        frozen=frozen,
        base_reference=with_reference and trainable is not None,
    )
    return graphdef, state


def _plain_path(keypath: Any) -> tuple[Any, ...]:
    """A key path as plain keys (`layers`, 3, `kernel`), without a Variable's trailing `value`."""
    keys = [k for k in keypath if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")]
    return tuple(_keys(keys))


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """The sharding of every leaf of `optimizer.init(params)`: a moment takes the sharding of the
    parameter whose path ends its own path (Adam's `mu/<param path>`, also inside `multi_transform`
    and `masked` states); counts and other scalars are replicated. (A bare `jit(optimizer.init)`
    would replicate the moments: init reads no parameter value, so nothing ties its outputs to the
    parameters' shardings -- 8 bytes per parameter on every device.)"""
    by_path = {_plain_path(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(params)}
    replicated = _replicated(mesh)

    def sharding(keypath: Any, x: Any) -> NamedSharding:
        path = _plain_path(keypath)
        for i in range(len(path)):
            match = by_path.get(path[i:])
            if match is not None and tuple(match.shape) == tuple(x.shape):
                found = getattr(match, "sharding", None)
                return found if isinstance(found, NamedSharding) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(optimizer.init, params))


def init_optimizer_state(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """`optimizer.init(params)` created directly at `optimizer_state_shardings` (no full copy)."""
    shardings = optimizer_state_shardings(optimizer, params, mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


def state_shardings(state: TrainState) -> Any:
    return jax.tree.map(lambda x: x.sharding, state)


def batch_sharding(mesh: Mesh, ndim: int, *, micro_axis: bool = True) -> NamedSharding:
    """Batch arrays `[A, B, ...]` (micro-batches first) split over (`data`, `fsdp`) on `B`."""
    axes = batch_axes(mesh)
    spec = (None, axes) if micro_axis else (axes,)
    return NamedSharding(mesh, PartitionSpec(*spec, *([None] * (ndim - len(spec)))))


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the scalar `ok` holds, else `old` (leaf by leaf; non-array leaves from `new`)."""
    return jax.tree.map(
        lambda n, o: jnp.where(ok, n, o) if isinstance(n, jax.Array) else n, new, old
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: Any,
    mesh: Mesh,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Compile `step(state, batch)`; `batch` leaves are `[A, B/A, ...]` (A micro-batches)."""

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        def model_of(params: nnx.State) -> CausalLM:
            frozen = () if state.frozen is None else (state.frozen,)
            return nnx.merge(graphdef, params, *frozen)

        ref_model = None
        if state.ref_params is not None:
            ref_model = nnx.merge(graphdef, state.ref_params)
        elif state.base_reference:
            ref_model = model_of(adapters_off(state.params))

        # LoRA dropout masks: a function of (seed, step, micro-batch), so a resumed run draws the same.
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro(carry, xs):
            grads_acc, num_acc, den_acc = carry
            micro_batch, index = xs

            def f(params):
                model = model_of(params)
                model = model.with_lora_dropout(jax.random.fold_in(step_key, index))
                (num, den, metrics), aux = nnx.capture(objective, RouterStats)(model, micro_batch, ref_model)
                metrics = dict(metrics)
                num = add_router_aux(model, num, aux, metrics, weight=den)  # MoE load balancing
                return num, (den, metrics)

            (num, (den, metrics)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, num_acc + num, den_acc + den), metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.float32(0.0), jnp.float32(0.0))
        num_micro = jax.tree.leaves(batch)[0].shape[0]
        (grads, num, den), metrics = jax.lax.scan(micro, init, (batch, jnp.arange(num_micro)))
        grads = jax.tree.map(lambda g, p: (g / den).astype(p.dtype), grads, state.params)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        loss, grad_norm = num / den, optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A NaN/inf loss or gradient changes nothing: the trainer then stops or counts the skipped
        # update (train.on_nonfinite), and no bad value ever reaches the parameters or Adam's moments.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = keep_if(finite, (params, opt_state), (state.params, state.opt_state))
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def batch_shardings(batch: dict[str, Any]) -> dict[str, NamedSharding]:
        return {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}

    jitted: dict[Any, Any] = {}

    def compiled_for(batch: dict[str, Any]) -> Any:
        key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
        if key not in jitted:  # one compilation per bucketed batch shape
            jitted[key] = jax.jit(
                step,
                in_shardings=(shardings, batch_shardings(batch)),
                out_shardings=(shardings, _replicated(mesh)),
                donate_argnums=(0,),
            )
        return jitted[key]

    def run(state: TrainState, batch: dict[str, jax.Array]):
        return compiled_for(batch)(state, batch)

    run.num_compilations = lambda: len(jitted)  # type: ignore[attr-defined]
    # `run.lower(state, batch)` takes arrays or `jax.ShapeDtypeStruct`s (no allocation): what
    # bench/memory_plan.py compiles to read XLA's per-device memory analysis.
    run.lower = lambda state, batch: compiled_for(batch).lower(state, batch)  # type: ignore[attr-defined]
    return run


def make_eval_fn(
    graphdef: nnx.GraphDef, fn: Callable[..., Any], mesh: Mesh
) -> Callable[[nnx.State, dict[str, jax.Array]], Any]:
    """Compile `fn(model, batch)` (no micro-batch axis); outputs are gathered replicated."""
    cache: dict[Any, Any] = {}

    def run(params: nnx.State, batch: dict[str, jax.Array]):
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in cache:
            shard = {k: batch_sharding(mesh, v.ndim, micro_axis=False) for k, v in batch.items()}
            cache[key] = jax.jit(
                lambda p, b: fn(nnx.merge(graphdef, p), b),
                in_shardings=(jax.tree.map(lambda x: x.sharding, params), shard),
                out_shardings=_replicated(mesh),
            )
        return cache[key](params, batch)

    return run
