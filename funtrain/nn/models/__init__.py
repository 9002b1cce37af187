"""Reference models, one readable file each: ``mlp``, ``cnn``, ``resnet``, ``gpt``.

Each is built from funtrain layers and combinators, so its params are readable nested
dicts (ResNet's keys follow torchvision's names, so ``interop.from_torch`` maps a
PyTorch ``state_dict`` onto them).
"""

from funtrain.nn.models.cnn import cnn
from funtrain.nn.models.gpt import gpt, transformer_block
from funtrain.nn.models.mlp import mlp
from funtrain.nn.models.resnet import basic_block, bottleneck_block, resnet

__all__ = ["mlp", "cnn", "resnet", "basic_block", "bottleneck_block", "gpt",
           "transformer_block"]
