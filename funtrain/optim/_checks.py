"""Validation of hyperparameters at construction time, with messages that name them."""

from __future__ import annotations

import math
from typing import Any


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
