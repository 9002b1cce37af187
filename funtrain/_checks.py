"""Argument checks shared by every module, with messages that say what came and where."""

from __future__ import annotations

from typing import Any

import numpy as np


class IntArgumentError(TypeError, ValueError):
    """An argument that must be an int is not one: both a wrong type and a wrong value, so
    ``except TypeError`` and ``except ValueError`` both catch it."""


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(where: str, name: str, value: Any, *, low: int = 1, high: int | None = None,
              optional: bool = False) -> None:
    """``value`` is an int in ``[low, high]`` (``None`` too when ``optional``).

    Raises ``IntArgumentError`` for a non-int (a float, a bool, a string) and
    ``ValueError`` for an int out of range, both as ``"{where}: {name} must be ..., got
    ..."``.
    """
    if optional and value is None:
        return
    want = ("a positive int" if low == 1 else f"an int >= {low}") if high is None else \
        f"an int in [{low}, {high}]"
    want = f"None or {want}" if optional else want
    if not is_int(value):
        raise IntArgumentError(f"{where}: {name} must be {want}, got {value!r} "
                               f"({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{where}: {name} must be {want}, got {value}")
