"""Building blocks: small ``Optimizer``s that ``chain`` combines into full optimizers.

Each factory validates its hyperparameters and returns ``Optimizer(init_state,
update)`` over a NamedTuple state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funtrain._tree import check_same_structure
from funtrain._typing import Array, Grads, Params, ScalarOrSchedule, Updates
from funtrain.optim._checks import check_scalar
from funtrain.optim.base import EmptyState, Optimizer
from funtrain.optim.schedules import as_schedule

_INT32_MAX = jnp.iinfo(jnp.int32).max


def safe_increment(count: Array) -> Array:
    """``count + 1`` that saturates instead of wrapping at int32's maximum."""
    return jnp.where(count < _INT32_MAX, count + 1, count).astype(jnp.int32)


def _need_params(where: str, params: Params | None) -> Params:
    if params is None:
        raise ValueError(f"{where}: needs the current params; call "
                         f"update(grads, state, params)")
    return params


# --------------------------------------------------------------------------- scale


def scale(step_size: float) -> Optimizer:
    """Multiply the updates by a constant: ``u ← step_size · g``."""
    check_scalar("scale", "step_size", step_size)

    def update(grads: Grads, state: EmptyState, params: Params | None = None):
        return jax.tree.map(lambda g: (step_size * g).astype(g.dtype), grads), state

    return Optimizer(lambda params: EmptyState(), update)


class ScaleByScheduleState(NamedTuple):
    """``count``: how many updates were made (the schedule's step)."""

    count: Array


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
                           ) -> Optimizer:
    """Multiply by ``-learning_rate`` (a float, or a schedule ``step -> lr``).

    With a schedule the block counts its own updates; the first uses ``schedule(0)``.
    ``flip_sign=False`` keeps the sign (for gradient *ascent* or custom chains).
    """
    lr = as_schedule(learning_rate, "scale_by_learning_rate")
    sign = -1.0 if flip_sign else 1.0

    def init_state(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(grads: Grads, state: ScaleByScheduleState, params: Params | None = None):
        step_size = sign * lr(state.count)
        updates = jax.tree.map(lambda g: (step_size * g).astype(g.dtype), grads)
        return updates, ScaleByScheduleState(count=safe_increment(state.count))

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    """``trace``: the momentum buffer; ``count``: updates so far (first step is special)."""

    trace: Any
    count: Array


def trace(decay: float, *, nesterov: bool = False, dampening: float = 0.0,
          accumulator_dtype: Any = None) -> Optimizer:
    r"""Heavy-ball momentum, PyTorch's convention.

    .. math::
        v_1 = g_1, \qquad v_t = \mu v_{t-1} + (1 - \tau) g_t \quad (t > 1)

    and the output is :math:`v_t`, or :math:`g_t + \mu v_t` with ``nesterov=True``.
    With ``dampening`` :math:`\tau = 0` this equals the usual JAX ``trace`` transform (which starts
    from :math:`v_0 = 0`); with :math:`\tau > 0` PyTorch's first step skips the
    dampening, and so does this block.

    Args:
      decay: the momentum :math:`\mu \ge 0`.
      nesterov: Nesterov momentum (Sutskever et al., 2013, as in PyTorch).
      dampening: :math:`\tau \in [0, 1]`.
      accumulator_dtype: dtype of the buffer; defaults to each param's dtype.
    """
    where = "trace"
    check_scalar(where, "decay", decay, low=0.0)
    check_scalar(where, "dampening", dampening, low=0.0, high=1.0)
    if nesterov and (not decay or dampening):
        raise ValueError(f"{where}: nesterov=True needs decay > 0 and dampening == 0, got "
                         f"decay={decay}, dampening={dampening}")

    def init_state(params: Params) -> TraceState:
        buf = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=accumulator_dtype or p.dtype),
                           params)
        return TraceState(trace=buf, count=jnp.zeros((), jnp.int32))

    def update(grads: Grads, state: TraceState, params: Params | None = None):
        check_same_structure(state.trace, grads, what="trace.update",
                             expected_name="the momentum buffer (params)", actual_name="grads")
        first = state.count == 0

        def step(g: Array, v: Array) -> tuple[Array, Array]:
            g_acc = g.astype(v.dtype)
            new_v = jnp.where(first, g_acc, decay * v + (1.0 - dampening) * g_acc)
            out = g_acc + decay * new_v if nesterov else new_v
            return out.astype(g.dtype), new_v

        pairs = jax.tree.map(step, grads, state.trace)
        treedef = jax.tree.structure(grads)
        flat = treedef.flatten_up_to(pairs)
        updates = treedef.unflatten([u for u, _ in flat])
        new_trace = treedef.unflatten([v for _, v in flat])
        return updates, TraceState(trace=new_trace, count=safe_increment(state.count))

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- weight decay

MaskOrFn = Any  # a pytree of bools like params, or a function params -> such a pytree


def add_decayed_weights(weight_decay: ScalarOrSchedule, mask: MaskOrFn | None = None
                        ) -> Optimizer:
    r"""Add :math:`\lambda \theta` to the updates (coupled L2 when placed before the lr).

    Args:
      weight_decay: :math:`\lambda \ge 0`, a float or a schedule.
      mask: optional pytree of bools with the params' structure (or a function
        ``params -> mask``); only ``True`` leaves are decayed, e.g. to skip biases.
    """
    wd = as_schedule(weight_decay, "add_decayed_weights", "weight_decay")

    def init_state(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(grads: Updates, state: ScaleByScheduleState, params: Params | None = None):
        params = _need_params("add_decayed_weights", params)
        check_same_structure(params, grads, what="add_decayed_weights",
                             expected_name="params", actual_name="grads")
        lam = wd(state.count)
        m = mask(params) if callable(mask) else mask
        if m is None:
            m = jax.tree.map(lambda _: True, params)
        check_same_structure(params, m, what="add_decayed_weights", expected_name="params",
                             actual_name="mask")

        def add(g: Array, p: Array, keep: Any) -> Array:
            decayed = (g + lam * p.astype(g.dtype)).astype(g.dtype)
            if isinstance(keep, bool):
                return decayed if keep else g
            return jnp.where(keep, decayed, g)

        updates = jax.tree.map(add, grads, params, m)
        return updates, ScaleByScheduleState(count=safe_increment(state.count))

    return Optimizer(init_state, update)


def labels_to_mask(fn: Callable[[tuple[str, ...], Array], bool]) -> Callable[[Params], Any]:
    """A mask function from a predicate on ``(key_path, leaf)``; e.g. decay only 2-D weights.

    Example:
      >>> mask = labels_to_mask(lambda path, p: p.ndim > 1)
    """

    def make(params: Params) -> Any:
        def pred(path: Any, leaf: Array) -> bool:
            keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
                         for k in path)
            return bool(fn(tuple(str(k) for k in keys), leaf))

        return jax.tree_util.tree_map_with_path(pred, params)

    return make
