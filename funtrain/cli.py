"""The ``funtrain`` command: ``funtrain demo`` trains the seed chapter's MLP on digits."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from funtrain import data, nn, optim, train

OPTIMIZERS: dict[str, Callable[[argparse.Namespace], optim.Optimizer]] = {
    "sgd": lambda a: optim.sgd(a.lr, weight_decay=a.weight_decay),
    "momentum": lambda a: optim.sgd(a.lr, momentum=a.momentum, weight_decay=a.weight_decay),
    "nesterov": lambda a: optim.sgd(a.lr, momentum=a.momentum, nesterov=True,
                                    weight_decay=a.weight_decay),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the seed's MLP (64 -> 256 -> 10) on the 8x8 "
                          "digits with SGD + momentum and print the test accuracy")
    demo.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                      help="mlp: 64 -> 256 -> 10 ReLU MLP (default); cnn: small CNN")
    demo.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="momentum",
                      help="default: momentum (SGD with momentum)")
    demo.add_argument("--lr", type=_positive_float, default=0.05, help="learning rate")
    demo.add_argument("--momentum", type=float, default=0.9)
    demo.add_argument("--weight-decay", type=float, default=0.0)
    demo.add_argument("--epochs", type=_positive_int, default=10)
    demo.add_argument("--batch-size", type=_positive_int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps-per-call", type=_positive_int, default=1,
                      help="training steps per device call (lax.scan)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def demo(args: argparse.Namespace) -> float:
    """Train on digits and return the test accuracy."""
    t0 = time.perf_counter()
    flat = args.model == "mlp"
    train_set, test_set = data.load_digits(flatten=flat)
    model = nn.mlp([256, 10]) if flat else nn.cnn(10)
    key = jax.random.key(args.seed)
    init_key, shuffle_key, run_key = jax.random.split(key, 3)
    params = model.init(init_key, jnp.asarray(train_set[:1]["x"]))
    opt = OPTIMIZERS[args.optimizer](args)
    state = train.TrainState.create(params, opt, run_key)
    step = train.make_train_step(train.classifier_loss(model), opt)
    eval_step = train.make_eval_step(train.classifier_eval(model))
    loader = train_set.batches(args.batch_size, key=shuffle_key, drop_remainder=True)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"funtrain demo: {args.model} ({n_params:,} params) on digits "
          f"({len(train_set)} train / {len(test_set)} test), {args.optimizer} lr={args.lr}, "
          f"{args.epochs} epochs of batch {args.batch_size}, backend {jax.default_backend()}")
    state, history = train.fit(
        state, step, loader, epochs=args.epochs, eval_step=eval_step,
        eval_data=test_set.batches(256), steps_per_call=args.steps_per_call,
        progress=not args.no_progress, log_every=10)
    acc = history.eval[-1]["accuracy"]
    print(f"final train loss {history.train['loss'][-1]:.4f}; "
          f"test loss {history.eval[-1]['loss']:.4f}")
    print(f"test accuracy: {acc:.4f}  ({time.perf_counter() - t0:.1f} s in all)")
    return acc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
