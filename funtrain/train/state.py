"""``TrainState``: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funtrain._typing import Array, OptState, Params, PRNGKey
from funtrain.optim.base import check_optimizer
from funtrain.optim.fused import fuse
from funtrain.precision import as_policy, check_loss_scale


def _checked_key(key: Any) -> Any:
    """A copy of a PRNG key (typed, or raw uint32[2]); anything else is a TypeError."""
    arr = key if hasattr(key, "dtype") else None
    if arr is not None and jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        return jax.random.clone(arr)
    if arr is not None and arr.dtype == jnp.uint32 and arr.shape[-1:] == (2,):
        return jnp.array(arr)
    raise TypeError(f"TrainState.create: key must be a PRNG key such as jax.random.key(0), "
                    f"got {type(key).__name__} {getattr(key, 'dtype', '')}".rstrip())


class TrainState(NamedTuple):
    """The whole state of a run: ``step``, ``params``, ``opt_state``, ``rng``, for mixed
    precision the ``loss_scale`` and the count of ``skipped_steps``, and for a model with
    state (BatchNorm) its ``model_state``.

    ``rng`` is the run's base key; step ``t`` uses ``fold_in(rng, t)``, so the
    randomness of a step depends only on the seed and the step number. ``loss_scale``
    (a ``funtrain.precision`` loss scale, or ``None``) and ``skipped_steps`` (steps whose
    gradients were not finite and so were not applied) are updated by the train step.
    ``model_state`` (``None`` for a stateless model) is the state from
    ``params, model_state = model.init(key, x)``; the train step passes it to the loss
    and stores the state the loss returns, eval steps read it, and checkpoints keep it.
    """

    step: Array
    params: Params
    opt_state: OptState
    rng: PRNGKey
    loss_scale: Any = None
    skipped_steps: Any = None
    model_state: Any = None

    @classmethod
    def create(cls, params: Params, optimizer: Any, key: PRNGKey, *, loss_scale: Any = None,
               policy: Any = None, model_state: Any = None, fused: Any = False
               ) -> TrainState:
        """Start a run: step 0 and ``optimizer.init_state(params)``.

        The params are copied, so donating the state to a jitted step never
        invalidates the arrays the caller still holds.

        Args:
          params: the initial params.
          optimizer: an ``Optimizer``.
          key: the run's base PRNG key.
          loss_scale: a loss scale from ``funtrain.precision`` (e.g. ``DynamicLossScale()``
            for float16 training); ``None`` means no scaling.
          policy: a ``precision.Policy`` (or its string); params are stored in its
            ``param_dtype`` (the FP32 master weights).
          model_state: the model state of a stateful model (``model.init`` returns
            ``(params, model_state)``); it is never cast by the policy.
          fused: ``True`` packs the params into one buffer per dtype, matrices apart from
            vectors (``optim.fuse``); a function ``(key_path, leaf) -> label`` groups them
            further. Element-wise optimizer rules then run once per buffer and their
            moments are buffers too; the step gives the model views of the buffers.
            ``state.params.unflatten()`` is the params tree; checkpoints store the tree,
            so they restore into a fused or an unfused state alike (``optim.fused``).
            Each buffer ends in zeros up to a multiple of ``jax.device_count()``, so that
            ``parallel.shard_state`` can split it over FSDP's devices.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from funtrain import optim
          >>> state = TrainState.create({"w": jnp.zeros(2)}, optim.sgd(0.1), jax.random.key(0))
          >>> int(state.step)
          0
        """
        check_optimizer("TrainState.create", "optimizer", optimizer)
        key = _checked_key(key)
        # Copies (so donation never deletes the caller's arrays), without weak types (a
        # weak-typed leaf would come back strong from the update and recompile the step).
        params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), params)
        if loss_scale is not None:
            check_loss_scale("TrainState.create", "loss_scale", loss_scale)
            loss_scale = jax.tree.map(lambda x: jnp.array(x, dtype=x.dtype), loss_scale)
        # A stateful model's init returns (params dict, state dict): catch passing it whole,
        # not a pair of param dicts (an encoder's and a decoder's): a state has counters.
        if (model_state is None and isinstance(params, tuple) and len(params) == 2
                and all(isinstance(p, dict) for p in params) and _has_counters(params[1])):
            raise TypeError("TrainState.create: params is a (params, state) pair, as a "
                            "stateful model's init returns; pass "
                            "TrainState.create(params, optimizer, key, model_state=state)")
        if model_state is not None:
            model_state = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype),
                                       model_state)
        if policy is not None:
            params = as_policy(policy).cast_to_param(params)
        if not (isinstance(fused, bool) or callable(fused)):
            raise TypeError(f"TrainState.create: fused must be True, False or a function "
                            f"(key_path, leaf) -> label, got {type(fused).__name__}")
        if fused is not False:
            # padded so that FSDP can split every buffer (an odd size was replicated whole)
            params = fuse(params, None if fused is True else fused, jax.device_count())
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=_owned_opt_state(optimizer, params), rng=key,
                   loss_scale=loss_scale, skipped_steps=jnp.zeros((), jnp.int32),
                   model_state=model_state)


def _owned_opt_state(optimizer: Any, params: Params) -> Any:
    """``optimizer.init(params)`` with every array a copy of its own.

    An optimizer may put the caller's arrays in its state (``sparsity.pruned``'s masks, an
    ``inject_hyperparams`` value given as a jax array); the first step donates the state,
    which would delete them, for the caller and for the next ``init`` (a resume). Copied
    leaf by leaf, with no second reference to the whole original state, so each original
    can go once its copy has run.
    """
    leaves, treedef = jax.tree.flatten(optimizer.init(params))
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            leaves[i] = jnp.array(leaf, copy=True)  # keeps dtype, weak type and sharding
    return treedef.unflatten(leaves)


def _has_counters(tree: Any) -> bool:
    """Whether ``tree`` holds an integer leaf, as model states (BatchNorm's ``count``) do
    and params cannot (the step differentiates every param)."""
    return any(jnp.issubdtype(jnp.result_type(x), jnp.integer) for x in jax.tree.leaves(tree))
