"""ResNet (He et al., 2016) in torchvision's layout: ResNet-18/34 (basic blocks) and
ResNet-50/101/152 (bottleneck blocks, stride on the 3×3 conv as torchvision's "v1.5").

Read top to bottom: a block is a ``residual`` around ``conv -> batch_norm -> relu``
layers, with a projection ``shortcut`` when the shape changes and a ReLU after the sum;
a stage is a ``serial`` of blocks; the model is stem → 4 stages → pool → ``fc``.

The param and state keys are torchvision's (``layer1/0/conv1/w``, ``layer1/0/bn1/mean``,
``layer2/0/downsample/0/w``, ``fc/w``), so ``funtrain.interop.from_torch`` maps a
torchvision ``state_dict`` onto them. Convs use PyTorch's symmetric padding (``k // 2``),
so outputs match torchvision's exactly, and He (fan-out) initialisation as torchvision.
"""

from __future__ import annotations

from funtrain._checks import check_int
from funtrain.nn import initializers as inits
from funtrain.nn.combinators import residual, serial
from funtrain.nn.layers import batch_norm, conv, dense, global_avg_pool, max_pool, relu
from funtrain.nn.module import Module

# depth -> (block, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv(features: int, kernel: int, strides: int = 1, *, name: str) -> Module:
    """A bias-free conv with PyTorch's padding and torchvision's init."""
    return conv(features, kernel, strides=strides, padding=kernel // 2, use_bias=False,
                w_init=inits.variance_scaling(2.0, "fan_out", "normal"), name=name)


def _downsample(features: int, strides: int) -> Module:
    """The projection shortcut: a 1×1 conv and a BatchNorm (torchvision's ``downsample``)."""
    return serial(_conv(features, 1, strides, name="0"), batch_norm(name="1"),
                  name="downsample")


def basic_block(features: int, strides: int = 1, *, downsample: bool = False,
                name: str | None = None) -> Module:
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3×3 convs."""
    return residual(
        _conv(features, 3, strides, name="conv1"), batch_norm(name="bn1"), relu(),
        _conv(features, 3, name="conv2"), batch_norm(name="bn2"),
        shortcut=_downsample(features, strides) if downsample else None,
        activation=relu(), name=name)


def bottleneck_block(features: int, strides: int = 1, *, downsample: bool = False,
                     name: str | None = None) -> Module:
    """1×1 (``features``) → 3×3 (``features``, strided) → 1×1 (``4 * features``), plus the
    shortcut, then ReLU."""
    out = features * EXPANSION["bottleneck"]
    return residual(
        _conv(features, 1, name="conv1"), batch_norm(name="bn1"), relu(),
        _conv(features, 3, strides, name="conv2"), batch_norm(name="bn2"), relu(),
        _conv(out, 1, name="conv3"), batch_norm(name="bn3"),
        shortcut=_downsample(out, strides) if downsample else None,
        activation=relu(), name=name)


def resnet(depth: int, num_classes: int = 1000, *, stem: str = "imagenet", width: int = 64,
           name: str | None = None) -> Module:
    """A ResNet of ``depth`` 18, 34, 50, 101 or 152 for channels-last images.

    Args:
      depth: the number of layers, which picks the block type and blocks per stage.
      num_classes: outputs of the final ``fc`` layer.
      stem: ``"imagenet"`` (7×7 stride-2 conv, BatchNorm, ReLU, 3×3 stride-2 max pool) or
        ``"cifar"`` (3×3 stride-1 conv, BatchNorm, ReLU, no pool) for small images.
      width: channels of the first stage (64 in the paper); stage ``i`` has
        ``width * 2**i`` (times 4 at a bottleneck's output).

    The model is stateful (BatchNorm): ``params, state = model.init(key, x)`` and
    ``logits, state = model.apply(params, x, state=state, train=True)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = resnet(18, 10, stem="cifar", width=8)
      >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
      >>> logits, state = model.apply(params, jnp.ones((2, 8, 8, 3)), state=state, train=True)
      >>> logits.shape
      (2, 10)
    """
    if depth not in DEPTHS:
        raise ValueError(f"resnet: depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"resnet: stem must be 'imagenet' or 'cifar', got {stem!r}")
    check_int("resnet", "width", width)
    kind, blocks = DEPTHS[depth]
    make_block = basic_block if kind == "basic" else bottleneck_block
    expansion = EXPANSION[kind]

    if stem == "imagenet":
        layers = [_conv(width, 7, 2, name="conv1"), batch_norm(name="bn1"), relu(),
                  max_pool(3, strides=2, padding=1, name="maxpool")]
    else:
        layers = [_conv(width, 3, 1, name="conv1"), batch_norm(name="bn1"), relu()]

    channels = width
    for i, n in enumerate(blocks):
        features = width * 2**i
        stage = []
        for j in range(n):
            strides = 2 if i > 0 and j == 0 else 1
            project = j == 0 and (strides != 1 or channels != features * expansion)
            stage.append(make_block(features, strides, downsample=project, name=str(j)))
            channels = features * expansion
        layers.append(serial(*stage, name=f"layer{i + 1}"))

    layers += [global_avg_pool(name="avgpool"), dense(num_classes, name="fc")]
    return serial(*layers, name=name)
