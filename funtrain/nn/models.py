"""Reference models built from funtrain layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jax.ad_checkpoint import checkpoint_name

from funtrain.nn import initializers as inits
from funtrain.nn.combinators import residual, serial
from funtrain.nn.layers import (
    conv,
    dense,
    flatten,
    gelu,
    layer_norm,
    max_pool,
    multi_head_attention,
    relu,
    stateless,
)
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

    Example:
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


def cnn(num_classes: int = 10, *, channels: Sequence[int] = (16, 32), kernel_size: int = 3,
        name: str | None = None) -> Module:
    """A small CNN for channels-last images: ``[conv -> relu -> max_pool(2)] * k -> dense``.

    Example:
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


def transformer_block(d_model: int, num_heads: int, *, mlp_ratio: int = 4,
                      causal: bool = True, name: str | None = None) -> Module:
    """A pre-norm transformer block on ``(batch, seq, d_model)`` (GPT-2 layout).

    ``x + attention(layer_norm(x))``, then ``x + mlp(layer_norm(x))`` with a GELU MLP of
    width ``mlp_ratio * d_model``. Params: ``{"attn": ..., "mlp": ...}``. The attention
    output and the MLP hidden activation are tagged ``attention_out`` and ``mlp_hidden``
    for ``remat.checkpoint(block, "names:attention_out,mlp_hidden")``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = transformer_block(32, 4)
      >>> params = block.init(jax.random.key(0), jnp.zeros((1, 8, 32)))
      >>> block.apply(params, jnp.ones((2, 8, 32))).shape
      (2, 8, 32)
    """
    return serial(
        residual(layer_norm(), multi_head_attention(num_heads, causal=causal), name="attn"),
        residual(layer_norm(), dense(mlp_ratio * d_model), gelu(),
                 stateless(lambda h: checkpoint_name(h, "mlp_hidden"), kind="tag"),
                 dense(d_model), name="mlp"),
        name=name)
