"""Mixed precision: memory and step time of FP32 vs BF16 vs FP16 + loss scaling.

For the seed's MLP (784 -> 256 -> 10) and a GPT-2-style transformer block, each run
through funtrain's ``make_train_step`` with a policy (params stay FP32 master weights):

- param bytes (the params pytree);
- activation bytes: the residuals the backward pass keeps (the leaves of ``jax.vjp``'s
  closure, read with ``jax.eval_shape``, so nothing is allocated);
- argument / output / temporary bytes from the compiled step's ``memory_analysis()``;
- median step time, measured in this process and run, with each precision's ratio to FP32.

    python bench/precision.py            # CPU sizes
    python bench/precision.py --gpu      # device sizes (GPT-2-small width, seq 1024)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from funtrain import losses, nn, optim, precision, profile, train

PRECISIONS = {
    "fp32": (None, None),
    "bf16": ("params=float32,compute=bfloat16,output=float32", None),
    "fp16": ("params=float32,compute=float16,output=float32", "dynamic"),
}


def problems(gpu: bool):
    """(name, model, example batch, loss_fn) for the MLP and the transformer block."""
    mlp = nn.mlp([256, 10])
    b = 4096 if gpu else 512
    mlp_batch = {"x": jax.random.normal(jax.random.key(0), (b, 784)),
                 "y": jax.random.randint(jax.random.key(1), (b,), 0, 10)}

    def mlp_loss(p, batch):
        return losses.softmax_cross_entropy(mlp.apply(p, batch["x"]), batch["y"])

    d, h, t, bt = (768, 12, 1024, 16) if gpu else (256, 4, 128, 8)
    block = nn.transformer_block(d, h)
    tb_batch = {"x": jax.random.normal(jax.random.key(2), (bt, t, d)),
                "y": jax.random.normal(jax.random.key(3), (bt, t, d))}

    def tb_loss(p, batch):
        return losses.mse(block.apply(p, batch["x"]), batch["y"])

    return [(f"MLP 784-256-10, batch {b}", mlp, mlp_batch, mlp_loss),
            (f"transformer block d={d} h={h} seq={t} batch={bt}", block, tb_batch, tb_loss)]


def measure(loss_fn, model, batch, policy, scale, repeats, steps):
    x = batch["x"]
    params = model.init(jax.random.key(4), x[:1])
    opt = optim.adamw(1e-4)
    loss_scale = precision.DynamicLossScale() if scale == "dynamic" else None
    state = train.TrainState.create(params, opt, jax.random.key(5), policy=policy,
                                    loss_scale=loss_scale)
    step = train.make_train_step(loss_fn, opt, policy=policy)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
        times.append((time.perf_counter() - t0) / steps)
    return {
        "params": optim.state_bytes(state.params),
        "activations": profile.residual_bytes(loss_fn, state.params, batch, policy=policy),
        "argument": getattr(mem, "argument_size_in_bytes", None) if mem else None,
        "temp": getattr(mem, "temp_size_in_bytes", None) if mem else None,
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "loss": float(m["loss"]),
    }


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:9.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="device-sized problems")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"backend {jax.default_backend()} ({dev.device_kind}), jax {jax.__version__}")
    ok = True
    for name, model, batch, loss_fn in problems(args.gpu):
        print(f"\n{name}")
        print(f"{'precision':<10}{'params MiB':>11}{'activ. MiB':>11}{'args MiB':>10}"
              f"{'temp MiB':>10}{'step ms':>9}{'act/fp32':>9}{'time/fp32':>10}")
        rows = {k: measure(loss_fn, model, batch, p, s, args.repeats, args.steps)
                for k, (p, s) in PRECISIONS.items()}
        base = rows["fp32"]
        for k, r in rows.items():
            print(f"{k:<10}{mib(r['params']):>11}{mib(r['activations']):>11}"
                  f"{mib(r['argument']):>10}{mib(r['temp']):>10}{r['step_s'] * 1e3:>9.2f}"
                  f"{r['activations'] / base['activations']:>9.2f}"
                  f"{r['step_s'] / base['step_s']:>10.2f}")
        act_ratio = rows["bf16"]["activations"] / base["activations"]
        print(f"bf16 activation bytes = {act_ratio:.2f}x fp32 (bar: <= 0.55x): "
              f"{'ok' if act_ratio <= 0.55 else 'MISSED'}")
        ok &= act_ratio <= 0.55
        if args.gpu and "transformer" in name:
            speedup = base["step_s"] / rows["bf16"]["step_s"]
            print(f"bf16 transformer step speed-up = {speedup:.2f}x (bar: >= 2.5x): "
                  f"{'ok' if speedup >= 2.5 else 'MISSED'}")
            ok &= speedup >= 2.5
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
