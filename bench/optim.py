"""Optimizer speed and the train step's compile time against optax (and torch), in one process.

Two measurements:

- ``update``: one AdamW update over ``--params`` float32 params (default 8M) split into 200
  leaves and into 1 leaf: funtrain's ``optim.adamw`` and optax's ``adamw``, each jitted
  with params and state donated, against torch's AdamW (``fused=True`` and
  ``foreach=True``) when torch is installed. Medians of ``--repeats`` timed calls.
- ``compile``: the train step's first compile and its steady step time as the tree grows
  (``--leaves``), funtrain's ``make_train_step`` (SGD) against the jax + optax step a user
  writes. The loss reads every leaf in one op, so it does not itself chain per leaf.

Ratios are peer time / funtrain time (> 1: funtrain is faster).

    python bench/optim.py [--only update compile] [--params 8000000] [--leaves 1000 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from funtrain import optim, train

LR, WD = 1e-3, 1e-2


def median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def split(total: int, leaves: int) -> list[int]:
    base = total // leaves
    return [base + (1 if i < total % leaves else 0) for i in range(leaves)]


# ----------------------------------------------------------------------------- update


def jax_update_timer(init, update, sizes: list[int]):
    """A timed AdamW update of ``sizes`` leaves: params and state donated, as in a step."""
    rng = np.random.default_rng(0)
    params = {f"p{i:04d}": jnp.asarray(rng.standard_normal(n), jnp.float32)
              for i, n in enumerate(sizes)}
    grads = jax.tree.map(lambda p: 1e-3 * p, params)
    box = [params, init(params)]

    def step(params, state, grads):
        updates, state = update(grads, state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))

    def run():
        box[0], box[1] = step(box[0], box[1], grads)
        jax.block_until_ready(box[0])
    return run


def torch_update_timer(sizes: list[int], **kw):
    import torch

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    for p in params:
        p.grad = 1e-3 * p.detach().clone()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **kw)
    return opt.step


def bench_update(total: int, repeats: int) -> None:
    import optax

    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    ft, ox = optim.adamw(LR, weight_decay=WD), optax.adamw(LR, weight_decay=WD)
    print(f"\nAdamW update over {total:,} float32 params (median of {repeats}; "
          f"ratio = peer / funtrain)")
    print(f"  {'leaves':>6} {'funtrain ms':>12} {'optax ms':>9} {'x optax':>8} "
          f"{'torch fused':>12} {'x fused':>8} {'torch foreach':>14} {'x foreach':>9}")
    for leaves in (200, 1):
        sizes = split(total, leaves)
        t_ft = median_time(jax_update_timer(ft.init, ft.update, sizes), repeats)
        t_ox = median_time(jax_update_timer(ox.init, ox.update, sizes), repeats)
        row = f"  {leaves:6d} {1e3 * t_ft:12.2f} {1e3 * t_ox:9.2f} {t_ox / t_ft:8.2f}"
        if has_torch:
            t_fu = median_time(torch_update_timer(sizes, fused=True), repeats)
            t_fe = median_time(torch_update_timer(sizes, foreach=True), repeats)
            row += (f" {1e3 * t_fu:12.2f} {t_fu / t_ft:8.2f} {1e3 * t_fe:14.2f} "
                    f"{t_fe / t_ft:9.2f}")
        print(row, flush=True)


# ----------------------------------------------------------------------------- compile


def tree_problem(leaves: int):
    params = {f"w{i:05d}": jnp.full((8,), 0.01 * (i % 7), jnp.float32) for i in range(leaves)}

    def loss(p, batch):
        w = jnp.stack(list(p.values()))  # every leaf in one op: no per-leaf chain here
        return jnp.mean((batch["x"] @ w.T - batch["y"]) ** 2)

    batch = {"x": jnp.ones((4, 8)), "y": jnp.zeros((4, leaves))}
    return params, loss, batch


def compile_and_run(jitted, args, steps: int = 20) -> tuple[float, float]:
    """(first compile in s, median steady step in s)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    first = time.perf_counter() - t0
    out = compiled(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_compile(sizes: list[int]) -> None:
    import optax

    print("\ntrain step (SGD) as the tree grows: first compile and steady step "
          "(ratio = funtrain / jax + optax; <= 1.3 is the bar)")
    print(f"  {'leaves':>6} {'funtrain s':>11} {'optax s':>8} {'x compile':>10} "
          f"{'funtrain us':>12} {'optax us':>9} {'x step':>7}")
    for leaves in sizes:
        params, loss, batch = tree_problem(leaves)
        tx = optax.sgd(0.1)

        def hand(p, s, b, loss=loss, tx=tx):
            value, grads = jax.value_and_grad(loss)(p, b)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, value

        c_ox, s_ox = compile_and_run(jax.jit(hand), (params, tx.init(params), batch))
        opt = optim.sgd(0.1)
        state = train.TrainState.create(params, opt, jax.random.key(0))
        step = train.make_train_step(loss, opt, jit=False)
        c_ft, s_ft = compile_and_run(jax.jit(step), (state, batch))
        print(f"  {leaves:6d} {c_ft:11.2f} {c_ox:8.2f} {c_ft / c_ox:10.2f} "
              f"{1e6 * s_ft:12.1f} {1e6 * s_ox:9.1f} {s_ft / s_ox:7.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["update", "compile"],
                    choices=["update", "compile"])
    ap.add_argument("--params", type=int, default=8_000_000)
    ap.add_argument("--leaves", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    if "update" in args.only:
        bench_update(args.params, args.repeats)
    if "compile" in args.only:
        bench_compile(args.leaves)


if __name__ == "__main__":
    main()
