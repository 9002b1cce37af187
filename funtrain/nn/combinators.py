"""Combinators: build bigger modules from smaller ones.

``serial`` chains layers, ``residual`` adds a skip connection, ``parallel`` runs
branches side by side. Each child's params live under its name (given, or its
kind numbered in order: ``dense_0``, ``dense_1``); layers without params take no
entry. Errors raised in a child carry its key path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from funtrain._typing import Params, PRNGKey
from funtrain.nn.module import Module, ModuleError, _check_name, call_in_scope


def _child_names(where: str, modules: Sequence[Any]) -> list[str]:
    """Check the children are Modules and give each a unique key."""
    if not modules:
        raise ValueError(f"{where}: needs at least one module")
    for i, m in enumerate(modules):
        if not isinstance(m, Module):
            hint = ""
            if callable(m) and getattr(m, "__module__", "").startswith("funtrain.nn"):
                hint = f"; did you mean {getattr(m, '__name__', 'layer')}()?"
            raise TypeError(f"{where}: child {i} is {m!r}, expected a Module{hint}")
    counts: Counter[str] = Counter()
    names = []
    for m in modules:
        if m.name is not None:
            names.append(m.name)
        else:
            names.append(f"{m.kind}_{counts[m.kind]}")
            counts[m.kind] += 1
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(f"{where}: two children share the name(s) {dupes}; give each a "
                         f"unique name=")
    return names


def _split(key: PRNGKey | None, n: int) -> list[PRNGKey | None]:
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def _is_empty(params: Any) -> bool:
    return params is None or (isinstance(params, dict) and not params)


def _as_args(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


def _check_extra_keys(kind: str, params: Any, names: Sequence[str]) -> None:
    if not isinstance(params, dict):
        raise ModuleError(kind, f"params must be a dict keyed by child name, got "
                          f"{type(params).__name__}")
    extra = sorted(set(params) - set(names))
    if extra:
        raise ModuleError(kind, "params do not match the model: unexpected key path(s) "
                          + ", ".join(f"'{{at}}{k}'" for k in extra)
                          + f" (children are {list(names)})")


def _shape_of(apply: Callable[..., Any], params: Params, *xs: Any) -> Any:
    """Output shapes of ``apply`` without running it."""
    return jax.eval_shape(lambda p, *a: apply(p, *a), params, *xs)


def serial(*modules: Module, name: str | None = None, checkpoint: str | int | None = None
           ) -> Module:
    """Chain modules: the output of each feeds the next (a tuple is passed as several args).

    ``checkpoint="sqrt"`` (or an int k) is the seed chapter's gradient checkpointing: the
    layers are cut into segments of ``ceil(sqrt(n))`` (or k) layers, only each segment's
    input is kept in the forward pass, and the segment is recomputed during the backward
    pass (``remat.tied_remat``), so activation memory falls from O(n) to O(sqrt(n)).
    Params are the same with or without it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> model = nn.serial(nn.dense(8), nn.relu(), nn.dense(2, name="head"))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> sorted(params)
      ['dense_0', 'head']
    """
    kind = "serial"
    names = _child_names(kind, modules)
    if name is not None:
        _check_name(name, kind)

    def init(key: PRNGKey, *xs: Any) -> Params:
        params: dict[str, Any] = {}
        for k, child, cname in zip(_split(key, len(modules)), modules, names, strict=True):
            p = call_in_scope(cname, child.init, k, *xs)
            if not _is_empty(p):
                params[cname] = p
            xs = _as_args(call_in_scope(cname, _shape_of, child.apply, p, *xs))
        return params

    seg = None
    if checkpoint is not None:
        from funtrain.remat import segment_size

        seg = segment_size(len(modules), checkpoint)

    def run(params: Params, xs: Any, keys: list[Any], idx: range, train: bool) -> Any:
        out: Any = xs
        for i, k in zip(idx, keys, strict=True):
            out = call_in_scope(names[i], modules[i].apply, params.get(names[i], {}),
                                *_as_args(out), key=k, train=train)
        return out

    def apply(params: Params, *xs: Any, key: PRNGKey | None = None, train: bool = False) -> Any:
        _check_extra_keys(kind, params, names)
        keys = _split(key, len(modules))
        if seg is None:
            return run(params, xs, keys, range(len(modules)), train)
        from funtrain.remat import tied_remat

        out: Any = xs
        for start in range(0, len(modules), seg):
            idx = range(start, min(start + seg, len(modules)))
            sub = {names[i]: params[names[i]] for i in idx if names[i] in params}
            fn = tied_remat(lambda p, x, k, idx=idx: run(p, x, k, idx, train))
            out = fn(sub, _as_args(out), [keys[i] for i in idx])
        return out

    return Module(init, apply, name, kind)


def residual(*modules: Module, name: str | None = None) -> Module:
    """Skip connection around a chain: ``x + serial(*modules)(x)``.

    The chain must keep the input's shape; ``init`` checks it. Params are those of
    the inner chain (``{"dense_0": ..., "dense_1": ...}``).
    """
    kind = "residual"
    body = serial(*modules)
    if name is not None:
        _check_name(name, kind)

    def init(key: PRNGKey, x: Any) -> Params:
        params = body.init(key, x)
        out = _shape_of(body.apply, params, x)
        if not hasattr(out, "shape") or tuple(out.shape) != tuple(x.shape):
            got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            raise ModuleError(kind, f"the body maps an input of shape {tuple(x.shape)} to "
                              f"{got}; a residual needs them equal")
        return params

    def apply(params: Params, x: Any, *, key: PRNGKey | None = None, train: bool = False) -> Any:
        y = body.apply(params, x, key=key, train=train)
        if y.shape != x.shape:
            raise ModuleError(kind, f"the body maps an input of shape {tuple(x.shape)} to "
                              f"{tuple(y.shape)}; a residual needs them equal")
        return x + y

    return Module(init, apply, name, kind)


_COMBINE: dict[str, Callable[[tuple[Any, ...]], Any]] = {
    "sum": lambda outs: sum(outs[1:], outs[0]),
    "concat": lambda outs: jnp.concatenate(outs, axis=-1),
}


def parallel(*modules: Module, combine: str | Callable[[tuple[Any, ...]], Any] | None = None,
             name: str | None = None) -> Module:
    """Run every module on the same inputs.

    Args:
      modules: the branches.
      combine: ``None`` returns a tuple of outputs; ``"sum"`` adds them; ``"concat"``
        joins them on the last axis; a callable receives the tuple.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> block = nn.parallel(nn.dense(3), nn.dense(5), combine="concat")
      >>> params = block.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> block.apply(params, jnp.ones((2, 4))).shape
      (2, 8)
    """
    kind = "parallel"
    names = _child_names(kind, modules)
    if name is not None:
        _check_name(name, kind)
    if isinstance(combine, str):
        if combine not in _COMBINE:
            raise ValueError(f"parallel: combine must be None, 'sum', 'concat' or a callable, "
                             f"got {combine!r}")
        combine_fn: Callable[[tuple[Any, ...]], Any] | None = _COMBINE[combine]
    else:
        combine_fn = combine

    def finish(outs: tuple[Any, ...]) -> Any:
        return outs if combine_fn is None else combine_fn(outs)

    def init(key: PRNGKey, *xs: Any) -> Params:
        params = {}
        for k, child, cname in zip(_split(key, len(modules)), modules, names, strict=True):
            p = call_in_scope(cname, child.init, k, *xs)
            if not _is_empty(p):
                params[cname] = p
        # Check the branches can be combined, before any real data flows.
        jax.eval_shape(lambda p, *a: apply(p, *a), params, *xs)
        return params

    def apply(params: Params, *xs: Any, key: PRNGKey | None = None, train: bool = False) -> Any:
        _check_extra_keys(kind, params, names)
        outs = tuple(
            call_in_scope(cname, child.apply, params.get(cname, {}), *xs, key=k, train=train)
            for k, child, cname in zip(_split(key, len(modules)), modules, names, strict=True)
        )
        try:
            return finish(outs)
        except (TypeError, ValueError) as err:
            shapes = [tuple(getattr(o, "shape", ())) for o in outs]
            raise ModuleError(kind, f"cannot combine branch outputs of shapes {shapes}: "
                              f"{err}") from err

    return Module(init, apply, name, kind)
