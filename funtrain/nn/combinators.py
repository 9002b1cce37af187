"""Combinators: build bigger modules from smaller ones.

``serial`` chains layers, ``residual`` adds a skip connection, ``parallel`` runs
branches side by side. Each child's params live under its name (given, or its
kind numbered in order: ``dense_0``, ``dense_1``); layers without params take no
entry. Errors raised in a child carry its key path.

A combinator with a stateful child (``batch_norm``) is stateful: its state is a dict
keyed like its params, holding only the stateful children's states, and it threads the
state through the children in order (see ``nn.module``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from funtrain._typing import Params, PRNGKey
from funtrain.nn._remat import segment_size, tied_remat
from funtrain.nn.module import (
    Module,
    ModuleError,
    _check_name,
    apply_with_state,
    call_in_scope,
    check_eval_state,
    check_state,
    init_with_state,
    run_child,
    type_of_params,
)


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


def _check_extra_keys(kind: str, params: Any, names: Sequence[str], what: str = "params"
                      ) -> None:
    if not isinstance(params, dict):
        raise ModuleError(kind, f"{what} must be a dict keyed by child name, got "
                          f"{type_of_params(params)}")
    extra = sorted(set(params) - set(names))
    if extra:
        verb = "does" if what == "model state" else "do"
        raise ModuleError(kind, f"{what} {verb} not match the model: unexpected key path(s) "
                          + ", ".join(f"'{{at}}{k}'" for k in extra)
                          + (f" (children with model state are {list(names)})"
                             if what == "model state" else f" (the children are {list(names)})"))


def _check_model_state(kind: str, state: Any, modules: Sequence[Module],
                       names: Sequence[str]) -> None:
    """A stateful combinator's state: a dict with exactly its stateful children's keys."""
    check_state(state, kind)
    expected = [n for m, n in zip(modules, names, strict=True) if m.stateful]
    _check_extra_keys(kind, state, expected, "model state")
    missing = [n for n in expected if n not in state]
    if missing:
        raise ModuleError(kind, "model state does not match the model: missing key path(s) "
                          + ", ".join(f"'{{at}}{k}'" for k in missing)
                          + " (was it made by another model?)")


def _out_shape(module: Module, params: Params, state: Any, *xs: Any) -> Any:
    """Output shapes of ``module`` (eval mode) without running it."""
    return jax.eval_shape(lambda p, s, *a: apply_with_state(module, p, *a, state=s)[0],
                          params, state, *xs)


def _init_child(cname: str, child: Module, key: PRNGKey | None, xs: tuple[Any, ...],
                params: dict[str, Any], state: dict[str, Any]) -> Any:
    """Init one child into ``params``/``state`` under ``cname``; return its output shapes."""
    p, s = call_in_scope(cname, init_with_state, child, key, *xs)
    if not _is_empty(p):
        params[cname] = p
    if child.stateful:
        state[cname] = s
    return call_in_scope(cname, _out_shape, child, p, s, *xs)


def _result(stateful: bool, out: Any, state: dict[str, Any]) -> Any:
    return (out, state) if stateful else out


def serial(*modules: Module, name: str | None = None, checkpoint: str | int | None = None
           ) -> Module:
    """Chain modules: the output of each feeds the next (a tuple is passed as several args).

    ``checkpoint="sqrt"`` (or an int k) is the seed chapter's gradient checkpointing: the
    layers are cut into segments of ``ceil(sqrt(n))`` (or k) layers, only each segment's
    input is kept in the forward pass, and the segment is recomputed during the backward
    pass (``remat.tied_remat``), so activation memory falls from O(n) to O(sqrt(n)).
    Params are the same with or without it.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> model = nn.serial(nn.dense(8), nn.relu(), nn.dense(2, name="head"))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> sorted(params)
      ['dense_0', 'head']
    """
    kind = "serial"
    names = _child_names(kind, modules)
    stateful = any(m.stateful for m in modules)
    if name is not None:
        _check_name(name, kind)

    def init(key: PRNGKey, *xs: Any) -> Any:
        params: dict[str, Any] = {}
        state: dict[str, Any] = {}
        for k, child, cname in zip(_split(key, len(modules)), modules, names, strict=True):
            xs = _as_args(_init_child(cname, child, k, xs, params, state))
        return _result(stateful, params, state)

    seg = None
    if checkpoint is not None:
        seg = segment_size(len(modules), checkpoint)

    def run(params: Params, xs: Any, keys: list[Any], state: Any, idx: range, train: bool
            ) -> tuple[Any, dict[str, Any]]:
        out: Any = xs
        new: dict[str, Any] = {}
        for i, k in zip(idx, keys, strict=True):
            cname = names[i]
            out, s = run_child(cname, modules[i], params.get(cname, {}), _as_args(out),
                               state=state.get(cname) if modules[i].stateful else None,
                               key=k, train=train)
            if modules[i].stateful:
                new[cname] = s
        return out, new

    def apply(params: Params, *xs: Any, state: Any = None, key: PRNGKey | None = None,
              train: bool = False) -> Any:
        _check_extra_keys(kind, params, names)
        if stateful:
            _check_model_state(kind, state, modules, names)
        state = state or {}
        keys = _split(key, len(modules))
        if seg is None:
            return _result(stateful, *run(params, xs, keys, state, range(len(modules)), train))
        # the segments are traced, which hides batch_norm's count from its own eager check
        check_eval_state(state, train, f"{kind} (checkpointed)")
        out: Any = xs
        new: dict[str, Any] = {}
        for start in range(0, len(modules), seg):
            idx = range(start, min(start + seg, len(modules)))
            sub = {names[i]: params[names[i]] for i in idx if names[i] in params}
            sub_state = {names[i]: state[names[i]] for i in idx if modules[i].stateful}
            def segment(p: Any, x: Any, aux: Any, idx: range = idx) -> Any:
                return run(p, x, aux[0], aux[1], idx, train)

            fn = tied_remat(segment)
            out, s = fn(sub, _as_args(out), ([keys[i] for i in idx], sub_state))
            new.update(s)
        return _result(stateful, out, new)

    return Module(init, apply, name, kind, stateful)


def residual(*modules: Module, shortcut: Module | None = None,
             activation: Module | None = None, name: str | None = None) -> Module:
    """Skip connection around a chain: ``activation(shortcut(x) + serial(*modules)(x))``.

    ``shortcut`` defaults to the identity and ``activation`` to none, so
    ``residual(*modules)`` is ``x + serial(*modules)(x)``. ResNet's projection block is
    ``residual(conv, batch_norm, relu(), conv, batch_norm, shortcut=serial(conv, batch_norm),
    activation=relu())``. Params are those of the inner chain
    (``{"dense_0": ..., "dense_1": ...}``) plus the shortcut's under its name
    (``"shortcut"`` unless named). The two branches must agree in shape; ``init`` checks it.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> block = nn.residual(nn.dense(4), nn.relu(), nn.dense(4))
      >>> params = block.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> block.apply(params, jnp.ones((2, 4))).shape
      (2, 4)
    """
    kind = "residual"
    body = serial(*modules)
    body_names = _child_names(kind, modules)
    extras: list[tuple[str, Module]] = []
    if shortcut is not None:
        extras.append((shortcut.name or "shortcut", shortcut))
    if activation is not None:
        extras.append((activation.name or activation.kind, activation))
    for _, m in extras:
        _child_names(kind, [m])  # a Module, or a clear TypeError
    all_names = body_names + [n for n, _ in extras]
    if len(set(all_names)) != len(all_names):
        raise ValueError(f"{kind}: two children share a name among {all_names}; give each "
                         f"a unique name=")
    stateful = body.stateful or any(m.stateful for _, m in extras)
    if name is not None:
        _check_name(name, kind)

    def mismatch(x_shape: Any, y_shape: Any, skip_shape: Any) -> ModuleError:
        what = "the shortcut gives" if shortcut is not None else "the input has"
        return ModuleError(kind, f"the body maps an input of shape {tuple(x_shape)} to "
                           f"{tuple(y_shape)}, but {what} shape {tuple(skip_shape)}; a "
                           f"residual needs them equal")

    def init(key: PRNGKey, x: Any) -> Any:
        kb, ke = jax.random.split(key)
        params, state = init_with_state(body, kb, x)
        params, state = dict(params), dict(state or {})
        y = _out_shape(body, params, state or None, x)
        if not hasattr(y, "shape"):
            raise ModuleError(kind, f"the body must return one array, got "
                              f"{type(y).__name__}")
        skip = x
        for (cname, m), k in zip(extras, jax.random.split(ke, 2), strict=False):
            if m is shortcut:
                skip = _init_child(cname, m, k, (x,), params, state)
                if tuple(skip.shape) != tuple(y.shape):
                    raise mismatch(x.shape, y.shape, skip.shape)
            else:
                _init_child(cname, m, k, (y,), params, state)
        if shortcut is None and tuple(y.shape) != tuple(x.shape):
            raise mismatch(x.shape, y.shape, x.shape)
        return _result(stateful, params, state)

    def apply(params: Params, x: Any, *, state: Any = None, key: PRNGKey | None = None,
              train: bool = False) -> Any:
        _check_extra_keys(kind, params, all_names)
        if stateful:
            _check_model_state(kind, state, [*modules, *(m for _, m in extras)], all_names)
        state = state or {}
        body_params = {k: v for k, v in params.items() if k in body_names}
        body_state = {k: v for k, v in state.items() if k in body_names}
        # The shortcut and activation get keys split off apart from the body's: any fold_in
        # of key would be one of the keys serial gives the body's children (split(key, n)[i]).
        body_key, extra_key = (key, None) if key is None or not extras else jax.random.split(key)
        y, new = apply_with_state(body, body_params, x, state=body_state, key=body_key,
                                  train=train)
        new = dict(new or {})
        skip = x
        keys = _split(extra_key, 2)
        if shortcut is not None:
            cname = extras[0][0]
            skip, s = run_child(cname, shortcut, params.get(cname, {}), (x,),
                                state=state.get(cname), key=keys[0], train=train)
            if shortcut.stateful:
                new[cname] = s
        if y.shape != skip.shape:
            raise mismatch(x.shape, y.shape, skip.shape)
        out = skip + y
        if activation is not None:
            cname = extras[-1][0]
            out, s = run_child(cname, activation, params.get(cname, {}), (out,),
                               state=state.get(cname), key=keys[1], train=train)
            if activation.stateful:
                new[cname] = s
        return _result(stateful, out, new)

    return Module(init, apply, name, kind, stateful)


def _sum(outs: tuple[Any, ...]) -> Any:
    if len({tuple(jnp.shape(o)) for o in outs}) > 1:  # broadcasting would hide a wrong width
        raise ValueError("'sum' needs outputs of one shape")
    return sum(outs[1:], outs[0])


_COMBINE: dict[str, Callable[[tuple[Any, ...]], Any]] = {
    "sum": _sum,
    "concat": lambda outs: jnp.concatenate(outs, axis=-1),
}


def parallel(*modules: Module, combine: str | Callable[[tuple[Any, ...]], Any] | None = None,
             name: str | None = None) -> Module:
    """Run every module on the same inputs.

    Args:
      modules: the branches.
      combine: ``None`` returns a tuple of outputs; ``"sum"`` adds them (they must have
        one shape); ``"concat"`` joins them on the last axis; a callable receives the tuple.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> block = nn.parallel(nn.dense(3), nn.dense(5), combine="concat")
      >>> params = block.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> block.apply(params, jnp.ones((2, 4))).shape
      (2, 8)
    """
    kind = "parallel"
    names = _child_names(kind, modules)
    stateful = any(m.stateful for m in modules)
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

    def init(key: PRNGKey, *xs: Any) -> Any:
        params: dict[str, Any] = {}
        state: dict[str, Any] = {}
        for k, child, cname in zip(_split(key, len(modules)), modules, names, strict=True):
            _init_child(cname, child, k, xs, params, state)
        # Check the branches can be combined, before any real data flows.
        jax.eval_shape(lambda p, s, *a: apply(p, *a, state=s), params,
                       state if stateful else None, *xs)
        return _result(stateful, params, state)

    def apply(params: Params, *xs: Any, state: Any = None, key: PRNGKey | None = None,
              train: bool = False) -> Any:
        _check_extra_keys(kind, params, names)
        if stateful:
            _check_model_state(kind, state, modules, names)
        state = state or {}
        outs, new = [], {}
        for k, child, cname in zip(_split(key, len(modules)), modules, names, strict=True):
            out, s = run_child(cname, child, params.get(cname, {}), xs,
                               state=state.get(cname) if child.stateful else None, key=k,
                               train=train)
            outs.append(out)
            if child.stateful:
                new[cname] = s
        try:
            combined = finish(tuple(outs))
        except (TypeError, ValueError) as err:
            shapes = [tuple(getattr(o, "shape", ())) for o in outs]
            raise ModuleError(kind, f"cannot combine branch outputs of shapes {shapes}: "
                              f"{err}") from err
        return _result(stateful, combined, new)

    return Module(init, apply, name, kind, stateful)
