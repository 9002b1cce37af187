"""Train-step throughput: funtrain vs a hand-written JAX + optax step (the named peer).

Both train the seed's MLP (784 -> 256 -> 10, ReLU) with SGD + momentum on the same
random batch, jitted, in the same process and run. We report the median step time of
each and their ratio (funtrain / peer; 1.00 means parity), plus funtrain with
``steps_per_call`` (lax.scan) to show what cutting dispatch overhead buys.

    python bench/train_step.py [--batch 128] [--steps 200] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from funtrain import losses, nn, optim, train


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    try:
        import optax
    except ImportError:
        raise SystemExit("bench/train_step.py needs optax as the peer: pip install optax") from None

    model = nn.mlp([256, 10])
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
    x = jax.random.normal(jax.random.key(1), (args.batch, 784))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    batch = {"x": x, "y": y}

    # funtrain
    opt = optim.sgd(0.01, momentum=0.9)
    step = train.make_train_step(train.classifier_loss(model), opt)
    state = train.TrainState.create(params, opt, jax.random.key(3))

    def run_funtrain():
        nonlocal state
        for _ in range(args.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])

    # peer: plain JAX + optax, the same math
    tx = optax.sgd(0.01, momentum=0.9)

    def peer_loss(p, b):
        return losses.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])

    @jax.jit
    def peer_step(p, s, b):
        loss, g = jax.value_and_grad(peer_loss)(p, b)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    peer = (jax.tree.map(jnp.array, params), tx.init(params))

    def run_peer():
        nonlocal peer
        p, s = peer
        for _ in range(args.steps):
            p, s, loss = peer_step(p, s, batch)
        jax.block_until_ready(loss)
        peer = (p, s)

    # funtrain, 10 steps per device call
    k = 10
    multi = train.scan_steps(train.make_train_step(train.classifier_loss(model), opt))
    stacked = jax.tree.map(lambda a: jnp.stack([a] * k), batch)
    mstate = train.TrainState.create(params, opt, jax.random.key(3))

    def run_multi():
        nonlocal mstate
        for _ in range(args.steps // k):
            mstate, m = multi(mstate, stacked)
        jax.block_until_ready(m["loss"])

    # Where the per-step cost goes, when the step is dispatch-bound (a GPU): the same step
    # without the grad-norm metric, and without donating the state.
    def variant(**kw):
        fn = train.make_train_step(train.classifier_loss(model), opt, **kw)
        box = [train.TrainState.create(params, opt, jax.random.key(3))]

        def run():
            for _ in range(args.steps):
                box[0], m = fn(box[0], batch)
            jax.block_until_ready(m["loss"])
        return run

    run_lean, run_keep = variant(grad_norm=False), variant(donate=False)
    for fn in (run_funtrain, run_peer, run_multi, run_lean, run_keep):  # compile + warm up
        fn()
    t_lean = timed(run_lean, args.repeats) / args.steps
    t_keep = timed(run_keep, args.repeats) / args.steps
    t_fun = timed(run_funtrain, args.repeats) / args.steps
    t_peer = timed(run_peer, args.repeats) / args.steps
    t_multi = timed(run_multi, args.repeats) / (args.steps // k * k)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
          f", optax {optax.__version__}; MLP 784-256-10, batch {args.batch}, SGD momentum")
    print(f"{'variant':<34}{'median step (us)':>18}{'ratio vs peer':>15}")
    rows = [("jax + optax (peer)", t_peer), ("funtrain make_train_step", t_fun),
            (f"funtrain scan_steps (k={k})", t_multi),
            ("  make_train_step, grad_norm=False", t_lean),
            ("  make_train_step, donate=False", t_keep)]
    for name, t in rows:
        print(f"{name:<34}{t * 1e6:>18.1f}{t / t_peer:>15.2f}")
    np.testing.assert_allclose(float(jnp.sum(state.params["dense_1"]["b"])),
                               float(jnp.sum(peer[0]["dense_1"]["b"])), rtol=1e-3, atol=1e-4)


if __name__ == "__main__":
    main()
