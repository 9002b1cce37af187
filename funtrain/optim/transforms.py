"""Building blocks: small ``Optimizer``s that ``chain`` combines into full optimizers.

Each factory validates its hyperparameters and returns ``Optimizer(init_state,
update)`` over a NamedTuple state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from funtrain._tree import check_same_structure
from funtrain._typing import Array, Grads, Params, Updates
from funtrain.optim._checks import (
    Beta,
    BetaOrSchedule,
    Count,
    Fraction,
    Int,
    NonNegative,
    NonNegativeOrSchedule,
    Positive,
    Range,
    Real,
    checked,
    is_traced_or_array,
    named,
)
from funtrain.optim.base import EmptyState, Optimizer, global_norm
from funtrain.optim.fused import FlatParams, flat_mask, leafwise
from funtrain.optim.schedules import value_at

_INT32_MAX = jnp.iinfo(jnp.int32).max


def safe_increment(count: Array) -> Array:
    """``count + 1`` that saturates instead of wrapping at int32's maximum."""
    return jnp.where(count < _INT32_MAX, count + 1, count).astype(jnp.int32)


def _need_params(where: str, params: Params | None) -> Params:
    if params is None:
        raise ValueError(f"{where}: needs the current params; call "
                         f"update(grads, state, params)")
    return params


# --------------------------------------------------------------------------- scale


@checked
def scale(step_size: Real) -> Optimizer:
    """Multiply the updates by a constant: ``u ← step_size · g``."""

    def update(grads: Grads, state: EmptyState, params: Params | None = None):
        return jax.tree.map(lambda g: (step_size * g).astype(g.dtype), grads), state

    return Optimizer(lambda params: EmptyState(), update)


class ScaleByScheduleState(NamedTuple):
    """``count``: how many updates were made (the schedule's step)."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count


@checked
def scale_by_learning_rate(learning_rate: NonNegativeOrSchedule, *, flip_sign: bool = True
                           ) -> Optimizer:
    """Multiply by ``-learning_rate`` (a float, or a schedule ``step -> lr``).

    With a schedule the block counts its own updates; the first uses ``schedule(0)``.
    A float needs no count, so the block is then stateless (SGD keeps 0 extra bytes).
    ``flip_sign=False`` keeps the sign (for gradient *ascent* or custom chains).
    """
    sign = -1.0 if flip_sign else 1.0
    if not callable(learning_rate):

        def update_const(grads: Grads, state: EmptyState, params: Params | None = None):
            return jax.tree.map(lambda g: (sign * learning_rate * g).astype(g.dtype), grads), state

        return Optimizer(lambda params: EmptyState(), update_const)
    lr = learning_rate

    def init_state(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(grads: Grads, state: ScaleByScheduleState, params: Params | None = None):
        step_size = sign * lr(state.count)
        updates = jax.tree.map(lambda g: (step_size * g).astype(g.dtype), grads)
        return updates, ScaleByScheduleState(count=safe_increment(state.count))

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    """``trace``: the momentum buffer; ``count``: updates so far (first step is special)."""

    trace: Any
    count: Array  # type: ignore[assignment]  # shadows tuple.count


@checked
def trace(decay: NonNegativeOrSchedule, *, nesterov: bool = False, dampening: Fraction = 0.0,
          accumulator_dtype: Any = None) -> Optimizer:
    r"""Heavy-ball momentum, PyTorch's convention.

    .. math::
        v_1 = g_1, \qquad v_t = \mu_t v_{t-1} + (1 - \tau) g_t \quad (t > 1)

    and the output is :math:`v_t`, or :math:`g_t + \mu_t v_t` with ``nesterov=True``.
    With ``dampening`` :math:`\tau = 0` this equals the usual JAX ``trace`` transform (which starts
    from :math:`v_0 = 0`); with :math:`\tau > 0` PyTorch's first step skips the
    dampening, and so does this block. A scheduled (or injected) momentum that is 0 at a
    step leaves :math:`v` as it is and outputs :math:`g_t`, as PyTorch's ``if momentum !=
    0``. One case differs: PyTorch starts its buffer (undamped) at the first nonzero
    momentum, this block at update 1, so a schedule that starts at exactly 0 with
    :math:`\tau > 0` damps one more step than PyTorch.

    Args:
      decay: the momentum :math:`\mu_t \ge 0`, a float or a schedule ``step -> momentum``:
        update :math:`t` (1-based) uses ``schedule(t - 1)``, the step the learning-rate
        schedule sees, as PyTorch's ``momentum`` under ``OneCycleLR``. The schedule is
        checked once, at step 0.
      nesterov: Nesterov momentum (Sutskever et al., 2013, as in PyTorch).
      dampening: :math:`\tau \in [0, 1]`.
      accumulator_dtype: dtype of the buffer; defaults to each param's dtype.

    Examples:
      >>> from funtrain.optim import schedules
      >>> mom = trace(schedules.one_cycle_momentum(total_steps=100))
    """
    where = "trace"
    scheduled = callable(decay)
    varies = scheduled or is_traced_or_array(decay)  # may be 0 at some step
    # A schedule's later values are unknown (PyTorch checks only dampening too).
    static = not (is_traced_or_array(decay) or is_traced_or_array(dampening))
    if nesterov and static and ((not scheduled and not decay) or dampening):
        w, name = named(where, "decay")
        need = "dampening == 0" if scheduled else f"{name} > 0 and dampening == 0"
        got = "" if scheduled else f"{name}={decay}, "
        raise ValueError(f"{w}: nesterov=True needs {need}, got {got}dampening={dampening}")

    def init_state(params: Params) -> TraceState:
        buf = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=accumulator_dtype or p.dtype),
                           params)
        return TraceState(trace=buf, count=jnp.zeros((), jnp.int32))

    def update(grads: Grads, state: TraceState, params: Params | None = None):
        first = state.count == 0
        # The count the block already keeps (for the first step) is the schedule's step.
        mu_t = value_at(decay, state.count)

        def rule(g: Array, v: Array) -> tuple[Array, Array]:
            g = g.astype(v.dtype)  # PyTorch's arithmetic: in the buffer's dtype
            # A float momentum is weakly typed; a schedule's value is cast the same way.
            mu = jnp.asarray(mu_t, v.dtype) if scheduled else mu_t
            new = jnp.where(first, g, mu * v + (1.0 - dampening) * g)
            out = g + mu * new if nesterov else new
            if varies:  # a momentum of 0 skips the buffer (PyTorch's `if momentum != 0`)
                return jnp.where(mu == 0, g, out), jnp.where(mu == 0, v, new)
            return out, new

        updates, new_trace = per_leaf(rule, grads, state.trace, promote=False,
                                       where="trace.update")
        return updates, TraceState(trace=new_trace, count=safe_increment(state.count))

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- weight decay

MaskOrFn = Any  # a pytree of bools like params, or a function params -> such a pytree


def resolve_mask(mask: MaskOrFn | None, params: Params, where: str) -> Any:
    """The mask tree for ``params`` (all True when ``mask`` is None), structure-checked.

    For fused params the mask is given per leaf and comes back per buffer (``flat_mask``).
    """
    if isinstance(params, FlatParams):
        leaves = resolve_mask(mask, params.unflatten(), where)
        return FlatParams(flat_mask(leaves, params), params.layout)
    m = mask(params) if callable(mask) else mask
    if m is None:
        return jax.tree.map(lambda _: True, params)
    check_same_structure(params, m, what=where, expected_name="params", actual_name="mask")
    return m


@checked
def add_decayed_weights(weight_decay: NonNegativeOrSchedule, mask: MaskOrFn | None = None
                        ) -> Optimizer:
    r"""Add :math:`\lambda \theta` to the updates (coupled L2 when placed before the lr).

    Args:
      weight_decay: :math:`\lambda \ge 0`, a float or a schedule.
      mask: optional pytree of bools with the params' structure (or a function
        ``params -> mask``); only ``True`` leaves are decayed, e.g. to skip biases.
        A mask whose structure differs from the params fails in ``init_state``.
    """
    where = "add_decayed_weights"
    scheduled = callable(weight_decay)

    def init_state(params: Params) -> Any:
        if mask is not None:
            resolve_mask(mask, params, where)
        if scheduled:
            return ScaleByScheduleState(count=jnp.zeros((), jnp.int32))
        return EmptyState()

    def update(grads: Updates, state: Any, params: Params | None = None):
        params = _need_params(where, params)
        check_same_structure(params, grads, what=where, expected_name="params",
                             actual_name="grads")
        lam = weight_decay(state.count) if callable(weight_decay) else weight_decay
        m = resolve_mask(mask, params, where)

        def add(g: Array, p: Array, keep: Any) -> Array:
            decayed = (g + lam * p.astype(g.dtype)).astype(g.dtype)
            if isinstance(keep, bool):
                return decayed if keep else g
            return jnp.where(keep, decayed, g)

        updates = jax.tree.map(add, grads, params, m)
        if scheduled:
            state = ScaleByScheduleState(count=safe_increment(state.count))
        return updates, state

    return Optimizer(init_state, update)


def labels_to_mask(fn: Callable[[tuple[str, ...], Array], bool]) -> Callable[[Params], Any]:
    """A mask function from a predicate on ``(key_path, leaf)``; e.g. decay only 2-D weights.

    Examples:
      >>> mask = labels_to_mask(lambda path, p: p.ndim > 1)
    """

    def make(params: Params) -> Any:
        def pred(path: Any, leaf: Array) -> bool:
            keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
                         for k in path)
            return bool(fn(tuple(str(k) for k in keys), leaf))

        return jax.tree_util.tree_map_with_path(pred, params)

    return make


# --------------------------------------------------------------------------- helpers


def _acc_dtype(x: Array) -> Any:
    """Compute dtype for statistics: float32 at least (float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _zeros_like(params: Params, dtype: Any = None) -> Any:
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype or _acc_dtype(p)), params)


def per_leaf(rule: Callable[..., tuple], grads: Any, *slots: Any, params: Any = None,
             promote: bool = True, where: str = "update") -> tuple:
    """Run an optimizer's per-leaf ``rule(g, *slots[, p]) -> (update, *new_slots)`` over
    trees: ``(updates, *new_slot_trees)``.

    The rule is the math alone. It gets each leaf promoted to float32 at least (and the
    leaf's param last when ``params`` is given); the update comes back in the gradient's
    dtype and each slot in its own. A slot of ``()`` (state the settings leave out, e.g.
    AMSGrad's maximum) reaches the rule as ``None`` and comes back as ``()``.
    ``promote=False`` passes the leaves as they are (a rule that reads their dtype).
    Grads whose structure differs from the first slot's (the state, made from params) are
    an error naming ``where`` and the key paths.
    """
    treedef = jax.tree.structure(grads)
    absent = [type(t) is tuple and not t for t in slots]  # () itself, not an empty node
    if slots and not absent[0]:
        check_same_structure(slots[0], grads, what=where, actual_name="grads",
                             expected_name="the optimizer state (made from params)")
    columns = [[None] * treedef.num_leaves if no else treedef.flatten_up_to(t)
               for t, no in zip(slots, absent, strict=True)]
    if params is not None:
        columns.append(treedef.flatten_up_to(params))
    outs = []
    for g, *xs in zip(treedef.flatten_up_to(grads), *columns, strict=True):
        dt = _acc_dtype(g) if promote else None
        out = rule(*((x if x is None or dt is None else x.astype(dt)) for x in (g, *xs)))
        slots_in = xs[:len(slots)]
        outs.append([out[0].astype(g.dtype)] + [o if x is None else o.astype(x.dtype)
                                                for o, x in zip(out[1:], slots_in, strict=True)])
    return (treedef.unflatten([o[0] for o in outs]),
            *(() if absent[k] else treedef.unflatten([o[k + 1] for o in outs])
              for k in range(len(slots))))


def _check_eps_pair(where: str, eps: Any, eps_root: Any) -> None:
    """``eps`` (outside the root) may be 0 only when ``eps_root > 0`` keeps it positive."""
    if not (is_traced_or_array(eps) or is_traced_or_array(eps_root)) and eps == eps_root == 0:
        raise ValueError(f"{named(where, 'eps')[0]}: eps must be > 0 (or pass eps_root > 0 to "
                         f"put it inside the square root), got {eps}")


def _bias_correction(decay: Any, count: Array, dtype: Any) -> Array:
    return 1.0 - jnp.asarray(decay, dtype) ** count.astype(dtype)


# --------------------------------------------------------------------------- RMS


class ScaleByRmsState(NamedTuple):
    """``nu``: EMA of squared grads; ``mu``: EMA of grads (centered only, else ``()``)."""

    nu: Any
    mu: Any


@checked
def scale_by_rms(decay: Beta = 0.99, eps: Positive = 1e-8, *, eps_in_sqrt: bool = False,
                 centered: bool = False, nu_dtype: Any = None) -> Optimizer:
    r"""Divide by the root of an EMA of squared gradients (Hinton's RMSProp, 2012).

    .. math::
        v_t = \alpha v_{t-1} + (1 - \alpha) g_t^2, \qquad
        u_t = g_t / (\sqrt{v_t} + \epsilon) \quad \text{(PyTorch)}
        \quad\text{or}\quad g_t / \sqrt{v_t + \epsilon} \quad (\texttt{eps\_in\_sqrt}, \text{optax})

    ``centered`` subtracts the squared EMA of the gradients from :math:`v_t`.
    """
    where = "scale_by_rms"

    def init_state(params: Params) -> ScaleByRmsState:
        return ScaleByRmsState(nu=_zeros_like(params, nu_dtype),
                               mu=_zeros_like(params) if centered else ())

    def update(grads: Grads, state: ScaleByRmsState, params: Params | None = None):
        def rule(g: Array, nu: Array, mu: Any) -> tuple:
            nu = decay * nu + (1 - decay) * g * g
            var = nu
            if centered:
                mu = decay * mu + (1 - decay) * g
                var = nu - mu * mu
            return g / (jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps), nu, mu

        updates, nu, mu = per_leaf(rule, grads, state.nu, state.mu, where=where)
        return updates, ScaleByRmsState(nu=nu, mu=mu)

    return Optimizer(init_state, update)


class ScaleBySumState(NamedTuple):
    """``sum_of_squares``: running sum of squared grads (Adagrad)."""

    sum_of_squares: Any


@checked
def scale_by_rss(initial_accumulator_value: NonNegative = 0.0, eps: Positive = 1e-10, *,
                 eps_in_sqrt: bool = False) -> Optimizer:
    r"""Divide by the root of the running sum of squared gradients (Adagrad; Duchi et al., 2011).

    .. math:: s_t = s_{t-1} + g_t^2, \qquad u_t = g_t / (\sqrt{s_t} + \epsilon)
        \quad \text{or, with } \texttt{eps\_in\_sqrt},\ g_t / \sqrt{s_t + \epsilon}
        \ (0 \text{ where } s_t = 0)
    """
    where = "scale_by_rss"

    def init_state(params: Params) -> ScaleBySumState:
        return ScaleBySumState(jax.tree.map(
            lambda p: jnp.full_like(p, initial_accumulator_value, dtype=_acc_dtype(p)), params))

    def update(grads: Grads, state: ScaleBySumState, params: Params | None = None):
        def rule(g: Array, s: Array) -> tuple:
            s = s + g * g
            if eps_in_sqrt:
                return jnp.where(s > 0, g * jax.lax.rsqrt(s + eps), 0.0), s
            return g / (jnp.sqrt(s) + eps), s

        updates, sums = per_leaf(rule, grads, state.sum_of_squares, where=where)
        return updates, ScaleBySumState(sums)

    return Optimizer(init_state, update)


class ScaleByAdadeltaState(NamedTuple):
    """EMAs of squared grads (``nu``) and of squared updates (``delta``)."""

    nu: Any
    delta: Any


@checked
def scale_by_adadelta(rho: Fraction = 0.9, eps: Positive = 1e-6) -> Optimizer:
    r"""Adadelta's unit-corrected step (Zeiler, 2012), as PyTorch.

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad
        \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t, \quad
        u_t = \rho u_{t-1} + (1-\rho) \Delta_t^2
    """
    where = "scale_by_adadelta"

    def init_state(params: Params) -> ScaleByAdadeltaState:
        return ScaleByAdadeltaState(_zeros_like(params), _zeros_like(params))

    def update(grads: Grads, state: ScaleByAdadeltaState, params: Params | None = None):
        def rule(g: Array, v: Array, u: Array) -> tuple:
            v = rho * v + (1 - rho) * g * g
            d = jnp.sqrt(u + eps) / jnp.sqrt(v + eps) * g
            return d, v, rho * u + (1 - rho) * d * d

        updates, nu, delta = per_leaf(rule, grads, state.nu, state.delta, where=where)
        return updates, ScaleByAdadeltaState(nu, delta)

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- Adam family


AmsgradConvention = Literal["pytorch", "optax"]  # which v AMSGrad keeps the max of
BiasCorrection = Literal["pytorch", "product"]  # of scheduled betas


class ScaleByAdamState(NamedTuple):
    """``count``; first moment ``mu``; second moment ``nu``; ``nu_max`` (AMSGrad, else ``()``)."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    mu: Any
    nu: Any
    nu_max: Any


class ScaleByAdamProductState(NamedTuple):
    r"""``ScaleByAdamState`` plus the running products :math:`\prod_{s \le t} \beta_s` of the
    scheduled betas (``b1_product``, ``b2_product``; ``()`` for a float beta), kept only
    with ``bias_correction="product"`` and a schedule beta."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    mu: Any
    nu: Any
    nu_max: Any
    b1_product: Any
    b2_product: Any




@checked
def scale_by_adam(b1: BetaOrSchedule = 0.9, b2: BetaOrSchedule = 0.999, eps: NonNegative = 1e-8,
                  eps_root: NonNegative = 0.0, *, nesterov: bool = False, amsgrad: bool = False,
                  amsgrad_convention: AmsgradConvention = "pytorch",
                  bias_correction: BiasCorrection = "pytorch",
                  mu_dtype: Any = None, nu_dtype: Any = None) -> Optimizer:
    r"""Adam's step direction (Kingma & Ba, 2014), before the learning rate.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \quad \hat m_t = \frac{m_t}{1-\beta_1^t}, \quad \hat v_t = \frac{v_t}{1-\beta_2^t},
        \quad u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    ``nesterov`` uses :math:`\hat m_t = \frac{\beta_1 m_t}{1-\beta_1^{t+1}} +
    \frac{(1-\beta_1) g_t}{1-\beta_1^t}` (Dozat's NAdam without a momentum schedule, the
    optax form). ``amsgrad`` (Reddi et al., 2018) keeps the running max of the second
    moment: with ``amsgrad_convention="pytorch"`` (default) of the *raw* :math:`v_t`,
    bias-corrected afterwards; with ``"optax"`` of :math:`\hat v_t`.

    ``b1`` and ``b2`` are floats or schedules ``step -> beta``. With a schedule, update
    :math:`t` (1-based) uses :math:`\beta_t` = ``schedule(t - 1)`` in the moment's EMA, and
    the bias correction is no longer :math:`1 - \beta^t`. ``bias_correction`` picks it:

    - ``"pytorch"`` (default): :math:`1 - \beta_t^{\,t}`, the current beta to the power
      :math:`t`, as ``torch.optim.Adam`` computes it when ``OneCycleLR`` cycles
      ``betas[0]`` (optax's ``scale_by_adam`` under ``inject_hyperparams`` does the same).
      A simplification: it is not the bias of :math:`m_t` once :math:`\beta` varies;
    - ``"product"``: :math:`1 - \prod_{s \le t} \beta_s`, the exact correction (with a
      constant gradient :math:`g`, :math:`m_t = (1 - \prod_{s\le t}\beta_s)\, g`, so
      :math:`\hat m_t = g`). The running product of each scheduled beta is kept in the
      state (``ScaleByAdamProductState``).

    For a float beta both are :math:`1 - \beta^t` and compute the same bits, and the state
    is ``ScaleByAdamState`` whatever ``bias_correction`` says. ``nesterov`` needs a float
    ``b1``.

    ``mu_dtype``/``nu_dtype`` set the moments' storage dtype (e.g. ``jnp.bfloat16``);
    the arithmetic runs in float32 at least.

    Examples:
      >>> from funtrain.optim import schedules
      >>> direction = scale_by_adam(b1=schedules.one_cycle_momentum(total_steps=1000))
    """
    where = "scale_by_adam"
    init_products, betas_at = _adam_betas(where, b1, b2, bias_correction)
    _check_eps_pair(where, eps, eps_root)
    if nesterov and callable(b1):
        raise ValueError(f"{where}: nesterov=True needs a float b1, got a schedule (its "
                         f"look-ahead correction 1 - b1^(t+1) assumes a constant b1)")

    def init_state(params: Params) -> Any:
        return init_products(ScaleByAdamState(
            jnp.zeros((), jnp.int32), _zeros_like(params, mu_dtype),
            _zeros_like(params, nu_dtype), _zeros_like(params, nu_dtype) if amsgrad else ()))

    def update(grads: Grads, state: Any, params: Params | None = None):
        count = safe_increment(state.count)
        state, at = betas_at(state, count)

        def rule(g: Array, m: Array, v: Array, vmax: Any) -> tuple:
            c1, c2, bc1, bc2 = at(g.dtype)
            m, v = c1 * m + (1 - c1) * g, c2 * v + (1 - c2) * g * g
            m_hat = m / bc1
            if nesterov:
                m_hat = c1 * m / _bias_correction(c1, count + 1, g.dtype) + (1 - c1) * g / bc1
            v_hat = v / bc2
            if amsgrad:  # PyTorch keeps the max of the raw v, optax of the corrected one
                vmax = jnp.maximum(vmax, v if amsgrad_convention == "pytorch" else v_hat)
                v_hat = vmax / bc2 if amsgrad_convention == "pytorch" else vmax
            return m_hat / (jnp.sqrt(v_hat + eps_root) + eps), m, v, vmax

        updates, mu, nu, nu_max = per_leaf(rule, grads, state.mu, state.nu, state.nu_max,
                                           where=where)
        return updates, state._replace(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return Optimizer(init_state, update)


def _adam_betas(where: str, b1: Any, b2: Any, bias_correction: str) -> tuple:
    """Adam's betas (floats or schedules) and their bias corrections.

    Returns ``(init_products, betas_at)``. ``init_products(state)`` adds the running products
    of the scheduled betas when ``bias_correction="product"`` needs them (a
    ``ScaleByAdamProductState``). ``betas_at(state, count)`` multiplies them by this step's
    betas and returns ``(state, at)``; ``at(dtype)`` gives ``(beta1, beta2, correction1,
    correction2)`` in that dtype.
    """
    scheduled = (callable(b1), callable(b2))
    products = bias_correction == "product" and any(scheduled)
    if bias_correction == "product" and (is_traced_or_array(b1) or is_traced_or_array(b2)):
        raise ValueError(f"{where}: bias_correction='product' needs the betas' schedules "
                         f"themselves (their running product is kept in the state), got an "
                         f"array beta; with inject_hyperparams pass static_args=('b1', 'b2')")

    def init_products(state: ScaleByAdamState) -> Any:
        one = jnp.ones((), jnp.result_type(float))  # the empty product
        return ScaleByAdamProductState(*state, *(one if s else () for s in scheduled)) \
            if products else state

    def betas_at(state: Any, count: Array) -> tuple:
        # A schedule's step is the count before this update (the first uses schedule(0)).
        betas = (value_at(b1, state.count), value_at(b2, state.count))
        prods: tuple = ((), ())
        if products:
            prods = tuple((p * b).astype(p.dtype) if s else ()
                          for p, b, s in zip((state.b1_product, state.b2_product), betas,
                                              scheduled, strict=True))
            state = state._replace(b1_product=prods[0], b2_product=prods[1])

        def at(dt: Any) -> tuple:
            # A float beta is weakly typed; a schedule's value is cast to match it.
            cs = [jnp.asarray(b, dt) if s else b for b, s in zip(betas, scheduled, strict=True)]
            return (*cs, *(1.0 - p.astype(dt) if products and s  # 1 - prod_{s <= t} beta_s
                           else _bias_correction(c, count, dt)  # 1 - beta_t^t
                           for c, p, s in zip(cs, prods, scheduled, strict=True)))

        return state, at

    return init_products, betas_at


class ScaleByAdamaxState(NamedTuple):
    """``count``; first moment ``mu``; infinity-norm accumulator ``u``."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    mu: Any
    u: Any


@checked
def scale_by_adamax(b1: Beta = 0.9, b2: Beta = 0.999, eps: Positive = 1e-8) -> Optimizer:
    r"""AdaMax (Kingma & Ba, 2014, §7): Adam with the infinity norm.

    :math:`u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon)`,
    :math:`d_t = m_t / ((1-\beta_1^t) u_t)`. PyTorch and optax agree on this form.
    """
    where = "scale_by_adamax"

    def init_state(params: Params) -> ScaleByAdamaxState:
        return ScaleByAdamaxState(jnp.zeros((), jnp.int32), _zeros_like(params),
                                  _zeros_like(params))

    def update(grads: Grads, state: ScaleByAdamaxState, params: Params | None = None):
        count = safe_increment(state.count)

        def rule(g: Array, m: Array, u: Array) -> tuple:
            m = b1 * m + (1 - b1) * g
            u = jnp.maximum(b2 * u, jnp.abs(g) + eps)
            return m / (_bias_correction(b1, count, m.dtype) * u), m, u

        updates, mu, u = per_leaf(rule, grads, state.mu, state.u, where=where)
        return updates, ScaleByAdamaxState(count, mu, u)

    return Optimizer(init_state, update)


class ScaleByNadamState(NamedTuple):
    """``count``; ``mu_product`` (product of the momentum schedule); moments ``mu``, ``nu``."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    mu_product: Array
    mu: Any
    nu: Any


@checked
def scale_by_nadam(b1: Beta = 0.9, b2: Beta = 0.999, eps: Positive = 1e-8,
                   momentum_decay: NonNegative = 4e-3) -> Optimizer:
    r"""NAdam's direction with Dozat's momentum schedule (PyTorch's ``NAdam``).

    .. math::
        \mu_t = \beta_1 (1 - \tfrac12 \cdot 0.96^{t\psi}), \quad
        d_t = \frac{(1-\mu_t)\, g_t}{(1 - \prod_{i\le t}\mu_i)(\sqrt{\hat v_t}+\epsilon)}
            + \frac{\mu_{t+1} m_t}{(1 - \prod_{i\le t+1}\mu_i)(\sqrt{\hat v_t}+\epsilon)}
    """
    where = "scale_by_nadam"

    def init_state(params: Params) -> ScaleByNadamState:
        return ScaleByNadamState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.result_type(float)),
                                 _zeros_like(params), _zeros_like(params))

    def update(grads: Grads, state: ScaleByNadamState, params: Params | None = None):
        count = safe_increment(state.count)
        dt = state.mu_product.dtype
        t = count.astype(dt)
        mu_t = b1 * (1.0 - 0.5 * jnp.asarray(0.96, dt) ** (t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * jnp.asarray(0.96, dt) ** ((t + 1) * momentum_decay))
        prod = state.mu_product * mu_t
        prod_next = prod * mu_next

        def rule(g: Array, m: Array, v: Array) -> tuple:
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            denom = jnp.sqrt(v / _bias_correction(b2, count, v.dtype)) + eps
            d = (1 - mu_t) / (1 - prod) * g / denom + mu_next / (1 - prod_next) * m / denom
            return d, m, v

        updates, mu, nu = per_leaf(rule, grads, state.mu, state.nu, where=where)
        return updates, ScaleByNadamState(count, prod, mu, nu)

    return Optimizer(init_state, update)


@checked
def scale_by_radam(b1: Beta = 0.9, b2: Beta = 0.999, eps: Positive = 1e-8,
                   threshold: float = 5.0) -> Optimizer:
    r"""Rectified Adam's direction (Liu et al., 2020), as PyTorch's ``RAdam``.

    .. math::
        \rho_\infty = \tfrac{2}{1-\beta_2} - 1, \quad
        \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1-\beta_2^t}, \quad
        d_t = \hat m_t \cdot \begin{cases} r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}
        & \rho_t > 5 \\ 1 & \text{otherwise} \end{cases}, \quad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}
    """
    where = "scale_by_radam"
    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def init_state(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(jnp.zeros((), jnp.int32), _zeros_like(params),
                                _zeros_like(params), ())

    def update(grads: Grads, state: ScaleByAdamState, params: Params | None = None):
        count = safe_increment(state.count)

        def rule(g: Array, m: Array, v: Array) -> tuple:
            dt = m.dtype
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            t = count.astype(dt)
            b2t = jnp.asarray(b2, dt) ** t
            rho_t = rho_inf - 2.0 * t * b2t / (1.0 - b2t)
            m_hat = m / _bias_correction(b1, count, dt)
            safe_rho = jnp.where(rho_t > threshold, rho_t, threshold + 1.0)
            r = jnp.sqrt((safe_rho - 4) * (safe_rho - 2) * rho_inf
                         / ((rho_inf - 4) * (rho_inf - 2) * safe_rho))
            adaptive = jnp.sqrt(1.0 - b2t) / (jnp.sqrt(v) + eps)
            return jnp.where(rho_t > threshold, m_hat * r * adaptive, m_hat), m, v

        updates, mu, nu = per_leaf(rule, grads, state.mu, state.nu, where=where)
        return updates, ScaleByAdamState(count, mu, nu, ())

    return Optimizer(init_state, update)


class ScaleByLionState(NamedTuple):
    """``mu``: the momentum EMA."""

    mu: Any


@checked
def scale_by_lion(b1: Beta = 0.9, b2: Beta = 0.99, mu_dtype: Any = None) -> Optimizer:
    r"""Lion's sign update (Chen et al., 2023).

    .. math:: d_t = \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t), \quad
              m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t
    """
    where = "scale_by_lion"

    def init_state(params: Params) -> ScaleByLionState:
        return ScaleByLionState(_zeros_like(params, mu_dtype))

    def update(grads: Grads, state: ScaleByLionState, params: Params | None = None):
        def rule(g: Array, m: Array) -> tuple:
            return jnp.sign(b1 * m + (1 - b1) * g), b2 * m + (1 - b2) * g

        updates, mu = per_leaf(rule, grads, state.mu, where=where)
        return updates, ScaleByLionState(mu)

    return Optimizer(init_state, update)


@checked
def scale_by_trust_ratio(trust_coefficient: Positive = 1.0, eps: NonNegative = 0.0) -> Optimizer:
    r"""Per-leaf layer-wise trust ratio (LARS, You et al. 2017; LAMB, You et al. 2019).

    .. math:: u \leftarrow u \cdot \frac{c\,\lVert\theta\rVert}{\lVert u\rVert + \epsilon}
        \quad (\text{ratio } 1 \text{ where either norm is } 0)
    """
    where = "scale_by_trust_ratio"

    def update(grads: Updates, state: EmptyState, params: Params | None = None):
        params = _need_params(where, params)
        check_same_structure(params, grads, what=where, expected_name="params",
                             actual_name="updates")

        def leaf(u: Array, p: Array) -> Array:
            dt = _acc_dtype(u)
            pn = jnp.linalg.norm(p.astype(dt).ravel())
            un = jnp.linalg.norm(u.astype(dt).ravel())
            ratio = trust_coefficient * pn / (un + eps)
            ratio = jnp.where((pn == 0) | (un == 0), 1.0, ratio)
            return (u.astype(dt) * ratio).astype(u.dtype)

        return jax.tree.map(leaf, grads, params), state

    return leafwise(Optimizer(lambda params: EmptyState(), update))


# --------------------------------------------------------------------------- clipping


@checked
def clip(max_delta: Positive) -> Optimizer:
    """Clip every update element to ``[-max_delta, max_delta]``."""

    def update(grads: Grads, state: EmptyState, params: Params | None = None):
        # cast back: a numpy or injected float32 bound would promote bf16 updates
        return jax.tree.map(lambda g: jnp.clip(g, -max_delta, max_delta).astype(g.dtype),
                            grads), state

    return Optimizer(lambda params: EmptyState(), update)


class ClipByGlobalNormState(NamedTuple):
    """``norm``: the global norm of the last grads *before* clipping (for logging)."""

    norm: Array


@checked
def clip_by_global_norm(max_norm: Annotated[float, Range(0.0, low_open=True, allow_inf=True)], *,
                        eps: NonNegative = 1e-6) -> Optimizer:
    r"""Rescale all grads together so their global L2 norm is at most ``max_norm``.

    PyTorch's ``clip_grad_norm_``: :math:`g \leftarrow g \cdot \min(1, \frac{c}{\lVert g\rVert
    + \epsilon})` with :math:`\epsilon = 10^{-6}`; ``eps=0`` gives the exact
    :math:`c / \max(\lVert g\rVert, c)` form. The pre-clip norm is kept in the state
    (``state.norm``) so a train step can report it. As in PyTorch, a non-finite grad
    spoils the clip: a NaN makes every grad NaN, an inf makes itself NaN and the others
    zero (all NaN with ``max_norm=inf``). Skip such steps with ``apply_if_finite`` or the
    train step's ``skip_nonfinite``.
    """

    def init_state(params: Params) -> ClipByGlobalNormState:
        return ClipByGlobalNormState(jnp.zeros((), jnp.float32))

    def update(grads: Grads, state: ClipByGlobalNormState, params: Params | None = None):
        norm = global_norm(grads)
        factor = jnp.minimum(1.0, max_norm / (norm + eps))
        clipped = jax.tree.map(lambda g: (g * factor.astype(_acc_dtype(g))).astype(g.dtype),
                               grads)
        return clipped, ClipByGlobalNormState(norm.astype(state.norm.dtype))

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- Adafactor


class ScaleByFactoredRmsState(NamedTuple):
    """``count``; row/column second-moment factors for >= 2-D leaves (``v_row``, ``v_col``)
    and the full second moment ``v`` for vectors and scalars; unused slots hold 0-d zeros."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count
    v_row: Any
    v_col: Any
    v: Any


@checked
def scale_by_factored_rms(beta2_decay: Annotated[float, Range(high=0.0)] = -0.8,
                          eps: Annotated[float | None,
                                         Range(0.0, low_open=True, optional=True)] = None,
                          clipping_threshold: Positive = 1.0) -> Optimizer:
    r"""Adafactor's direction (Shazeer & Stern, 2018), as ``torch.optim.Adafactor``.

    For a leaf with >= 2 dims the second moment is factored over its last two axes:

    .. math::
        \hat\beta_{2,t} = 1 - t^{c}, \quad
        R_t = \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{col}(g_t^2), \quad
        C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{row}(g_t^2), \\
        \hat V_t = \frac{R_t C_t}{\max(\mathrm{mean}(R_t), \epsilon_1)}, \quad
        U_t = \frac{g_t}{\sqrt{\max(\hat V_t, \epsilon_1^2)}}, \quad
        \hat U_t = \frac{U_t}{\max(1, \mathrm{RMS}(U_t)/d)}

    (vectors and scalars keep an unfactored EMA). ``eps`` (:math:`\epsilon_1`) defaults to
    the machine epsilon of each leaf's dtype, ``clipping_threshold`` is :math:`d`.
    """
    where = "scale_by_factored_rms"

    def init_state(params: Params) -> ScaleByFactoredRmsState:
        def row(p: Array) -> Array:
            return jnp.zeros(p.shape[:-1], _acc_dtype(p)) if p.ndim >= 2 else jnp.zeros(())

        def col(p: Array) -> Array:
            return (jnp.zeros(p.shape[:-2] + p.shape[-1:], _acc_dtype(p)) if p.ndim >= 2
                    else jnp.zeros(()))

        def full(p: Array) -> Array:
            return jnp.zeros(p.shape, _acc_dtype(p)) if p.ndim < 2 else jnp.zeros(())

        return ScaleByFactoredRmsState(jnp.zeros((), jnp.int32), jax.tree.map(row, params),
                                       jax.tree.map(col, params), jax.tree.map(full, params))

    def update(grads: Grads, state: ScaleByFactoredRmsState, params: Params | None = None):
        count = safe_increment(state.count)

        def leaf(g: Array, r: Array, c: Array, v: Array) -> tuple:
            dt = _acc_dtype(g)
            e1 = eps if eps is not None else float(jnp.finfo(g.dtype).eps)
            w = count.astype(dt) ** beta2_decay  # 1 - beta2_t
            gf = g.astype(dt)
            g2 = gf * gf
            if g.ndim >= 2:
                r = r + w * (jnp.mean(g2, axis=-1) - r)
                c = c + w * (jnp.mean(g2, axis=-2) - c)
                denom = jnp.maximum(jnp.mean(r, axis=-1, keepdims=True), e1)
                v_hat = (r[..., :, None] * c[..., None, :]) / denom[..., None]
            else:
                v = v + w * (g2 - v)
                v_hat = v
            u = gf * jax.lax.rsqrt(jnp.maximum(v_hat, e1 * e1))
            rms = jnp.sqrt(jnp.mean(u * u))
            return u / jnp.maximum(1.0, rms / clipping_threshold), r, c, v

        # eps1 defaults to the gradient's own dtype epsilon: the rule sees the raw dtype
        updates, rows, cols, full = per_leaf(leaf, grads, state.v_row, state.v_col, state.v,
                                             promote=False, where=where)
        return updates, ScaleByFactoredRmsState(count, rows, cols, full)

    return leafwise(Optimizer(init_state, update))


class ScaleByRelativeStepState(NamedTuple):
    """``count``: updates so far (for the relative step size)."""

    count: Array  # type: ignore[assignment]  # shadows tuple.count


@checked
def scale_by_relative_step(learning_rate: NonNegativeOrSchedule = 1e-2,
                           eps2: NonNegative = 1e-3,
                           weight_decay: NonNegative = 0.0) -> Optimizer:
    r"""Adafactor's relative step (Shazeer & Stern, 2018), learning rate included, as
    ``torch.optim.Adafactor``: :math:`-\max(\epsilon_2, \mathrm{RMS}(\theta))
    \min(\eta, 1/\sqrt t)\,\hat U - \eta\lambda\theta`, the RMS per leaf."""
    where = "scale_by_relative_step"

    def init_state(params: Params) -> ScaleByRelativeStepState:
        return ScaleByRelativeStepState(jnp.zeros((), jnp.int32))

    def update(updates: Any, state: ScaleByRelativeStepState, params: Params | None = None):
        params = _need_params(where, params)
        count = safe_increment(state.count)
        lr = value_at(learning_rate, state.count)

        def rule(u: Array, p: Array) -> tuple:
            rho = jnp.minimum(lr, 1.0 / jnp.sqrt(count.astype(u.dtype)))
            alpha = jnp.maximum(eps2, jnp.sqrt(jnp.mean(p * p))) * rho
            return (-alpha * u - lr * weight_decay * p,)

        return per_leaf(rule, updates, params=params)[0], ScaleByRelativeStepState(count)

    return leafwise(Optimizer(init_state, update))  # RMS(θ) is per leaf


# --------------------------------------------------------------------------- schedule-free


class ScheduleFreeState(NamedTuple):
    """``b1`` (kept for ``schedule_free_eval_params``), ``count``, ``weight_sum``, ``max_lr``,
    the second moment ``nu`` and the ``z`` sequence."""

    b1: Array
    count: Array  # type: ignore[assignment]  # shadows tuple.count
    weight_sum: Array
    max_lr: Array
    nu: Any
    z: Any


@checked
def scale_by_schedule_free(learning_rate: NonNegative = 0.0025,
                           b1: Annotated[float, Range(0.0, 1.0, True, True)] = 0.9,
                           b2: Beta = 0.999, eps: Positive = 1e-8,
                           weight_decay: NonNegative = 0.0,
                           warmup_steps: Annotated[int, Int(low=0)] = 0, *,
                           weight_lr_power: float = 2.0, mask: Any = None,
                           convention: Literal["paper", "optax", "schedulefree"] = "paper"
                           ) -> Optimizer:
    r"""Schedule-free AdamW's whole step (Defazio et al., 2024), learning rate included: the
    update moves the held params :math:`y` to :math:`y_{t+1}`. See ``schedule_free_adamw``.
    """
    where = "scale_by_schedule_free"

    def warm(t: Array) -> Array:
        if warmup_steps == 0:
            return jnp.ones((), t.dtype)
        return jnp.clip(t / warmup_steps, 0.0, 1.0)

    def init_state(params: Params) -> ScheduleFreeState:
        f = jnp.result_type(float)
        if mask is not None:
            resolve_mask(mask, params, where)
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                          params)
        return ScheduleFreeState(jnp.asarray(b1, f), jnp.zeros((), jnp.int32),
                                 jnp.zeros((), f), jnp.zeros((), f), nu,
                                 jax.tree.map(jnp.array, params))

    def update(grads: Any, state: ScheduleFreeState, params: Params | None = None):
        params = _need_params(where, params)
        count = safe_increment(state.count)
        t = count.astype(state.weight_sum.dtype)
        bc2 = 1.0 - jnp.asarray(b2, t.dtype) ** t
        if convention == "paper":
            gamma = learning_rate * warm(t) * jnp.sqrt(bc2)
            gamma_z = gamma
        else:
            gamma = learning_rate * warm(t)
            gamma_z = learning_rate * warm(t - 1.0) if convention == "optax" else gamma
        max_lr = jnp.maximum(state.max_lr, gamma)
        weight = max_lr ** weight_lr_power
        total = state.weight_sum + weight
        ck = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)
        decay = resolve_mask(mask, params, where)

        def leaf(g: Array, y: Array, v: Array, z: Array, keep: Any) -> tuple:
            dt = v.dtype
            gf, yf, zf = g.astype(dt), y.astype(dt), z.astype(dt)
            v = b2 * v + (1 - b2) * gf * gf
            denom = jnp.sqrt(v) + eps if convention == "paper" else jnp.sqrt(v / bc2) + eps
            d = gf / denom
            if keep is True or not isinstance(keep, bool):
                d = d + jnp.where(keep, weight_decay, 0.0) * yf
            z_new = zf - gamma_z * d
            x = (yf - (1.0 - b1) * zf) / b1
            x = (1.0 - ck) * x + ck * z_new
            y_new = b1 * x + (1.0 - b1) * z_new
            return (y_new - yf).astype(y.dtype), v, z_new.astype(z.dtype)

        check_same_structure(state.z, grads, what=where, actual_name="grads",
                             expected_name="the optimizer state (made from params)")
        treedef = jax.tree.structure(grads)
        flat = [treedef.flatten_up_to(tree) for tree in (grads, params, state.nu, state.z)]
        flat.append(treedef.flatten_up_to(decay))
        outs = [leaf(*args) for args in zip(*flat, strict=True)]
        updates, nu, z = (treedef.unflatten([o[k] for o in outs]) for k in range(3))
        return updates, ScheduleFreeState(state.b1, count, total, max_lr, nu, z)

    return Optimizer(init_state, update)


# --------------------------------------------------------------------------- Muon

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Array, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = _NS_COEFFICIENTS) -> Array:
    r"""Approximately orthogonalise a matrix with Keller Jordan's quintic Newton–Schulz.

    :math:`X_0 = G/\max(\lVert G\rVert_F, \epsilon)`, then ``steps`` times
    :math:`A = XX^\top,\ X \leftarrow aX + (bA + cA^2)X` (on the wide orientation).
    """
    a, b, c = coefficients
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / jnp.maximum(jnp.linalg.norm(x), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class ScaleByMuonState(NamedTuple):
    """``mu``: the momentum buffer of each (2-D) leaf, in float32 at least."""

    mu: Any


@checked
def scale_by_muon(momentum: Beta = 0.95, nesterov: bool = True, ns_steps: Count = 5,
                  eps: float = 1e-7,
                  adjust_lr: Literal["original", "match_rms_adamw"] = "original",
                  ns_dtype: Any = None) -> Optimizer:
    r"""Muon's direction for 2-D leaves: :math:`s\,\mathrm{NS}(u_t)` with
    :math:`b_t = \mu b_{t-1} + (1-\mu) g_t` and :math:`u_t = (1-\mu) g_t + \mu b_t`
    (Nesterov) or :math:`b_t`; :math:`s = \sqrt{\max(1, n/m)}` (``"original"``) or
    :math:`0.2\sqrt{\max(n, m)}` (``"match_rms_adamw"``). See ``optim.muon``.
    """
    where = "scale_by_muon"

    def init_state(params: Params) -> ScaleByMuonState:
        for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
            if jnp.ndim(p) != 2:
                raise ValueError(f"{where}: orthogonalises 2-D leaves only; "
                                 f"{jax.tree_util.keystr(path)} has shape {jnp.shape(p)}")
        return ScaleByMuonState(_zeros_like(params))

    def update(grads: Grads, state: ScaleByMuonState, params: Params | None = None):
        def rule(g: Array, m: Array) -> tuple:
            m = momentum * m + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * m if nesterov else m
            o = newton_schulz(u.astype(ns_dtype or m.dtype), ns_steps, eps).astype(m.dtype)
            rows, cols = g.shape
            s = (max(1.0, rows / max(cols, 1)) ** 0.5 if adjust_lr == "original"  # (n, 0): empty
                 else 0.2 * max(rows, cols) ** 0.5)
            return s * o, m

        updates, mu = per_leaf(rule, grads, state.mu, where=where)
        return updates, ScaleByMuonState(mu)

    return leafwise(Optimizer(init_state, update))
