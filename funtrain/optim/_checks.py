"""Validation of hyperparameters at construction time, with messages that name them.

Each hyperparameter is checked once, by the building block that uses it. An optimizer
factory decorated with ``@names_errors`` makes those messages name the factory the user
called and its own argument names (``sgd: momentum must be >= 0.0``, not ``trace: decay
...``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from funtrain._checks import check_int as _check_int

# (factory name, {block: {block's argument: factory's argument}}) while a factory builds
_CALLED: contextvars.ContextVar[tuple[str, Mapping[str, Mapping[str, str]]] | None] = \
    contextvars.ContextVar("funtrain_optimizer_factory", default=None)


@contextlib.contextmanager
def naming(factory: str, **renames: Mapping[str, str]) -> Iterator[None]:
    """Within the block, checks name ``factory`` and ``renames[block][argument]`` (for a
    factory that builds one block twice, e.g. two learning rates)."""
    token = _CALLED.set((factory, renames))
    try:
        yield
    finally:
        _CALLED.reset(token)


def names_errors(**renames: Mapping[str, str]) -> Callable[[Callable[..., Any]], Any]:
    """Decorate an optimizer factory: the checks of the blocks it builds name the factory,
    and ``renames[block][argument]`` maps a block's argument to the factory's name for it.
    The outermost factory names (``muon`` builds an ``adamw``: errors say ``muon``)."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(factory)
        def build(*args: Any, **kwargs: Any) -> Any:
            if _CALLED.get() is not None:
                return factory(*args, **kwargs)
            with naming(factory.__name__, **renames):
                return factory(*args, **kwargs)
        return build

    return decorate


def named(where: str, name: str) -> tuple[str, str]:
    """``(where, name)`` as the user called them: the factory being built and its argument
    name, when a ``@names_errors`` factory is building ``where``."""
    called = _CALLED.get()
    if called is None:
        return where, name
    factory, renames = called
    return factory, renames.get(where, {}).get(name, name)


def check_int(where: str, name: str, value: Any, **kw: Any) -> None:
    """``funtrain._checks.check_int``, naming the factory being built."""
    _check_int(*named(where, name), value, **kw)


def check_choice(where: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Check a setting is one of ``choices``; ``(False, True)`` checks a bool flag."""
    flag = all(isinstance(c, bool) for c in choices)
    if not isinstance(value, bool) if flag else value not in choices:
        where, name = named(where, name)
        want = "a bool" if flag else " or ".join(map(repr, choices)) if len(choices) == 2 \
            else "one of " + ", ".join(map(repr, choices))
        raise (TypeError if flag else ValueError)(f"{where}: {name} must be {want}, "
                                                  f"got {value!r}")


def is_traced_or_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def check_scalar(where: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False, allow_inf: bool = False) -> None:
    """Check a float hyperparameter lies in a range and is finite (``allow_inf``: ``inf``
    is a meaningful setting, e.g. a clipping norm that never clips); arrays (e.g. traced)
    are not checked."""
    if is_traced_or_array(value):
        return
    where, name = named(where, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a float, got {type(value).__name__} "
                        f"({value!r})")
    if math.isnan(value):
        raise ValueError(f"{where}: {name} must be a number, got nan")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{where}: {name} must be finite, got {value}")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f"{lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low}" if low is not None else
            f"{'<' if high_open else '<='} {high}")
        if low is not None and high is not None:
            rng = f"in {rng}"
        raise ValueError(f"{where}: {name} must be {rng}, got {value}")
