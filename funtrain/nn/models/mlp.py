"""The multi-layer perceptron: ``dense -> activation`` repeated, no activation last."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from funtrain.nn import initializers as inits
from funtrain.nn.combinators import serial
from funtrain.nn.layers import dense, relu
from funtrain.nn.module import Module


def mlp(sizes: Sequence[int], *, activation: Callable[[], Module] = relu,
        w_init: inits.Initializer | None = None, name: str | None = None) -> Module:
    """Multi-layer perceptron: ``dense(s) -> activation`` for each size, no activation last.

    The input size comes from the example input at ``init``, so the seed chapter's
    784 → 256 → 10 ReLU MLP is ``mlp([256, 10])`` initialised on a ``(N, 784)`` batch.
    Weights are He-initialised (``he_normal()``), biases zero.

    Args:
      sizes: output size of each dense layer, the last one being the number of outputs.
      activation: a layer factory such as ``nn.relu`` or ``nn.gelu``.
      w_init: weight initializer; defaults to ``he_normal()``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = mlp([256, 10])
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
      >>> params["dense_0"]["w"].shape, params["dense_1"]["w"].shape
      ((784, 256), (256, 10))
    """
    sizes = list(sizes)
    if not sizes:
        raise ValueError("mlp: sizes must name at least one layer, got []")
    w_init = w_init or inits.he_normal()
    layers: list[Module] = []
    for i, size in enumerate(sizes):
        layers.append(dense(size, w_init=w_init))
        if i < len(sizes) - 1:
            layers.append(activation())
    return serial(*layers, name=name)
