"""Expert dispatch for the MoE MLP: sorted tokens + `jax.lax.ragged_dot` (what
`jaxrlhf.models.moe.MoE` does) against the two usual alternatives, forward + backward of one block:

* `capacity`: GShard / Switch dispatch: one-hot `[N, E, C]` dispatch and combine tensors, each
  expert runs on a fixed `C = capacity_factor * N k / E` slots (tokens past the capacity dropped).
* `dense`: every expert on every token, the outputs weighted by the (mostly zero) routing weights.

Shapes follow Mixtral (8 experts, top-2) and Qwen3-MoE (128 experts, top-8) with a smaller width.
Prints milliseconds per forward+backward, the work ratio and the fraction of dropped assignments.

    python bench/bench_moe.py [--tokens 2048] [--hidden 256] [--width 256]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.moe import route


def ragged(x, wr, wg, wu, wd, k):
    n, d = x.shape
    e = wr.shape[1]
    _, weights, experts = route(x @ wr, k, normalize=True)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, sizes)) * jax.lax.ragged_dot(xs, wu, sizes)
    y = jax.lax.ragged_dot(h, wd, sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return jnp.einsum("nkd,nk->nd", y[inverse].reshape(n, k, d), weights), jnp.float32(0.0)


def capacity(x, wr, wg, wu, wd, k, factor):
    n, _ = x.shape
    e = wr.shape[1]
    c = int(np.ceil(factor * n * k / e))
    _, weights, experts = route(x @ wr, k, normalize=True)
    onehot = jax.nn.one_hot(experts, e, dtype=jnp.int32)  # [N, k, E]
    # slot of each assignment within its expert: running count in (token, choice) order
    position = (jnp.cumsum(onehot.reshape(n * k, e), axis=0).reshape(n, k, e) - 1) * onehot
    kept = (position < c) & (onehot > 0)
    dispatch = (jax.nn.one_hot(position, c, dtype=x.dtype) * kept[..., None]).sum(1)  # [N, E, C]
    combine = (jax.nn.one_hot(position, c, dtype=x.dtype) * (kept * weights[..., None])[..., None]).sum(1)
    xe = jnp.einsum("nec,nd->ecd", dispatch, x)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, wg)) * jnp.einsum("ecd,edf->ecf", xe, wu)
    ye = jnp.einsum("ecf,efd->ecd", h, wd)
    dropped = 1.0 - jnp.sum(kept) / (n * k)
    return jnp.einsum("nec,ecd->nd", combine, ye), dropped


def dense(x, wr, wg, wu, wd, k):
    n, _ = x.shape
    e = wr.shape[1]
    _, weights, experts = route(x @ wr, k, normalize=True)
    gates = jnp.zeros((n, e), x.dtype).at[jnp.arange(n)[:, None], experts].set(weights)
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, wg)) * jnp.einsum("nd,edf->nef", x, wu)
    return jnp.einsum("nef,efd,ne->nd", h, wd, gates), jnp.float32(0.0)


def timed(fn, args, reps=5):
    step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)[0] ** 2), argnums=(0, 1, 2, 3, 4)))
    jax.block_until_ready(step(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, float(jax.jit(fn)(*args)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{jax.default_backend()}, N={a.tokens} D={a.hidden} F={a.width}, forward+backward of one block")
    print("| experts, top-k | dispatch | ms | vs ragged | dropped |")
    print("|---|---|---|---|---|")
    for e, k in ((8, 2), (64, 8)):
        def w(*shape):
            return jnp.asarray(rng.normal(size=shape) * 0.05, jnp.float32)

        x = jnp.asarray(rng.normal(size=(a.tokens, a.hidden)), jnp.float32)
        args = (x, w(a.hidden, e), w(e, a.hidden, a.width), w(e, a.hidden, a.width), w(e, a.width, a.hidden))
        base, _ = timed(lambda *z, k=k: ragged(*z, k), args)
        rows = [("ragged", base, 0.0)]
        for factor in (1.25, 2.0):
            ms, drop = timed(lambda *z, f=factor, k=k: capacity(*z, k, f), args)
            rows.append((f"capacity x{factor}", ms, drop))
        ms, _ = timed(lambda *z, k=k: dense(*z, k), args)
        rows.append(("dense", ms, 0.0))
        for name, ms, drop in rows:
            print(f"| {e}, {k} | {name} | {ms:.1f} | {ms / base:.2f}x | {drop:.1%} |")


if __name__ == "__main__":
    main()
