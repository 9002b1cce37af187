"""The segment form of gradient checkpointing, under ``nn`` so ``nn.serial`` can use it.

``funtrain.remat`` re-exports both functions; it sits above ``nn`` (its ``checkpoint`` and
``repeat`` build ``Module``s), so ``nn`` cannot import it without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["tied_remat", "segment_size"]


def tied_remat(fn: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """Checkpoint ``fn(params, inputs, keys)``: keep only its arguments, recompute on the way back.

    The backward pass recomputes ``fn`` inside ``lax.cond`` on a predicate read from the
    incoming cotangent (always true, but not provably so). The recomputation therefore
    cannot run before the cotangent exists, and each segment's intermediates live only
    during its own backward step. ``keys`` (PRNG keys or ``None``) get no cotangent.
    """

    def primal(params: Any, xs: Any, keys: Any) -> Any:
        return fn(params, xs, keys)

    rematted = jax.custom_vjp(primal)

    def fwd(params: Any, xs: Any, keys: Any) -> tuple[Any, Any]:
        return fn(params, xs, keys), (params, xs, keys)

    def bwd(res: Any, g: Any) -> tuple[Any, Any, Any]:
        params, xs, keys = res
        leaves = [x for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.inexact)]
        probe = leaves[0].reshape(-1)[0] if leaves else jnp.zeros(())
        # True for every value (NaN included), but XLA cannot fold it away.
        pred = jnp.logical_or(jnp.isnan(probe), jnp.logical_not(jnp.isnan(probe)))

        def recompute(params: Any, xs: Any, g: Any) -> tuple[Any, Any]:
            _, vjp = jax.vjp(lambda p, x: fn(p, x, keys), params, xs)
            return vjp(g)

        def skip(params: Any, xs: Any, g: Any) -> tuple[Any, Any]:
            return jax.tree.map(jnp.zeros_like, (params, xs))

        d_params, d_xs = lax.cond(pred, recompute, skip, params, xs, g)
        return d_params, d_xs, jax.tree.map(lambda _: None, keys)

    rematted.defvjp(fwd, bwd)
    return rematted


def segment_size(n: int, checkpoint: str | int) -> int:
    """Layers per segment: ``ceil(sqrt(n))`` for ``"sqrt"``, else the given int."""
    if checkpoint == "sqrt":
        return max(1, math.ceil(math.sqrt(n)))
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        raise ValueError(f"serial: checkpoint must be 'sqrt' or a positive int (layers per "
                         f"segment), got {checkpoint!r}")
    return checkpoint
