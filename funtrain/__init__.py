"""funtrain: a pure-functional training library for JAX.

Models are ``Module(init, apply)`` pairs, optimizers are ``Optimizer(init_state,
update)`` pairs, and a training step is ``step(state, batch) -> (state, metrics)``.
"""

from funtrain import (
    data,
    interop,
    losses,
    nn,
    optim,
    parallel,
    precision,
    profile,
    quant,
    remat,
    sparsity,
    train,
)
from funtrain._version import __version__

__all__ = ["nn", "optim", "losses", "precision", "remat", "profile", "train", "data",
           "interop", "parallel", "quant", "sparsity", "__version__"]
