"""Type aliases shared across funtrain.

They document intent; at run time all of them are plain pytrees or arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array  # a typed key from ``jax.random.key``
PyTree = Any
Params = PyTree  # nested dicts of arrays with string keys
Grads = PyTree  # same structure as Params
Updates = PyTree  # same structure as Params
OptState = PyTree  # NamedTuples of arrays
Batch = PyTree  # usually a dict of arrays sharing a leading dimension
Schedule = Callable[[Any], Any]  # step -> value, pure and jittable
ScalarOrSchedule = float | Schedule
