"""GRPO and RLOO: critic-free online RL with group-relative advantages.

`GRPOEngine.step` takes P prompts, samples G = `num_generations` completions of each in one compiled
rollout (the prompts repeated prompt-major: rows `p * G .. p * G + G - 1`), scores them with host
reward functions (and / or a reward model), turns the weighted reward sum into advantages with
`group_advantages` (GRPO: group mean and std; RLOO: leave-one-out mean) and runs `num_iterations`
passes of `num_mini_batches` clipped updates (`grpo_loss`), all in one `jax.jit`. The sampler's
log-probs are the old policy. A reference is kept only when `beta > 0` (with LoRA: the base).

The rollout, the policy / reference split and the host-reward broadcast are PPO's
(`jaxrlhf/train/rollout.py`); there is no critic, no GAE and no value loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxrlhf.generation.sampling import Generation
from jaxrlhf.losses import group_advantages, grpo_loss, masked_mean
from jaxrlhf.models.decoder import CausalLM, default_positions
from jaxrlhf.models.moe import RouterStats, add_router_aux
from jaxrlhf.models.trunk import shared_trunk
from jaxrlhf.train.objectives import packed_mask
from jaxrlhf.train.rollout import RolloutEngine, response_logprobs, sequence_scores

if TYPE_CHECKING:  # the method module owns its section (and imports this engine)
    from jaxrlhf.train.algorithms.grpo import GRPOConfig

Array = jax.Array
# reward_fn(query_response_BxL, response_mask_BxN) -> rewards [B, R] (NaN: "does not apply")
RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@struct.dataclass
class GroupRollout:
    """One rollout, group-major: P prompts, G completions each, N completion slots."""

    prompt_ids: Array  # [P, Lp] left-padded
    prompt_mask: Array  # [P, Lp]
    tokens: Array  # [P, G, N]
    completion_mask: Array  # [P, G, N] 1 through the EOS
    loss_mask: Array  # [P, G, N] in the loss (truncated completions out with the DAPO rule)
    old_logprobs: Array  # [P, G, N] the sampling policy's (logits / temperature)
    ref_logprobs: Array | None  # [P, G, N] the reference's, when beta > 0
    rewards: Array  # [P, G] weighted sum of the rewards
    advantages: Array  # [P, G]
    trunk: Array | None = None  # the policy's frozen trunk of the rows, P first (`group_trunk`), or None

    def flat(self) -> dict[str, Array]:
        """Prompt-major rows `[P * G, ...]` (row p * G + g): the prompt repeated, then completion g."""
        p, g, n = self.tokens.shape
        ids, mask, pos = unpacked_rows(self.prompt_ids, self.prompt_mask, self.tokens, self.completion_mask)
        rows = {"ids": ids, "mask": mask, "positions": pos}
        for name in ("loss_mask", "old_logprobs", "ref_logprobs", "rewards", "advantages", "completion_mask"):
            x = getattr(self, name)
            rows[name] = None if x is None else x.reshape(p * g, *x.shape[2:])
        return rows


def unpacked_rows(prompt_ids: Array, prompt_mask: Array, tokens: Array, completion_mask: Array) -> tuple[
    Array, Array, Array
]:  # fmt: skip
    """`[P * G, Lp + N]` ids, mask and positions: each completion in its own row after its prompt."""
    p, g, n = tokens.shape
    ids = jnp.concatenate([jnp.repeat(prompt_ids, g, axis=0), tokens.reshape(p * g, n)], axis=1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, g, axis=0), completion_mask.reshape(p * g, n)], axis=1)
    return ids, mask, default_positions(mask, *mask.shape)


def packed_rows(prompt_ids: Array, prompt_mask: Array, tokens: Array, completion_mask: Array) -> tuple[
    Array, Array, Array
]:  # fmt: skip
    """One row per prompt `[P, Lp + G * N]`: the prompt once, then its G completions, each attending
    to the prompt and to itself only (segment ids: 0 padding, 1 prompt, 2 + g completion g), with
    the positions it has in its own unpacked row. Returns ids, segment ids and positions."""
    p, g, n = tokens.shape
    ids = jnp.concatenate([prompt_ids, tokens.reshape(p, g * n)], axis=1)
    segment = jnp.where(completion_mask != 0, jnp.arange(2, g + 2, dtype=jnp.int32)[None, :, None], 0)
    segment = jnp.concatenate([(prompt_mask != 0).astype(jnp.int32), segment.reshape(p, g * n)], axis=1)
    real = jnp.sum(prompt_mask != 0, axis=1).astype(jnp.int32)
    completion_pos = jnp.broadcast_to(real[:, None, None] + jnp.arange(n, dtype=jnp.int32), (p, g, n))
    positions = jnp.concatenate([default_positions(prompt_mask, *prompt_mask.shape),
                                 completion_pos.reshape(p, g * n)], axis=1)  # fmt: skip
    return ids, segment, positions


def group_trunk(model: CausalLM, prompt_ids: Array, prompt_mask: Array, tokens: Array,
                completion_mask: Array, *, pack: bool) -> Array:  # fmt: skip
    """The frozen trunk (`CausalLM.trunk_states`) of the rows `group_logprobs` runs, prompt first:
    `[P, Lp + G N, D]` packed, `[P, G, Lp + N, D]` one row per completion."""
    p, g, n = tokens.shape
    if not pack:
        ids, mask, positions = unpacked_rows(prompt_ids, prompt_mask, tokens, completion_mask)
        x = model.trunk_states(ids, mask, positions)
        return x.reshape(p, g, *x.shape[1:])
    ids, segment, positions = packed_rows(prompt_ids, prompt_mask, tokens, completion_mask)
    return model.trunk_states(ids, packed_mask(segment), positions)


def group_logprobs(model: CausalLM, prompt_ids: Array, prompt_mask: Array, tokens: Array,
                   completion_mask: Array, temperature: float, *, pack: bool,
                   trunk: Array | None = None) -> Array:  # fmt: skip
    """Log-probs `[P, G, N]` of every completion token under `softmax(logits / temperature)`, from
    packed rows (the prompt computed once per group: `Lp + G N` tokens instead of `G (Lp + N)`) or
    from one row per completion; both give the same numbers. `trunk`: the rows' `group_trunk`
    (of this model, or of one with the same frozen layers), the pass starts above it."""
    p, g, n = tokens.shape
    lp = prompt_ids.shape[1]
    if not pack:
        ids, mask, positions = unpacked_rows(prompt_ids, prompt_mask, tokens, completion_mask)
        flat = None if trunk is None else trunk.reshape(p * g, *trunk.shape[2:])
        return response_logprobs(model, ids, mask, positions, lp, temperature, trunk=flat).reshape(p, g, n)
    ids, segment, positions = packed_rows(prompt_ids, prompt_mask, tokens, completion_mask)
    hidden = model.hidden_states(ids, packed_mask(segment), positions, trunk=trunk)
    # the slot that predicts token j of completion k: the prompt's last slot for j = 0, else the
    # completion's own previous token
    k, j = np.arange(g)[:, None], np.arange(n)[None, :]
    source = np.where(j == 0, lp - 1, lp + k * n + j - 1).reshape(g * n)
    logps = model.token_logprobs(hidden[:, source], ids[:, lp:], temperature=temperature)
    return logps.reshape(p, g, n)


class GRPOEngine(RolloutEngine):
    """Compiled GRPO (`estimator="grpo"`) or RLOO (`"rloo"`) on a mesh. Subclasses change the loss
    (`_loss`), the temperature of the trained log-probs (`logprob_temperature`; default: the
    sampling temperature, as TRL's GRPO) and the missing-EOS penalty on the rewards."""

    logprob_temperature: float | None = None
    missing_eos_penalty: float | None = None
    trunk: bool = False  # the policy's frozen trunk computed once per rollout (`shared_trunk`)

    def __init__(
        self,
        policy: CausalLM,
        cfg: GRPOConfig,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        estimator: str = "grpo",
        reward_model: CausalLM | None = None,
        reward_weights: list[float] | None = None,
        num_reward_funcs: int = 1,
        seed: int = 0,
        frozen_dtype: Any = None,
    ):
        self.cfg, self.optimizer, self.mesh, self.estimator = cfg, optimizer, mesh, estimator
        # trained above frozen layers, the policy computes its reference's trunk too: once per
        # rollout, kept in it for the updates (which then run the trained layers only) -- less work
        # when something besides one update pass reads it
        reuse = cfg.beta > 0 or cfg.rescore_policy or cfg.num_iterations > 1
        self.trunk = reuse and shared_trunk(policy)
        params = self._init_policy(
            policy, reference=cfg.beta > 0, frozen_dtype=frozen_dtype, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
        )  # fmt: skip
        self.rm_def, self.rm_params = (
            nnx.split(reward_model, nnx.Param) if reward_model is not None else (None, None)
        )
        self.num_funcs = num_reward_funcs
        n = num_reward_funcs + (reward_model is not None)
        self.weights = np.asarray(reward_weights if reward_weights is not None else [1.0] * n, np.float32)
        if len(self.weights) != n:
            raise ValueError(f"{len(self.weights)} reward weights for {n} rewards")
        self._init_state({"policy": params}, optimizer, seed)
        self._score = jax.jit(self._score_fn)
        self._update = jax.jit(self._update_fn, donate_argnums=(0,))

    # ---------------------------------------------------------------- scoring
    def _score_fn(self, params, frozen, ref_params, rm_params, prompt_ids, prompt_mask, gen: Generation,
                  host_rewards):  # fmt: skip
        cfg, g = self.cfg, self.cfg.num_generations
        p, n = prompt_ids.shape[0], gen.tokens.shape[1]
        tokens, completion_mask = gen.tokens.reshape(p, g, n), gen.completion_mask.reshape(p, g, n)
        ids, mask, positions = unpacked_rows(prompt_ids, prompt_mask, tokens, completion_mask)
        columns = [] if host_rewards is None else [host_rewards.reshape(p * g, -1)]
        if rm_params is not None:
            rm = nnx.merge(self.rm_def, rm_params)
            columns.append(sequence_scores(rm, ids, mask, positions, prompt_ids.shape[1])[:, None])
        rewards_BxR = jnp.concatenate(columns, axis=1).astype(jnp.float32)
        # TRL: a None (NaN) reward does not apply and is left out of the weighted sum
        rewards_B = jnp.nansum(rewards_BxR * jnp.asarray(self.weights), axis=1)
        # [P, G] ended by the policy: the completion's last token is an EOS (one of several in a
        # multi-turn rollout, whose tool messages end with one too)
        length = jnp.sum(completion_mask, axis=2)
        last_token = jnp.take_along_axis(tokens, jnp.maximum(length - 1, 0)[..., None], axis=2)[..., 0]
        has_eos = jnp.isin(last_token, self.eos) & (length > 0)
        policy_mask = completion_mask if gen.policy_mask is None else gen.policy_mask.reshape(p, g, n)
        if self.missing_eos_penalty is not None:  # TRL's OnlineDPO: subtracted before ranking
            rewards_B = rewards_B - self.missing_eos_penalty * (1.0 - has_eos.reshape(-1).astype(jnp.float32))
        advantages = group_advantages(rewards_B, g, scale=cfg.scale_rewards, estimator=self.estimator)
        loss_mask = policy_mask  # a multi-turn rollout's tool messages are context, not trained
        if cfg.mask_truncated_completions:  # DAPO: a cut-off completion says nothing about its reward
            loss_mask = loss_mask * has_eos[..., None].astype(loss_mask.dtype)

        trunk = None
        if self.trunk:
            rows = (prompt_ids, prompt_mask, tokens, completion_mask)
            trunk = group_trunk(self._policy(params, frozen), *rows, pack=cfg.pack_groups)

        def logprobs(model: CausalLM) -> Array:
            return group_logprobs(model, prompt_ids, prompt_mask, tokens, completion_mask,
                                  self.train_temperature, pack=cfg.pack_groups, trunk=trunk)  # fmt: skip

        if cfg.rescore_policy:
            old = logprobs(self._policy(params, frozen))
        else:  # the sampler computed them from the same policy: one forward fewer (as TRL does)
            old = gen.logprobs.reshape(p, g, n)
        ref = logprobs(self._reference(params, frozen, ref_params)) if self.has_reference else None
        group_std = jnp.std(rewards_B.reshape(p, g), axis=1, ddof=1)
        lengths = jnp.sum(completion_mask, axis=2).astype(jnp.float32)
        valid = ~jnp.isnan(rewards_BxR)
        n_valid = jnp.maximum(jnp.sum(valid, axis=0), 1)
        func_mean = jnp.nansum(rewards_BxR, axis=0) / n_valid
        func_std = jnp.sqrt(jnp.nansum((rewards_BxR - func_mean) ** 2, axis=0) / jnp.maximum(n_valid - 1, 1))
        metrics = {
            "reward": jnp.mean(rewards_B),
            "reward_std": jnp.mean(group_std),  # TRL: the mean over groups of the group's std
            "frac_reward_zero_std": jnp.mean((group_std < 1e-6).astype(jnp.float32)),
            "completions/mean_length": jnp.mean(lengths),
            "completions/min_length": jnp.min(lengths),
            "completions/max_length": jnp.max(lengths),
            "completions/clipped_ratio": 1.0 - jnp.mean(has_eos.astype(jnp.float32)),
            "entropy": masked_mean(gen.entropy, policy_mask.reshape(gen.entropy.shape).astype(jnp.float32)),
            "rewards_mean": func_mean,  # [R]: named on the host
            "rewards_std": func_std,
        }
        rollout = GroupRollout(
            prompt_ids, prompt_mask, tokens, completion_mask, loss_mask, old, ref, rewards_B.reshape(p, g),
            advantages.reshape(p, g), trunk,
        )  # fmt: skip
        return rollout, metrics

    # ---------------------------------------------------------------- update
    def _update_fn(self, state, rollout: GroupRollout, frozen: dict[str, Any]):
        cfg = self.cfg
        p = rollout.tokens.shape[0]  # minibatches of whole groups (packed rows keep a group together)
        mb = p // cfg.num_mini_batches
        rng = jax.random.wrap_key_data(state.rng)
        rng, *epoch_keys = jax.random.split(rng, cfg.num_iterations + 1)

        def loss_fn(params, batch: GroupRollout, key: Array):
            policy = self._policy(params, frozen)
            # LoRA dropout (when set): in updates only; MoE router statistics of the policy's pass
            policy = policy.with_lora_dropout(key)
            logps, aux = nnx.capture(group_logprobs, RouterStats)(
                policy, batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.completion_mask,
                self.train_temperature, pack=cfg.pack_groups, trunk=batch.trunk,
            )  # fmt: skip
            loss, metrics = self._loss(logps, batch)
            metrics = {**metrics, "loss": loss}
            return add_router_aux(policy, loss, aux, metrics), metrics

        def minibatch(state, xs):
            return self._minibatch_step(state, rollout, loss_fn, *xs)

        def epoch(state, key: Array):  # a fresh permutation every pass
            perm = jax.random.permutation(key, p).reshape(cfg.num_mini_batches, mb)
            dropout_keys = jax.random.split(jax.random.fold_in(key, 1), cfg.num_mini_batches)
            return jax.lax.scan(minibatch, state, (perm, dropout_keys))

        state, metrics = jax.lax.scan(epoch, state, jnp.stack(epoch_keys))
        metrics = jax.tree.map(jnp.mean, metrics)
        return state.replace(step=state.step + 1, rng=jax.random.key_data(rng)), metrics

    @property
    def train_temperature(self) -> float:
        """The temperature of the trained (and reference) log-probs."""
        return self.cfg.temperature if self.logprob_temperature is None else self.logprob_temperature

    def _loss(self, logps: Array, batch: GroupRollout) -> tuple[Array, dict[str, Array]]:
        """The clipped surrogate of `grpo_loss` on the rollout's minibatch (`logps` [P, G, N])."""
        cfg = self.cfg
        flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])  # noqa: E731
        return grpo_loss(
            flat(logps), flat(batch.old_logprobs), flat(batch.advantages), flat(batch.loss_mask),
            ref_logps=flat(batch.ref_logprobs), loss_type=cfg.loss_type, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high, beta=cfg.beta,
            importance_sampling_level=cfg.importance_sampling_level,
            max_completion_length=cfg.max_completion_length,
        )  # fmt: skip

    # ---------------------------------------------------------------- one iteration
    def step(
        self, prompt_ids: np.ndarray | Array, prompt_mask: np.ndarray | Array,
        reward_fn: RewardFn | None, reward_names: list[str] | None = None,
    ) -> dict[str, float]:  # fmt: skip
        """One iteration on P prompts: G completions each, rewards, advantages, updates.

        `reward_fn(ids [P*G, P_len+N], completion_mask [P*G, N]) -> [P*G, R]` (numpy, NaN where a
        reward does not apply) runs on process 0 and is broadcast; `reward_names` name its columns
        (then "reward_model") in the metrics. Every process calls `step` with the same global batch."""
        if (reward_fn is None) != (self.num_funcs == 0):
            raise ValueError(f"the engine was built for {self.num_funcs} reward functions")
        g = self.cfg.num_generations
        start = time.perf_counter()
        ids_p, mask_p = self._batch(prompt_ids), self._batch(prompt_mask)
        prompt_ids, prompt_mask = jnp.repeat(ids_p, g, axis=0), jnp.repeat(mask_p, g, axis=0)
        if self.rollout is not None:  # multi-turn: the policy's turns and the tools' answers
            gen = self.rollout(self, prompt_ids, prompt_mask)
        else:
            gen = self.generate(prompt_ids, prompt_mask)  # all P * G completions in one sampler call
        jax.block_until_ready(gen.tokens)
        gen_seconds = time.perf_counter() - start
        start = time.perf_counter()
        host_rewards = None
        if reward_fn is not None:
            ids = jnp.concatenate([prompt_ids, gen.tokens], axis=1)
            host_rewards = self.host_values(reward_fn, ids, gen.completion_mask, shape=(self.num_funcs,))
        rollout, metrics = self._score(
            self.state.params, self.frozen, self.ref_params, self.rm_params, ids_p, mask_p, gen, host_rewards
        )
        jax.block_until_ready(rollout)
        score_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.state, update_metrics = self._update(self.state, rollout, self.frozen)
        out = {k: float(v) for k, v in update_metrics.items()}
        update_seconds = time.perf_counter() - start
        names = list(reward_names or [f"func{i}" for i in range(self.num_funcs)])
        names += ["reward_model"] if self.rm_params is not None else []
        for k, v in metrics.items():
            if k in ("rewards_mean", "rewards_std"):
                for name, x in zip(names, np.asarray(v), strict=True):
                    out[f"rewards/{name}/{k.split('_')[1]}"] = float(x)
            else:
                out[k] = float(v)
        out.update({
            "time/generation": gen_seconds, "time/scoring": score_seconds, "time/update": update_seconds,
            "rollout_tokens_per_second": float(jnp.sum(gen.completion_mask)) / max(gen_seconds, 1e-9),
        })  # fmt: skip
        self.last_rollout = rollout
        return out
