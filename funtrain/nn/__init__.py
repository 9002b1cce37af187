"""Models as pure ``init``/``apply`` pairs: layers, combinators, initializers, reference models.

``layer_norm``, ``rms_norm``, ``group_norm``, ``softmax`` and attention's softmax keep only
compute-dtype tensors for the backward pass through a ``jax.custom_vjp``. Reverse mode and
everything built on it work (``jax.grad``, grad of grad, ``jax.hessian``), but forward
mode applied to them directly (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) raises
JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function"."""

from funtrain.nn import initializers, models
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
    batch_norm,
    conv,
    conv_transpose,
    dense,
    dropout,
    embed,
    flatten,
    gelu,
    global_avg_pool,
    group_norm,
    layer_norm,
    max_pool,
    multi_head_attention,
    relu,
    reshape,
    rms_norm,
    sigmoid,
    silu,
    softmax,
    stateless,
    tanh,
)
from funtrain.nn.models import cnn, gpt, mlp, resnet, transformer_block
from funtrain.nn.module import (
    Module,
    ModuleError,
    ModuleTypeError,
    apply_with_state,
    init_with_state,
    named,
)
from funtrain.nn.policy import with_policy
from funtrain.nn.recurrent import gru, lstm
from funtrain.nn.summary import summary

__all__ = [
    "Module", "ModuleError", "ModuleTypeError", "named", "with_policy",
    "init_with_state", "apply_with_state", "summary",
    "serial", "residual", "parallel",
    "dense", "conv", "conv_transpose", "embed", "layer_norm", "rms_norm", "batch_norm",
    "group_norm", "dropout", "max_pool", "avg_pool",
    "global_avg_pool", "relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "flatten",
    "reshape", "stateless",
    "initializers", "variance_scaling", "he_normal", "he_uniform", "glorot_normal",
    "glorot_uniform", "lecun_normal", "lecun_uniform", "zeros", "ones", "constant", "normal",
    "uniform",
    "models", "mlp", "cnn", "resnet", "gpt", "transformer_block", "multi_head_attention",
    "lstm", "gru",
]
