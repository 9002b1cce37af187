"""The ``Module`` type: a model is a pair of pure functions, ``init`` and ``apply``.

``init(key, *example_inputs) -> params`` finds every shape from the example inputs
(arrays or ``jax.ShapeDtypeStruct``), so the batch size is never baked in.
``apply(params, *inputs, key=None, train=False) -> outputs`` is a pure function of
its arguments, so it composes with ``jax.jit``, ``jax.grad``, ``jax.vmap`` and
``jax.checkpoint``.

Errors raised inside a layer carry the key path of that layer (``"block_0/dense_1"``);
combinators add their child's key as the error travels up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

from funtrain._typing import Params, PRNGKey


class InitFn(Protocol):
    def __call__(self, key: PRNGKey, *example_inputs: Any) -> Params: ...


class ApplyFn(Protocol):
    def __call__(
        self, params: Params, *inputs: Any, key: PRNGKey | None = None, train: bool = False
    ) -> Any: ...


class Module(NamedTuple):
    """A model or layer: two pure functions plus the name its parent files it under.

    Attributes:
      init: ``init(key, *example_inputs) -> params``.
      apply: ``apply(params, *inputs, key=None, train=False) -> outputs``.
      name: the key under which a combinator stores this module's params. ``None``
        lets the combinator number it by kind (``dense_0``, ``dense_1`` ...).
      kind: the layer type (``"dense"``), used for automatic names and in messages.

    Example:
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


def check_params(params: Any, expected: Iterable[str], kind: str) -> None:
    """Check that a leaf layer's params dict has exactly the ``expected`` keys."""
    expected = sorted(expected)
    if not isinstance(params, dict):
        raise ModuleTypeError(kind, f"params must be a dict with keys {expected}, got "
                              f"{type(params).__name__}")
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
