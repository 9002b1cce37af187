"""Parameter initializers: ``init(key, shape, dtype) -> array``.

Each public function is a factory that returns an initializer, as in
``jax.nn.initializers``: ``dense(10, w_init=he_normal())``.

Fans follow PyTorch and JAX: for a kernel of shape ``(*receptive, in, out)``,
``fan_in = in * prod(receptive)`` and ``fan_out = out * prod(receptive)``.
The normal variants draw from an untruncated normal, as PyTorch's
``kaiming_normal_``/``xavier_normal_`` do (JAX's ``he_normal`` truncates).

| name           | distribution | std or limit                      |
|----------------|--------------|-----------------------------------|
| he_normal      | normal       | std = sqrt(2 / fan_in)            |
| he_uniform     | uniform      | limit = sqrt(6 / fan_in)          |
| glorot_normal  | normal       | std = sqrt(2 / (fan_in + fan_out))|
| glorot_uniform | uniform      | limit = sqrt(6 / (fan_in + fan_out)) |
| lecun_normal   | normal       | std = sqrt(1 / fan_in)            |
| lecun_uniform  | uniform      | limit = sqrt(3 / fan_in)          |
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from funtrain._random import draw_flat
from funtrain._typing import Array, PRNGKey

Initializer = Callable[..., Array]  # (key, shape, dtype=float32) -> array


# Compiling the PRNG for a new shape costs about a second on a CPU, and a model has many
# shapes (ResNet-18: ~20), so eagerly, params of up to _BLOCK entries are cut from one
# fixed-size draw with a single compiled sampler; larger ones are drawn at their own size.
# With the default (partitionable threefry) keys the values equal a draw at the real shape.
_BLOCK = 1 << 18


@functools.partial(jax.jit, static_argnums=1)
def _block(key: PRNGKey, distribution: str) -> Array:
    sample = jax.random.normal if distribution == "normal" else jax.random.uniform
    return sample(key, (_BLOCK,), jnp.float32)


def _spread(x: Array, distribution: str, spread: float) -> Array:
    """N(0, 1) samples times the std, or U(0, 1) samples onto (-limit, limit)."""
    return spread * x if distribution == "normal" else spread * (2.0 * x - 1.0)


# One program per param shape: eagerly, the cut, reshape, scale and cast would each compile.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _cut(block: Array, shape: tuple[int, ...], distribution: str, spread: float,
         dtype: Any) -> Array:
    x = block[:math.prod(shape)].reshape(shape)
    return _spread(x, distribution, spread).astype(dtype)


def _sample(key: PRNGKey, shape: Sequence[int], distribution: str, spread: float,
            dtype: Any) -> Array:
    """Samples of N(0, spread**2), or of U(-spread, spread), of ``shape`` and ``dtype``."""
    shape, spread = tuple(int(d) for d in shape), float(spread)
    n = math.prod(shape)
    if n > _BLOCK or isinstance(key, jax.core.Tracer):  # traced: one program anyway
        sample = jax.random.normal if distribution == "normal" else jax.random.uniform
        x = draw_flat(sample, key, shape, dtype=jnp.float32)
        return _spread(x, distribution, spread).astype(dtype)
    return _cut(_block(key, distribution), shape, distribution, spread, dtype)


def compute_fans(shape: Sequence[int], in_axis: int = -2, out_axis: int = -1) -> tuple[int, int]:
    """Return ``(fan_in, fan_out)`` for a parameter shape."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape) // (shape[in_axis] * shape[out_axis]) if math.prod(shape) else 0
    return shape[in_axis] * receptive, shape[out_axis] * receptive


def variance_scaling(scale: float, mode: str, distribution: str, in_axis: int = -2,
                     out_axis: int = -1) -> Initializer:
    """Initializer with variance ``scale / fan`` (``fan`` by ``mode``).

    Args:
      scale: the numerator of the variance (2.0 for He, 1.0 for Glorot and LeCun).
      mode: ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"``.
      distribution: ``"normal"`` (untruncated) or ``"uniform"``.
    """
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"variance_scaling: mode must be 'fan_in', 'fan_out' or 'fan_avg', "
                         f"got {mode!r}")
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"variance_scaling: distribution must be 'normal' or 'uniform', "
                         f"got {distribution!r}")
    if scale <= 0:
        raise ValueError(f"variance_scaling: scale must be > 0, got {scale}")

    def init(key: PRNGKey, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        fan_in, fan_out = compute_fans(shape, in_axis, out_axis)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / max(1.0, fan)
        if distribution == "normal":
            return _sample(key, shape, "normal", math.sqrt(variance), dtype)
        return _sample(key, shape, "uniform", math.sqrt(3.0 * variance), dtype)

    return init


def he_normal(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """He/Kaiming normal: ``N(0, 2 / fan_in)``, for ReLU networks (He et al., 2015)."""
    return variance_scaling(2.0, "fan_in", "normal", in_axis, out_axis)


def he_uniform(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """He/Kaiming uniform: ``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))``."""
    return variance_scaling(2.0, "fan_in", "uniform", in_axis, out_axis)


def glorot_normal(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """Glorot/Xavier normal: ``N(0, 2 / (fan_in + fan_out))`` (Glorot & Bengio, 2010)."""
    return variance_scaling(1.0, "fan_avg", "normal", in_axis, out_axis)


def glorot_uniform(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """Glorot/Xavier uniform: ``U(-sqrt(6 / (fan_in + fan_out)), +...)``."""
    return variance_scaling(1.0, "fan_avg", "uniform", in_axis, out_axis)


def lecun_normal(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """LeCun normal: ``N(0, 1 / fan_in)`` (LeCun et al., 1998)."""
    return variance_scaling(1.0, "fan_in", "normal", in_axis, out_axis)


def lecun_uniform(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """LeCun uniform: ``U(-sqrt(3 / fan_in), sqrt(3 / fan_in))``."""
    return variance_scaling(1.0, "fan_in", "uniform", in_axis, out_axis)


def zeros() -> Initializer:
    """All zeros."""
    def init(key: PRNGKey, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jnp.zeros(shape, dtype)
    return init


def ones() -> Initializer:
    """All ones."""
    return lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype)


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``."""
    return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


def normal(stddev: float = 1e-2) -> Initializer:
    """``N(0, stddev**2)``."""
    if stddev <= 0:
        raise ValueError(f"normal: stddev must be > 0, got {stddev}")

    def init(key: PRNGKey, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return _sample(key, shape, "normal", stddev, dtype)

    return init


def uniform(limit: float = 1e-2) -> Initializer:
    """``U(-limit, limit)``."""
    if limit <= 0:
        raise ValueError(f"uniform: limit must be > 0, got {limit}")
    return lambda key, shape, dtype=jnp.float32: _sample(key, shape, "uniform", limit, dtype)
