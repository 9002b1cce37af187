"""Random draws that XLA compiles quickly."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from funtrain._typing import Array, PRNGKey


def draw_flat(sample: Callable[..., Array], key: PRNGKey, shape: Sequence[int],
              **kwargs: Any) -> Array:
    """``sample(key, shape=shape, **kwargs)``, drawn flat and reshaped.

    The values are the same (JAX's default, partitionable threefry, counts over the flat
    index), but XLA compiles threefry for a 4-d shape far slower: under jit on a 2-core CPU,
    a 3x3x8x16 conv kernel took 4.0 s against 0.24 s flat, and 8x4x16x16 attention weights
    3.7 s against 0.35 s.
    """
    shape = tuple(int(d) for d in shape)
    return sample(key, shape=(math.prod(shape),), **kwargs).reshape(shape)
