"""What a bf16 cross-entropy keeps for the backward pass, and what the compiled step needs.

``losses.softmax_cross_entropy`` computes in float32 and keeps its float32 log-softmax
(plain autodiff). The alternatives keep only the bf16 logits and recompute the rest in the
backward pass: a ``jax.checkpoint`` around the loss (with and without its CSE barrier), or
a ``jax.custom_vjp`` as ``nn.softmax`` uses. For a bf16 head ``x @ w`` and the loss, each
prints the residual bytes (``profile.residual_bytes``: what ``jax.vjp`` keeps), the
compiled gradient's temporary bytes (``memory_analysis``) and the median time, in one
process and run, with ratios to funtrain's.

    python bench/loss_memory.py                  # 2048 x 8192 logits
    python bench/loss_memory.py --n 128 --classes 32768 --features 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from funtrain import losses, profile


def _nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


@jax.custom_vjp
def _nll_custom_vjp(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return _nll(logits, labels)


def _fwd(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    return _nll(logits, labels), (logits, labels)


def _bwd(res: tuple[jax.Array, ...], g: jax.Array) -> tuple[jax.Array, None]:
    logits, labels = res
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    grad = g[..., None] * (p - jax.nn.one_hot(labels, logits.shape[-1], dtype=p.dtype))
    return grad.astype(logits.dtype), None


_nll_custom_vjp.defvjp(_fwd, _bwd)

VARIANTS = {
    "funtrain (autodiff)": lambda z, y: losses.softmax_cross_entropy(z, y, reduction="none"),
    "checkpoint": jax.checkpoint(_nll),
    "checkpoint, no CSE barrier": jax.checkpoint(_nll, prevent_cse=False),
    "custom_vjp": _nll_custom_vjp,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=8192)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.n, args.features)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((args.features, args.classes)) * 0.05, jnp.float32)
    y = jnp.asarray(rng.integers(0, args.classes, args.n), jnp.int32)
    print(f"{jax.devices()[0].device_kind}: logits {args.n} x {args.classes} bf16 "
          f"({args.n * args.classes * 2 / 2**20:.1f} MiB)")
    rows = {}
    for name, nll in VARIANTS.items():
        def loss(w: jax.Array, nll=nll) -> jax.Array:
            return jnp.mean(nll(x @ w.astype(jnp.bfloat16), y))

        grad = jax.jit(jax.grad(loss))
        temp = grad.lower(w).compile().memory_analysis().temp_size_in_bytes
        logits_only = profile.residual_bytes(lambda z, nll=nll: jnp.mean(nll(z, y)),
                                             (x @ w.astype(jnp.bfloat16)))
        grad(w).block_until_ready()
        rows[name] = (logits_only, temp, grad, [])
    for _ in range(args.runs):  # alternate the variants, so drift hits them alike
        for _, _, grad, times in rows.values():
            start = time.perf_counter()
            grad(w).block_until_ready()
            times.append(time.perf_counter() - start)
    base = statistics.median(rows["funtrain (autodiff)"][3])
    base_temp = rows["funtrain (autodiff)"][1]
    print(f"{'variant':28} {'loss residuals':>15} {'step temp':>10} {'median':>9}")
    for name, (kept, temp, _, times) in rows.items():
        t = statistics.median(times)
        print(f"{name:28} {kept / 2**20:11.1f} MiB {temp / 2**20:6.1f} MiB "
              f"{t * 1e3:7.2f} ms  (temp {temp / base_temp:.2f}x, time {t / base:.2f}x)")


if __name__ == "__main__":
    main()
