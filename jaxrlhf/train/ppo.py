"""RLHF with PPO: rollouts with the KV-cache sampler, reward-model (or reward-function) scores, a
per-token KL penalty to the frozen reference, GAE, and clipped policy / value updates over several
minibatch epochs.

`PPOEngine` holds the four models (policy, critic, reference, reward model) as pytrees and three
compiled functions: `generate` (the sampler), `_score` (log-probs, values, rewards and advantages of a
rollout: no gradients) and `_update` (`num_ppo_epochs` x minibatches of clipped updates, a fresh
permutation per epoch, in one `jax.jit`). Each implementation detail of Huang et al. (2024), "The N+
Implementation Details of RLHF with PPO" (arXiv:2403.17031), is listed in docs/ppo.md with the line
that does it.

With LoRA (a policy loaded with `lora=`), only the adapters are trained and the reference is the
policy with its adapters switched off: no copy of the base. With `frozen_layers` the frozen layers
hold no gradients and no Adam moments, the reference copies only the layers above them, and when
the four models share those frozen weights their trunk runs once per rollout (`shared_trunk`): the
scoring and the updates run only the trained layers from it. A LoRA critic (adapters and a trained
score head) shares the frozen base arrays of the policy (critic from the policy) or of the reward
model (critic from the reward model) when they are the same weights: one base in memory.
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
from jaxrlhf.losses import (
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from jaxrlhf.models.decoder import CausalLM, default_positions
from jaxrlhf.models.moe import RouterStats, add_router_aux
from jaxrlhf.models.trunk import shared_trunk
from jaxrlhf.parallel import host_array
from jaxrlhf.train.rollout import (
    RolloutEngine,
    RolloutState,
    response_logprobs,
    sequence_scores,
    share_arrays,
    split_trainable,
)

if TYPE_CHECKING:  # the method module owns its section (and imports this engine)
    from jaxrlhf.train.algorithms.ppo import PPOConfig

Array = jax.Array
PPOState = RolloutState  # {"policy", "critic"} parameters and their optimizer state
__all__ = ["PPOEngine", "PPOState", "Rollout", "ScoreFn", "response_logprobs", "response_values"]
# score_fn(query_response_BxL, response_mask_BxN) -> scores [B] (host or traced), for verifiable rewards
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@struct.dataclass
class Rollout:
    ids: Array  # [B, P+N] prompt (left-padded) then response
    mask: Array  # [B, P+N] 1 on real prompt tokens and on the response through its EOS
    positions: Array  # [B, P+N]
    response_mask: Array  # [B, N]
    logprobs: Array  # [B, N] policy log-probs at rollout time (logits / temperature)
    values: Array  # [B, N] critic values at rollout time
    advantages: Array  # [B, N] whitened GAE advantages
    returns: Array  # [B, N]
    ref_logprobs: Array  # [B, N] frozen reference log-probs
    scores: Array  # [B] reward (after the missing-EOS penalty)
    rewards: Array  # [B, N] per-token rewards: -kl_coef * kl, plus the score at the last token
    kl: Array  # [B, N] per-token KL estimate (masked)
    trunk: Array | None = None  # [B, P+N, D] the shared frozen trunk's output (`shared_trunk`), or None


def response_values(critic: CausalLM, ids: Array, mask: Array, positions: Array, prompt_len: int, *,
                    trunk: Array | None = None) -> Array:  # fmt: skip
    """Critic values `[B, N]`, read at the slot before each response token (the state it acts from)."""
    return critic(ids, mask, positions, trunk=trunk)[:, prompt_len - 1 : -1]


class PPOEngine(RolloutEngine):
    """Compiled PPO on a mesh. Models are given as loaded `CausalLM`s; the reference is a frozen copy
    of the initial policy (stored in `frozen_dtype` when given), or with LoRA the policy with its
    adapters off."""

    trunk: bool = False  # one frozen trunk for the four models (`shared_trunk`), computed once per rollout

    def __init__(
        self,
        policy: CausalLM,
        critic: CausalLM,
        reward_model: CausalLM | None,
        cfg: PPOConfig,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        seed: int = 0,
        frozen_dtype: Any = None,
        critic_frozen_from: str = "policy",
    ):
        self.cfg, self.optimizer, self.mesh = cfg, optimizer, mesh
        # Trained above one frozen base (model.frozen_layers), the four models compute the same
        # trunk: once per rollout, kept in it for the updates (which run the trained layers only).
        self.trunk = shared_trunk(policy, critic, reward_model)
        policy_params = self._init_policy(
            policy, reference=True, frozen_dtype=frozen_dtype, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
        )  # fmt: skip
        self.critic_def, critic_params, critic_frozen = split_trainable(critic)
        self.rm_def, self.rm_params = (
            nnx.split(reward_model, nnx.Param) if reward_model is not None else (None, None)
        )
        if critic_frozen is not None:  # one base in memory: the policy's or the reward model's
            source = self.frozen["policy"] if critic_frozen_from == "policy" else self.rm_params
            critic_frozen = share_arrays(critic_frozen, source)
        # Not differentiated, not in the optimizer, not checkpointed (it is the loaded checkpoint).
        self.frozen["critic"] = critic_frozen
        self._init_state({"policy": policy_params, "critic": critic_params}, optimizer, seed)
        self.kl_coef = float(cfg.kl_coef)
        # The frozen bases go in as a separate argument, never donated (the critic's may alias the
        # policy's buffers).
        self._update = jax.jit(self._update_fn, static_argnames=("prompt_len",), donate_argnums=(0,))
        self._score = jax.jit(self._score_fn, static_argnames=("prompt_len",))
        self._eval = jax.jit(self._eval_fn, static_argnames=("prompt_len",))

    def _critic(self, params: dict[str, nnx.State], frozen: dict[str, Any]) -> CausalLM:
        return self._model(self.critic_def, params["critic"], frozen["critic"])

    def _trunk(self, params, frozen, ids, mask, positions) -> Array | None:
        """The rows' frozen trunk, shared by the four models (None unless `self.trunk`)."""
        return self._policy(params, frozen).trunk_states(ids, mask, positions) if self.trunk else None

    def _final_scores(self, rm_params, ids, mask, positions, response_mask, host_scores, prompt_len: int,
                      trunk: Array | None = None):  # fmt: skip
        """Scores `[B]` (the reward model's at the last real token, or the host's, then the missing-EOS
        rule) and whether each response ends with an EOS `[B]` (`response_mask`: all of the
        completion, a multi-turn rollout's tool messages included)."""
        cfg = self.cfg
        if rm_params is not None:
            rm = nnx.merge(self.rm_def, rm_params)
            scores = sequence_scores(rm, ids, mask, positions, prompt_len, trunk=trunk)
        else:
            scores = host_scores
        response = ids[:, prompt_len:]
        length = jnp.sum(response_mask != 0, axis=1)
        last = jnp.take_along_axis(response, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
        has_eos = jnp.isin(last, self.eos) & (length > 0)
        if cfg.missing_eos_penalty is not None:  # detail: penalise responses that never stop
            scores = jnp.where(has_eos, scores, scores - cfg.missing_eos_penalty)
        if cfg.missing_eos_score is not None:  # or replace their (meaningless) score outright
            scores = jnp.where(has_eos, scores, jnp.float32(cfg.missing_eos_score))
        return scores, has_eos

    def _score_fn(self, params, frozen, ref_params, rm_params, ids, mask, gen: Generation, host_scores,
                  kl_coef, *, prompt_len):  # fmt: skip
        cfg = self.cfg
        completion_mask = gen.completion_mask
        # the policy's own tokens: all of the completion, or a multi-turn rollout's turns without the
        # tool messages between them (context, not actions: out of the KL, the losses and GAE)
        response_mask = completion_mask if gen.policy_mask is None else gen.policy_mask
        positions = default_positions(mask, *mask.shape)
        trunk = self._trunk(params, frozen, ids, mask, positions)
        ref = self._reference(params, frozen, ref_params)
        if cfg.rescore_policy:
            policy = self._policy(params, frozen)
            logprobs, entropy = response_logprobs(
                policy, ids, mask, positions, prompt_len, cfg.temperature, with_entropy=True, trunk=trunk
            )
        else:  # the sampler computed both from the same policy: one forward fewer (as TRL does)
            logprobs, entropy = gen.logprobs, gen.entropy
        ref_logprobs = response_logprobs(ref, ids, mask, positions, prompt_len, cfg.temperature, trunk=trunk)
        critic = self._critic(params, frozen)
        values = response_values(critic, ids, mask, positions, prompt_len, trunk=trunk)
        scores, _ = self._final_scores(
            rm_params, ids, mask, positions, completion_mask, host_scores, prompt_len, trunk
        )
        response = ids[:, prompt_len:]
        rewards, non_score, kl = per_token_rewards(
            scores, logprobs, ref_logprobs, response_mask, kl_coef=kl_coef, kl_kind=cfg.kl_estimator
        )
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False)
        advantages, returns = gae(rewards, values, response_mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = masked_whiten(advantages, response_mask)  # detail: advantage whitening
        m = response_mask.astype(jnp.float32)
        metrics = {
            "objective/kl": jnp.mean(jnp.sum(kl * m, axis=1)),
            "objective/entropy": jnp.mean(jnp.sum(-logprobs * m, axis=1)),
            "objective/non_score_reward": jnp.mean(jnp.sum(non_score, axis=1)),
            "objective/rlhf_reward": jnp.mean(scores + jnp.sum(non_score, axis=1)),
            "objective/scores": jnp.mean(scores),
            "policy/entropy_avg": masked_mean(entropy, m),
            "val/num_eos_tokens": jnp.sum(jnp.isin(response, self.eos) & (response_mask != 0)).astype(
                jnp.float32
            ),
            "val/response_length": jnp.mean(jnp.sum(completion_mask, axis=1).astype(jnp.float32)),
        }
        rollout = Rollout(
            ids, mask, positions, response_mask, logprobs, values, advantages, returns,
            ref_logprobs, scores, rewards, kl, trunk,
        )  # fmt: skip
        return rollout, metrics

    # ---------------------------------------------------------------- update
    def _update_fn(self, state: PPOState, rollout: Rollout, frozen: dict[str, Any], *, prompt_len: int):
        cfg = self.cfg
        b = rollout.ids.shape[0]
        if b % cfg.num_mini_batches:
            raise ValueError(
                f"rollout batch {b} is not divisible by ppo.num_mini_batches {cfg.num_mini_batches}"
            )
        mb = b // cfg.num_mini_batches
        rng = jax.random.wrap_key_data(state.rng)
        rng, *epoch_keys = jax.random.split(rng, cfg.num_ppo_epochs + 1)

        def loss_fn(params, batch: Rollout, key: Array):
            policy, critic = self._policy(params, frozen), self._critic(params, frozen)
            # detail: the sampling temperature divides the training logits too
            # LoRA dropout (when set): updates only; MoE router statistics of the policy's pass
            policy = policy.with_lora_dropout(jax.random.fold_in(key, 0))
            logprobs, aux = nnx.capture(response_logprobs, RouterStats)(
                policy, batch.ids, batch.mask, batch.positions, prompt_len, cfg.temperature, trunk=batch.trunk
            )
            critic = critic.with_lora_dropout(jax.random.fold_in(key, 1))
            values = response_values(critic, batch.ids, batch.mask, batch.positions, prompt_len,
                                     trunk=batch.trunk)  # fmt: skip
            pg, pg_m = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, batch.response_mask,
                                       clip_eps=cfg.cliprange)  # fmt: skip
            vf, vf_m = ppo_value_loss(
                values, batch.values, batch.returns, batch.response_mask, clip=cfg.cliprange_value
            )
            metrics = {
                "policy/approxkl_avg": pg_m["approxkl"],
                "policy/clipfrac_avg": pg_m["clipfrac"],
                "val/ratio": pg_m["ratio"],
                "loss/policy_avg": pg,
                "loss/value_avg": vf,
                "val/clipfrac_avg": vf_m["vf_clipfrac"],
            }
            return add_router_aux(policy, pg + cfg.vf_coef * vf, aux, metrics), metrics

        def minibatch(state: PPOState, xs: tuple[Array, Array]):
            return self._minibatch_step(state, rollout, loss_fn, *xs)

        def epoch(state: PPOState, key: Array):  # detail: a fresh permutation every epoch
            perm = jax.random.permutation(key, b).reshape(cfg.num_mini_batches, mb)
            dropout_keys = jax.random.split(jax.random.fold_in(key, 1), cfg.num_mini_batches)
            return jax.lax.scan(minibatch, state, (perm, dropout_keys))

        state, metrics = jax.lax.scan(epoch, state, jnp.stack(epoch_keys))
        metrics = jax.tree.map(jnp.mean, metrics)
        return state.replace(step=state.step + 1, rng=jax.random.key_data(rng)), metrics

    def step(
        self, prompt_ids: np.ndarray | Array, prompt_mask: np.ndarray | Array, score_fn: ScoreFn | None = None
    ) -> dict[str, float]:
        """One PPO iteration: rollout, scoring, advantages, `num_ppo_epochs` x minibatch updates.

        On several processes every process calls `step` with the same global batch (a global array of
        each host's rows, or the same numpy batch); `score_fn` then runs on process 0 only, on the
        whole rollout, and its scores are broadcast."""
        self._check_reward(score_fn)
        start = time.perf_counter()
        prompt_ids, prompt_mask = self._batch(prompt_ids), self._batch(prompt_mask)
        if self.rollout is not None:  # multi-turn: the policy's turns and the tools' answers
            gen = self.rollout(self, prompt_ids, prompt_mask)
        else:
            gen = self.generate(prompt_ids, prompt_mask)
        tokens, response_mask = gen.tokens, gen.completion_mask
        ids = jnp.concatenate([prompt_ids, tokens], axis=1)
        mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
        host_scores = None
        if self.rm_params is None:
            host_scores = self.host_values(score_fn, ids, response_mask)
        jax.block_until_ready(tokens)
        gen_seconds = time.perf_counter() - start
        start = time.perf_counter()
        p = prompt_ids.shape[1]
        rollout, metrics = self._score(
            self.state.params, self.frozen, self.ref_params, self.rm_params, ids, mask, gen, host_scores,
            np.float32(self.kl_coef), prompt_len=p,
        )  # fmt: skip
        jax.block_until_ready(rollout)
        score_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.state, update_metrics = self._update(self.state, rollout, self.frozen, prompt_len=p)
        out = {k: float(v) for k, v in {**metrics, **update_metrics}.items()}
        update_seconds = time.perf_counter() - start
        response_tokens = float(jnp.sum(response_mask if gen.policy_mask is None else gen.policy_mask))
        out.update({
            "objective/kl_coef": self.kl_coef,
            "time/generation": gen_seconds, "time/scoring": score_seconds, "time/update": update_seconds,
            "rollout_tokens_per_second": response_tokens / max(gen_seconds, 1e-9),
            "train_tokens_per_second": float(jnp.sum(mask)) * self.cfg.num_ppo_epochs
            / max(update_seconds, 1e-9),
        })  # fmt: skip
        self._adapt_kl(out["objective/kl"], n=prompt_ids.shape[0])
        self.last_rollout = rollout
        return out

    def _check_reward(self, score_fn: ScoreFn | None) -> None:
        if (self.rm_params is None) == (score_fn is None):
            raise ValueError("PPO needs exactly one of a reward model (at construction) or a score_fn")

    def evaluate(
        self, prompt_ids: np.ndarray | Array, prompt_mask: np.ndarray | Array,
        score_fn: ScoreFn | None = None, *, seed: int = 0, rollout: Callable[..., Generation] | None = None,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Held-out numbers of the current policy, per prompt row (numpy `[B]`, gathered on every
        process): responses are sampled as in training (same temperature) but from a fixed `seed`, so
        evaluations are comparable and the training stream is untouched; then `scores` (reward
        model or `score_fn`, with the missing-EOS rule), `kl` (the configured estimator summed over
        the response, to the reference), `length` (response tokens) and `eos` (1 if it stopped).
        `rollout(engine, ids, mask, seed=)`: a multi-turn rollout instead of the sampler."""
        self._check_reward(score_fn)
        prompt_ids, prompt_mask = self._batch(prompt_ids), self._batch(prompt_mask)
        if rollout is not None:
            gen = rollout(self, prompt_ids, prompt_mask, seed=seed)
        else:
            gen = self.generate(prompt_ids, prompt_mask, seed=seed)
        ids = jnp.concatenate([prompt_ids, gen.tokens], axis=1)
        mask = jnp.concatenate([prompt_mask, gen.completion_mask], axis=1)
        host_scores = None if score_fn is None else self.host_values(score_fn, ids, gen.completion_mask)
        out = self._eval(self.state.params, self.frozen, self.ref_params, self.rm_params, ids, mask, gen,
                         host_scores, prompt_len=prompt_ids.shape[1])  # fmt: skip
        return {k: host_array(v) for k, v in out.items()}

    def _eval_fn(self, params, frozen, ref_params, rm_params, ids, mask, gen: Generation, host_scores, *,
                 prompt_len: int):  # fmt: skip
        response_mask = gen.completion_mask
        policy_mask = response_mask if gen.policy_mask is None else gen.policy_mask
        positions = default_positions(mask, *mask.shape)
        trunk = self._trunk(params, frozen, ids, mask, positions)
        ref = self._reference(params, frozen, ref_params)
        ref_logprobs = response_logprobs(ref, ids, mask, positions, prompt_len, self.cfg.temperature,
                                         trunk=trunk)  # fmt: skip
        scores, has_eos = self._final_scores(
            rm_params, ids, mask, positions, response_mask, host_scores, prompt_len, trunk
        )
        kl = kl_penalty(gen.logprobs, ref_logprobs, self.cfg.kl_estimator) * policy_mask
        return {
            "scores": scores,
            "kl": jnp.sum(kl, axis=1),
            "length": jnp.sum(response_mask, axis=1).astype(jnp.float32),
            "eos": has_eos.astype(jnp.float32),
        }

    def _adapt_kl(self, kl: float, n: int) -> None:
        """Adaptive KL controller of Ziegler et al. (2019, arXiv:1909.08593), when `target_kl` is set."""
        if self.cfg.target_kl is None:
            return
        error = float(np.clip(kl / self.cfg.target_kl - 1.0, -0.2, 0.2))
        self.kl_coef *= 1.0 + error * n / self.cfg.kl_horizon

    def policy_model(self) -> CausalLM:
        return self._policy(self.state.params, self.frozen)
