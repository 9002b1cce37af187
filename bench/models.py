"""ResNet-18 train step with BatchNorm: funtrain vs flax.linen + optax (the named peer).

Both build the same network (CIFAR stem, torchvision's ResNet-18 layout, BatchNorm with
running statistics updated every step), train it with SGD + momentum on the same random
batch, jitted with the state donated, in the same process and run. We print the median
step time of each and their ratio (funtrain / flax; 1.00 is parity, < 1 faster), plus the
eval step. On a GPU (``--gpu``) the batch and width grow to the usual CIFAR settings and
the compute runs in bfloat16.

    python bench/models.py [--batch 64] [--width 16] [--size 32] [--steps 20] [--gpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp

from funtrain import losses, nn, optim, train


def seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flax_resnet18(width, num_classes, dtype):
    """torchvision's ResNet-18 with a CIFAR stem, written in flax.linen."""
    import flax.linen as fnn

    norm = partial(fnn.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype)

    class Block(fnn.Module):
        features: int
        strides: int
        project: bool

        @fnn.compact
        def __call__(self, x, train):
            conv = partial(fnn.Conv, use_bias=False, dtype=dtype)
            y = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)))(x)
            y = fnn.relu(norm(use_running_average=not train)(y))
            y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)))(y)
            y = norm(use_running_average=not train)(y)
            if self.project:
                x = conv(self.features, (1, 1), self.strides)(x)
                x = norm(use_running_average=not train)(x)
            return fnn.relu(x + y)

    class ResNet(fnn.Module):
        @fnn.compact
        def __call__(self, x, train):
            x = fnn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                         dtype=dtype)(x)
            x = fnn.relu(norm(use_running_average=not train)(x))
            channels = width
            for i in range(4):
                for j in range(2):
                    strides = 2 if i > 0 and j == 0 else 1
                    f = width * 2**i
                    x = Block(f, strides, strides != 1 or channels != f)(x, train)
                    channels = f
            x = jnp.mean(x, axis=(1, 2))
            return fnn.Dense(num_classes, dtype=dtype)(x)

    return ResNet()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gpu", action="store_true", help="batch 256, width 64, bf16 compute")
    args = ap.parse_args()
    if args.gpu:
        args.batch, args.width, args.steps = 256, 64, 50
    try:
        import optax  # noqa: F401
    except ImportError:
        raise SystemExit("bench/models.py needs optax and flax: pip install optax flax") from None
    dtype = jnp.bfloat16 if args.gpu else jnp.float32
    policy = "params=float32,compute=bfloat16,output=float32" if args.gpu else None
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    batch = {"x": x, "y": y}

    # funtrain
    model = nn.models.resnet(18, 10, stem="cifar", width=args.width)
    params, model_state = model.init(jax.random.key(0), x[:1])
    opt = optim.sgd(0.05, momentum=0.9)
    state = train.TrainState.create(params, opt, jax.random.key(3), model_state=model_state,
                                    policy=policy)
    step = train.make_train_step(train.classifier_loss(model), opt, policy=policy)
    eval_step = train.make_eval_step(train.classifier_eval(model))

    def run_funtrain():
        nonlocal state
        for _ in range(args.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])

    def eval_funtrain():
        jax.block_until_ready(eval_step(state.params, batch, state.model_state)["loss"])

    # peer: flax.linen + optax, the hand-written step a flax user writes
    import optax

    fmodel = flax_resnet18(args.width, 10, dtype)
    variables = fmodel.init(jax.random.key(0), x[:1], train=False)
    tx = optax.sgd(0.05, momentum=0.9)

    def peer_loss(p, stats, b):
        logits, upd = fmodel.apply({"params": p, "batch_stats": stats}, b["x"], train=True,
                                   mutable=["batch_stats"])
        return losses.softmax_cross_entropy(logits, b["y"]), upd["batch_stats"]

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def peer_step(p, stats, s, b):
        (loss, stats), g = jax.value_and_grad(peer_loss, has_aux=True)(p, stats, b)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), stats, s, loss

    @jax.jit
    def peer_eval(p, stats, b):
        logits = fmodel.apply({"params": p, "batch_stats": stats}, b["x"], train=False)
        return losses.softmax_cross_entropy(logits, b["y"])

    peer = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def run_peer():
        nonlocal peer
        p, stats, s = peer
        for _ in range(args.steps):
            p, stats, s, loss = peer_step(p, stats, s, batch)
        peer = (p, stats, s)
        jax.block_until_ready(loss)

    def eval_peer():
        jax.block_until_ready(peer_eval(peer[0], peer[1], batch))

    n_ft = sum(a.size for a in jax.tree.leaves(params))
    n_fl = sum(a.size for a in jax.tree.leaves(variables["params"]))
    print(f"ResNet-18 (CIFAR stem, width {args.width}): funtrain {n_ft:,} params, flax "
          f"{n_fl:,}; batch {args.batch} x {args.size}x{args.size}x3, "
          f"{'bf16' if args.gpu else 'fp32'}, backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind})")
    for fn in (run_funtrain, run_peer, eval_funtrain, eval_peer):  # compile and warm up
        fn()
    rows = []
    for label, a, b, n in (("train step", run_funtrain, run_peer, args.steps),
                           ("eval step", eval_funtrain, eval_peer, 1)):
        # Interleave the two so drift on a shared machine hits both alike.
        ta, tb = [], []
        for _ in range(args.repeats):
            ta.append(seconds(a) / n)
            tb.append(seconds(b) / n)
        rows.append((label, statistics.median(ta), statistics.median(tb)))
    print(f"{'':12s}{'funtrain':>12s}{'flax+optax':>12s}{'ratio':>8s}")
    for label, a, b in rows:
        print(f"{label:12s}{a * 1e3:10.2f}ms{b * 1e3:10.2f}ms{a / b:8.2f}")


if __name__ == "__main__":
    main()
