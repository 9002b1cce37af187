"""``TrainState``: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funtrain._typing import Array, OptState, Params, PRNGKey


class TrainState(NamedTuple):
    """The whole state of a run: ``step``, ``params``, ``opt_state`` and ``rng``.

    ``rng`` is the run's base key; step ``t`` uses ``fold_in(rng, t)``, so the
    randomness of a step depends only on the seed and the step number.
    """

    step: Array
    params: Params
    opt_state: OptState
    rng: PRNGKey

    @classmethod
    def create(cls, params: Params, optimizer: Any, key: PRNGKey) -> TrainState:
        """Start a run: step 0 and ``optimizer.init_state(params)``.

        The params are copied, so donating the state to a jitted step never
        invalidates the arrays the caller still holds.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from funtrain import optim
          >>> state = TrainState.create({"w": jnp.zeros(2)}, optim.sgd(0.1), jax.random.key(0))
          >>> int(state.step)
          0
        """
        if not hasattr(optimizer, "init"):
            raise TypeError(f"TrainState.create: optimizer must be an Optimizer (init_state, "
                            f"update), got {type(optimizer).__name__}")
        params = jax.tree.map(jnp.array, params)  # jnp.array copies
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params), rng=key)
