"""Validation of hyperparameters at construction time, with messages that name them.

Each hyperparameter is checked once, by the building block that uses it, and its domain is
declared in that block's signature: ``b1: Beta = 0.9`` is ``Annotated[float, Range(0.0,
1.0, high_open=True)]``, and ``@checked`` checks every annotated argument when the block is
built. The block's body is left with its math. An optimizer factory decorated with
``@names_errors`` makes those messages name the factory the user called and its own
argument names (``sgd: momentum must be >= 0.0``, not ``trace: decay ...``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from funtrain._checks import check_int as _check_int
from funtrain._typing import ScalarOrSchedule, Schedule
from funtrain.optim.base import Optimizer, check_optimizer

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
    """A JAX array or tracer: an injected or traced hyperparameter, known at run time only.
    A NumPy scalar (``np.logspace(...)[i]`` from a sweep) is a plain number, checked."""
    return isinstance(value, jax.Array)


def check_scalar(where: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False, allow_inf: bool = False) -> None:
    """Check a float hyperparameter lies in a range and is finite (``allow_inf``: ``inf``
    is a meaningful setting, e.g. a clipping norm that never clips); arrays (e.g. traced)
    are not checked."""
    if is_traced_or_array(value):
        return
    where, name = named(where, name)
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()  # np.float32 is no float; np.bool_ becomes a bool, refused
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


def check_schedule(schedule: Schedule, where: str, name: str = "learning_rate", *,
                   low: float | None = 0.0, high: float | None = None,
                   high_open: bool = False) -> None:
    """Call ``schedule(0)`` once, when the optimizer is built: it must take the step count
    and return a finite real scalar (``>= low``, and below ``high`` when given). A wrong
    shape would silently reshape every param it scales; a negative learning rate would
    climb the loss. Later steps are not checked: that would cost a call per step."""
    where, name = named(where, name)
    what = f"{where}: {name} is a schedule"
    try:
        out = schedule(jnp.zeros((), jnp.int32))
    except TypeError as e:
        raise TypeError(f"{what}, so it must take the step count, schedule(count) -> value; "
                        f"calling it with count 0 raised TypeError: {e}") from None
    if out is None or isinstance(out, (str, bytes)) or not hasattr(out, "__float__") and \
            not hasattr(out, "dtype"):
        raise TypeError(f"{what}; it must return a scalar, got {type(out).__name__} "
                        f"at count 0")
    shape = tuple(jnp.shape(out))
    if shape != ():
        raise ValueError(f"{what}; it must return a scalar, got shape {shape} at count 0")
    dtype = jnp.result_type(out)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{what}; it must return a real number, got dtype {dtype} at count 0")
    if isinstance(out, jax.core.Tracer):  # built inside a trace: only the shape is known
        return
    check_scalar(where, f"{name}(0)", float(out), low=low, high=high, high_open=high_open)


# --------------------------------------------------------------------------- declared domains


@dataclasses.dataclass(frozen=True)
class Range:
    """A float hyperparameter in ``[low, high]`` (``low_open``/``high_open`` exclude an end),
    finite unless ``allow_inf``; with ``schedule``, a schedule too, whose value at step 0 is
    checked; with ``optional``, ``None`` too. Arrays (injected or traced hyperparameters) are
    not checked."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_inf: bool = False
    schedule: bool = False
    optional: bool = False

    def check(self, where: str, name: str, value: Any) -> None:
        if self.optional and value is None:
            return
        if self.schedule and callable(value):
            check_schedule(value, where, name, low=self.low, high=self.high,
                           high_open=self.high_open)
        else:
            check_scalar(where, name, value, low=self.low, high=self.high,
                         low_open=self.low_open, high_open=self.high_open,
                         allow_inf=self.allow_inf)


@dataclasses.dataclass(frozen=True)
class Int:
    """An int hyperparameter in ``[low, high]`` (``None`` too when ``optional``)."""

    low: int = 1
    high: int | None = None
    optional: bool = False

    def check(self, where: str, name: str, value: Any) -> None:
        check_int(where, name, value, low=self.low, high=self.high, optional=self.optional)


# The domains the optimizers use; each reads as the math's: b1: Beta, eps: Positive.
Real = Annotated[float, Range()]
NonNegative = Annotated[float, Range(0.0)]
Positive = Annotated[float, Range(0.0, low_open=True)]
Fraction = Annotated[float, Range(0.0, 1.0)]
Beta = Annotated[float, Range(0.0, 1.0, high_open=True)]
Count = Annotated[int, Int()]
Flag = Literal[False, True]
NonNegativeOrSchedule = Annotated[ScalarOrSchedule, Range(0.0, schedule=True)]
BetaOrSchedule = Annotated[ScalarOrSchedule, Range(0.0, 1.0, high_open=True, schedule=True)]


def _check_choice_of(choices: tuple[Any, ...], where: str, name: str, value: Any) -> None:
    check_choice(where, name, value, choices)


P = ParamSpec("P")
R = TypeVar("R")


def _rules(fn: Callable[..., Any]) -> dict[str, Callable[[str, str, Any], None]]:
    """The check of each argument of ``fn`` whose annotation declares a domain: a ``Range``
    or ``Int`` in ``Annotated`` metadata, a ``Literal`` of the allowed settings, or
    ``Optimizer``."""
    rules: dict[str, Callable[[str, str, Any], None]] = {}
    for name, hint in typing.get_type_hints(fn, include_extras=True).items():
        domains = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, (Range, Int))]
        if domains:
            rules[name] = domains[0].check
        elif typing.get_origin(hint) is Literal:
            rules[name] = functools.partial(_check_choice_of, typing.get_args(hint))
        elif hint is Optimizer:
            rules[name] = check_optimizer
    return rules


def checked(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a building block: when it is called, each argument (defaults included) whose
    annotation declares a domain (``Range``, ``Int``, ``Literal``, ``Optimizer``) is
    checked, and an error names the block (or the ``@names_errors`` factory building it) and
    the argument."""
    sig = inspect.signature(fn)
    rules: dict[str, Callable[[str, str, Any], None]] | None = None

    @functools.wraps(fn)
    def build(*args: P.args, **kwargs: P.kwargs) -> R:
        nonlocal rules
        rules = _rules(fn) if rules is None else rules  # once the module's names exist
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)  # Python's own message for a wrong call
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            if name in rules:
                rules[name](fn.__name__, name, value)
        return fn(*args, **kwargs)

    return build
