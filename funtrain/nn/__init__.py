"""Models as pure ``init``/``apply`` pairs: layers, combinators, initializers, reference models."""

from funtrain.nn import initializers
from funtrain.nn.combinators import parallel, residual, serial
from funtrain.nn.initializers import (
    constant,
    glorot_normal,
    glorot_uniform,
    he_normal,
    he_uniform,
    lecun_normal,
    lecun_uniform,
    normal,
    ones,
    uniform,
    variance_scaling,
    zeros,
)
from funtrain.nn.layers import (
    avg_pool,
    conv,
    dense,
    dropout,
    embed,
    flatten,
    gelu,
    global_avg_pool,
    layer_norm,
    max_pool,
    relu,
    reshape,
    rms_norm,
    sigmoid,
    silu,
    softmax,
    stateless,
    tanh,
)
from funtrain.nn.models import cnn, mlp
from funtrain.nn.module import Module, ModuleError, ModuleTypeError, named

__all__ = [
    "Module", "ModuleError", "ModuleTypeError", "named",
    "serial", "residual", "parallel",
    "dense", "conv", "embed", "layer_norm", "rms_norm", "dropout", "max_pool", "avg_pool",
    "global_avg_pool", "relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "flatten",
    "reshape", "stateless",
    "initializers", "variance_scaling", "he_normal", "he_uniform", "glorot_normal",
    "glorot_uniform", "lecun_normal", "lecun_uniform", "zeros", "ones", "constant", "normal",
    "uniform",
    "mlp", "cnn",
]
