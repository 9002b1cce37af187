"""``step_report``: memory, FLOPs and compile time of a compiled step, read from XLA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from funtrain._tree import tree_bytes
from funtrain.parallel import device_bytes
from funtrain.precision import as_policy

__all__ = ["step_report", "format_report", "residual_bytes"]

_MEMORY_FIELDS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
}


def _flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def step_report(step_fn: Callable[..., Any], *args: Any, step_time: float | None = None,
                print_table: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Compile ``step_fn(*args)`` and report what XLA says it costs.

    Args:
      step_fn: a jitted function (e.g. from ``make_train_step``) or a plain one (jitted here).
      args, kwargs: example arguments; nothing is executed, only lowered and compiled.
      step_time: a measured seconds-per-step, to report achieved FLOP/s.
      print_table: print the report as a table.

    Returns:
      A dict: ``params_bytes`` and ``opt_state_bytes`` (when the first argument is a
      ``TrainState``), ``argument_bytes``, ``output_bytes``, ``alias_bytes``,
      ``temp_bytes`` (activations and scratch), ``flops``, ``compile_seconds`` and, with
      ``step_time``, ``flops_per_second``. Entries the backend does not report are
      ``None``, and ``notes`` says which.

      For a state placed on a mesh (``parallel.shard_state``) it also gives ``devices``
      and ``params_bytes_per_device`` / ``opt_state_bytes_per_device`` (the most any one
      device holds, read from the arrays' shards). XLA compiles one program per device
      there, so ``argument_bytes``, ``temp_bytes`` and ``flops`` are per device too.

    Examples:
      >>> import jax.numpy as jnp
      >>> report = step_report(lambda x: (x @ x).sum(), jnp.ones((64, 64)), print_table=False)
      >>> report["flops"] > 0
      True
    """
    jitted = step_fn if hasattr(step_fn, "lower") else jax.jit(step_fn)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    compiled = lowered.compile()
    report: dict[str, Any] = {"compile_seconds": time.perf_counter() - t0}
    notes = []
    first: Any = args[0] if args else None
    if hasattr(first, "params") and hasattr(first, "opt_state"):
        report["params_bytes"] = tree_bytes(first.params)
        report["opt_state_bytes"] = tree_bytes(first.opt_state)
        devices = {d for x in jax.tree.leaves(first) for d in getattr(
            getattr(x, "sharding", None), "device_set", ())}
        if len(devices) > 1:
            report["devices"] = len(devices)
            for part in ("params", "opt_state"):
                held = _device_bytes(getattr(first, part))
                report[f"{part}_bytes_per_device"] = max(held.values(), default=0)
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        mem = None
    for key, attr in _MEMORY_FIELDS.items():
        report[key] = int(getattr(mem, attr)) if mem is not None and hasattr(mem, attr) else None
    if mem is None:
        notes.append(f"the {jax.default_backend()} backend returned no memory_analysis()")
    report["flops"] = _flops(compiled)
    if report["flops"] is None:
        notes.append(f"the {jax.default_backend()} backend returned no FLOP count "
                     f"(cost_analysis)")
    # The program's own loops, read before XLA's passes: a backend may lower an op
    # (scatter, on XLA's legacy CPU emitters) into a loop that is not the user's.
    elif "stablehlo.while" in lowered.as_text():
        notes.append("the program has a loop (lax.scan, remat.repeat, scan_steps): XLA's "
                     "FLOP count takes each loop body once, so flops and flops_per_second "
                     "are too low by about its trip count")
    if step_time is not None:
        report["step_seconds"] = step_time
        report["flops_per_second"] = (report["flops"] / step_time
                                      if report["flops"] and step_time > 0 else None)
    report["notes"] = notes
    if print_table:
        print(format_report(report))
    return report


def _device_bytes(tree: Any) -> dict[Any, int]:
    """``parallel.device_bytes``, also for abstract leaves (``jax.ShapeDtypeStruct`` with a
    sharding, as ``jax.eval_shape`` gives): their shard shape, from the sharding."""
    held = device_bytes(tree)
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if hasattr(leaf, "addressable_shards") or sharding is None:
            continue
        nbytes = math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        for device in sharding.addressable_devices:
            held[device] = held.get(device, 0) + nbytes
    return held


def residual_bytes(loss_fn: Callable[..., Any], params: Any, *args: Any,
                   policy: Any = None) -> int:
    """Bytes the backward pass of ``loss_fn(params, *args)`` keeps from the forward pass
    (the residuals of ``jax.vjp``), found abstractly: nothing runs.

    With ``policy`` (a ``precision.Policy``, its string or one dtype), params and args are
    cast to its compute dtype first, as ``make_train_step(policy=...)`` does.

    Examples:
      >>> import jax.numpy as jnp
      >>> residual_bytes(lambda w, x: jnp.sum(jnp.tanh(x @ w)), jnp.ones((4, 8)),
      ...                jnp.ones((2, 4)))  # x (32 B) and two 2 x 8 float32 for tanh
      160
    """
    def residuals(p: Any) -> Any:
        if policy is None:
            f = lambda q: loss_fn(q, *args)  # noqa: E731
        else:
            pol = as_policy(policy)
            f = lambda q: loss_fn(pol.cast_to_compute(q), *pol.cast_to_compute(args))  # noqa: E731
        return jax.tree.leaves(jax.vjp(f, p)[1])

    return sum(s.size * s.dtype.itemsize for s in jax.eval_shape(residuals, params))


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key.endswith(("_bytes", "_bytes_per_device")):
        return f"{value / 2**20:,.2f} MiB"
    if key == "flops":
        return f"{value / 1e9:,.3f} GFLOP"
    if key == "flops_per_second":
        return f"{value / 1e9:,.2f} GFLOP/s"
    if key.endswith("seconds"):
        return f"{value:.3f} s"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned two-column table."""
    lines = [f"{k:<28}{_fmt(k, v)}" for k, v in report.items() if k != "notes"]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
