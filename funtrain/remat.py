"""Gradient checkpointing (rematerialisation): trade recomputation for activation memory.

- ``checkpoint(module, policy)`` wraps a module's apply in ``jax.checkpoint`` with a named
  policy of what to keep.
- ``tied_remat(fn)`` is the segment form the seed chapter's √n scheme needs: only the
  segment's inputs are kept, and the segment is recomputed inside a conditional whose
  predicate depends on the incoming cotangent. No scheduler can hoist that recomputation
  into the forward pass, so the saving holds on every backend (plain ``jax.checkpoint`` on
  unrolled segments saves nothing on XLA's CPU backend).
- ``nn.serial(..., checkpoint="sqrt" | k)`` uses ``tied_remat`` per segment of k layers.
- ``repeat(block, n, remat=...)`` runs n identical blocks through one traced block with
  ``lax.scan`` (compile time flat in depth), optionally checkpointed per block or nested √n.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax

from funtrain import quant
from funtrain._checks import check_int
from funtrain._tree import keystr
from funtrain._typing import Params, PRNGKey
from funtrain.nn._remat import segment_size, tied_remat
from funtrain.nn.module import (
    Module,
    ModuleError,
    _check_name,
    apply_with_state,
    check_eval_state,
    init_with_state,
)

__all__ = ["checkpoint", "tied_remat", "repeat", "segment_size", "checkpoint_policy"]

_NAMED = {
    "nothing": "nothing_saveable",
    "everything": "everything_saveable",
    "dots": "checkpoint_dots",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}


def checkpoint_policy(policy: str | Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Resolve a checkpoint policy name to a ``jax.checkpoint_policies`` function.

    ``"nothing"`` recomputes everything; ``"everything"`` keeps all; ``"dots"`` keeps
    matmul outputs; ``"dots_no_batch"`` keeps matmuls without batch dimensions;
    ``"names:a,b"`` keeps values tagged ``checkpoint_name(x, "a")`` (funtrain tags
    ``attention_out`` and ``mlp_hidden``); ``"offload"`` / ``"offload:a,b"`` moves them to
    host memory, where the backend supports it. A callable passes through.
    """
    cp = jax.checkpoint_policies
    if policy is None or callable(policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"checkpoint: policy must be a name or a callable, got "
                        f"{type(policy).__name__}")
    if policy in _NAMED:
        return getattr(cp, _NAMED[policy])
    if policy.startswith("names:"):
        names = [n.strip() for n in policy[len("names:"):].split(",") if n.strip()]
        if not names:
            raise ValueError("checkpoint: 'names:' needs at least one name, e.g. "
                             "'names:attention_out,mlp_hidden'")
        return cp.save_only_these_names(*names)
    if policy == "offload" or policy.startswith("offload:"):
        backend = jax.default_backend()
        if backend == "cpu":
            raise ValueError(f"checkpoint: policy 'offload' moves saved activations to host "
                             f"memory, but the default backend is '{backend}', which has no "
                             f"separate device memory to offload from; use 'nothing' or "
                             f"'names:...' here, or run on a GPU/TPU")
        names = [n.strip() for n in policy.partition(":")[2].split(",") if n.strip()]
        names = names or ["attention_out", "mlp_hidden"]
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=names,
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"checkpoint: unknown policy {policy!r}; expected one of "
                     f"{sorted(_NAMED) + ['names:a,b', 'offload']} or a callable")


def checkpoint(module: Module, policy: str | Callable[..., Any] | None = "nothing",
               *, name: str | None = None) -> Module:
    """Wrap ``module.apply`` in ``jax.checkpoint`` with a named policy (see ``checkpoint_policy``).

    Params are unchanged (same keys), so a checkpointed model loads the same params.

    Examples:
      >>> from funtrain import nn, remat
      >>> block = remat.checkpoint(nn.serial(nn.dense(8), nn.relu(), nn.dense(8)), "dots")
    """
    pol = checkpoint_policy(policy)

    def apply(params: Params, *xs: Any, state: Any = None, key: PRNGKey | None = None,
              train: bool = False, **inputs: Any) -> Any:
        # inputs: the module's keyword inputs (e.g. a transformer block's mask=)
        def run(p: Params, xs_: tuple[Any, ...], kw: dict[str, Any], k: Any, s: Any) -> Any:
            if module.stateful:
                return module.apply(p, *xs_, **kw, state=s, key=k, train=train)
            return module.apply(p, *xs_, **kw, key=k, train=train)

        check_eval_state(state, train, f"{module.kind} (checkpointed)")
        return jax.checkpoint(run, policy=pol)(params, xs, inputs, key, state)

    if name is not None:
        _check_name(name, "checkpoint")
    return Module(module.init, apply, name if name is not None else module.name, module.kind,
                  module.stateful)


# --------------------------------------------------------------------------- repeat


def repeat(block: Module, n: int, *, remat: str | None = None, segment: int | None = None,
           name: str | None = None) -> Module:
    """Run ``n`` identical blocks with stacked params through one traced block (``lax.scan``).

    Compile time does not grow with ``n``. The block must keep its input's shape.
    Params (and the model state of a stateful block) are the block's with a leading axis
    of size ``n``. On CPU, a block with convolutions runs many times slower inside the
    scan than unrolled (4 blocks of a 3x3 conv of 16 channels on a batch of 32 8x8 images:
    a jitted gradient took 56 ms here, 1.8 ms as ``nn.serial`` of the blocks), so there
    ``nn.serial`` trades compile time for speed. Quantized params (``quant.quantize``) run
    on their dequantized weights here, one scale per output channel across the blocks.

    Args:
      block: the block (e.g. ``nn.transformer_block(768, 12)``).
      n: number of blocks.
      remat: ``None`` keeps every block's activations; ``"block"`` checkpoints each block
        (keeps n block inputs); ``"sqrt"`` nests scans: an outer scan over segments of
        ``segment`` blocks whose body is checkpointed, so only segment inputs are kept
        during the forward pass. ``segment`` must divide ``n``; the default is the divisor
        ``k`` that keeps the fewest inputs, ``n / k + k`` (``sqrt(n)`` for a square ``n``;
        for a prime ``n`` it is ``n``, which saves nothing: choose another ``n``).
      name: key for a parent combinator.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn, remat
      >>> deep = remat.repeat(nn.serial(nn.dense(16), nn.relu()), 8, remat="sqrt")
      >>> params = deep.init(jax.random.key(0), jnp.zeros((1, 16)))
      >>> params["dense_0"]["w"].shape
      (8, 16, 16)
    """
    kind = "repeat"
    check_int(kind, "n", n)
    if remat not in (None, "block", "sqrt"):
        raise ValueError(f"repeat: remat must be None, 'block' or 'sqrt', got {remat!r}")
    check_int(kind, "segment", segment, high=n, optional=True)
    if segment is not None and remat != "sqrt":
        raise ValueError(f"repeat: segment={segment} is for remat='sqrt', got remat={remat!r}")
    k = segment or min((d for d in range(1, n + 1) if n % d == 0),
                       key=lambda d: (n // d + d, -d))
    if remat == "sqrt" and n % k:
        raise ValueError(f"repeat: remat='sqrt' needs n divisible by the segment size; n={n}, "
                         f"segment={k} (pass segment= a divisor of n)")

    def init(key: PRNGKey, x: Any) -> Any:
        both = jax.vmap(lambda kk: init_with_state(block, kk, x))(jax.random.split(key, n))
        one = jax.tree.map(lambda p: p[0], both)
        out = jax.eval_shape(lambda ps, x_: apply_with_state(block, ps[0], x_, state=ps[1])[0],
                             one, x)
        if getattr(out, "shape", None) != tuple(x.shape):
            raise ModuleError(kind, f"the block maps an input of shape {tuple(x.shape)} to "
                              f"{getattr(out, 'shape', type(out).__name__)}; repeat needs "
                              f"them equal")
        return both if block.stateful else both[0]

    def apply(params: Params, x: Any, *, state: Any = None, key: PRNGKey | None = None,
              train: bool = False) -> Any:
        check_eval_state(state, train, kind)
        keys = None if key is None else jax.random.split(key, n)
        # A QTensor's static shape and shared scale do not split along the scan's axis:
        # quantized blocks run on their dequantized (float) weights.
        params = quant.dequantize(params)
        stacked = [(f"{what}{keystr(path)}", np.shape(leaf))
                   for what, tree in (("", params), ("state/", state))
                   for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
        wrong = [(path, shape) for path, shape in stacked if not shape or shape[0] != n]
        if wrong:  # another repeat's params would run its count of blocks, or fail in scan
            raise ModuleError(kind, f"params and state must stack the {n} blocks on their "
                              f"first axis; {wrong[0][0]!r} has shape {wrong[0][1]}")

        def body(h: Any, inp: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            p, kk, s = inp
            return apply_with_state(block, p, h, state=s, key=kk, train=train)

        if remat == "block":
            body = jax.checkpoint(body)
        if remat != "sqrt":
            # length: a block without params, run without a key, scans over nothing
            out, new = lax.scan(body, x, (params, keys, state), length=n)
            return (out, new) if block.stateful else out

        def segment_body(h: Any, inp: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            return lax.scan(body, h, inp, length=k)

        reshape = lambda a: a.reshape(n // k, k, *a.shape[1:])
        seg = jax.tree.map(reshape, (params, keys, state))
        out, new = lax.scan(jax.checkpoint(segment_body), x, seg, length=n // k)
        if not block.stateful:
            return out
        return out, jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), new)

    if name is not None:
        _check_name(name, kind)
    return Module(init, apply, name, kind, block.stateful)
