"""Pure training and evaluation steps: ``step(state, batch) -> (state, metrics)``."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from funtrain import losses
from funtrain._tree import keystr
from funtrain._typing import Array, Batch, Params, PRNGKey
from funtrain.data.checks import check_leading_dims
from funtrain.nn.module import Module, check_statistics
from funtrain.optim import MultiStepsState, injected_hyperparams
from funtrain.optim.base import Optimizer, apply_updates, check_optimizer, global_norm
from funtrain.optim.fused import FlatParams, unfuse_spec
from funtrain.optim.transforms import ScaleByScheduleState
from funtrain.precision import all_finite, as_policy, check_loss_scale
from funtrain.train.state import TrainState

Metrics = dict[str, Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def _positional(fn: Callable[..., Any]) -> tuple[float, int]:
    """(how many positional args ``fn`` accepts, how many it requires); inf for ``*args``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return float("inf"), 0
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return float("inf"), required
    return len(positional), required


def _takes_key(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a third positional argument (the PRNG key)."""
    return _positional(fn)[0] >= 3


# The metrics a train step reports besides loss_fn's aux, and "step", under which History
# and the loggers record the step number (an aux "invalid_labels" is meant: it feeds the
# non-finite guard, as classifier_loss's does).
STEP_METRICS = ("step", "loss", "grad_norm", "nonfinite", "learning_rate", "skipped",
                "skipped_steps", "loss_scale")


def _split_loss(where: str, out: Any, stateful: bool = False
                ) -> tuple[Array, Metrics, Any]:
    if stateful:
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[1], Mapping)):
            got = f"a tuple of {len(out)} entries" if isinstance(out, tuple) else \
                type(out).__name__
            raise TypeError(f"{where}: with model state, loss_fn(params, batch, key, "
                            f"model_state) must return (loss, aux_metrics_dict, "
                            f"new_model_state), got {got}")
        loss, aux, new_state = out
    elif isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(f"{where}: loss_fn must return a scalar loss or (loss, aux) with "
                            f"aux a dict of metrics, got a tuple of {len(out)} entries")
        (loss, aux), new_state = out, None
    else:
        loss, aux, new_state = out, {}, None
    loss = jnp.asarray(loss)
    if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(f"{where}: loss_fn must return a scalar floating loss, got shape "
                         f"{tuple(loss.shape)} and dtype {loss.dtype}; reduce it, e.g. with "
                         f"reduction='mean'")
    taken = sorted(set(aux) & set(STEP_METRICS))
    if taken:  # the step's own would overwrite them, or they the step number in the logs
        raise ValueError(f"{where}: loss_fn's aux metrics {taken} clash with the train "
                         f"step's own metrics or the logs' step number (reserved: "
                         f"{', '.join(STEP_METRICS)}); rename them")
    return loss, dict(aux), new_state


def _is_multi_steps(s: Any) -> bool:
    return isinstance(s, MultiStepsState)


def _learning_rate(learning_rate: Any, state: TrainState, opt_state: Any) -> Any:
    """The lr this step's update used: the given float; or the schedule at the count that
    the optimizer's scheduled block reads (a step skipped by the step's guard or an
    ``apply_if_finite``, or a ``multi_steps`` micro-step, does not advance it), else (an
    optax optimizer) at the steps taken; or the injected one in the updated ``opt_state``
    (the state before it holds the last step's)."""
    if learning_rate is None:
        return injected_hyperparams(opt_state).get("learning_rate")
    if not callable(learning_rate):
        return learning_rate
    scheduled = [s.count for s in jax.tree.leaves(state.opt_state, is_leaf=_is_scheduled)
                 if _is_scheduled(s)]
    if scheduled:  # the blocks of one optimizer count alike
        return learning_rate(scheduled[0])
    rounds = [s for s in jax.tree.leaves(state.opt_state, is_leaf=_is_multi_steps)
              if _is_multi_steps(s)]
    if len(rounds) == 1:
        return learning_rate(rounds[0].gradient_step)
    skipped = state.skipped_steps
    return learning_rate(state.step if skipped is None else state.step - skipped)


def _is_scheduled(s: Any) -> bool:
    return isinstance(s, ScaleByScheduleState)


def _check_opt_state(where: str, optimizer: Optimizer, state: TrainState) -> None:
    """``state.opt_state`` must be what ``optimizer.init_state(state.params)`` builds: the
    same key paths, shapes and dtypes. Checked while tracing (``eval_shape``: no compute)."""
    expected = jax.eval_shape(optimizer.init, state.params)  # optax's (init, update) too
    want = {keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {keystr(p): leaf for p, leaf in
           jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
    fix = ("Create the state with TrainState.create(params, optimizer, key) using the "
           "optimizer given to make_train_step")
    if list(want) != list(got) or (jax.tree.structure(expected)
                                   != jax.tree.structure(state.opt_state)):
        missing = [p for p in want if p not in got][:3]
        extra = [p for p in got if p not in want][:3]
        detail = "; ".join(part for part in (
            f"the optimizer's state has {', '.join(repr(p) for p in missing)}" if missing
            else "", f"the given state has {', '.join(repr(p) for p in extra)}" if extra
            else "") if part) or "the same key paths in other containers"
        raise ValueError(f"{where}: state.opt_state was not made by this optimizer's "
                         f"init_state ({detail}). {fix}")
    for path, w in want.items():
        g = got[path]
        shape, dtype = tuple(jnp.shape(g)), jnp.result_type(g)
        if shape != tuple(w.shape) or dtype != w.dtype:
            raise ValueError(f"{where}: state.opt_state at {path!r} has shape {shape} and "
                             f"dtype {dtype}, but for these params the optimizer keeps "
                             f"{tuple(w.shape)} and {w.dtype}: the state was built for other "
                             f"params. {fix}")


def _check_param_dtypes(where: str, params: Params) -> None:
    """Params are differentiated, so they must be floats; 16-bit params take the update in
    16 bits, where small updates round away (a warning)."""
    warned = False
    # fused params: name the leaves, not their buffers
    for path, leaf in jax.tree_util.tree_flatten_with_path(unfuse_spec(params))[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(f"{where}: params {keystr(path)!r} are {dtype}, but the step "
                            f"differentiates every leaf of params, so each must be a float "
                            f"array; keep integer arrays (counters, masks, token tables) in "
                            f"the batch, the model state or a closure")
        if not warned and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits <= 16:
            warned = True
            warnings.warn(
                f"{where}: params {keystr(path)!r} are {dtype}, so the update is added in "
                f"{dtype} and any update below ~2^-{jnp.finfo(dtype).nmant + 1} of a weight "
                f"rounds away (with sgd(1e-3) most weights stop moving). Keep float32 params "
                f"and compute in {dtype} with policy='p=f32,c={dtype}': the update then "
                f"runs on float32 master params", stacklevel=4)


def _is_deleted(tree: Any) -> bool:
    # a tracer (the step traced inside a user's jax.jit) has no buffer to have lost
    return any(isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
               and leaf.is_deleted() for leaf in jax.tree.leaves(tree))


def donated_state_error(where: str) -> ValueError:
    return ValueError(f"{where}: the state passed in was donated to an earlier step or fit "
                      f"call, so its buffers are deleted. Use the state that call returned "
                      f"(state, metrics = step(state, batch), or state, history = fit(...)). "
                      f"A step built with donate=False keeps its input alive; fit always "
                      f"donates its input (keep a copy with jax.tree.map(jnp.copy, state))")


def canonical_sharding(sharding: Any) -> Any:
    """A ``NamedSharding`` with its spec's trailing ``None``s dropped: the same placement,
    spelled as jit spells its outputs' (``P('fsdp', None)`` comes back as ``P('fsdp')``)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    parts = tuple(sharding.spec)
    while parts and parts[-1] is None:
        parts = parts[:-1]
    return NamedSharding(sharding.mesh, PartitionSpec(*parts), memory_kind=sharding.memory_kind)


class _JittedStep:
    """``jax.jit(step)``, with a clear error for a state already donated (XLA's says only
    "Buffer has been deleted or donated"). Other attributes are the jitted function's."""

    def __init__(self, step: StepFn, donate: bool) -> None:
        self.step, self.donate = step, donate
        self.jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
        self.sharded: dict[Any, Any] = {}  # a jit per state layout on a mesh
        self.by_layout: dict[Any, Any] = {}  # the same, keyed by canonical shardings
        functools.update_wrapper(self, step)

    def _for(self, state: TrainState) -> Any:
        """The jitted step; for a state placed on a mesh (``parallel.shard_state``, which
        places every leaf, the step count included), one that keeps each new leaf where the
        old one was (GSPMD would otherwise choose). One attribute read on one device."""
        on_mesh = getattr(state, "step", None)
        on_mesh = getattr(on_mesh, "sharding", None)
        if not (isinstance(on_mesh, NamedSharding) and on_mesh.mesh.size > 1):
            return self.jitted
        leaves, treedef = jax.tree.flatten(state)
        # checked first: XLA's CPU client crashes on a deleted buffer of a multi-device
        # input (jax 0.10); a list, not a generator: ~60 ns a leaf (on a mesh, no tracers)
        if any([x.is_deleted() for x in leaves if hasattr(x, "is_deleted")]):
            raise donated_state_error("step")
        shardings = tuple(getattr(x, "sharding", None) for x in leaves)
        key = (treedef, shardings)
        if key in self.sharded:
            return self.sharded[key]
        # A miss may be the same layout spelled otherwise: jit hands back P('fsdp', None)
        # as P('fsdp'), and a second jit for it would compile the step a second time.
        layout = (treedef, tuple(canonical_sharding(sh) for sh in shardings))
        if layout not in self.by_layout:
            def keep(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
                new, metrics = self.step(state, batch)
                new = treedef.unflatten([
                    lax.with_sharding_constraint(x, sh) if isinstance(sh, NamedSharding)
                    else x for x, sh in zip(jax.tree.leaves(new), shardings, strict=True)])
                return new, metrics

            self.by_layout[layout] = jax.jit(keep, donate_argnums=(0,) if self.donate else ())
        self.sharded[key] = self.by_layout[layout]
        return self.sharded[key]

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        try:
            return self._for(state)(state, batch)
        except (RuntimeError, ValueError):
            if _is_deleted(state):
                raise donated_state_error("step") from None
            raise

    def __getattr__(self, name: str) -> Any:
        if name == "jitted":  # not set yet (copy, unpickling): no recursion through here
            raise AttributeError(name)
        return getattr(self.jitted, name)


def _select(pred: Array, new: Any, old: Any) -> Any:
    """``new`` where ``pred`` else ``old``, leaf by leaf (bitwise ``old`` when false)."""
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(loss_fn: Callable[..., Any], optimizer: Optimizer, *, policy: Any = None,
                    loss_scale: Any = None, skip_nonfinite: bool = False,
                    learning_rate: Any = None, grad_norm: bool = True, jit: bool = True,
                    donate: bool = True) -> StepFn:
    """Build the step ``(state, batch) -> (state, metrics)``: forward, loss, backward, update.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> loss`` or ``-> (loss, aux_metrics)``; a
        two-argument ``loss_fn(params, batch)`` is called without the key. With a fused
        state (``TrainState.create(..., fused=True)``) it gets the params tree as views
        of the buffers, and the optimizer runs on the buffers. ``key`` is
        ``fold_in(state.rng, state.step)``, fresh every step. For a model with state
        (``state.model_state`` is not ``None``): ``loss_fn(params, batch, key,
        model_state) -> (loss, aux_metrics, new_model_state)``; the step stores the new
        state (``classifier_loss`` does this for a stateful model).
      optimizer: an ``Optimizer``.
      policy: a ``precision.Policy`` (or its string, e.g. ``"p=f32,c=bf16,o=f32"``): the
        params and the floating parts of the batch are cast to ``compute_dtype`` for the
        forward and backward pass; gradients come back in the params' dtype (FP32 master
        weights) and the update runs there. The model's outputs reach ``loss_fn`` in the
        compute dtype (funtrain's losses compute in float32 anyway). For the policy's
        ``output_dtype`` or per-layer overrides, wrap the model in ``nn.with_policy``
        *instead*: this cast covers every param, so an override would get params already
        rounded to the compute dtype.
      loss_scale: the loss scale this step expects (e.g. ``precision.DynamicLossScale()``
        for float16). The current scale lives in the state, so create the state with
        ``TrainState.create(..., loss_scale=...)``; a state without one, or with a scale
        of another class, is an error here (it would change the state's structure and
        recompile). The state's values count, not this one's.
        With a loss scale the step differentiates ``scale * loss``, unscales the grads in
        float32, checks they are all finite (through their float32 global norm, so a norm
        beyond ~1.8e19, whose square overflows, counts as non-finite too), and applies
        the optimizer only if they are;
        otherwise params and optimizer state stay bitwise unchanged and
        ``state.skipped_steps`` grows by one. The scale is then adjusted.
      skip_nonfinite: the non-finite guard's skip mode, on the device with no host sync:
        a step whose loss, gradients or updated params are not all finite leaves params
        and optimizer state bitwise unchanged and counts one more ``skipped_steps``
        (always on with a loss scale). Without it, ``fit`` stops at a step whose loss or
        gradients are not finite, and refuses to checkpoint params that are not; with it,
        ``fit`` stops after ``max_consecutive_skips`` skips in a row.
      grad_norm: report ``grad_norm`` and test the gradients with it. ``False`` saves its
        pass over the gradients, a kernel per leaf on XLA:CPU, which for trees of thousands
        of small leaves costs up to twice the update's compile and step time
        (``bench/optim.py``); ``fit``'s guard then sees non-finite gradients through the
        next step's loss and the params before each checkpoint. Skip mode and loss scaling
        always test the gradients.
      learning_rate: a float or schedule to report as the ``learning_rate`` metric (the
        optimizer's own is used); a schedule is read at the optimizer's count, which
        skipped steps and ``multi_steps``' micro-steps do not advance. Without it, the
        ``learning_rate`` an ``optim.inject_hyperparams`` optimizer used in this update.
      jit: compile the step with ``jax.jit``.
      donate: donate the input state's buffers to the output (halves peak memory);
        do not reuse a state after passing it in.

    Returns:
      The step. ``metrics`` holds ``loss``, ``grad_norm`` (global L2 norm of the
      unscaled gradients, unless ``grad_norm=False``), whatever ``aux_metrics``
      ``loss_fn`` returned, ``nonfinite`` (an int: +1 the loss, +2 the gradients, +4
      (skip mode) the updated params are not all finite; ``fit``'s guard reads it and
      leaves it out of the history), in skip mode or with a loss scale ``skipped``,
      ``skipped_steps`` and ``loss_scale``, and
      ``invalid_labels`` when ``loss_fn`` reports that count (``classifier_loss`` does:
      integer labels outside ``[0, classes)``, whose cross-entropy is NaN; the guard names
      them as the cause).

      While tracing, the step checks that ``state.opt_state`` is what
      ``optimizer.init_state(state.params)`` builds, and warns when params are 16-bit
      floats (small updates round away in them). The jitted step turns XLA's error for a
      donated state passed in again into one that says so.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import optim
      >>> loss_fn = lambda p, batch: jnp.mean((batch["x"] * p["w"] - batch["y"]) ** 2)
      >>> step = make_train_step(loss_fn, optim.sgd(0.1))
      >>> state = TrainState.create({"w": jnp.zeros(())}, optim.sgd(0.1), jax.random.key(0))
      >>> state, metrics = step(state, {"x": jnp.ones(4), "y": jnp.ones(4)})
      >>> float(metrics["loss"])
      1.0
    """
    where = "make_train_step"
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}")
    check_optimizer(where, "optimizer", optimizer)
    with_key = _takes_key(loss_fn)
    accepts, requires = _positional(loss_fn)
    if policy is not None:
        policy = as_policy(policy)
    if loss_scale is not None:
        check_loss_scale(where, "loss_scale", loss_scale)

    def objective(params: Params, batch: Batch, key: PRNGKey, scale: Any, model_state: Any
                  ) -> tuple[Array, tuple[Array, Metrics, Any]]:
        if policy is not None:  # the model state (statistics) stays float32
            params = policy.cast_to_compute(params)
            batch = policy.cast_to_compute(batch)
        if isinstance(params, FlatParams):  # fused: the model sees views of the buffers
            params = params.unflatten()
        if model_state is not None:
            out = loss_fn(params, batch, key, model_state)
        else:
            out = loss_fn(params, batch, key) if with_key else loss_fn(params, batch)
        loss, aux, new_model_state = _split_loss(where, out, model_state is not None)
        loss = loss.astype(jnp.promote_types(loss.dtype, jnp.float32))
        scaled = loss if scale is None else scale.scale(loss)
        return scaled, (loss, aux, new_model_state)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if not isinstance(state, TrainState):  # checked while tracing, as the batch
            raise TypeError(f"{where}: the step takes (state, batch) with state a TrainState "
                            f"(TrainState.create(params, optimizer, key)), got "
                            f"{type(state).__name__}")
        check_leading_dims(batch, f"{where}: batch")  # static shapes: checked while tracing
        key = jax.random.fold_in(state.rng, state.step)
        scale = state.loss_scale
        if scale is None and loss_scale is not None:
            raise ValueError(f"{where}: loss_scale= was given but state.loss_scale is None; "
                             f"create the state with TrainState.create(..., loss_scale=...) "
                             f"so the scale can change between steps")
        if scale is not None:  # a state built by replace(), not create
            check_loss_scale(where, "state.loss_scale", scale)
        if loss_scale is not None and type(scale) is not type(loss_scale):
            raise ValueError(f"{where}: the step was built with a {type(loss_scale).__name__} "
                             f"but state.loss_scale is a {type(scale).__name__}; give "
                             f"TrainState.create and make_train_step the same kind of scale")
        if state.model_state is not None and accepts < 4:
            raise TypeError(f"{where}: state.model_state is set (the model has state, e.g. "
                            f"BatchNorm statistics), but loss_fn takes {accepts} positional "
                            f"argument(s); write loss_fn(params, batch, key, model_state) -> "
                            f"(loss, aux, new_model_state), or use classifier_loss(model)")
        if state.model_state is None and requires >= 4:
            raise ValueError(f"{where}: loss_fn takes a model_state argument but "
                             f"state.model_state is None; create the state with "
                             f"TrainState.create(params, optimizer, key, model_state=...) from "
                             f"`params, model_state = model.init(key, x)`")
        _check_opt_state(where, optimizer, state)
        _check_param_dtypes(where, state.params)
        (_, (loss, aux, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, batch, key, scale, state.model_state)
        bad_labels = aux.pop("invalid_labels", None)  # classifier_loss's count, for the guard
        guarded = scale is not None or skip_nonfinite
        if scale is not None:
            grads = scale.unscale(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = apply_updates(state.params, updates)
        # Which of loss (1), gradients (2) and, in skip mode, updated params (4) are not
        # finite: fit's guard reads this. The gradients' test is their float32 norm's (one
        # reduction fewer; it also flags gradients whose squares overflow, beyond 1e19).
        # The params' test costs a pass over them, so only skip mode, which must decide on
        # the device, pays it every step; in stop mode fit checks the params on the host
        # before each checkpoint.
        norm = global_norm(grads) if grad_norm or guarded else None
        loss_ok = jnp.isfinite(loss)
        grads_ok = jnp.isfinite(norm) if norm is not None else jnp.bool_(True)
        params_ok = all_finite(params) if guarded else jnp.bool_(True)
        nonfinite = (jnp.where(loss_ok, 0, 1) + jnp.where(grads_ok, 0, 2)
                     + jnp.where(params_ok, 0, 4)).astype(jnp.int32)
        metrics = {"loss": loss, **({"grad_norm": norm} if grad_norm else {}), **aux,
                   "nonfinite": nonfinite}
        if bad_labels is not None:
            metrics["invalid_labels"] = jnp.asarray(bad_labels, jnp.int32)
        lr = _learning_rate(learning_rate, state, opt_state)
        if lr is not None:
            metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
        skipped = state.skipped_steps
        if guarded:
            finite = loss_ok & grads_ok & params_ok
            params = _select(finite, params, state.params)
            opt_state = _select(finite, opt_state, state.opt_state)
            model_state = _select(finite, model_state, state.model_state)
            skipped = (skipped if skipped is not None else jnp.zeros((), jnp.int32)) + \
                jnp.where(finite, 0, 1).astype(jnp.int32)
            metrics["skipped"] = jnp.where(finite, 0, 1).astype(jnp.int32)
            metrics["skipped_steps"] = skipped
        if scale is not None:
            scale = scale.adjust(loss_ok & grads_ok)  # params overflow is no scale problem
            metrics["loss_scale"] = scale.loss_scale
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=state.rng, loss_scale=scale, skipped_steps=skipped,
                               model_state=model_state)
        return new_state, metrics

    if not jit:
        return step
    return _JittedStep(step, donate)


def _scan(state: TrainState, batches: Batch, *, step: StepFn
          ) -> tuple[TrainState, Metrics]:
    return lax.scan(step, state, batches)


# Module-level, with the step static: the compiled scan is cached across calls (and fit's).
_scan_donating = jax.jit(_scan, static_argnames=("step",), donate_argnames=("state",))
_scan_keeping = jax.jit(_scan, static_argnames=("step",))


def scan_steps(step: StepFn, *, jit: bool = True, donate: bool = True
               ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Run several steps in one device call: batches stacked on a new leading axis.

    ``scan_steps(step)(state, stacked)`` equals calling ``step`` once per slice of
    ``stacked``; metrics come back stacked. This cuts per-step dispatch overhead
    for small models. The compiled scan is cached per step and shapes, so calling
    ``scan_steps(step)`` again compiles nothing. On CPU, keep it for steps without
    convolutions: XLA:CPU runs a convolution inside the scan's loop many times slower
    (``bench/fit.py``, workload C: 15x), so ``fit`` does not scan such a step there.
    """
    run = functools.partial(_scan if not jit else _scan_donating if donate else _scan_keeping,
                            step=step)

    def scanned(state: TrainState, stacked: Batch) -> tuple[TrainState, Metrics]:
        if _is_deleted(state):  # XLA's own error says only "Array has been deleted"
            raise donated_state_error("scan_steps")
        return run(state, stacked)

    return scanned


def make_eval_step(eval_fn: Callable[..., Any], *, jit: bool = True
                   ) -> Callable[..., Metrics]:
    """Build ``eval_step(params, batch, model_state=None) -> metrics`` from ``eval_fn``.

    ``eval_fn(params, batch)`` (or ``eval_fn(params, batch, model_state)`` for a model
    with state) returns a dict of per-batch *mean* metrics (or one scalar, reported as
    ``loss``); ``evaluate`` weights them by batch size. With a model state, the step first
    checks, once per state, that every BatchNorm has statistics (eval mode before any
    training is an error naming the layer).
    """
    if not callable(eval_fn):
        raise TypeError(f"make_eval_step: eval_fn must be callable, got "
                        f"{type(eval_fn).__name__}")

    def run(params: Params, batch: Batch, model_state: Any = None) -> Metrics:
        if isinstance(params, FlatParams):
            params = params.unflatten()
        out = eval_fn(params, batch) if model_state is None else \
            eval_fn(params, batch, model_state)
        if not isinstance(out, Mapping):
            out = {"loss": out}
        for name, value in out.items():
            if name in ("step", "epoch"):  # History.eval records them beside the metrics
                raise ValueError(f"make_eval_step: metric {name!r} has a name History and "
                                 f"the loggers use for the step and epoch; rename it")
            if jnp.shape(value) != ():
                raise ValueError(f"make_eval_step: metric {name!r} must be a scalar (a mean "
                                 f"over the batch), got shape {jnp.shape(value)}")
        return dict(out)

    compiled = jax.jit(run) if jit else run
    accepts, requires = _positional(eval_fn)
    wants_state = requires >= 3
    checked: list[Any] = []  # the state leaves last found ready (checked once per state)

    def eval_step(params: Params, batch: Batch, model_state: Any = None) -> Metrics:
        if model_state is None and wants_state:
            raise ValueError("eval_step: eval_fn takes a model_state (the model has state, "
                             "e.g. BatchNorm statistics) but none was given; call "
                             "eval_step(params, batch, state.model_state), or "
                             "evaluate(eval_step, params, data, model_state=...)")
        if model_state is not None and accepts < 3:
            raise TypeError("eval_step: a model_state was given (the model has state, e.g. "
                            "BatchNorm statistics) but eval_fn takes (params, batch); write "
                            "eval_fn(params, batch, model_state), or use "
                            "classifier_eval(model)")
        leaves = jax.tree.leaves(model_state)
        # Traced statistics (the step inside the user's own jit) cannot be read: unchecked
        if leaves and not any(isinstance(x, jax.core.Tracer) for x in leaves):
            if len(leaves) != len(checked) or any(
                    a is not b for a, b in zip(leaves, checked, strict=True)):
                check_statistics(model_state, "eval_step")
                checked[:] = leaves
        return compiled(params, batch, model_state)

    return eval_step


def _inputs_and_labels(batch: Batch, x: str, y: str, where: str) -> tuple[Array, Array]:
    """``(batch[x], batch[y])`` of a dict batch, or a batch given as a tuple ``(x, y)``."""
    if isinstance(batch, tuple) and len(batch) == 2:
        return batch
    if isinstance(batch, Mapping):
        missing = [k for k in (x, y) if k not in batch]
        if missing:
            raise ValueError(f"{where}: the batch has no key {missing[0]!r} (its keys: "
                             f"{', '.join(map(repr, batch))}); name the keys with "
                             f"{where}(model, x=..., y=...)")
        return batch[x], batch[y]
    got = f"a tuple of {len(batch)}" if isinstance(batch, tuple) else type(batch).__name__
    raise TypeError(f"{where}: a batch is a dict {{{x!r}: inputs, {y!r}: labels}} or a tuple "
                    f"(inputs, labels), got {got}")


def classifier_loss(model: Module, *, label_smoothing: float = 0.0, x: str = "x",
                    y: str = "y") -> Callable[..., Any]:
    """``loss_fn`` for classification: softmax cross-entropy on ``model(batch[x])``.

    A batch is a dict with inputs under ``x`` and labels under ``y``, or a tuple
    ``(inputs, labels)``. Runs the model with ``train=True`` and the step's key (for
    dropout), and also reports ``accuracy`` and ``invalid_labels`` (how many integer labels
    lie outside ``[0, classes)``: their loss is NaN, and ``fit``'s guard names them). For a
    stateful model (BatchNorm) the loss takes and returns the model state:
    ``loss_fn(params, batch, key, model_state) -> (loss, aux, state)``.
    """
    where = "classifier_loss"

    def metrics(logits: Array, labels: Array) -> tuple[Array, Metrics]:
        loss = losses.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return loss, {"accuracy": losses.accuracy(logits, labels),
                      "invalid_labels": losses.invalid_labels(logits, labels)}

    if model.stateful:
        def stateful_loss_fn(params: Params, batch: Batch, key: PRNGKey, model_state: Any
                             ) -> tuple[Array, Metrics, Any]:
            inputs, labels = _inputs_and_labels(batch, x, y, where)
            logits, model_state = model.apply(params, inputs, state=model_state, key=key,
                                              train=True)
            return (*metrics(logits, labels), model_state)

        return stateful_loss_fn

    def loss_fn(params: Params, batch: Batch, key: PRNGKey) -> tuple[Array, Metrics]:
        inputs, labels = _inputs_and_labels(batch, x, y, where)
        return metrics(model.apply(params, inputs, key=key, train=True), labels)

    return loss_fn


def classifier_eval(model: Module, *, x: str = "x", y: str = "y") -> Callable[..., Metrics]:
    """``eval_fn`` for classification: mean cross-entropy ``loss`` and ``accuracy``.

    For a stateful model it is ``eval_fn(params, batch, model_state)`` and runs the model
    in eval mode on the running statistics.
    """

    where = "classifier_eval"

    def metrics(logits: Array, labels: Array) -> Metrics:
        return {"loss": losses.softmax_cross_entropy(logits, labels),
                "accuracy": losses.accuracy(logits, labels)}

    if model.stateful:
        def stateful_eval_fn(params: Params, batch: Batch, model_state: Any) -> Metrics:
            inputs, labels = _inputs_and_labels(batch, x, y, where)
            return metrics(model.apply(params, inputs, state=model_state)[0], labels)

        return stateful_eval_fn

    def eval_fn(params: Params, batch: Batch) -> Metrics:
        inputs, labels = _inputs_and_labels(batch, x, y, where)
        return metrics(model.apply(params, inputs), labels)

    return eval_fn
