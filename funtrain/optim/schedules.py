"""Learning-rate schedules: pure, jittable functions ``step -> value``.

Any callable ``step -> value`` built from ``jax.numpy`` works wherever funtrain
takes a schedule; these are the common shapes. ``step`` counts optimizer updates
from 0: the first update uses ``schedule(0)``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from funtrain._typing import Schedule
from funtrain.optim._checks import check_scalar


def constant(value: float) -> Schedule:
    """``value`` at every step."""
    check_scalar("constant", "value", value)
    return lambda step: jnp.asarray(value, dtype=jnp.result_type(float))


def as_schedule(value: float | Schedule, where: str, name: str = "learning_rate",
                *, low: float | None = 0.0) -> Schedule:
    """Turn a float into a constant schedule; check a float's range; pass callables through."""
    if callable(value):
        return value
    check_scalar(where, name, value, low=low)
    return lambda step: value


def value_at(schedule: float | Schedule, step: Any) -> Any:
    """The value of a float or a schedule at ``step``."""
    return schedule(step) if callable(schedule) else schedule
