"""A small CNN for channels-last images: ``[conv -> relu -> max_pool(2)] * k -> dense``."""

from __future__ import annotations

from collections.abc import Sequence

from funtrain.nn import initializers as inits
from funtrain.nn.combinators import serial
from funtrain.nn.layers import conv, dense, flatten, max_pool, relu
from funtrain.nn.module import Module


def cnn(num_classes: int = 10, *, channels: Sequence[int] = (16, 32), kernel_size: int = 3,
        name: str | None = None) -> Module:
    """A small CNN for channels-last images: ``[conv -> relu -> max_pool(2)] * k -> dense``.

    Each conv keeps the spatial size (``"SAME"``) and each pool halves it, so an 8×8
    digit becomes 2×2×32 before the classifier.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = cnn(10)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> model.apply(params, jnp.zeros((4, 8, 8, 1))).shape
      (4, 10)
    """
    layers: list[Module] = []
    for c in channels:
        layers += [conv(c, kernel_size, w_init=inits.he_normal()), relu(), max_pool(2)]
    layers += [flatten(), dense(num_classes)]
    return serial(*layers, name=name)
