"""The ``Module`` type: a model is a pair of pure functions, ``init`` and ``apply``.

``init(key, *example_inputs) -> params`` finds every shape from the example inputs
(arrays or ``jax.ShapeDtypeStruct``), so the batch size is never baked in.
``apply(params, *inputs, key=None, train=False) -> outputs`` is a pure function of
its arguments, so it composes with ``jax.jit``, ``jax.grad``, ``jax.vmap`` and
``jax.checkpoint``.

A module with *model state* (``stateful=True``: BatchNorm's running statistics, counters)
keeps the same two functions, with the state beside the params, explicit and a pytree:
``init(key, *xs) -> (params, state)`` and
``apply(params, *xs, state=state, key=None, train=False) -> (outputs, new_state)``.
In train mode the new state holds the updated statistics; in eval mode it is the state
that came in. Stateless modules are unchanged and pay nothing.

Errors raised inside a layer carry the key path of that layer (``"block_0/dense_1"``);
combinators add their child's key as the error travels up.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from funtrain._typing import Params, PRNGKey

# ``init(key, *example_inputs) -> params`` and ``apply(params, *inputs, key=None,
# train=False, [state=...]) -> outputs``: the Module docstring gives the full contract
# (stateful modules add ``state=`` and return ``(outputs, state)``, and layers may take
# extra inputs such as a mask), which a Protocol cannot state once for all of them.
InitFn = Callable[..., Any]
ApplyFn = Callable[..., Any]


class Module(NamedTuple):
    """A model or layer: two pure functions plus the name its parent files it under.

    Attributes:
      init: ``init(key, *example_inputs) -> params`` (``-> (params, state)`` if stateful).
      apply: ``apply(params, *inputs, key=None, train=False) -> outputs``; if stateful,
        ``apply(params, *inputs, state=..., key=None, train=False) -> (outputs, state)``.
      name: the key under which a combinator stores this module's params. ``None``
        lets the combinator number it by kind (``dense_0``, ``dense_1`` ...).
      kind: the layer type (``"dense"``), used for automatic names and in messages.
      stateful: whether the module carries model state (see the module docstring). A
        combinator with a stateful child is stateful itself.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> model = nn.serial(nn.dense(4), nn.relu(), nn.dense(2))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 3)))
      >>> sorted(params)
      ['dense_0', 'dense_1']
      >>> model.apply(params, jnp.ones((5, 3))).shape
      (5, 2)
    """

    init: InitFn
    apply: ApplyFn
    name: str | None = None
    kind: str = "module"
    stateful: bool = False


def named(module: Module, name: str) -> Module:
    """Return ``module`` filed under ``name`` in its parent's params."""
    _check_name(name, "named")
    return module._replace(name=name)


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{where}: a layer name must be a non-empty string without '/', "
                         f"got {name!r}")


class _PathError(Exception):
    """Mixin: an error raised inside a layer, rendered with the layer's key path.

    ``detail`` may contain ``{here}`` (the layer's key path) and ``{at}`` (the key
    path followed by ``/``, or nothing at the root), filled in when printed.
    """

    def __init__(self, kind: str, detail: str, path: Iterable[str] = ()):
        self.kind = kind
        self.detail = detail
        self.path = list(path)
        super().__init__(kind, detail)

    def __str__(self) -> str:
        here = "/".join(self.path)
        detail = self.detail.replace("{here}", here or "<root>").replace(
            "{at}", f"{here}/" if here else "")
        where = f"'{here}'" if here else "(at the root)"
        return f"{self.kind} layer {where}: {detail}"


class ModuleError(_PathError, ValueError):
    """A shape or params-structure mistake inside a layer; names the layer's key path."""


class ModuleTypeError(_PathError, TypeError):
    """A wrong input type inside a layer (e.g. floats fed to ``embed``)."""


def call_in_scope(scope: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and prefix ``scope`` to the key path of any layer error it raises."""
    try:
        return fn(*args, **kwargs)
    except _PathError as err:
        err.path.insert(0, scope)
        raise


# ----------------------------------------------------------------------------- model state


def init_with_state(module: Module, key: PRNGKey, *xs: Any) -> tuple[Params, Any]:
    """``(params, state)`` of any module; ``state`` is ``None`` for a stateless one."""
    out = module.init(key, *xs)
    if not module.stateful:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ModuleError(module.kind, f"a stateful module's init must return (params, "
                          f"state), got {type(out).__name__}")
    return out


def apply_with_state(module: Module, params: Params, *xs: Any, state: Any = None,
                     key: PRNGKey | None = None, train: bool = False) -> tuple[Any, Any]:
    """``(outputs, new_state)`` of any module; ``new_state`` is ``None`` for a stateless one."""
    if not module.stateful:
        return module.apply(params, *xs, key=key, train=train), None
    return module.apply(params, *xs, state=state, key=key, train=train)


def check_state(state: Any, kind: str) -> None:
    """A stateful layer's first check: its state was passed at all."""
    if state is None:
        raise ModuleError(kind, "this layer has model state (e.g. BatchNorm's running "
                          "statistics) but none was passed: create it with "
                          "`params, state = model.init(key, x)`, call "
                          "`y, state = model.apply(params, x, state=state, train=...)`, and "
                          "give TrainState.create(..., model_state=state) for training")


def check_statistics(model_state: Any, where: str) -> None:
    """Raise if a BatchNorm state (a dict with ``count``, ``mean``, ``var``) was never
    updated in train mode; called on the host, once per state, by eval entry points."""
    found: list[tuple[str, Any]] = []

    def walk(path: tuple[str, ...], node: Any) -> None:
        if isinstance(node, dict):
            if {"count", "mean", "var"} <= set(node):
                found.append(("/".join(path) or "<root>", node["count"]))
                return
            for k, v in node.items():
                walk((*path, str(k)), v)

    walk((), model_state)
    if not found:
        return
    counts = jax.device_get([c for _, c in found])
    bad = [p for (p, _), c in zip(found, counts, strict=True) if np.any(np.asarray(c) == 0)]
    if bad:
        raise ValueError(f"{where}: eval mode before any statistics exist: the BatchNorm "
                         f"state at {', '.join(repr(b) for b in bad)} has never been updated "
                         f"(count 0). Train first (train=True updates the running mean and "
                         f"variance), or load trained statistics")


def check_eval_state(state: Any, train: bool, where: str) -> None:
    """Eager eval-mode check for wrappers whose tracing (``jax.checkpoint``, ``lax.scan``)
    would hide the count from ``batch_norm``; traced calls are checked by the eval step."""
    if train or state is None:
        return
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(state)):
        return
    check_statistics(state, where)


# The summary records each child's output while tracing a model (summary.py); it is off
# otherwise, and never touches values.
_RECORD: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("_RECORD",
                                                                           default=None)
_SCOPE: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("_SCOPE", default=())
# While with_policy applies a model with overrides (policy.py): casts a child's inputs to
# the compute dtype of its key path (the scope tuple).
_CAST_INPUTS: contextvars.ContextVar[Callable[[tuple[str, ...], tuple[Any, ...]],
                                              tuple[Any, ...]] | None] = \
    contextvars.ContextVar("_CAST_INPUTS", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[Any]]:
    """Collect ``(key_path, kind, outputs)`` for every child a combinator runs.

    Only for tracing an ``apply`` (``nn.summary``): combinators' ``init`` also runs
    children to find shapes, so tracing an ``init`` inside would add stray rows.
    """
    rows: list[Any] = []
    token = _RECORD.set(rows)
    try:
        yield rows
    finally:
        _RECORD.reset(token)


def run_child(scope: str, module: Module, params: Params, xs: tuple[Any, ...], *,
              state: Any = None, key: PRNGKey | None = None, train: bool = False
              ) -> tuple[Any, Any]:
    """A combinator's call of one child: errors carry ``scope``; returns ``(out, state)``."""
    rows, cast = _RECORD.get(), _CAST_INPUTS.get()
    if rows is None and cast is None:
        return call_in_scope(scope, apply_with_state, module, params, *xs, state=state,
                             key=key, train=train)
    path = (*_SCOPE.get(), scope)
    if cast is not None:
        xs = cast(path, xs)
    row = [path, module.kind, None]
    if rows is not None:
        rows.append(row)
    token = _SCOPE.set(path)
    try:
        out = call_in_scope(scope, apply_with_state, module, params, *xs, state=state,
                            key=key, train=train)
    finally:
        _SCOPE.reset(token)
    row[2] = out[0]
    return out


def type_of_params(params: Any) -> str:
    """The type name for a params error; fused params get told how to unpack them."""
    hint = " (fused params: pass params.unflatten())" if hasattr(params, "unflatten") else ""
    return type(params).__name__ + hint


def check_params(params: Any, expected: Iterable[str], kind: str) -> None:
    """Check that a leaf layer's params dict has exactly the ``expected`` keys."""
    expected = sorted(expected)
    if not isinstance(params, dict):
        raise ModuleTypeError(kind, f"params must be a dict with keys {expected}, got "
                              f"{type_of_params(params)}")
    if not params and expected:
        raise ModuleError(kind, f"params have no entry for this layer: missing key path "
                          f"'{{here}}' (expected keys {expected})")
    missing = [k for k in expected if k not in params]
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        msg = []
        if missing:
            msg.append("missing key path(s) " + ", ".join(f"'{{at}}{k}'" for k in missing))
        if extra:
            msg.append("unexpected key path(s) " + ", ".join(f"'{{at}}{k}'" for k in extra))
        raise ModuleError(kind, "params do not match the layer: " + "; ".join(msg))


def check_param_shape(params: dict, key: str, shape: tuple[int, ...], kind: str) -> None:
    """Check one param's shape, naming its key path on mismatch."""
    actual = tuple(params[key].shape)
    if actual != tuple(shape):
        raise ModuleError(kind, f"param '{{at}}{key}' has shape {actual}, expected "
                          f"{tuple(shape)} for this input")


def check_rank(x: Any, ranks: Iterable[int] | None, kind: str, what: str,
               min_rank: int | None = None) -> None:
    """Check an input's rank (``ranks`` allowed exactly, or at least ``min_rank``)."""
    shape = tuple(getattr(x, "shape", ()))
    if ranks is not None and len(shape) not in tuple(ranks):
        raise ModuleError(kind, f"expected {what}, got input of shape {shape} "
                          f"(rank {len(shape)})")
    if min_rank is not None and len(shape) < min_rank:
        raise ModuleError(kind, f"expected {what}, got input of shape {shape} "
                          f"(rank {len(shape)})")
