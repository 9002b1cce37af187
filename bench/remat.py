"""Gradient checkpointing on the seed's stack: 100 x Linear(1000, 1000) + ReLU, batch 1024.

Variants, all measured in this process and run (temporary bytes from XLA's
``memory_analysis()`` of the compiled gradient step, median step time):

- none: plain backprop, every activation kept;
- per-layer: ``jax.checkpoint`` around each layer (plain JAX's usual form);
- sqrt: ``nn.serial(..., checkpoint="sqrt")``, funtrain's segments with cotangent-tied
  recomputation;
- scan+sqrt: ``remat.repeat(layer, 100, remat="sqrt")``, nested ``lax.scan``.

Also prints the compile time of ``remat.repeat`` at depth 4 and 48.

    python bench/remat.py [--width 1000] [--depth 100] [--batch 1024]
    python bench/remat.py --gpu          # adds the GPT-2-small-shaped step (bf16)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from funtrain import nn, precision, remat


def layer(width):
    return nn.serial(nn.dense(width), nn.relu())


def variants(depth, width):
    body = [m for _ in range(depth) for m in (nn.dense(width), nn.relu())]
    return {
        "none": nn.serial(*body),
        "per-layer": nn.serial(*[remat.checkpoint(layer(width), "nothing", name=f"layer_{i}")
                                 for i in range(depth)]),
        "sqrt": nn.serial(*[layer(width) for _ in range(depth)], checkpoint="sqrt"),
        "scan+sqrt": remat.repeat(layer(width), depth, remat="sqrt",
                                  segment=_divisor_near_sqrt(depth)),
    }


def _divisor_near_sqrt(n):
    r = int(n ** 0.5)
    return next(d for d in range(r, 0, -1) if n % d == 0)


def measure(model, x, repeats, policy=None):
    params = model.init(jax.random.key(0), x)
    pol = precision.as_policy(policy) if policy else None

    def loss(p):
        if pol is not None:
            p, xx = pol.cast_to_compute(p), pol.cast_to_compute(x)
        else:
            xx = x
        return jnp.mean(model.apply(p, xx).astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    compiled = step.lower(params).compile()
    compile_s = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params))
        times.append(time.perf_counter() - t0)
    return {"temp": temp, "step": statistics.median(times), "compile": compile_s}


def table(title, rows, base="none"):
    print(f"\n{title}")
    print(f"{'variant':<12}{'temp MiB':>10}{'mem/none':>10}{'step ms':>10}{'time/none':>11}"
          f"{'compile s':>11}")
    b = rows[base]
    for k, r in rows.items():
        print(f"{k:<12}{r['temp'] / 2**20:>10.1f}{r['temp'] / b['temp']:>10.2f}"
              f"{r['step'] * 1e3:>10.1f}{r['step'] / b['step']:>11.2f}{r['compile']:>11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"jax {jax.__version__}")
    x = jax.random.normal(jax.random.key(1), (args.batch, args.width))
    rows = {k: measure(m, x, args.repeats) for k, m in variants(args.depth, args.width).items()}
    table(f"{args.depth} x Linear({args.width}, {args.width}) + ReLU, batch {args.batch}, "
          f"grad step", rows)
    mem_bar, time_bar = (0.2, 1.2) if args.gpu else (0.25, 1.5)
    s = rows["sqrt"]
    mem, tim = s["temp"] / rows["none"]["temp"], s["step"] / rows["none"]["step"]
    ok = mem <= mem_bar and tim <= time_bar
    print(f"sqrt: {mem:.2f}x memory (bar <= {mem_bar}), {tim:.2f}x time (bar <= {time_bar}): "
          f"{'ok' if ok else 'MISSED'}")

    block = nn.transformer_block(64, 4)
    xb = jnp.ones((2, 16, 64))
    comp = {}
    for n in (4, 48):
        deep = remat.repeat(block, n, remat="block")
        params = jax.eval_shape(deep.init, jax.random.key(0), xb)
        f = jax.jit(jax.grad(lambda p, deep=deep: jnp.sum(deep.apply(p, xb))))
        t0 = time.perf_counter()
        f.lower(params).compile()
        comp[n] = time.perf_counter() - t0
    print(f"\nrepeat compile time: 4 blocks {comp[4]:.2f} s, 48 blocks {comp[48]:.2f} s "
          f"({comp[48] / comp[4]:.2f}x; bar < 2x)")
    ok = ok and comp[48] < 2 * comp[4]

    if args.gpu:
        d, h, t, b = 768, 12, 1024, 16
        xg = jax.random.normal(jax.random.key(2), (b, t, d))
        blocks = [nn.transformer_block(d, h, name=f"block_{i}") for i in range(12)]
        gpt = {
            "none": nn.serial(*blocks),
            "per-block": nn.serial(*[remat.checkpoint(bl, "nothing") for bl in blocks]),
            "dots": nn.serial(*[remat.checkpoint(bl, "dots_no_batch") for bl in blocks]),
            "names": nn.serial(*[remat.checkpoint(bl, "names:attention_out,mlp_hidden")
                                 for bl in blocks]),
            "sqrt": nn.serial(*blocks, checkpoint="sqrt"),
        }
        rows = {k: measure(m, xg, args.repeats, "params=float32,compute=bfloat16,output=float32")
                for k, m in gpt.items()}
        table(f"GPT-2-small-shaped step: 12 blocks, d={d}, seq {t}, batch {b}, bf16", rows)
        base = rows["none"]
        fits = {k: r["temp"] / base["temp"] for k, r in rows.items()
                if k != "none" and r["step"] / base["step"] <= 1.10}
        best = min(fits, key=fits.get) if fits else None
        gpt_ok = best is not None and fits[best] <= 0.5
        print(f"best policy within 1.10x time: {best} at "
              f"{fits[best] if best else float('nan'):.2f}x memory (bar <= 0.5x): "
              f"{'ok' if gpt_ok else 'MISSED'}")
        ok = ok and gpt_ok
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
