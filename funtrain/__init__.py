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

__version__ = "0.1.0"

__all__ = ["nn", "optim", "losses", "precision", "remat", "profile", "train", "data",
           "interop", "parallel", "quant", "sparsity", "__version__"]
