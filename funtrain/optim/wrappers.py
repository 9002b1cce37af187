"""Wrappers: optimizers that take an optimizer and change when, or to which leaves, it applies.

- ``masked``: run an optimizer on some leaves only; the others pass through.
- ``partition``: one optimizer per parameter group (labels by key path).
- ``freeze``: zero the updates of some leaves.
- ``multi_steps``: gradient accumulation over ``k`` micro-steps.
- ``apply_if_finite``: skip steps whose gradients hold an inf or a NaN.
- ``inject_hyperparams``: keep numeric hyperparameters in the state, so a jitted step can
  read and change them without recompiling.
- ``ema``: keep an exponential moving average of the params, to evaluate on
  (``ema_params``).

Each returns an ``Optimizer(init_state, update)`` over a NamedTuple state, so the wrappers
nest and chain like any other block. Labels decide the state's structure, so they are static
strings. A mask leaf is a Python bool (per leaf, static: it decides the state's structure) or
a bool array broadcastable to the leaf (per element). The two mask conventions: in ``masked``
True means *the optimizer applies*; in ``freeze`` True means *frozen*.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funtrain._checks import IntArgumentError
from funtrain._tree import check_same_structure, keystr, leaf_paths
from funtrain._typing import Array, Grads, OptState, Params, Updates
from funtrain.optim._checks import Count, Int, check_schedule, checked, is_traced_or_array
from funtrain.optim.base import (
    EmptyState,
    Optimizer,
    apply_updates,
    check_optimizer,
)
from funtrain.optim.fused import leafwise
from funtrain.optim.transforms import _need_params, safe_increment
from funtrain.precision import all_finite

__all__ = [
    "injected_hyperparams",
    "MaskedNode", "MaskedState", "masked",
    "PartitionState", "partition",
    "freeze",
    "MultiStepsState", "multi_steps",
    "ApplyIfFiniteState", "apply_if_finite",
    "InjectHyperparamsState", "inject_hyperparams",
    "EmaState", "ema", "ema_params",
]

MaskOrFn = Any  # a pytree like params of Python bools (per leaf) or bool arrays (per
# element), or a function params -> such a pytree
LabelsOrFn = Any  # a pytree of str like params, or a function params -> such a pytree


# --------------------------------------------------------------------------- helpers


def _resolve(where: str, name: str, tree_or_fn: Any, params: Params | None,
             grads: Grads | None = None) -> Any:
    """Call a mask/label function on params (or, without params, on the grads)."""
    if not callable(tree_or_fn):
        return tree_or_fn
    arg = params if params is not None else grads
    if arg is None:
        raise ValueError(f"{where}: {name} is a function of the params; pass the params")
    return tree_or_fn(arg)


def _static_leaves(where: str, name: str, tree: Any, params: Any, ok: tuple[type, ...],
                   expected: str) -> list[Any]:
    """The leaves of a mask/label tree, after checking its structure and leaf types."""
    check_same_structure(params, tree, what=where, expected_name="params", actual_name=name)
    for path, leaf in leaf_paths(tree).items():
        if not isinstance(leaf, ok):
            raise TypeError(f"{where}: {name} leaves must be {expected} (they decide the "
                            f"state's structure, so they are static), got "
                            f"{type(leaf).__name__} ({leaf!r}) at key path {path}")
    return jax.tree.leaves(tree)


def _mask_leaf(where: str, path: str, m: Any, shape: tuple[int, ...] | None) -> Any:
    """One mask leaf, checked: a Python bool (static), or a bool array broadcastable to
    ``shape`` (the leaf's shape; ``None`` checks the type and dtype only)."""
    if isinstance(m, (bool, np.bool_)):
        return bool(m)
    if not isinstance(m, (np.ndarray, jax.Array)):  # jax.Array covers tracers
        raise TypeError(f"{where}: mask leaves must be Python bools (per leaf, static: they "
                        f"decide the state's structure) or bool arrays (per element), got "
                        f"{type(m).__name__} ({m!r}) at key path {path}")
    if m.dtype != np.bool_:
        # A float mask is ambiguous (a 0/1 gate? a weight?) and jnp.where would silently
        # read any nonzero as True, so ask for the comparison instead.
        raise TypeError(f"{where}: the mask at key path {path} has dtype {m.dtype}; use a "
                        f"bool array (e.g. mask != 0)")
    if shape is not None:
        try:
            fits = np.broadcast_shapes(m.shape, shape) == tuple(shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"{where}: the mask at key path {path} has shape {m.shape}, which "
                             f"does not broadcast to the leaf's shape {tuple(shape)}; give it "
                             f"that shape or one with 1s where it repeats (trailing axes "
                             f"align, as in numpy)")
    return m


def _check_mask_types(where: str, mask: Any) -> None:
    """At construction: the leaf types and dtypes of a mask given as a tree (not a function)."""
    if not callable(mask):
        for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
            _mask_leaf(where, keystr(path), m, None)


def _mask_leaves(where: str, mask: Any, tree: Any) -> list[Any]:
    """Per leaf of ``tree``: a Python bool, or a bool array broadcastable to the leaf.

    Checks the mask's structure against ``tree`` (params or grads), then each leaf's type,
    dtype and shape, naming the key path.
    """
    check_same_structure(tree, mask, what=where, expected_name="params", actual_name="mask")
    shapes = [jnp.shape(x) for x in jax.tree.leaves(tree)]
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]  # paths may print alike: no dict
    return [_mask_leaf(where, keystr(path), m, shape)
            for (path, m), shape in zip(flat, shapes, strict=True)]


class MaskedNode(NamedTuple):
    """Stands in for a leaf an inner optimizer does not see; it has no leaves of its own."""


def _select(tree: Any, keep: list[bool]) -> Any:
    """``tree`` with the leaves where ``keep`` is False replaced by ``MaskedNode()``."""
    if tree is None:
        return None
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([x if k else MaskedNode() for x, k in zip(leaves, keep,
                                                                       strict=True)])


def _inner_leaves(where: str, updates: Any, n: int) -> list[Any]:
    leaves = jax.tree.leaves(updates)
    if len(leaves) != n:
        raise ValueError(f"{where}: the inner optimizer returned {len(leaves)} update leaves "
                         f"for {n} gradient leaves; it must keep the gradients' structure")
    return leaves


def _update_or_skip(pred: Any, update: Callable[..., tuple[Updates, OptState]],
                    grads: Grads, state: OptState, params: Params | None
                    ) -> tuple[Updates, OptState]:
    """``update(grads, state, params)`` where ``pred``, else zero updates and ``state`` as is.

    Under a trace ``lax.cond`` runs only the chosen branch; eagerly a Python ``if`` does
    (an eager ``lax.cond`` would compile both branches on every call). Either way the
    skipped branch hands the state back untouched (bitwise), and the zeros take the
    dtypes the inner update would return.
    """
    out = jax.eval_shape(update, grads, state, params)

    def skip(g: Grads, s: OptState, p: Params | None) -> tuple[Updates, OptState]:
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out[0])
        return zeros, jax.tree.map(
            lambda x, a: x if jnp.asarray(x).dtype == a.dtype else jnp.asarray(x, a.dtype),
            s, out[1])

    try:
        concrete = bool(pred)
    except jax.errors.ConcretizationTypeError:  # traced (jit, vmap, scan): choose at run time
        return lax.cond(pred, update, skip, grads, state, params)
    return (update if concrete else skip)(grads, state, params)


# --------------------------------------------------------------------------- masked


class MaskedState(NamedTuple):
    """``inner_state``: the inner optimizer's state over the leaves it sees.

    It sees every leaf whose mask is not a Python ``False``; the others appear as
    ``MaskedNode()`` in it, which holds no arrays.
    """

    inner_state: OptState


@checked
def masked(opt: Optimizer, mask: MaskOrFn) -> Optimizer:
    r"""Apply ``opt`` where ``mask`` is True; pass the incoming gradient through elsewhere.

    True means *the optimizer applies* (``freeze`` is the other way round: True means
    frozen). A mask leaf is one of:

    - a Python bool, per leaf and static. ``opt`` never sees a False leaf: its update is
      the incoming gradient, unchanged, and ``opt``'s state holds nothing for it (a
      ``MaskedNode()``).
    - a bool array ``m`` broadcastable to the leaf's shape, per element. ``opt`` sees the
      whole leaf and keeps state for all of it, but with the gradient zeroed where ``m``
      is False; the update takes ``opt``'s result where ``m`` is True and the incoming
      gradient elsewhere, as the per-leaf rule does element by element:

      .. math::
          \tilde g = \mathrm{where}(m, g, 0), \qquad
          (u', s_t) = \mathrm{opt}(\tilde g, s_{t-1}, \theta), \qquad
          u = \mathrm{where}(m, u', g).

      Zeroing keeps ``opt``'s statistics to the elements it owns: Adam's moments stay
      exactly 0 where ``m`` has always been False (the raw gradient would fill them with
      values ``opt`` never applies), and a gradient norm (``clip_by_global_norm``) counts
      only masked-in elements. The params go in whole, so what ``opt`` computes from them
      (weight decay, LAMB's trust ratio) sees the whole leaf. Where ``m`` is False the
      inner state never reaches the update. An element masked out mid-run
      keeps moments that decay as under zero gradients, and the step count behind the
      bias correction runs for every element; reset the state if an element that comes
      back (sparse regrowth) needs fresh statistics.
      Zeroing uses ``jnp.where``, not a product with a 0/1 mask (``inf * 0`` is NaN), so
      an inf or NaN in a masked-out element stays out of the state; it still reaches the
      update, as a False leaf's would. jaxpruner's sparse-gradient mode also feeds its
      inner optimizer gradients zeroed by the mask (a product with a 0/1 mask); optax's
      ``masked`` takes per-leaf bools only.

    To zero the masked-out gradient instead of passing it through (pruned weights),
    follow with ``freeze`` and the opposite mask: ``chain(masked(opt, m), freeze(~m))``.

    Args:
      opt: the optimizer to apply to the masked-in leaves or elements.
      mask: a pytree with the params' structure whose leaves are Python bools or bool
        arrays (numpy or jax) broadcastable to their leaf's shape, in any mix; or a
        function ``params -> mask`` (called on the grads when ``update`` gets no params),
        which must give the same kind (bool or array) at each leaf on every call, since
        the Python bools decide the state's structure. Array masks need not be static:
        a jax array captured here, or one computed by the function under ``jit``, works.
        Leaf types and dtypes are checked here when ``mask`` is a tree; the structure
        and shapes in ``init_state`` and ``update``.

    Returns:
      An ``Optimizer`` whose state is a ``MaskedState``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> from funtrain.optim.wrappers import masked
      >>> params = {"w": jnp.ones(2), "b": jnp.zeros(2)}
      >>> opt = masked(optim.sgd(0.1), {"w": True, "b": False})
      >>> updates, state = opt.update({"w": jnp.ones(2), "b": jnp.ones(2)},
      ...                             opt.init_state(params), params)
      >>> updates["w"], updates["b"]
      (Array([-0.1, -0.1], dtype=float32), Array([1., 1.], dtype=float32))
      >>> opt = masked(optim.sgd(0.1), {"w": jnp.array([True, False]), "b": False})
      >>> updates, state = opt.update({"w": jnp.ones(2), "b": jnp.ones(2)},
      ...                             opt.init_state(params), params)
      >>> updates["w"]
      Array([-0.1,  1. ], dtype=float32)
    """
    where = "masked"
    _check_mask_types(where, mask)

    def init_state(params: Params) -> MaskedState:
        ms = _mask_leaves(where, _resolve(where, "mask", mask, params), params)
        return MaskedState(inner_state=opt.init(_select(params, [m is not False for m in ms])))

    def update(grads: Grads, state: MaskedState, params: Params | None = None
               ) -> tuple[Updates, MaskedState]:
        ms = _mask_leaves(where, _resolve(where, "mask", mask, params, grads), grads)
        seen = [m is not False for m in ms]
        g_leaves, treedef = jax.tree.flatten(grads)
        # Element-wise leaves: opt sees zeros where the mask is False (see the docstring).
        g_in = [g if isinstance(m, bool) else jnp.where(m, g, 0)
                for g, m in zip(g_leaves, ms, strict=True)]
        inner_updates, inner_state = opt.update(_select(treedef.unflatten(g_in), seen),
                                                state.inner_state, _select(params, seen))
        it = iter(_inner_leaves(where, inner_updates, sum(seen)))
        out = []
        for g, m in zip(g_leaves, ms, strict=True):
            if m is False:
                out.append(g)
            elif m is True:
                out.append(next(it))
            else:  # the inner update's dtype, as for a True leaf
                u = next(it)
                out.append(jnp.where(m, u, jnp.asarray(g, u.dtype)))
        return treedef.unflatten(out), MaskedState(inner_state=inner_state)

    return leafwise(Optimizer(init_state, update))


# --------------------------------------------------------------------------- partition


class PartitionState(NamedTuple):
    """``inner_states``: a dict ``label -> state`` of each group's optimizer."""

    inner_states: dict[str, OptState]


def partition(opts_by_label: Mapping[str, Optimizer], label_fn: LabelsOrFn) -> Optimizer:
    """Give each parameter group its own optimizer, groups named by string labels.

    Every leaf gets exactly one label; the leaves labelled ``"x"`` are updated by
    ``opts_by_label["x"]``, whose state covers those leaves only. A label in
    ``opts_by_label`` that no leaf carries is allowed (its state holds no arrays).

    Args:
      opts_by_label: a dict ``label -> Optimizer``.
      label_fn: a pytree of str labels with the params' structure, or a function
        ``params -> labels`` (called on the grads when ``update`` gets no params).

    Returns:
      An ``Optimizer`` whose state is a ``PartitionState``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> from funtrain.optim.wrappers import freeze, partition
      >>> params = {"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
      >>> opt = partition({"train": optim.sgd(0.1, momentum=0.9), "frozen": freeze(True)},
      ...                 {"body": {"w": "frozen"}, "head": {"w": "train"}})
      >>> grads = {"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
      >>> updates, state = opt.update(grads, opt.init_state(params), params)
      >>> updates["body"]["w"], updates["head"]["w"]
      (Array([0., 0.], dtype=float32), Array([-0.1, -0.1], dtype=float32))
    """
    where = "partition"
    if not isinstance(opts_by_label, Mapping):
        raise TypeError(f"{where}: opts_by_label must be a dict label -> Optimizer, got "
                        f"{type(opts_by_label).__name__}")
    if not opts_by_label:
        raise ValueError(f"{where}: opts_by_label is empty; give at least one label -> "
                         f"Optimizer")
    for label, opt in opts_by_label.items():
        if not isinstance(label, str):
            raise TypeError(f"{where}: opts_by_label keys must be str labels, got "
                            f"{type(label).__name__} ({label!r})")
        check_optimizer(where, f"opts_by_label[{label!r}]", opt)
    opts = dict(opts_by_label)

    def labels_of(tree: Any, params: Params | None, grads: Grads | None = None) -> list[str]:
        labels = _resolve(where, "labels", label_fn, params, grads)
        leaves = _static_leaves(where, "labels", labels, tree, (str,), "str labels")
        unknown: dict[str, list[str]] = {}
        for path, label in leaf_paths(labels).items():
            if label not in opts:
                unknown.setdefault(label, []).append(path)
        if unknown:
            bad = "; ".join(f"label {lab!r} at key path{'s' if len(ps) > 1 else ''} "
                            f"{', '.join(ps)}" for lab, ps in unknown.items())
            raise ValueError(f"{where}: no optimizer for {bad}. opts_by_label has the labels "
                             f"{sorted(opts)}; add the missing labels to it")
        return leaves

    def init_state(params: Params) -> PartitionState:
        labels = labels_of(params, params)
        return PartitionState(inner_states={
            lab: opt.init(_select(params, [x == lab for x in labels]))
            for lab, opt in opts.items()})

    def update(grads: Grads, state: PartitionState, params: Params | None = None
               ) -> tuple[Updates, PartitionState]:
        if params is not None:  # labels come from params: say when grads differ from them
            check_same_structure(params, grads, what=where, expected_name="params",
                                 actual_name="grads")
        labels = labels_of(grads, params, grads)
        if not isinstance(state.inner_states, Mapping) or set(state.inner_states) != set(opts):
            got = sorted(state.inner_states) if isinstance(state.inner_states, Mapping) else (
                type(state.inner_states).__name__)
            raise ValueError(f"{where}: the state has the labels {got}, expected "
                             f"{sorted(opts)}; was it made by another optimizer's init_state?")
        g_leaves, treedef = jax.tree.flatten(grads)
        out: list[Any] = list(g_leaves)
        new_states = {}
        for lab, opt in opts.items():
            keep = [x == lab for x in labels]
            u, new_states[lab] = opt.update(_select(grads, keep), state.inner_states[lab],
                                            _select(params, keep))
            it = iter(_inner_leaves(f"{where} (label {lab!r})", u, sum(keep)))
            out = [next(it) if k else o for o, k in zip(out, keep, strict=True)]
        return treedef.unflatten(out), PartitionState(inner_states=new_states)

    return leafwise(Optimizer(init_state, update))


# --------------------------------------------------------------------------- freeze


def freeze(mask: MaskOrFn) -> Optimizer:
    r"""Zero the updates where ``mask`` is True (frozen); pass the others through.

    True means *frozen* (``masked`` is the other way round: True means the optimizer
    applies). A mask leaf is a Python bool, which freezes the whole leaf, or a bool array
    ``m`` broadcastable to the leaf's shape, which freezes element by element:

    .. math:: u = \mathrm{where}(m, 0, g)

    The updates keep their dtypes. ``freeze`` holds no state. Put it last in a chain, so
    nothing after it (weight decay, say) moves a frozen leaf or element. To keep an
    optimizer's state off frozen leaves too, mask the optimizer with the opposite mask:
    ``chain(masked(opt, trainable), freeze(frozen))``, or use ``partition``. With array
    masks, ``chain(masked(opt, ~pruned), freeze(pruned))`` also keeps the optimizer's
    statistics free of the pruned elements' gradients. An optimizer that keeps its own
    params to evaluate (``ema``, ``schedule_free_adamw``) must not move the frozen elements
    either: write ``ema(chain(opt, freeze(frozen)))`` and
    ``chain(masked(schedule_free_adamw(...), trainable), freeze(frozen))``. With ``freeze``
    after ``ema``, ``ema_params`` averages updates that ``freeze`` then drops.

    Args:
      mask: a pytree with the params' structure whose leaves are Python bools or bool
        arrays (numpy or jax) broadcastable to their leaf's shape, in any mix; a single
        Python bool for every leaf; or a function ``params -> mask`` (called on the
        grads when ``update`` gets no params). Array masks need not be static: a jax
        array captured here, or one computed by the function under ``jit``, works. Leaf
        types and dtypes are checked here when ``mask`` is a tree; the structure and
        shapes in ``init_state`` and ``update``.

    Returns:
      An ``Optimizer`` whose state is ``EmptyState()``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> from funtrain.optim.wrappers import freeze
      >>> params = {"embed": jnp.ones(2), "w": jnp.ones(2)}
      >>> opt = optim.chain(optim.sgd(0.1), freeze({"embed": True, "w": False}))
      >>> updates, _ = opt.update(params, opt.init_state(params), params)
      >>> updates["embed"], updates["w"]
      (Array([0., 0.], dtype=float32), Array([-0.1, -0.1], dtype=float32))
      >>> opt = optim.chain(optim.sgd(0.1), freeze({"embed": jnp.array([True, False]),
      ...                                           "w": False}))
      >>> updates, _ = opt.update(params, opt.init_state(params), params)
      >>> updates["embed"]
      Array([ 0. , -0.1], dtype=float32)
    """
    where = "freeze"
    _check_mask_types(where, mask)

    def mask_leaves(tree: Any, params: Params | None, grads: Grads | None = None
                    ) -> list[Any]:
        m = _resolve(where, "mask", mask, params, grads)
        if isinstance(m, (bool, np.bool_)):
            return [bool(m)] * len(jax.tree.leaves(tree))
        return _mask_leaves(where, m, tree)

    def init_state(params: Params) -> EmptyState:
        mask_leaves(params, params)  # report a bad mask at init, not at the first step
        return EmptyState()

    def update(grads: Grads, state: EmptyState, params: Params | None = None
               ) -> tuple[Updates, EmptyState]:
        frozen = mask_leaves(grads, params, grads)
        g_leaves, treedef = jax.tree.flatten(grads)
        # where(m, 0, g): the weakly typed 0 keeps g's dtype; the shape check made m
        # broadcast to g's shape, not beyond it.
        out = [(jnp.zeros_like(g) if m else g) if isinstance(m, bool) else jnp.where(m, 0, g)
               for g, m in zip(g_leaves, frozen, strict=True)]
        return treedef.unflatten(out), state

    return leafwise(Optimizer(init_state, update))


# --------------------------------------------------------------------------- multi_steps


class MultiStepsState(NamedTuple):
    """State of ``multi_steps``.

    ``mini_step``: micro-steps since the last real step (0 .. every_k - 1);
    ``gradient_step``: real steps taken (inner updates); ``inner_state``: the inner
    optimizer's state; ``acc_grads``: the sum of this round's gradients (float32 at least).
    """

    mini_step: Array
    gradient_step: Array
    inner_state: OptState
    acc_grads: Grads


@checked
def multi_steps(opt: Optimizer, every_k: Count) -> Optimizer:
    r"""Gradient accumulation: apply ``opt`` to the mean of every ``every_k`` gradients.

    Calls 1 .. k-1 of each round add the gradients to an accumulator and return zero
    updates, leaving ``opt``'s state untouched. Call k applies ``opt`` to the mean

    .. math:: \bar g = \frac{1}{k} \sum_{j=1}^{k} g_j

    and returns its updates. When the loss is a mean over examples and the params do
    not move in between (they don't: the updates are zero), ``k`` micro-batches of
    size ``m`` give the same step as one batch of size ``k m``. Sums are kept in
    float32 at least. Under ``jit`` the inner update runs only on the k-th call
    (``lax.cond``).

    Args:
      opt: the optimizer that takes the real steps.
      every_k: the number of micro-steps per real step, an int >= 1.

    Returns:
      An ``Optimizer`` whose state is a ``MultiStepsState``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> from funtrain.optim.wrappers import multi_steps
      >>> params = {"w": jnp.zeros(2)}
      >>> opt = multi_steps(optim.sgd(1.0), every_k=2)
      >>> state = opt.init_state(params)
      >>> u, state = opt.update({"w": jnp.array([1.0, 2.0])}, state, params)
      >>> u["w"]
      Array([0., 0.], dtype=float32)
      >>> u, state = opt.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> u["w"], int(state.gradient_step)
      (Array([-2., -3.], dtype=float32), 1)
    """
    where = "multi_steps"
    k = int(every_k)

    def acc_dtype(x: Any) -> Any:
        return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)

    def init_state(params: Params) -> MultiStepsState:
        return MultiStepsState(
            mini_step=jnp.zeros((), jnp.int32),
            gradient_step=jnp.zeros((), jnp.int32),
            inner_state=opt.init(params),
            acc_grads=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), acc_dtype(p)), params))

    def update(grads: Grads, state: MultiStepsState, params: Params | None = None
               ) -> tuple[Updates, MultiStepsState]:
        check_same_structure(state.acc_grads, grads, what=f"{where}.update",
                             expected_name="the accumulated grads (params)",
                             actual_name="grads")
        summed = jax.tree.map(lambda a, g: a + jnp.asarray(g).astype(a.dtype),
                              state.acc_grads, grads)
        mean = jax.tree.map(lambda s, g: (s / k).astype(jnp.asarray(g).dtype), summed, grads)
        emit = state.mini_step >= k - 1
        updates, inner_state = _update_or_skip(emit, opt.update, mean, state.inner_state,
                                               params)
        return updates, MultiStepsState(
            mini_step=jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32),
            gradient_step=jnp.where(emit, safe_increment(state.gradient_step),
                                    state.gradient_step).astype(jnp.int32),
            inner_state=inner_state,
            acc_grads=jax.tree.map(lambda s: jnp.where(emit, jnp.zeros_like(s), s), summed))

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- apply_if_finite


class ApplyIfFiniteState(NamedTuple):
    """State of ``apply_if_finite``.

    ``notfinite_count``: consecutive steps with a non-finite gradient (0 after a finite
    one); ``last_finite``: whether the last step's gradients were all finite;
    ``total_notfinite``: all non-finite steps so far; ``inner_state``: the inner state.
    """

    notfinite_count: Array
    last_finite: Array
    total_notfinite: Array
    inner_state: OptState


@checked
def apply_if_finite(opt: Optimizer, max_consecutive_errors: Annotated[int, Int(low=0)]
                    ) -> Optimizer:
    """Skip the steps whose gradients hold an inf or a NaN.

    On such a step the updates are zero and ``opt``'s state is returned bitwise
    unchanged, so the params and the optimizer stay exactly where they were (a loss
    scale that overflowed, one bad batch). After more than ``max_consecutive_errors``
    non-finite steps in a row the update is applied anyway, so a run that keeps
    producing NaNs fails visibly instead of silently standing still. One finite step
    resets the count. In ``fit``, whose guard stops at a non-finite step, the train step's
    own ``make_train_step(..., skip_nonfinite=True)`` does this (and counts the skips).

    Args:
      opt: the optimizer to guard.
      max_consecutive_errors: how many non-finite steps in a row are skipped, an int >= 0.

    Returns:
      An ``Optimizer`` whose state is an ``ApplyIfFiniteState``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> from funtrain.optim.wrappers import apply_if_finite
      >>> params = {"w": jnp.ones(2)}
      >>> opt = apply_if_finite(optim.sgd(0.1), max_consecutive_errors=5)
      >>> u, state = opt.update({"w": jnp.array([1.0, jnp.nan])}, opt.init_state(params),
      ...                       params)
      >>> u["w"], bool(state.last_finite), int(state.notfinite_count)
      (Array([0., 0.], dtype=float32), False, 1)
    """
    def init_state(params: Params) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(
            notfinite_count=jnp.zeros((), jnp.int32),
            last_finite=jnp.array(True),
            total_notfinite=jnp.zeros((), jnp.int32),
            inner_state=opt.init(params))

    def update(grads: Grads, state: ApplyIfFiniteState, params: Params | None = None
               ) -> tuple[Updates, ApplyIfFiniteState]:
        finite = all_finite(grads)
        notfinite_count = jnp.where(finite, 0, safe_increment(state.notfinite_count))
        apply = finite | (notfinite_count > max_consecutive_errors)
        updates, inner_state = _update_or_skip(apply, opt.update, grads, state.inner_state,
                                               params)
        return updates, ApplyIfFiniteState(
            notfinite_count=notfinite_count.astype(jnp.int32),
            last_finite=finite,
            total_notfinite=jnp.where(finite, state.total_notfinite,
                                      safe_increment(state.total_notfinite)).astype(jnp.int32),
            inner_state=inner_state)

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- inject_hyperparams


class InjectHyperparamsState(NamedTuple):
    """State of an optimizer built by ``inject_hyperparams``.

    ``count``: updates so far (the step at which schedules are evaluated);
    ``hyperparams``: a dict ``name -> scalar array`` of the numeric and scheduled
    hyperparameters, as used by the last update (or by the first, before any);
    ``inner_state``: the state of the optimizer the factory builds.
    """

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    hyperparams: dict[str, Array]
    inner_state: OptState


def _is_numeric(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    return (hasattr(value, "shape") and hasattr(value, "dtype") and np.ndim(value) == 0
            and (jnp.issubdtype(value.dtype, jnp.integer)
                 or jnp.issubdtype(value.dtype, jnp.floating)))


def _as_hyperparam(value: Any) -> Array:
    """A Python or NumPy number as ``jnp.asarray(float(value))``; a JAX array as it is.

    ``jnp.asarray(0.01)`` is a *weak-typed* scalar of the default float dtype
    (float32 unless x64 is on). Storing numbers that way means a user who writes
    ``jnp.asarray(new_value)`` into the state hands the jitted step the very same
    abstract value, so nothing recompiles; a weak-typed scalar also promotes like the
    Python float the factory was written for.
    """
    if isinstance(value, jax.Array):
        return value
    return jnp.asarray(float(value))


def _as_scheduled(value: Any) -> Array:
    # The same dtype at init (eager) and in update (traced): the default float dtype.
    return jnp.asarray(value).astype(jnp.result_type(float))


def injected_hyperparams(opt_state: Any) -> dict[str, Array]:
    """The hyperparameters (``name -> scalar``) that the ``inject_hyperparams`` optimizer
    inside ``opt_state`` used in its last update; ``{}`` when there is none, or more than
    one (whose would be ambiguous). ``make_train_step`` reports the learning rate from it."""
    def found(s: Any) -> bool:
        return isinstance(s, InjectHyperparamsState)

    states = [s for s in jax.tree.leaves(opt_state, is_leaf=found) if found(s)]
    return dict(states[0].hyperparams) if len(states) == 1 else {}


def inject_hyperparams(factory: Callable[..., Optimizer], static_args: Iterable[str] = ()
                       ) -> Callable[..., Optimizer]:
    """Move an optimizer factory's numeric hyperparameters into the optimizer state.

    ``inject_hyperparams(sgd)(learning_rate=0.1, momentum=0.9)`` builds an optimizer
    whose state is ``InjectHyperparamsState(count, hyperparams, inner_state)``, with
    ``hyperparams == {"learning_rate": 0.1, "momentum": 0.9}`` as scalar arrays. The
    hyperparameters are then ordinary inputs of a jitted step: log them from
    ``state.hyperparams``, or change them between steps without recompiling::

        state = state._replace(hyperparams={**state.hyperparams,
                                            "learning_rate": jnp.asarray(0.01)})

    Which argument goes where:

    - numbers (int or float, not bool) are stored as ``jnp.asarray(float(value))``, a
      weak-typed scalar of the default float dtype (float32 unless x64 is on): write
      new values with ``jnp.asarray(value)`` to keep the compiled signature. JAX
      scalars are stored as they are;
    - callables other than classes are schedules ``step -> value`` (a dtype such as
      ``jnp.bfloat16`` is a class, so ``mu_dtype=jnp.bfloat16`` stays static), evaluated
      at this wrapper's own count on every update; the value used is stored in
      ``hyperparams`` (in the default float dtype). Writing over it has no effect: the
      next update evaluates the schedule again;
    - bools, strings, other objects, and every name in ``static_args`` stay static
      (baked into the compiled step). Pass callables that are not schedules, and ints the
      factory needs as Python ints, in ``static_args``;
    - arguments left at their defaults are not injected.

    Each update rebuilds the optimizer as ``factory(**static, **hyperparams)`` with the
    current arrays and runs its update on ``inner_state``. The factory is also called
    once with the original values, so its validation runs at construction. It must
    accept arrays for the injected arguments (funtrain's factories skip the range checks
    for arrays) and build a state of the same structure whatever their values.

    Args:
      factory: a function returning an ``Optimizer``, such as ``sgd``.
      static_args: names of arguments to keep static even if numeric or callable.

    Returns:
      A function with the factory's arguments that returns an ``Optimizer`` whose state
      is an ``InjectHyperparamsState``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> from funtrain.optim.wrappers import inject_hyperparams
      >>> opt = inject_hyperparams(optim.sgd)(learning_rate=0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init_state(params)
      >>> state.hyperparams["learning_rate"]
      Array(0.1, dtype=float32, weak_type=True)
      >>> state = state._replace(hyperparams={"learning_rate": jnp.asarray(0.5)})
      >>> opt.update({"w": jnp.ones(2)}, state, params)[0]["w"]
      Array([-0.5, -0.5], dtype=float32)
    """
    where = "inject_hyperparams"
    if not callable(factory):
        raise TypeError(f"{where}: factory must be a callable returning an Optimizer, got "
                        f"{type(factory).__name__}")
    fname = getattr(factory, "__name__", type(factory).__name__)
    if isinstance(static_args, str):
        raise TypeError(f"{where}({fname}): static_args must be a tuple of argument names, "
                        f"got the str {static_args!r}; write ({static_args!r},)")
    static_names = tuple(static_args)
    for name in static_names:
        if not isinstance(name, str):
            raise TypeError(f"{where}({fname}): static_args must hold argument names (str), "
                            f"got {type(name).__name__} ({name!r})")
    try:
        sig: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C callables have none
        sig = None
    if sig is not None:
        kinds = {p.kind for p in sig.parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            unknown = [n for n in static_names if n not in sig.parameters]
            if unknown:
                raise ValueError(f"{where}({fname}): static_args names {unknown} that "
                                 f"{fname} does not take; it takes {list(sig.parameters)}")

    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> Optimizer:
        factory(*args, **kwargs)  # validate the hyperparameters now, with their own messages
        if sig is not None:
            try:
                named = _named_arguments(sig, sig.bind(*args, **kwargs))
            except TypeError as e:
                raise TypeError(f"{where}({fname}): {e}") from None
        else:
            named = dict(kwargs)
        numeric = {n: v for n, v in named.items()
                   if n not in static_names and not callable(v) and _is_numeric(v)}
        schedules = {n: v for n, v in named.items() if n not in static_names and callable(v)
                     and not isinstance(v, type)}
        for n, fn in schedules.items():
            _check_injected_schedule(f"{where}({fname})", n, fn)
        names = sorted([*numeric, *schedules])

        def build(hyperparams: dict[str, Any]) -> Optimizer:
            if sig is None:
                return factory(*args, **{**kwargs, **hyperparams})
            bound = sig.bind(*args, **kwargs)
            var_kw = next((p.name for p in sig.parameters.values()
                           if p.kind is inspect.Parameter.VAR_KEYWORD), None)
            if var_kw is not None:
                bound.arguments[var_kw] = dict(bound.arguments.get(var_kw, {}))
            for n, v in hyperparams.items():
                if n in sig.parameters and sig.parameters[n].kind is not (
                        inspect.Parameter.VAR_KEYWORD):
                    bound.arguments[n] = v
                else:
                    assert var_kw is not None  # checked when the names were bound
                    bound.arguments[var_kw][n] = v
            return factory(*bound.args, **bound.kwargs)

        def current(count: Array, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
            out = {n: hyperparams[n] for n in numeric}
            out.update({n: _as_scheduled(fn(count)) for n, fn in schedules.items()})
            return out

        for n in [n for n, v in numeric.items() if isinstance(v, (int, np.integer))]:
            try:  # injected numbers become float arrays, which an int setting refuses
                build({**numeric, n: _as_hyperparam(numeric[n])})
            except IntArgumentError as e:
                raise IntArgumentError(f"{e}; inject_hyperparams injects numbers as float "
                                       f"arrays: pass static_args=({n!r},) to keep {n} an "
                                       f"int") from None

        def init_state(params: Params) -> InjectHyperparamsState:
            count = jnp.zeros((), jnp.int32)
            hp = current(count, {n: _as_hyperparam(v) for n, v in numeric.items()})
            return InjectHyperparamsState(count=count, hyperparams=hp,
                                          inner_state=build(hp).init(params))

        def update(grads: Grads, state: InjectHyperparamsState, params: Params | None = None
                   ) -> tuple[Updates, InjectHyperparamsState]:
            got = state.hyperparams
            if not isinstance(got, Mapping) or sorted(got) != names:
                have = sorted(got) if isinstance(got, Mapping) else type(got).__name__
                raise ValueError(f"{where}({fname}): state.hyperparams has the keys {have}, "
                                 f"expected {names}; replace values, don't add or drop keys")
            hp = current(state.count, got)
            updates, inner_state = build(hp).update(grads, state.inner_state, params)
            return updates, InjectHyperparamsState(count=safe_increment(state.count),
                                                   hyperparams=hp, inner_state=inner_state)

        return Optimizer(init_state, update)

    return wrapped


def _check_injected_schedule(where: str, name: str, fn: Callable[[Any], Any]) -> None:
    """An injected callable is a schedule ``count -> real scalar`` (``check_schedule``). A
    mask or label function would be called with the count: it belongs in ``static_args``."""
    try:
        check_schedule(fn, where, name, low=None)
    except (TypeError, ValueError) as e:
        message = str(e)
    except Exception as e:  # noqa: BLE001 - whatever calling it raised, it is no schedule
        message = (f"{where}: {name} is a schedule, but calling it with count 0 raised "
                   f"{type(e).__name__}: {e}")
    else:
        return
    raise TypeError(f"{message}; if {name} is not a schedule, pass static_args=({name!r},)")


def _named_arguments(sig: inspect.Signature, bound: inspect.BoundArguments) -> dict[str, Any]:
    """The arguments given by name or position, with ``**kwargs`` spread; ``*args`` left out."""
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


# --------------------------------------------------------------------------- ema


class EmaState(NamedTuple):
    """``inner``: the wrapped optimizer's state; ``ema``: the average of the params."""

    inner: OptState
    ema: Params


@checked
def ema(opt: Optimizer, decay: float = 0.999) -> Optimizer:
    r"""Keep an exponential moving average of the params in the optimizer state.

    After each update, with :math:`p_t` the params it produces,

    .. math:: e_t = \delta\, e_{t-1} + (1 - \delta)\, p_t, \qquad e_0 = p_0,

    the update rule of ``torch.optim.swa_utils.get_ema_multi_avg_fn`` (no bias
    correction; optax's ``ema`` averages updates instead). It starts from the params the
    state was made from; torch's ``AveragedModel`` starts from the first updated params
    (:math:`e_1 = p_1`), so the two differ by :math:`\delta^t (p_1 - p_0)`. The average
    is kept in float32 at least, checkpoints and shards with the state, and leaves the
    updates unchanged. Evaluate on it with ``fit(eval_params=optim.ema_params)``. With
    gradient accumulation, ``multi_steps(ema(opt), k)`` averages once per real step, as
    torch does after each ``optimizer.step()``; ``ema(multi_steps(opt, k))`` averages at
    every micro-step (a decay of :math:`\delta^k` per real step).

    Args:
      opt: the optimizer whose params to average.
      decay: :math:`\delta` in ``[0, 1)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> opt = ema(optim.sgd(1.0), decay=0.5)
      >>> params = {"w": jnp.zeros(())}
      >>> _, state = opt.update({"w": jnp.ones(())}, opt.init(params), params)
      >>> float(ema_params(state)["w"])  # 0.5 * 0 + 0.5 * (0 - 1)
      -0.5
    """
    where = "ema"
    if isinstance(decay, (np.generic, np.ndarray)) and np.ndim(decay) == 0:
        decay = decay.item()  # a NumPy scalar is a number (check_scalar does the same)
    if not is_traced_or_array(decay) and (  # an array: injected (inject_hyperparams)
            isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating))
            or not 0.0 <= float(decay) < 1.0):
        raise ValueError(f"{where}: decay must be a float in [0, 1), got {decay!r}")

    def init_state(params: Params) -> EmaState:
        average = jax.tree.map(
            lambda p: jnp.array(p, jnp.promote_types(jnp.asarray(p).dtype, jnp.float32)),
            params)
        return EmaState(opt.init(params), average)

    def update(grads: Grads, state: EmaState, params: Params | None = None
               ) -> tuple[Updates, EmaState]:
        params = _need_params(where, params)
        updates, inner = opt.update(grads, state.inner, params)
        new = apply_updates(params, updates)
        average = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype),
                               state.ema, new)
        return updates, EmaState(inner, average)

    return Optimizer(init_state, update)


def ema_params(state: Any) -> Params:
    """The averaged params of the one ``ema`` in ``state``: an optimizer state, or a whole
    ``TrainState`` (then cast to its params' dtypes), so ``fit(eval_params=ema_params)``.

    An ``ema`` inside ``masked`` or ``partition`` averages its leaves only; from a
    ``TrainState`` the others are its params as they are.
    """
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, EmaState))
             if isinstance(s, EmaState)]
    if len(found) != 1:
        raise ValueError(f"ema_params: expected the state of one optim.ema optimizer, "
                         f"found {len(found)}")
    params, ema = getattr(state, "params", None), found[0].ema
    masked = lambda x: isinstance(x, MaskedNode)  # noqa: E731 - a leaf the ema does not see
    if params is None:
        if any(map(masked, jax.tree.leaves(ema, is_leaf=masked))):
            raise ValueError("ema_params: this ema averages some leaves only (it sits in "
                             "masked or partition); pass the TrainState, whose params fill "
                             "in the others")
        return ema
    return jax.tree.map(lambda e, p: p if masked(e) else e.astype(p.dtype), ema, params,
                        is_leaf=masked)
