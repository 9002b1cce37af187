"""Optimizer speed and the train step's compile time against optax (and torch), in one process.

Two measurements:

- ``update``: one AdamW update over ``--params`` float32 params (default 8M) split into 200
  leaves and into 1 leaf: funtrain's ``optim.adamw`` and optax's ``adamw``, each jitted
  with params and state donated, against torch's AdamW (``fused=True`` and
  ``foreach=True``) when torch is installed. Medians of ``--repeats`` timed calls. A second
  copy of the optax side shows how far two identical programs drift apart.
- ``compile``: the train step's first compile and its steady step time as the tree grows
  (``--leaves``), funtrain's ``make_train_step`` (SGD) against the jax + optax step a user
  writes, with two losses that read every leaf without chaining an op per leaf (see
  ``tree_problem``).

The update's ratios are optax's time / the side's (> 1: faster than optax); the compile
sweep's are funtrain's time / the hand step's (<= 1.3 is the bar). The update also prints its
distance from the memory bound: AdamW reads params, grads and both moments and writes
params and moments (28 bytes a float32 param), against a measured device copy bandwidth.
Under each table come the compiled programs' fusion count and bytes accessed (XLA's cost
analysis), and how many instructions differ between funtrain's program and optax's: sides
that build the same kernels over the same bytes differ in time only by the machine's noise,
which the ``optax again`` row measures. ``--gpu`` requires an NVIDIA GPU
and uses 200M params in 600 leaves. ``--runs N`` measures everything N times in this
process and ends with each ratio's median over the runs (each run measures every side, so
each ratio comes from one run).

    python bench/optim.py [--only update compile] [--params 8000000] [--leaves 1000 2000]
    python bench/optim.py --only compile --leaves 1000 2000 4000 --losses matrix --runs 5
    python bench/optim.py --gpu --only update
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from train_step import timed  # bench/ is on the path when a bench script runs

from funtrain import optim, train

LR, WD = 1e-3, 1e-2


def median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    return timed(fn, repeats)


_ORDER = np.random.default_rng(0)  # a new order every turn, the same ones in every process


def round_robin(runs: dict, repeats: int, rounds: int = 5) -> dict:
    """Median time of each run, its ``repeats`` calls taken in ``rounds`` turns that
    alternate between the runs, so that the machine's drift favours none of them (timed
    one after the other, the first measured was up to 1.5x faster on this shared CPU).
    Each turn takes the runs in a new seeded random order, and each run's turn starts with
    one untimed call: a run is slower just after another (caches, pages), up to 8% over its
    next five calls after a torch side. A rotated fixed order had put the same run after
    torch in every turn."""
    for run in runs.values():
        run()  # compile / warm up
    samples: dict = {name: [] for name in runs}
    names = list(runs)
    for _turn in range(rounds):
        for i in _ORDER.permutation(len(names)):
            run = runs[names[i]]
            run()  # untimed: the previous run's cache state is not this one's cost
            for _call in range(-(-repeats // rounds)):
                t0 = time.perf_counter()
                run()
                samples[names[i]].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in samples.items()}


def split(total: int, leaves: int) -> list[int]:
    base = total // leaves
    return [base + (1 if i < total % leaves else 0) for i in range(leaves)]


# ----------------------------------------------------------------------------- update


def jax_update_timer(init, update, sizes: list[int], group=None):
    """A timed AdamW update of ``sizes`` leaves: params and state donated, as in a step.
    With ``group`` the params are fused (``optim.fuse(params, group)``): one buffer per
    group label, so the update runs once per buffer."""
    rng = np.random.default_rng(0)
    params = {f"p{i:04d}": jnp.asarray(rng.standard_normal(n), jnp.float32)
              for i, n in enumerate(sizes)}
    if group is not None:
        params = optim.fuse(params, group)
    grads = jax.tree.map(lambda p: 1e-3 * p, params)
    box = [params, init(params)]

    def step(params, state, grads):
        updates, state = update(grads, state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    compiled = step.lower(box[0], box[1], grads).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    def run():
        box[0], box[1] = step(box[0], box[1], grads)
        jax.block_until_ready(box[0])
    # what XLA built: two sides with the same kernels and bytes differ in time only by noise
    run.program = (compiled.as_text().count(" fusion("), cost.get("bytes accessed", 0.0))
    run.ops = instructions(compiled.as_text())
    return run


def built_twice(makers: dict) -> dict:
    """Each side built twice, in mirrored order (A B C C B A), its calls alternating between
    its two copies. On this CPU a side's speed depends on when it was built: in one process
    that times identical programs call by call, each built later ran faster, the first about
    3% slower than the last (``ox ft ox ft``: 15.75 15.32 15.65 15.13 ms; ``ft ox ft ox``:
    14.85 14.45 14.43 14.51 ms). Built once in the dict's order, the first side (funtrain's
    unfused) paid that in every run; mirrored, every side's two positions sum the same."""
    copies: dict = {name: [] for name in makers}
    for name in [*makers, *reversed(makers)]:
        copies[name].append(makers[name]())
    return {name: alternating(runs) for name, runs in copies.items()}


def alternating(runs: list):
    """One run that calls ``runs`` in turn; it describes the program of the first."""
    turn = [0]

    def run():
        turn[0] += 1
        runs[turn[0] % len(runs)]()
    run.program, run.ops = runs[0].program, runs[0].ops
    return run


def instructions(hlo: str) -> collections.Counter:
    """Each instruction of a compiled program as (result shape, opcode), names and operand
    order aside: two programs with equal counts run the same kernels over the same data."""
    return collections.Counter(re.findall(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z][\w-]*)\(",
                                          hlo, re.MULTILINE))


def torch_update_timer(sizes: list[int], **kw):
    import torch

    torch.manual_seed(0)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]
    for p in params:
        p.grad = 1e-3 * p.detach().clone()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **kw)

    def run():
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def copy_bandwidth(total: int, repeats: int) -> float:
    """Bytes a second of a device copy (read + write) of ``total`` float32 values."""
    box = [jnp.ones((total,), jnp.float32)]
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)  # in place, as the update runs

    def run():
        box[0] = copy(box[0])
        jax.block_until_ready(box[0])
    return 2 * 4 * total / median_time(run, repeats)


def bench_update(total: int, repeats: int, leaves_list: tuple[int, ...] = (200, 1)) -> dict:
    """Prints the table; returns {(row, side): optax time / side time}."""
    import optax

    ratios: dict = {}
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    ft, ox = optim.adamw(LR, weight_decay=WD), optax.adamw(LR, weight_decay=WD)
    bandwidth = copy_bandwidth(total, repeats)
    ideal = 28 * total / bandwidth  # AdamW's bytes at the copy bandwidth
    print(f"\nAdamW update over {total:,} float32 params (median of {repeats}); copy "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s, so the memory bound is {1e3 * ideal:.2f} ms")
    print(f"  {'leaves':>6} {'side':34} {'ms':>8} {'x bound':>8} {'optax/side':>11} "
          f"{'torch fused/side':>17}")
    one = lambda path, leaf: "all"  # noqa: E731
    halves = lambda path, leaf: int(path[1:]) % 2  # noqa: E731 (two buffers: p0000 p0001 ...)
    for leaves in leaves_list:
        sizes = split(total, leaves)
        programs = {"funtrain": (ft, None), "funtrain fused (1 buffer)": (ft, one),
                    "funtrain fused (2 buffers)": (ft, halves), "optax": (ox, None),
                    # the same program again: how far two identical sides drift apart
                    "optax again (the noise)": (ox, None)}
        sides = built_twice({name: functools.partial(jax_update_timer, opt.init, opt.update,
                                                     sizes, group)
                             for name, (opt, group) in programs.items()})
        if has_torch:
            sides["torch AdamW(fused=True)"] = torch_update_timer(sizes, fused=True)
            sides["torch AdamW(foreach=True)"] = torch_update_timer(sizes, foreach=True)
        times = round_robin(sides, repeats)
        ratios.update({(f"update, {leaves} leaves", f"{name} (optax's time / its)"):
                       times["optax"] / t
                       for name, t in times.items() if name != "optax"})
        for name, t in times.items():
            fused = (f"{times['torch AdamW(fused=True)'] / t:17.2f}" if has_torch
                     else f"{'-':>17}")
            print(f"  {leaves:6d} {name:34} {1e3 * t:8.2f} {t / ideal:8.2f} "
                  f"{times['optax'] / t:11.2f} {fused}", flush=True)
        print("         compiled (fusions, MB accessed): " + "; ".join(
            f"{name} {run.program[0]}, {run.program[1] / 1e6:,.1f}"
            for name, run in sides.items() if hasattr(run, "program") and "again" not in name))
        ours, theirs = sides["funtrain"].ops, sides["optax"].ops
        print(f"         instructions (shape, opcode) in funtrain's program and not optax's: "
              f"{sum((ours - theirs).values())}, in optax's and not funtrain's: "
              f"{sum((theirs - ours).values())}, of {sum(theirs.values())}")
    return ratios


# ----------------------------------------------------------------------------- compile


def tree_problem(leaves: int, loss_kind: str):
    """Params of ``leaves`` small leaves and a loss that reads them all without a chain of
    one op per leaf. ``matrix``: the leaves stacked into one matrix (their gradients are
    slices of one array); ``per-leaf``: a small computation on each leaf, then one stack
    (each gradient comes from its own op, as in a model's layers)."""
    params = {f"w{i:05d}": jnp.full((8,), 0.01 * (i % 7), jnp.float32) for i in range(leaves)}
    batch = {"x": jnp.ones((4, 8)), "y": jnp.zeros((4, leaves))}

    def matrix(p, batch):
        w = jnp.stack(list(p.values()))
        return jnp.mean((batch["x"] @ w.T - batch["y"]) ** 2)

    def per_leaf(p, batch):
        s = jnp.stack([jnp.sum(jnp.tanh(w * batch["x"][0])) for w in p.values()])
        return jnp.mean((s - batch["y"][0]) ** 2)

    return params, {"matrix": matrix, "per-leaf": per_leaf}[loss_kind], batch


def compile_first(fn, args) -> tuple[float, object]:
    """(first compile in s, the compiled step). A fresh wrapper each time, so that nothing
    JAX cached for ``fn`` (its trace, its lowering) shortens a later measurement."""
    t0 = time.perf_counter()
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    return time.perf_counter() - t0, compiled


def steady_times(runs: dict, repeats: int = 50) -> dict:
    """Median steady step of each compiled ``(fn, args)``, measured round-robin."""
    return round_robin({name: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
                        for name, (fn, args) in runs.items()}, repeats)


VARIANTS = ("funtrain", "lean", "fused")


def bench_compile(sizes: list[int], losses: list[str], variants=VARIANTS) -> dict:
    """Prints the table; returns {(row, column): funtrain / jax + optax} for the compile and
    the steady step of each variant."""
    import optax

    print("\ntrain step (SGD) as the tree grows: first compile (mean of two, in alternating "
          "order) and steady step (ratio = funtrain / jax + optax; <= 1.3 is the bar)")
    print("  funtrain: default metrics; lean: grad_norm=False (the same HLO as the hand "
          "step, so its ratio shows the noise); fused: a fused state")
    ratios: dict = {}
    for loss_kind in losses:
        for leaves in sizes:
            params, loss, batch = tree_problem(leaves, loss_kind)
            tx = optax.sgd(0.1)

            def hand(p, s, b, loss=loss, tx=tx):
                value, grads = jax.value_and_grad(loss)(p, b)
                updates, s = tx.update(grads, s, p)
                return optax.apply_updates(p, updates), s, value

            opt = optim.sgd(0.1)
            state = train.TrainState.create(params, opt, jax.random.key(0))
            step = train.make_train_step(loss, opt, jit=False)
            sides = {"optax": (hand, (params, tx.init(params), batch)),
                     "funtrain": (step, (state, batch)),
                     "lean": (train.make_train_step(loss, opt, grad_norm=False, jit=False),
                              (state, batch)),
                     "fused": (step, (train.TrainState.create(params, opt, jax.random.key(0),
                                                              fused=True), batch))}
            sides = {k: v for k, v in sides.items() if k == "optax" or k in variants}
            # Each side compiled twice, in one order and then the other, and the mean kept:
            # compiled one after another, the first was favoured.
            first, runs = {name: 0.0 for name in sides}, {}
            for order in (list(sides), list(sides)[::-1]):
                for name in order:
                    fn, args = sides[name]
                    secs, compiled = compile_first(fn, args)
                    first[name] += secs / 2
                    runs[name] = (compiled, args)
            t = steady_times(runs)
            row = f"{loss_kind} loss, {leaves} leaves"
            print(f"  {row:28} jax + optax: compile {first['optax']:6.2f} s, "
                  f"step {1e6 * t['optax']:8.1f} us", flush=True)
            for name in sides:
                if name == "optax":
                    continue
                ratios[(row, f"{name} compile (its time / optax's)")] = \
                    first[name] / first["optax"]
                ratios[(row, f"{name} step (its time / optax's)")] = t[name] / t["optax"]
                print(f"  {'':28} {name + ':':13} compile {first[name]:6.2f} s "
                      f"({first[name] / first['optax']:4.2f}x), step {1e6 * t[name]:8.1f} us "
                      f"({t[name] / t['optax']:4.2f}x)", flush=True)
    return ratios


def summary(runs: list[dict]) -> None:
    """Each ratio's median (and range) over the runs, every run measuring all sides."""
    print(f"\nmedians over {len(runs)} runs in this process (range in brackets)")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key[0]:30} {key[1]:34} {np.median(values):5.2f}x  "
              f"[{min(values):.2f}-{max(values):.2f}]  " + " ".join(f"{v:.2f}" for v in values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["update", "compile"],
                    choices=["update", "compile"])
    ap.add_argument("--params", type=int, default=8_000_000)
    ap.add_argument("--leaves", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--losses", nargs="+", default=["per-leaf", "matrix"],
                    choices=["per-leaf", "matrix"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--runs", type=int, default=1,
                    help="measure everything this many times and print each ratio's median")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                    help="the funtrain steps the compile sweep compiles beside the hand step")
    ap.add_argument("--gpu", action="store_true",
                    help="require an NVIDIA GPU; the update uses 200M params in 600 leaves")
    args = ap.parse_args()
    device = jax.devices()[0]
    if args.gpu and device.platform != "gpu":
        raise SystemExit(f"--gpu: no GPU found (JAX sees {device})")
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    runs = []
    for _ in range(args.runs):
        ratios = {}
        if "update" in args.only:
            ratios.update(bench_update(200_000_000, args.repeats, (600, 1)) if args.gpu
                          else bench_update(args.params, args.repeats))
        if "compile" in args.only:
            ratios.update(bench_compile(args.leaves, args.losses, args.variants))
        runs.append(ratios)
    if args.runs > 1:
        summary(runs)


if __name__ == "__main__":
    main()
