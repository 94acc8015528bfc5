"""What every online-RL engine shares (PPO, GRPO, RLOO): the policy split into trained and frozen
parameters (LoRA), the reference, the compiled sampler, prompts as global arrays, and host reward
functions scored once and broadcast.

`RolloutEngine` is a base class: a subclass sets `self.cfg` (with `response_length`,
`temperature`, `top_k`, `top_p`), calls `_init_policy` and `_init_state`, and adds its scoring and
update functions (`jaxrlhf/train/ppo.py`, `jaxrlhf/train/grpo.py`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.generation.sampling import Generation, _generate
from jaxrlhf.generation.turns import TurnCache
from jaxrlhf.losses import entropy_from_logits, token_logprobs
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.models.lora import adapters_off, trainable
from jaxrlhf.parallel import host_array
from jaxrlhf.train.step import init_optimizer_state, is_frozen_path, keep_if

Array = jax.Array


@struct.dataclass
class RolloutState:
    step: Array
    params: dict[str, nnx.State]  # {"policy": ...} (PPO: and "critic")
    opt_state: Any
    rng: Array  # key data (uint32)


def response_logprobs(
    model: CausalLM,
    ids: Array,
    mask: Array,
    positions: Array,
    prompt_len: int,
    temperature: float,
    *,
    with_entropy: bool = False,
    trunk: Array | None = None,
) -> Any:
    """Log-probs `[B, N]` of the response tokens under `softmax(logits / temperature)`: the hidden
    state at slot t predicts the token at t + 1, so the response starts from slot P - 1. With
    `with_entropy`, also the per-token entropy `[B, N]` of that distribution (from the same pass).
    `trunk`: the rows' shared frozen trunk (`shared_trunk`), the pass starts above it."""
    hidden = model.hidden_states(ids, mask, positions, trunk=trunk)[:, prompt_len - 1 : -1]
    labels = ids[:, prompt_len:]
    if with_entropy:
        logits = model.apply_head(hidden)
        return token_logprobs(logits, labels, temperature=temperature), entropy_from_logits(
            logits, temperature=temperature
        )
    return model.token_logprobs(hidden, labels, temperature=temperature)


def sequence_scores(
    reward_model: CausalLM, ids: Array, mask: Array, positions: Array, prompt_len: int, *,
    trunk: Array | None = None,
) -> Array:
    """Reward-model scores `[B]` of `[prompt | response]` rows (the response from column
    `prompt_len`), pooled as the reward model was trained (`config.score_pooling`): at each row's
    last real token (the EOS when there is one), or the mean over the response's real tokens."""
    scores_BxL = reward_model(ids, mask, positions, trunk=trunk)
    if reward_model.config.score_pooling == "mean":
        response_BxL = (mask != 0) & (jnp.arange(ids.shape[1]) >= prompt_len)[None, :]
        w = response_BxL.astype(jnp.float32)
        return jnp.sum(scores_BxL.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    last = jnp.max(jnp.where(mask != 0, jnp.arange(ids.shape[1]), 0), axis=1)
    return jnp.take_along_axis(scores_BxL, last[:, None], axis=1)[:, 0]


def split_trainable(model: CausalLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graphdef, trained parameters, frozen parameters): with LoRA the adapters (and a score head)
    are trained and the base is frozen; with `frozen_layers` (unrolled layers) the embeddings and
    the first layers are frozen, so that neither gradients nor Adam moments exist for them; else
    everything is trained. (Scanned layers stack the frozen with the trained: the optimizer zeroes
    their updates, `step.frozen_params`.)"""
    c = model.config
    if c.lora is not None:
        return nnx.split(model, trainable(model.head_type), nnx.Param)
    if c.frozen_layers and not c.scan_layers:
        def above(path: Any, value: Any) -> bool:
            return isinstance(value, nnx.Param) and not is_frozen_path(path, c.frozen_layers)

        return nnx.split(model, above, nnx.Param)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, None


def share_arrays(frozen: nnx.State, source: nnx.State | None) -> nnx.State:
    """`frozen` with each leaf replaced by `source`'s leaf at the same path when that is the same
    kind of array (shape, dtype, sharding): a LoRA critic then holds no second copy of a base it
    shares with the policy or the reward model (both loaded from the same checkpoint)."""
    if source is None:
        return frozen
    by_path = dict(nnx.to_flat_state(source))

    def same(a: Any, b: Any) -> bool:
        return a.shape == b.shape and a.dtype == b.dtype and getattr(a, "sharding", None) == getattr(
            b, "sharding", None
        )

    flat = []
    for path, var in nnx.to_flat_state(frozen):
        other = by_path.get(path)
        if other is not None and type(other) is type(var) and same(other.get_value(), var.get_value()):
            var = other
        flat.append((path, var))
    return nnx.from_flat_state(flat)


class RolloutEngine:
    """The policy side of an online-RL engine (see the module docstring)."""

    cfg: Any
    mesh: Mesh
    optimizer: optax.GradientTransformation
    state: RolloutState
    # `rollout(engine, prompt_ids, prompt_mask) -> Generation`, when set, replaces the single-turn
    # sampler in `step` (a multi-turn rollout with tools: `jaxrlhf.train.algorithms.tool_use`)
    rollout: Callable[..., Generation] | None = None

    def _init_policy(
        self,
        policy: CausalLM,
        *,
        reference: bool,
        frozen_dtype: Any,
        eos_token_ids: list[int],
        pad_token_id: int,
    ) -> nnx.State:
        """Split the policy; keep a reference when `reference` (a frozen copy of the initial policy,
        in `frozen_dtype` when given, or with LoRA nothing: the base with the adapters off). Returns
        the trained parameters."""
        self.eos = np.asarray(eos_token_ids, np.int32)
        self.pad_id = int(pad_token_id)
        self.policy_def, params, frozen = split_trainable(policy)
        self.lora = policy.config.lora is not None
        self.frozen: dict[str, Any] = {"policy": frozen}
        # The reference may be stored narrower (e.g. bfloat16): it only feeds forward passes, which
        # compute in the model's compute dtype anyway. With LoRA it is the base: no copy; with
        # frozen layers, a copy of the trained layers above the policy's own frozen ones.
        self.ref_params = None
        if reference and not self.lora:
            self.ref_params = jax.tree.map(
                lambda p: p.astype(frozen_dtype) if frozen_dtype is not None else jnp.copy(p), params
            )
        self.has_reference = reference
        return params

    def _init_state(self, params: dict[str, nnx.State], optimizer: optax.GradientTransformation,
                    seed: int) -> None:  # fmt: skip
        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt_state = init_optimizer_state(optimizer, params, self.mesh)  # moments sharded like params
        self.state = RolloutState(
            step=jax.device_put(np.zeros((), np.int32), replicated),
            params=params,
            opt_state=opt_state,
            rng=jax.device_put(np.asarray(jax.random.key_data(jax.random.key(seed))), replicated),
        )

    def _minibatch_step(self, state: RolloutState, rollout: Any, loss_fn: Callable[..., Any], idx: Array,
                        key: Array) -> tuple[RolloutState, dict[str, Array]]:  # fmt: skip
        """One optimizer step on the rollout rows `idx`: `loss_fn(params, batch, key) -> (loss,
        metrics)`. A NaN/inf minibatch changes nothing (train.on_nonfinite: stop or skip, in run_loop)."""
        batch = jax.tree.map(lambda x: x[idx], rollout)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = keep_if(finite, (params, opt_state), (state.params, state.opt_state))
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return state.replace(params=params, opt_state=opt_state), metrics

    # ---------------------------------------------------------------- models
    @staticmethod
    def _model(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None) -> CausalLM:
        return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)

    def _policy(self, params: dict[str, nnx.State], frozen: dict[str, Any]) -> CausalLM:
        return self._model(self.policy_def, params["policy"], frozen["policy"])

    def _reference(self, params: dict[str, nnx.State], frozen: dict[str, Any], ref_params: Any) -> CausalLM:
        """The frozen reference: the copy of the initial policy, or with LoRA the base (adapters off)."""
        if ref_params is not None:
            return self._model(self.policy_def, ref_params, frozen["policy"])
        return self._model(self.policy_def, adapters_off(params["policy"]), frozen["policy"])

    def _policy_state(self) -> nnx.State:
        """Every parameter of the current policy (trained and frozen) as one state."""
        p, f = self.state.params["policy"], self.frozen["policy"]
        return p if f is None else nnx.merge_state(p, f)

    def policy_model(self) -> CausalLM:
        return self._policy(self.state.params, self.frozen)

    # ---------------------------------------------------------------- rollout
    def _batch(self, x: np.ndarray | Array) -> Array:
        """Prompts as given: a global `jax.Array` (e.g. built from each host's rows) passes as is; a
        numpy batch is the whole global batch, the same on every process."""
        if isinstance(x, jax.Array):
            return x.astype(jnp.int32)
        if jax.process_count() == 1:
            return jnp.asarray(x, jnp.int32)
        return jax.device_put(np.asarray(x, np.int32), NamedSharding(self.mesh, PartitionSpec()))

    def generate(
        self, prompt_ids: np.ndarray | Array, prompt_mask: np.ndarray | Array, *, seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> Generation:  # fmt: skip
        """Sample responses with the current policy: tokens, response mask, and the sampler's log-probs
        and entropies under `softmax(logits / temperature)` (reused by scoring). The key comes from
        the training stream, or from `seed` (which leaves the training stream untouched)."""
        key = self.next_key(seed)
        return _generate(
            self.policy_def, self._policy_state(), self._batch(prompt_ids),
            self._batch(prompt_mask), self.eos, np.int32(self.pad_id), key,
            max_new_tokens=max_new_tokens or self.cfg.response_length, temperature=self.cfg.temperature,
            top_k=self.cfg.top_k, top_p=self.cfg.top_p,
        )  # fmt: skip

    def next_key(self, seed: int | None = None) -> Array:
        """A sampling key from the training stream (advancing it), or from `seed` (leaving it)."""
        if seed is None:
            rng = jax.random.wrap_key_data(self.state.rng)
            rng, key = jax.random.split(rng)
            self.state = self.state.replace(rng=jax.random.key_data(rng))
            return key
        data = np.asarray(jax.random.key_data(jax.random.key(seed)))
        return jax.random.wrap_key_data(jax.device_put(data, NamedSharding(self.mesh, PartitionSpec())))

    def turn_cache(self, batch: int, prompt_width: int, *, max_tokens: int, turn_tokens: int,
                   buckets: Any = None, seed: int | None = None) -> TurnCache:  # fmt: skip
        """The sampler of one multi-turn rollout of `batch` rows with the current policy: a KV cache
        carried across turns (`jaxrlhf.generation.turns`), keys from the training stream (or, with
        `seed`, from that seed, one per turn: the stream is left as it is)."""
        next_key: Callable[[], Array] = self.next_key
        if seed is not None:
            base, turns = self.next_key(seed), itertools.count()

            def next_key() -> Array:
                return jax.random.fold_in(base, next(turns))

        return TurnCache(
            self.policy_def, self._policy_state, batch=batch,
            length=TurnCache.size(prompt_width, max_tokens, turn_tokens, buckets), eos_ids=self.eos,
            pad_id=self.pad_id, next_key=next_key, temperature=self.cfg.temperature,
            top_k=self.cfg.top_k, top_p=self.cfg.top_p, buckets=buckets, place=self._batch,
        )  # fmt: skip

    def host_values(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], ids: Array,
                    response_mask: Array, *, shape: tuple[int, ...] = ()) -> Array:  # fmt: skip
        """`fn(ids, response_mask)` of a host function (reward functions): `[B, *shape]` float32,
        replicated. The whole rollout is gathered on every process (a collective), `fn` runs on
        process 0 only, and its result is broadcast: one call, one answer."""
        ids_np, mask_np = host_array(ids), host_array(response_mask)
        if jax.process_count() == 1:
            return jnp.asarray(fn(ids_np, mask_np), jnp.float32)
        from jax.experimental import multihost_utils

        values = np.zeros((ids_np.shape[0], *shape), np.float32)
        if jax.process_index() == 0:
            values = np.asarray(fn(ids_np, mask_np), np.float32)
        values = np.asarray(multihost_utils.broadcast_one_to_all(values), np.float32)
        # NaN ("does not apply") travels as a mask: device_put checks that every process passes
        # equal values, and NaN != NaN.
        valid = ~np.isnan(values)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        values = jax.device_put(np.where(valid, values, 0.0), replicated)
        return jnp.where(jax.device_put(valid, replicated), values, jnp.nan)
