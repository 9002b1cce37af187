"""The ``funtrain`` command: ``funtrain demo`` trains the seed chapter's MLP on digits."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from funtrain import data, nn, optim, precision, train
from funtrain._version import __version__

# Demo learning rates that reach the accuracy bar on digits (MLP, batch 32, 10 epochs).
DEMO_LR = {
    "sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "rmsprop": 1e-3, "adagrad": 0.05,
    "adadelta": 1.0, "adam": 1e-3, "adamw": 1e-3, "amsgrad": 1e-3, "adamax": 2e-3,
    "nadam": 1e-3, "radam": 1e-3, "lion": 1e-4, "lamb": 5e-3, "lars": 0.5, "adafactor": 1e-2,
    "schedule_free_adamw": 2.5e-3, "muon": 2e-2,
}


PRECISIONS = {
    "fp32": lambda: (None, None),
    "bf16": lambda: (precision.get_policy("params=float32,compute=bfloat16,output=float32"),
                     None),
    "fp16": lambda: (precision.get_policy("params=float32,compute=float16,output=float32"),
                     precision.DynamicLossScale()),
}


# The demo's models; the CNN and ResNet see the digits as 8x8x1 images.
MODELS = {
    "mlp": lambda: nn.mlp([256, 10]),
    "cnn": lambda: nn.cnn(10),
    "resnet": lambda: nn.models.resnet(18, 10, stem="cifar", width=8),
}


def make_optimizer(args: argparse.Namespace) -> optim.Optimizer:
    """The optimizer named by ``--optimizer`` with ``--lr`` (or its demo default)."""
    name = args.optimizer
    lr = args.lr if args.lr is not None else DEMO_LR[name]
    wd = args.weight_decay
    if name == "sgd":
        return optim.sgd(lr, weight_decay=wd)
    if name in ("momentum", "nesterov"):
        return optim.sgd(lr, momentum=args.momentum, nesterov=name == "nesterov",
                         weight_decay=wd)
    if name == "lars":
        return optim.lars(lr, momentum=args.momentum, weight_decay=wd,
                          trust_coefficient=args.trust_coefficient)
    if name == "muon":
        return optim.muon(lr, weight_decay=wd, adam_learning_rate=1e-3)
    factory = optim.OPTIMIZERS[name]
    return factory(lr, weight_decay=wd)


class _UsageError(ValueError):
    """A flag value the parser cannot check alone; ``main`` reports it as a usage error."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    """A seed ``jax.random.key`` takes: an int in int64's range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text}") from None
    if not -2 ** 63 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**63), got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funtrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"funtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("launch", help="python -m funtrain launch --nproc N script.py [args]: run "
                   "the script as N processes of one jax.distributed job on this machine")
    demo = sub.add_parser("demo", help="train the seed's MLP (64 -> 256 -> 10) on the 8x8 "
                          "digits with SGD + momentum and print the test accuracy")
    demo.add_argument("--model", choices=tuple(MODELS), default="mlp",
                      help="mlp: 64 -> 256 -> 10 ReLU MLP (default); cnn: small CNN; resnet: "
                      "a small ResNet-18 with BatchNorm (CIFAR stem, width 8)")
    demo.add_argument("--optimizer", choices=sorted(DEMO_LR), default="momentum",
                      help="default: momentum (SGD with momentum 0.9)")
    demo.add_argument("--lr", type=_positive_float, default=None,
                      help="learning rate (default: a per-optimizer value that works here)")
    demo.add_argument("--momentum", type=float, default=0.9,
                      help="for momentum, nesterov and lars")
    demo.add_argument("--trust-coefficient", type=_positive_float, default=0.005,
                      help="LARS trust coefficient")
    demo.add_argument("--weight-decay", type=float, default=0.0,
                      help="weight decay (default 0 for every optimizer, AdamW included)")
    demo.add_argument("--epochs", type=_positive_int, default=10)
    demo.add_argument("--batch-size", type=_positive_int, default=32)
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                      help="compute dtype; params stay float32 (master weights); fp16 adds "
                      "dynamic loss scaling")
    demo.add_argument("--steps-per-call", type=_positive_int, default=None,
                      help="training steps per device call (lax.scan); default: fit's choice")
    demo.add_argument("--checkpoint-dir", default=None,
                      help="save the train state there every epoch (atomic checkpoints)")
    demo.add_argument("--resume", action="store_true",
                      help="continue the run saved in --checkpoint-dir (a finished run is "
                      "reported, not trained again)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # main's own usage errors print the demo's usage line, as the parser's do
    demo.set_defaults(usage_error=demo.error)
    return parser


def demo(args: argparse.Namespace) -> float | None:
    """Train on digits and return the test accuracy (``None`` when interrupted)."""
    t0 = time.perf_counter()
    train_set, test_set = data.load_digits(flatten=args.model == "mlp")
    model = MODELS[args.model]()
    key = jax.random.key(args.seed)
    init_key, shuffle_key, run_key = jax.random.split(key, 3)
    # A stateful model (the ResNet's BatchNorm) also returns its running statistics.
    params, model_state = nn.init_with_state(model, init_key, jnp.asarray(train_set[:1]["x"]))
    opt = make_optimizer(args)
    policy, loss_scale = PRECISIONS[args.precision]()
    state = train.TrainState.create(params, opt, run_key, policy=policy, loss_scale=loss_scale,
                                    model_state=model_state)
    step = train.make_train_step(train.classifier_loss(model), opt, policy=policy)
    eval_step = train.make_eval_step(train.classifier_eval(model))
    try:
        loader = train_set.batches(args.batch_size, key=shuffle_key, drop_remainder=True)
    except ValueError as err:  # a --batch-size larger than the data
        raise _UsageError(str(err)) from None
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"funtrain demo: {args.model} ({n_params:,} params) on digits "
          f"({len(train_set)} train / {len(test_set)} test), {args.optimizer} "
          f"lr={args.lr if args.lr is not None else DEMO_LR[args.optimizer]}, "
          f"{args.epochs} epochs of batch {args.batch_size}, precision {args.precision}, "
          f"backend {jax.default_backend()}")
    state, history = train.fit(
        state, step, loader, epochs=args.epochs, eval_step=eval_step,
        eval_data=test_set.batches(256), steps_per_call=args.steps_per_call,
        progress=not args.no_progress, log_every=10, checkpoint_dir=args.checkpoint_dir,
        resume=args.resume)
    if history.interrupted:
        print(f"interrupted at step {int(state.step)}"
              + ("; continue with --resume" if args.checkpoint_dir else ""))
    if not history.eval:  # interrupted before the first evaluation
        return None
    acc = history.eval[-1]["accuracy"]
    if state.loss_scale is not None:
        print(f"loss scale {float(state.loss_scale.loss_scale):g}, "
              f"skipped steps {int(state.skipped_steps)}")
    if history.train.get("loss"):
        print(f"final train loss {history.train['loss'][-1]:.4f}; "
              f"test loss {history.eval[-1]['loss']:.4f}")
    else:
        print(f"the run in {args.checkpoint_dir} had finished at step {int(state.step)}; "
              f"test loss {history.eval[-1]['loss']:.4f}")
    print(f"test accuracy: {acc:.4f}  ({time.perf_counter() - t0:.1f} s in all)")
    return None if history.interrupted else acc


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # the rest belongs to the launched script
        from funtrain.parallel import main_launch
        return main_launch(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.resume and not args.checkpoint_dir:
        args.usage_error("--resume needs --checkpoint-dir")
    if args.command == "demo":
        try:  # the optimizer's own checks (a negative --momentum, a nan --weight-decay)
            make_optimizer(args)
        except (ValueError, TypeError) as err:
            args.usage_error(str(err))
        try:
            interrupted = demo(args) is None
        except _UsageError as err:
            args.usage_error(str(err))
        except train.CheckpointError as err:  # a user error (wrong folder, other data)
            print(f"funtrain demo: error: {err}\n(the arguments named are fit's; the demo "
                  f"has --resume to continue the run, or give another --checkpoint-dir)",
                  file=sys.stderr)
            return 1
        if interrupted:  # as a shell's Ctrl-C: a && chain stops here
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
