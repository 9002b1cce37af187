"""Sparsity: pruning masks, the gradual-pruning schedule, and an optimizer that keeps pruned
weights at exactly zero.

A mask is a tree like the params, of bool arrays: True keeps a weight, False prunes it.
Leaves that ``select`` leaves out (by default everything but the ``w`` kernels: biases and
norms stay dense) get all-True masks. The mask makers:

- :func:`magnitude`: the smallest ``|w|`` pruned, per layer or globally (one threshold
  over all selected leaves);
- :func:`random`: a random subset of each layer;
- :func:`n_m`: structured N:M (2:4 by default: of every 4 consecutive weights along the
  input axis, the 2 largest stay), the pattern sparse tensor cores run.

:func:`pruned` wraps any optimizer: the masks live in its state, are updated on a
:func:`polynomial_schedule` (Zhu & Gupta, 2017), and every update is taken so that a pruned
weight lands on exactly 0.0 whatever the inner optimizer does (momentum, Adam's moments and
decoupled weight decay cannot revive it). :func:`summary` reports the sparsity.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from funtrain import sparsity
  >>> params = {"w": jnp.arange(1.0, 9.0).reshape(4, 2), "b": jnp.ones(2)}
  >>> masks = sparsity.magnitude(params, 0.5)
  >>> int(masks["w"].sum()), bool(masks["b"].all())
  (4, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funtrain._random import draw_flat
from funtrain._tree import KERNELS, key_path_selector, keystr
from funtrain.optim.base import Optimizer, check_optimizer
from funtrain.optim.fused import has_fused
from funtrain.optim.transforms import ScheduleFreeState
from funtrain.optim.wrappers import EmaState
from funtrain.quant import QTensor

__all__ = ["magnitude", "random", "n_m", "apply_masks", "polynomial_schedule",
           "SparsitySchedule", "pruned", "PrunedState", "summary", "DEFAULT_SELECT"]

DEFAULT_SELECT = KERNELS  # dense and conv kernels
Select = str | Callable[[str, Any], bool] | None


def _check_prunable(params: Any) -> None:
    """Masks are made per float kernel: fused buffers and quantized kernels are refused."""
    if has_fused(params):  # its leaves are whole buffers: no key path would match
        raise TypeError("sparsity: params are fused (TrainState.create(..., fused=True)); "
                        "masks are made per layer, so prune an unfused state, or make the "
                        "masks from params.unflatten()")
    if any(isinstance(x, QTensor) for x in jax.tree.leaves(
            params, is_leaf=lambda x: isinstance(x, QTensor))):  # no kernel path would match
        raise TypeError("sparsity: params are quantized (quant.quantize); prune the float "
                        "params first, then quantize them")


def _chosen(params: Any, select: Select) -> Any:
    """A tree of Python bools: which leaves are pruned."""
    _check_prunable(params)
    test = key_path_selector(select, "sparsity")
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(test(keystr(p), x)), params)


def _check_sparsity(where: str, sparsity: Any) -> None:
    if isinstance(sparsity, (int, float)) and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity}")


def _keep_largest(scores: jax.Array, sparsity: Any) -> jax.Array:
    """True for all but the ``floor(sparsity * size)`` smallest scores (ties by position),
    so the count is exact; ``sparsity`` may be traced (see ``_traced_count``)."""
    flat = scores.reshape(-1)
    ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
    if isinstance(sparsity, (int, float)):  # as the decimal reads: 0.53 of 100 is 53
        k: Any = math.floor(Fraction(repr(float(sparsity))) * flat.size)
    else:
        k = _traced_count(jnp.asarray(sparsity, jnp.float32), flat.size)
    return (ranks >= k).reshape(scores.shape)


def _traced_count(s: jax.Array, n: int) -> jax.Array:
    """``floor(s * n)`` for a float32 ``s`` in [0, 1), of the largest real number that rounds
    to ``s``: a float32 0.53 is 0.52999997, and 0.53 of 100 must still prune 53.

    The product is formed exactly: ``s`` split into two 12-bit halves (Veltkamp) and ``n``
    into 12-bit chunks, so each partial product is exact in float32; their integer parts
    add up in int32 and their fractions in float32 (a plain float32 ``s * n`` rounds, and a
    margin wide enough for that pruned a weight too many in a quarter of the layers of 2^21
    weights). The margin ``n * spacing(s) / 2`` is the half-ulp by which the intended share
    may exceed ``s``; capped at 1/16, so beyond about 2^21 weights (where one float32 step
    of ``s`` is worth ``n * 2^-24`` weights) the count is ``floor(s * n)`` of ``s`` itself,
    give or take that resolution, and never a weight past the 1/16 margin."""
    c = s * 4097.0
    hi = c - (c - s)
    halves = (hi, s - hi)
    whole = jnp.zeros((), jnp.int32)
    fraction = jnp.minimum(n * jnp.spacing(s) / 2, 1 / 16)
    shift = 0
    while n >> shift:
        chunk = float(((n >> shift) & 4095) << shift)
        for half in halves:
            p = half * chunk
            f = jnp.floor(p)
            whole, fraction = whole + f.astype(jnp.int32), fraction + (p - f)
        shift += 12
    return whole + jnp.floor(fraction).astype(jnp.int32)


def magnitude(params: Any, sparsity: Any, scope: str = "layer", select: Select = None
              ) -> Any:
    """Masks that prune the ``sparsity`` share of smallest ``|w|``: in each selected leaf
    (``scope="layer"``) or across all of them (``"global"``: one threshold, so layers end
    up with different sparsities). Works under ``jit`` with a traced ``sparsity``."""
    _check_sparsity("sparsity.magnitude", sparsity)
    chosen = _chosen(params, select)
    if scope == "layer":
        return jax.tree.map(lambda w, c: _keep_largest(jnp.abs(w), sparsity) if c
                            else jnp.ones(jnp.shape(w), bool), params, chosen)
    if scope != "global":
        raise ValueError(f"sparsity.magnitude: scope must be 'layer' or 'global', got "
                         f"{scope!r}")
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(chosen)
    picked = [jnp.abs(w).reshape(-1) for w, c in zip(leaves, flags, strict=True) if c]
    keep = iter(jnp.split(_keep_largest(jnp.concatenate(picked), sparsity),
                          np.cumsum([p.size for p in picked])[:-1].tolist()) if picked else [])
    return treedef.unflatten([next(keep).reshape(jnp.shape(w)) if c
                              else jnp.ones(jnp.shape(w), bool)
                              for w, c in zip(leaves, flags, strict=True)])


def random(params: Any, sparsity: float, key: jax.Array, select: Select = None) -> Any:
    """Masks that prune a random ``sparsity`` share of each selected leaf (exact count)."""
    _check_sparsity("sparsity.random", sparsity)
    chosen = _chosen(params, select)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        _keep_largest(draw_flat(jax.random.uniform, k, jnp.shape(w)), sparsity) if c
        else jnp.ones(jnp.shape(w), bool)
        for w, c, k in zip(leaves, jax.tree.leaves(chosen), keys, strict=True)])


def n_m(params: Any, n: int = 2, m: int = 4, axis: int = -2, select: Select = None) -> Any:
    """Structured N:M masks: of every ``m`` consecutive weights along ``axis`` (by default
    the input axis: of a dense kernel ``(in, out)``, a conv's ``(kh, kw, in, out)`` and a
    stack of blocks' ``(L, in, out)`` alike), the ``n`` largest ``|w|`` stay.

    Raises:
      ValueError: ``n``/``m`` out of order, or a selected leaf whose ``axis`` is not
        divisible by ``m`` (naming its key path).
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"sparsity.n_m: need integers 0 < n <= m, got n={n!r}, m={m!r}")
    chosen = _chosen(params, select)

    def one(path: Any, w: Any, c: bool) -> jax.Array:
        if not c:
            return jnp.ones(jnp.shape(w), bool)
        name = keystr(path)
        if jnp.ndim(w) == 0:
            raise ValueError(f"sparsity.n_m: key path {name!r} is a scalar; N:M needs an axis")
        if not -jnp.ndim(w) <= axis < jnp.ndim(w):  # % would wrap it onto another axis
            raise ValueError(f"sparsity.n_m: key path {name!r} has shape {tuple(w.shape)}: "
                             f"axis {axis} is out of range for {jnp.ndim(w)} dimensions")
        ax = axis % jnp.ndim(w)
        if w.shape[ax] % m:
            raise ValueError(f"sparsity.n_m: key path {name!r} has shape {tuple(w.shape)}: "
                             f"its axis {axis} ({w.shape[ax]}) is not divisible by m={m}")
        moved = jnp.moveaxis(jnp.abs(w), ax, -1)
        groups = moved.reshape(*moved.shape[:-1], -1, m)
        order = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1, stable=True)
        keep = (order >= m - n).reshape(moved.shape)
        return jnp.moveaxis(keep, -1, ax)

    return jax.tree_util.tree_map_with_path(one, params, chosen)


def apply_masks(params: Any, masks: Any) -> Any:
    """``params`` with pruned weights set to exactly 0.

    Raises:
      ValueError: a mask whose shape differs from its param (naming the key path).
      TypeError: fused params (the masks are per layer)."""
    _check_prunable(params)  # a clear error, not a pytree mismatch

    def one(path: Any, w: Any, m: Any) -> Any:
        if jnp.shape(m) != jnp.shape(w):
            raise ValueError(f"sparsity: key path {keystr(path)!r}: mask of shape "
                             f"{tuple(jnp.shape(m))} for a param of shape "
                             f"{tuple(jnp.shape(w))}")
        return jnp.where(m, w, jnp.zeros((), jnp.result_type(w)))

    return jax.tree_util.tree_map_with_path(one, params, masks)


# ----------------------------------------------------------------------------- schedule


class SparsitySchedule(NamedTuple):
    """Zhu & Gupta's gradual pruning (2017): at steps ``begin, begin + frequency, ...,
    end`` the target sparsity is
    ``final + (initial - final) * (1 - (t - begin) / (end - begin)) ** 3``, held between
    them; ``initial`` before ``begin`` (no pruning when it is 0), ``final`` after ``end``."""

    initial: float
    final: float
    begin: int
    end: int
    frequency: int

    def __call__(self, step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.int32)
        last = self.begin + (jnp.clip(t, self.begin, self.end) - self.begin) \
            // self.frequency * self.frequency
        frac = jnp.where(t >= self.end, 1.0, (last - self.begin) / max(self.end - self.begin, 1))
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def due(self, step: Any) -> jax.Array:
        """Whether the masks are updated at ``step``."""
        t = jnp.asarray(step, jnp.int32)
        return (t >= self.begin) & (t <= self.end) & (
            ((t - self.begin) % self.frequency == 0) | (t == self.end))


def polynomial_schedule(initial_sparsity: float = 0.0, final_sparsity: float = 0.9, *,
                        begin_step: int = 0, end_step: int = 1000, frequency: int = 100
                        ) -> SparsitySchedule:
    """The cubic gradual-pruning schedule (see :class:`SparsitySchedule`)."""
    for name, value in (("initial_sparsity", initial_sparsity),
                        ("final_sparsity", final_sparsity)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"sparsity.polynomial_schedule: {name} must be in [0, 1), got "
                             f"{value!r}")
    for name, value in (("begin_step", begin_step), ("end_step", end_step),
                        ("frequency", frequency)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"sparsity.polynomial_schedule: {name} must be a non-negative "
                             f"int, got {value!r}")
    if end_step < begin_step or frequency < 1:
        raise ValueError(f"sparsity.polynomial_schedule: need begin_step <= end_step and "
                         f"frequency >= 1, got {begin_step}, {end_step}, {frequency}")
    if final_sparsity < initial_sparsity:  # pruned's masks only grow: a pruned weight stays
        raise ValueError(f"sparsity.polynomial_schedule: final_sparsity must be >= "
                         f"initial_sparsity (pruning only removes weights), got "
                         f"{initial_sparsity} -> {final_sparsity}")
    return SparsitySchedule(float(initial_sparsity), float(final_sparsity), begin_step,
                            end_step, frequency)


# ----------------------------------------------------------------------------- optimizer


class PrunedState(NamedTuple):
    inner: Any
    masks: Any
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count


def pruned(opt: Optimizer, schedule: SparsitySchedule | None = None, *, masks: Any = None,
           scope: str = "layer", select: Select = None) -> Optimizer:
    """``opt`` on a sparse model: pruned weights are exactly 0.0 after every update.

    The masks live in the state: ``masks`` given (fixed: one-shot pruning, then
    fine-tuning), or all-True at ``init`` and re-made by :func:`magnitude` (``scope``,
    ``select``) at the steps ``schedule.due`` names, from the current (masked) weights, so
    a pruned weight stays pruned. Each update

    .. math::
        \\tilde g = \\mathrm{where}(m, g, 0), \\quad (u', s) = \\mathrm{opt}(\\tilde g, s,
        \\theta), \\quad u = \\mathrm{where}(m, u', -\\theta)

    so ``theta + u`` is exactly 0 where ``m`` is False: the inner optimizer's moments never
    see a pruned weight's gradient, and its weight decay or momentum cannot move it. Under
    ``schedule_free_adamw`` its ``z`` sequence is zeroed where pruned too, and under
    ``optim.ema`` its average, so the params ``schedule_free_eval_params`` and
    ``ema_params`` give are as sparse (wrap the ema in ``pruned``, not the other way round:
    an ``ema`` outside keeps averaging the weights from before they were pruned).
    """
    check_optimizer("sparsity.pruned", "opt", opt)
    if schedule is None and masks is None:
        raise ValueError("sparsity.pruned: give a schedule (gradual pruning) or masks "
                         "(fixed, e.g. from sparsity.magnitude)")
    if schedule is not None and not isinstance(schedule, SparsitySchedule):
        raise TypeError(f"sparsity.pruned: schedule must come from "
                        f"sparsity.polynomial_schedule, got {type(schedule).__name__}")

    def init_state(params: Any) -> PrunedState:
        _chosen(params, select)  # checks select, and that params are not fused
        if masks is None:
            start = jax.tree.map(lambda w: jnp.ones(jnp.shape(w), bool), params)
        else:
            apply_masks(params, masks)  # checks the shapes, naming the key path
            start = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)
        return PrunedState(opt.init(params), start, jnp.zeros((), jnp.int32))

    def update(grads: Any, state: PrunedState, params: Any = None
               ) -> tuple[Any, PrunedState]:
        if params is None:
            raise ValueError("sparsity.pruned: update needs params (to zero pruned weights)")
        current = state.masks
        if schedule is not None:
            # and-ed with the masks so far: a pruned weight stays pruned (given masks
            # sparser than the schedule's target, or zero weights tied with pruned ones,
            # came back to life)
            current = lax.cond(
                schedule.due(state.count),
                lambda: jax.tree.map(jnp.logical_and, state.masks, magnitude(
                    apply_masks(params, state.masks), schedule(state.count), scope, select)),
                lambda: state.masks)
        zero = lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype))  # noqa: E731
        inner_updates, inner = opt.update(jax.tree.map(zero, current, grads), state.inner,
                                          params)
        updates = jax.tree.map(lambda m, u, p: jnp.where(m, u, -p).astype(u.dtype),
                               current, inner_updates, params)
        # the params an optimizer keeps to evaluate are as sparse as the params: schedule-
        # free evaluates at x = (y - (1 - b1) z) / b1 (z zeroed where pruned), ema its average
        def sparse(s: Any) -> Any:
            if isinstance(s, ScheduleFreeState):
                return s._replace(z=jax.tree.map(zero, current, s.z))
            if isinstance(s, EmaState):
                return s._replace(inner=sparse(s.inner), ema=jax.tree.map(zero, current, s.ema))
            return s

        inner = jax.tree.map(sparse, inner,
                             is_leaf=lambda s: isinstance(s, (ScheduleFreeState, EmaState)))
        return updates, PrunedState(inner, current, state.count + 1)

    return Optimizer(init_state, update)


# ----------------------------------------------------------------------------- summary


def summary(params: Any, select: Select = None) -> dict[str, Any]:
    """The share of exact zeros per selected leaf (by key path) and over all of them
    (``"global"``), with the counts: ``{"layers": {path: sparsity}, "global": sparsity,
    "zeros": int, "total": int}``."""
    chosen = _chosen(params, select)
    flat = jax.tree_util.tree_leaves_with_path(params)
    layers, zeros, total = {}, 0, 0
    for (path, w), c in zip(flat, jax.tree.leaves(chosen), strict=True):
        if not c:
            continue
        z = int(jnp.sum(jnp.asarray(w) == 0))
        layers[keystr(path)] = z / max(int(jnp.size(w)), 1)
        zeros, total = zeros + z, total + int(jnp.size(w))
    return {"layers": layers, "global": zeros / total if total else 0.0, "zeros": zeros,
            "total": total}
