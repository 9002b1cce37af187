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
    during its own backward step. ``keys`` (PRNG keys or ``None``) and integer or bool
    leaves (token ids, masks, quantized weights) get no cotangent. Values ``fn`` closes
    over that are being differentiated (a scale from an outer ``jax.grad``) are passed
    through as arguments and get theirs: a ``custom_vjp`` cannot see into a closure.
    """

    def checkpointed(params: Any, xs: Any, keys: Any) -> Any:
        # jax.closure_convert would do this, but its cache keeps every call's closure (and
        # the arrays it holds) alive: serial makes a new one per call.
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, xs, keys)
        consts = list(closed.consts)
        traced = [i for i, c in enumerate(consts) if isinstance(c, jax.core.Tracer)]

        def converted(params: Any, xs: Any, keys: Any, *hoisted: Any) -> Any:
            values = list(consts)
            for i, c in zip(traced, hoisted, strict=True):
                values[i] = c
            out = jax.core.eval_jaxpr(closed.jaxpr, values, *jax.tree.leaves((params, xs, keys)))
            return jax.tree.unflatten(jax.tree.structure(out_shape), out)

        return _tied(converted)((params, xs, [consts[i] for i in traced]), keys)

    return checkpointed


def _tied(fn: Callable[..., Any]) -> Callable[[Any, Any], Any]:
    """``fn(params, xs, keys, *consts)`` as a custom_vjp of ``((params, xs, consts), keys)``."""

    def call(args: Any, keys: Any) -> Any:
        params, xs, consts = args
        return fn(params, xs, keys, *consts)

    rematted = jax.custom_vjp(call)

    def fwd(args: Any, keys: Any) -> tuple[Any, Any]:
        return call(args, keys), (args, keys)

    def bwd(res: Any, g: Any) -> tuple[Any, Any]:
        args, keys = res
        leaves = [x for x in jax.tree.leaves(g)
                  if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]  # an empty batch too
        probe = leaves[0].reshape(-1)[0] if leaves else jnp.zeros(())
        # True for every value (NaN included), but XLA cannot fold it away.
        pred = jnp.logical_or(jnp.isnan(probe), jnp.logical_not(jnp.isnan(probe)))

        # Only the float leaves are differentiated; the others are closed over.
        flat, treedef = jax.tree.flatten(args)
        wrt = [i for i, a in enumerate(flat) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]

        def call_floats(floats: list[Any]) -> Any:
            full = list(flat)
            for i, a in zip(wrt, floats, strict=True):
                full[i] = a
            return call(treedef.unflatten(full), keys)

        def recompute(floats: list[Any], g: Any) -> list[Any]:
            return jax.vjp(call_floats, floats)[1](g)[0]

        def skip(floats: list[Any], g: Any) -> list[Any]:
            return [jnp.zeros_like(a) for a in floats]

        d_floats = lax.cond(pred, recompute, skip, [flat[i] for i in wrt], g)
        cotangents: list[Any] = [None] * len(flat)
        for i, d in zip(wrt, d_floats, strict=True):
            cotangents[i] = d
        return treedef.unflatten(cotangents), jax.tree.map(lambda _: None, keys)

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
