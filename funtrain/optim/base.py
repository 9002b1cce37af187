"""The optimizer protocol: ``Optimizer(init_state, update)``, ``chain`` and ``apply_updates``.

An optimizer (or a building block of one) is a pair of pure functions:

- ``init_state(params) -> state``: the state is a NamedTuple of arrays;
- ``update(grads, state, params=None) -> (updates, new_state)``: ``updates`` has
  the structure of ``grads`` and is *added* to the params by ``apply_updates``.

The pair is also reachable as ``(opt.init, opt.update)``, the common
``GradientTransformation`` protocol, so a funtrain optimizer drops into other JAX
libraries' chains and into ``flax.training.train_state``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funtrain._tree import check_same_structure, reduction_groups, tree_bytes
from funtrain._typing import Grads, OptState, Params, Updates

InitStateFn = Callable[[Params], OptState]
UpdateFn = Callable[..., tuple[Updates, OptState]]


class Optimizer(NamedTuple):
    """A gradient transformation: ``init_state(params)`` and ``update(grads, state, params)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from funtrain import optim
      >>> opt = optim.sgd(0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init_state(params)
      >>> updates, state = opt.update({"w": jnp.ones(2)}, state, params)
      >>> optim.apply_updates(params, updates)["w"]
      Array([0.9, 0.9], dtype=float32)
    """

    init_state: InitStateFn
    update: UpdateFn

    @property
    def init(self) -> InitStateFn:
        """Alias of ``init_state``, for the ``(init, update)`` GradientTransformation protocol."""
        return self.init_state


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


def is_optimizer(x: Any) -> bool:
    """Whether ``x`` is a gradient transformation: it has ``init`` and ``update`` (a
    funtrain ``Optimizer``, or another library's ``GradientTransformation``)."""
    return hasattr(x, "init") and hasattr(x, "update")


def check_optimizer(where: str, name: str, opt: Any) -> None:
    """The one check that an argument is an optimizer, naming where and which."""
    if not is_optimizer(opt):
        raise TypeError(f"{where}: {name} must be an Optimizer (a pair init_state/update), "
                        f"got {type(opt).__name__}")


def identity() -> Optimizer:
    """Leave the gradients unchanged."""
    return Optimizer(lambda params: EmptyState(),
                     lambda grads, state, params=None: (grads, state))


def chain(*optimizers: Optimizer) -> Optimizer:
    """Apply transformations in order; the state is the tuple of their states.

    Examples:
      >>> from funtrain import optim
      >>> opt = optim.chain(optim.add_decayed_weights(1e-4), optim.scale_by_learning_rate(0.1))
    """
    for i, opt in enumerate(optimizers):
        check_optimizer("chain", f"argument {i}", opt)
    init_fns = tuple(opt.init for opt in optimizers)
    update_fns = tuple(opt.update for opt in optimizers)

    def init_state(params: Params) -> tuple[OptState, ...]:
        return tuple(fn(params) for fn in init_fns)

    def update(grads: Grads, state: tuple[OptState, ...],
               params: Params | None = None) -> tuple[Updates, tuple[OptState, ...]]:
        if not isinstance(state, tuple) or len(state) != len(update_fns):
            raise ValueError(f"chain: expected a state tuple of {len(update_fns)} entries (one "
                             f"per transformation), got {_describe(state)}; was it made by "
                             f"another optimizer's init_state?")
        new_states = []
        for fn, s in zip(update_fns, state, strict=True):
            grads, s = fn(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return Optimizer(init_state, update)


def _describe(x: Any) -> str:
    if isinstance(x, tuple):
        return f"{type(x).__name__} of length {len(x)}"
    return type(x).__name__


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates``, each leaf keeping its params dtype.

    The sum is formed in the wider of the two dtypes and then cast back, so bf16
    params updated with f32 updates lose as little as possible.
    """
    check_same_structure(params, updates, what="apply_updates", expected_name="params",
                         actual_name="updates")

    def add(p: Any, u: Any) -> Any:
        p = jnp.asarray(p)
        return jnp.asarray(p + u).astype(p.dtype)

    return jax.tree.map(add, params, updates)


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves taken together, accumulated in float32 at least; a
    complex leaf counts as its real and imaginary parts (:math:`|z|^2`)."""
    leaves = [part for x in map(jnp.asarray, jax.tree.leaves(tree))
              for part in ((x.real, x.imag) if jnp.iscomplexobj(x) else (x,))]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(jnp.float32, *leaves)
    # No chain of one add per leaf: compile time must grow linearly with the tree.
    squares = [jnp.sum(jnp.square(x)) for x in reduction_groups(leaves, dtype)]
    return jnp.sqrt(squares[0] if len(squares) == 1 else jnp.sum(jnp.stack(squares)))


def state_bytes(state: Any) -> int:
    """Bytes held by the arrays of an optimizer state (or any pytree).

    Works on concrete arrays and on ``jax.eval_shape`` results, so the memory of an
    optimizer can be read without allocating it:
    ``state_bytes(jax.eval_shape(opt.init_state, params))``.
    """
    return tree_bytes(state)
