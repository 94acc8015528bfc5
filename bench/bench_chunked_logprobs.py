"""Memory and time of chunked vs direct token log-probs, forward + backward.

Compares ``jaxrlhf.losses.token_logprobs_from_hidden`` (chunked, rematerialised) with the direct
path ``token_logprobs(hidden @ lm_head, labels)`` at a SmolLM2-135M-like size: hidden size
D=576, vocabulary V=49152, N=2048 tokens. Each variant is ``jax.jit(jax.value_and_grad(...))``
w.r.t. both the hidden states and the LM head.

Memory is XLA's own buffer assignment from ``jit(...).lower(...).compile().memory_analysis()``:
``temp`` is the scratch memory the program needs beyond its inputs and outputs (where the [N, V]
logits and their gradient live on the direct path); ``total`` = arguments + outputs + temp, the
program's whole footprint. (The backend's ``peak_memory_in_bytes`` is not used: on CPU it leaves
out the temp buffers.)

    python bench/bench_chunked_logprobs.py                 # the default SmolLM2-like size
    python bench/bench_chunked_logprobs.py --n 512 --iters 2 --chunk-sizes 256

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.losses import token_logprobs, token_logprobs_from_hidden

MIB = 2**20


def make_inputs(n: int, d: int, v: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    seq = 512 if n % 512 == 0 else n
    hidden_BxTxD = jnp.asarray(rng.standard_normal((n // seq, seq, d)), dtype)
    lm_head_DxV = jnp.asarray(rng.standard_normal((d, v)) / np.sqrt(d), dtype)
    labels_BxT = jnp.asarray(rng.integers(0, v, (n // seq, seq)), jnp.int32)
    return hidden_BxTxD, lm_head_DxV, labels_BxT


def direct_loss(hidden_BxTxD, lm_head_DxV, labels_BxT):
    return -jnp.mean(token_logprobs(hidden_BxTxD @ lm_head_DxV, labels_BxT))


def chunked_loss(chunk_size: int):
    def loss(hidden_BxTxD, lm_head_DxV, labels_BxT):
        logps = token_logprobs_from_hidden(hidden_BxTxD, lm_head_DxV, labels_BxT,
                                           chunk_size=chunk_size)
        return -jnp.mean(logps)

    return loss


def measure(loss_fn, args, iters: int):
    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is None:  # backend without memory accounting
        temp = total = float("nan")
    else:
        temp = mem.temp_size_in_bytes
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + temp
                 - mem.alias_size_in_bytes)
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return out, temp, total, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens (flattened positions)")
    parser.add_argument("--d", type=int, default=576, help="hidden size")
    parser.add_argument("--v", type=int, default=49152, help="vocabulary size")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    inputs = make_inputs(args.n, args.d, args.v, dtype)
    logits_mib = args.n * args.v * 4 / MIB
    device = jax.devices()[0]
    where = f"{os.cpu_count()} CPU cores" if device.platform == "cpu" else device.device_kind
    print(f"jax {jax.__version__} on {device.platform} ({where}); N={args.n} D={args.d} "
          f"V={args.v} {args.dtype}; value_and_grad w.r.t. hidden and lm_head; "
          f"median of {args.iters} runs")
    print(f"(one float32 [N, V] logits array = {logits_mib:.0f} MiB)\n")

    rows = [("direct (hidden @ W -> log_softmax)", direct_loss)]
    rows += [(f"token_logprobs_from_hidden chunk={c}", chunked_loss(c)) for c in args.chunk_sizes]

    header = f"| {'method':<38} | {'temp MiB':>9} | {'total MiB':>9} | {'fwd+bwd ms':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    reference = None
    for name, fn in rows:
        out, temp, total, seconds = measure(fn, inputs, args.iters)
        print(f"| {name:<38} | {temp / MIB:9.1f} | {total / MIB:9.1f} | {seconds * 1e3:10.1f} |",
              flush=True)
        if reference is None:
            reference = out
        else:  # sanity: same value and gradients as the direct path
            err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip(jax.tree_util.tree_leaves(out),
                                      jax.tree_util.tree_leaves(reference), strict=True))
            assert err < 1e-3, f"{name} differs from the direct path by {err}"


if __name__ == "__main__":
    main()
