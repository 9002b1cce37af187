"""``fit`` against the loop a flax + optax user writes by hand, in one process and one run.

Three workloads, AdamW, random examples shuffled every epoch:

- A: the seed's MLP (784 -> 256 -> 10), batch 128, a 4-epoch run of 60,000 examples;
- B: the demo's digits-shaped MLP (64 -> 256 -> 10), batch 32, a 6-epoch run of 60,000;
- C: a small CNN on digits-shaped 8x8 images (two 3x3 convolutions of 16 and 32 channels,
  ReLU, a dense head), batch 32, a 3-epoch run of 6,000. On CPU, ``fit`` runs its step one
  per call (XLA:CPU runs convolutions in a loop slowly), and the scans are no limit.

The peer is the hand loop: a jitted flax + optax step per batch, numpy batches drawn from
a host permutation, the loss read once per epoch. funtrain runs ``fit`` with its default
settings (progress bar included, drawn to /dev/null) and with a whole epoch per device
call (no bar, metrics read once per run). Each run builds and compiles
its step afresh, so:

- *whole* is the time of an E-epoch run, compile included (what a user waits for);
- *steady* is the time of an E-epoch run minus that of a 1-epoch run (the compile cancels).

Ratios are peer time / funtrain time (> 1: funtrain is faster), from the best of
``--repeats`` runs per side, sides alternating. Two pure JAX + optax ``lax.scan`` loops over
device-resident data give the limits: slicing pre-permuted batches, and gathering each
batch inside the scan.

    python bench/fit.py [--repeats 3] [--workloads A B] [--gpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from funtrain import data, nn, optim, train

WORKLOADS = {  # name: (example shape, batch, epochs, examples)
    "A": ((784,), 128, 4, 60_000),
    "B": ((64,), 32, 6, 60_000),
    "C": ((8, 8, 1), 32, 3, 6_000),
}
HIDDEN, CLASSES, LR = 256, 10, 1e-3


def dataset(shape: tuple[int, ...], examples: int) -> data.ArrayDataset:
    rng = np.random.default_rng(0)
    return data.ArrayDataset(x=rng.standard_normal((examples, *shape)).astype(np.float32),
                             y=rng.integers(0, CLASSES, examples).astype(np.int32))


def model_for(ds: data.ArrayDataset) -> nn.Module:
    """The workload's funtrain model: the MLP, or the CNN for images."""
    if ds.arrays["x"].ndim == 2:
        return nn.mlp([HIDDEN, CLASSES])
    return nn.serial(nn.conv(16, (3, 3)), nn.relu(), nn.conv(32, (3, 3)), nn.relu(),
                     nn.flatten(), nn.dense(CLASSES))


# ----------------------------------------------------------------------------- the peer


def hand_loop(ds: data.ArrayDataset, batch: int, epochs: int) -> float:
    """What a flax + optax user writes: a jitted step, numpy batches from a permutation."""
    import flax.linen as fnn
    import optax

    class MLP(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(CLASSES)(fnn.relu(fnn.Dense(HIDDEN)(x)))

    class CNN(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.relu(fnn.Conv(32, (3, 3))(fnn.relu(fnn.Conv(16, (3, 3))(x))))
            return fnn.Dense(CLASSES)(x.reshape(len(x), -1))

    model, tx = (MLP() if ds.arrays["x"].ndim == 2 else CNN()), optax.adamw(LR)
    x_all, y_all = ds.arrays["x"], ds.arrays["y"]
    params = model.init(jax.random.key(0), x_all[:1])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(1)
    steps = len(x_all) // batch
    for _ in range(epochs):
        perm = rng.permutation(len(x_all))
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            params, opt_state, loss = step(params, opt_state, x_all[idx], y_all[idx])
        float(loss)  # the epoch's last loss, printed by every such loop
    return float(loss)


# ----------------------------------------------------------------------------- funtrain


def funtrain_fit(ds: data.ArrayDataset, batch: int, epochs: int, **fit_kw) -> float:
    model = model_for(ds)
    opt = optim.adamw(LR)
    params = model.init(jax.random.key(0), jnp.zeros((1, *ds.arrays["x"].shape[1:])))
    state = train.TrainState.create(params, opt, jax.random.key(1))
    step = train.make_train_step(train.classifier_loss(model), opt)  # a new step: compiles
    loader = ds.batches(batch, key=jax.random.key(2), drop_remainder=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # the bar
        state, history = train.fit(state, step, loader, epochs=epochs, **fit_kw)
    return history.train["loss"][-1]


# ----------------------------------------------------------------------------- limits


def scan_limit(ds: data.ArrayDataset, batch: int, epochs: int, gather: bool) -> float:
    """Pure JAX + optax: one ``lax.scan`` per epoch over device-resident data."""
    import optax

    model = model_for(ds)
    tx = optax.adamw(LR)
    params = model.init(jax.random.key(0), jnp.zeros((1, *ds.arrays["x"].shape[1:])))
    opt_state = tx.init(params)
    x_all, y_all = jax.device_put(ds.arrays["x"]), jax.device_put(ds.arrays["y"])
    steps = len(ds) // batch

    def step(carry, xy):
        params, opt_state = carry
        x, y = xy

        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit  # the data are arguments: captured as constants they slow compiling
    def epoch(carry, x_all, y_all, key):
        perm = jax.random.permutation(key, len(ds))[:steps * batch]
        if gather:
            def body(c, idx):
                return step(c, (x_all[idx], y_all[idx]))
            return jax.lax.scan(body, carry, perm.reshape(steps, batch))
        xs = (x_all[perm].reshape(steps, batch, *x_all.shape[1:]),
              y_all[perm].reshape(steps, batch))
        return jax.lax.scan(step, carry, xs)

    carry = (params, opt_state)
    for e in range(epochs):
        carry, losses = epoch(carry, x_all, y_all, jax.random.key(e))
    return float(losses[-1])


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def measure(name: str, repeats: int, sides: dict[str, Callable[[int], float]], epochs: int
            ) -> dict[str, dict[str, float]]:
    """Best whole-run times of E and 1 epochs per side, sides alternating."""
    times: dict[str, dict[str, list[float]]] = {s: {"E": [], "1": []} for s in sides}
    for _ in range(repeats):
        for count in (epochs, 1):
            for side, run in sides.items():
                seconds, loss = timed(lambda run=run, count=count: run(count))
                if not np.isfinite(loss):
                    raise SystemExit(f"{name} {side}: the loss is {loss}")
                times[side]["E" if count == epochs else "1"].append(seconds)
    return {s: {k: min(v) for k, v in t.items()} for s, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--gpu", action="store_true", help="require an NVIDIA GPU and name it")
    args = ap.parse_args()
    try:
        import flax  # noqa: F401
        import optax  # noqa: F401
    except ImportError:
        raise SystemExit("bench/fit.py needs flax and optax as the peer: "
                         "pip install flax optax") from None
    device = jax.devices()[0]
    if args.gpu and device.platform != "gpu":
        raise SystemExit(f"--gpu: no GPU found (JAX sees {device})")
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"best of {args.repeats} runs per side, sides alternating")

    rows = []
    for name in args.workloads:
        shape, batch, epochs, examples = WORKLOADS[name]
        ds = dataset(shape, examples)
        steps = len(ds) // batch
        sides = {
            "hand loop (flax+optax)": lambda e, ds=ds, b=batch: hand_loop(ds, b, e),
            "fit (defaults)": lambda e, ds=ds, b=batch: funtrain_fit(ds, b, e),
            "fit (epoch per call)": lambda e, ds=ds, b=batch, s=steps: funtrain_fit(
                ds, b, e, steps_per_call=s, log_every=10 * s, progress=False),
            "limit: jax scan, sliced": lambda e, ds=ds, b=batch: scan_limit(ds, b, e, False),
            "limit: jax scan, gather": lambda e, ds=ds, b=batch: scan_limit(ds, b, e, True),
        }
        best = measure(name, args.repeats, sides, epochs)
        peer = best["hand loop (flax+optax)"]
        what = (f"MLP {shape[0]}-{HIDDEN}-{CLASSES}" if len(shape) == 1 else
                f"CNN on {'x'.join(map(str, shape))} images")
        print(f"\nworkload {name}: {what}, batch {batch}, {epochs} epochs of {steps} steps")
        print(f"  {'side':28} {'whole s':>8} {'steady us/step':>15} {'whole x':>8} "
              f"{'steady x':>9}")
        for side, t in best.items():
            steady = t["E"] - t["1"]
            whole_x = peer["E"] / t["E"]
            # On a fast device the extra epochs can take less than the run-to-run noise of
            # the compile; then the difference means nothing and is not printed.
            steady_x = (peer["E"] - peer["1"]) / steady if steady > 0 else float("nan")
            per_step = f"{1e6 * steady / ((epochs - 1) * steps):15.1f}" if steady > 0 else (
                f"{'below noise':>15}")
            print(f"  {side:28} {t['E']:8.2f} {per_step} {whole_x:8.2f} {steady_x:9.2f}")
            if side.startswith("fit"):
                rows.append((name, side, whole_x, steady_x))
    print("\nratios (hand loop time / fit time; > 1 means fit is faster):")
    for name, side, whole_x, steady_x in rows:
        print(f"  {name} {side:28} whole {whole_x:.2f}x  steady {steady_x:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
