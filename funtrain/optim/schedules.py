r"""Learning-rate schedules: pure, jittable functions ``step -> value``.

Any callable ``step -> value`` built from ``jax.numpy`` works wherever funtrain
takes a schedule; these are the common shapes. ``step`` counts optimizer updates
from 0: the first update uses ``schedule(0)``.

Every schedule here is built by a factory that checks its arguments, and returns a
function that

- takes ``step``, a Python int or an integer array (traced or not; an array of steps
  gives an array of values of the same shape, so ``schedule(jnp.arange(n))`` plots it);
- returns a float array in JAX's default float dtype (``float32``, or ``float64``
  under ``jax.enable_x64``), decided when the schedule is called;
- uses no Python control flow on ``step``, so it works under ``jax.jit``, ``jax.vmap``
  and ``lax.scan``.

Where a schedule has a PyTorch twin (``torch.optim.lr_scheduler``), ``schedule(t)``
equals the optimizer's ``lr`` after ``t`` calls of ``scheduler.step()``, with the
optimizer built with ``lr=init_value``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import jax.numpy as jnp
import numpy as np

from funtrain._checks import check_int, is_int
from funtrain._typing import Schedule
from funtrain.optim._checks import (
    Count,
    Flag,
    Fraction,
    Int,
    NonNegative,
    Positive,
    Real,
    check_scalar,
    check_schedule,
    checked,
)

__all__ = [
    "Schedule", "as_schedule", "value_at",
    "constant", "step_decay", "multistep_decay", "exponential_decay",
    "cosine_annealing", "cosine_warm_restarts", "warmup_cosine", "linear", "polynomial",
    "one_cycle", "one_cycle_momentum", "cyclic", "join", "per_epoch",
]


@checked
def constant(value: Real) -> Schedule:
    """``value`` at every step.

    Args:
      value: the value.

    Examples:
      >>> sched = constant(0.1)
      >>> round(float(sched(1000)), 6)
      0.1
    """

    def schedule(step: Any) -> Any:
        dtype = _float_dtype()
        return jnp.asarray(value, dtype=dtype) + jnp.zeros(jnp.shape(step), dtype)

    return schedule


def as_schedule(value: float | Schedule, where: str, name: str = "learning_rate",
                *, low: float | None = 0.0, high: float | None = None,
                high_open: bool = False) -> Schedule:
    """Turn a float into a constant schedule; check a float's range, or a schedule's value
    at step 0 (see ``optim._checks.check_schedule``). ``high``/``high_open`` bound the range above
    (betas: ``low=0.0, high=1.0, high_open=True``)."""
    if callable(value):
        check_schedule(value, where, name, low=low, high=high, high_open=high_open)
        return value
    check_scalar(where, name, value, low=low, high=high, high_open=high_open)
    return lambda step: value


def value_at(schedule: float | Schedule, step: Any) -> Any:
    """The value of a float or a schedule at ``step``."""
    return schedule(step) if callable(schedule) else schedule


# --------------------------------------------------------------------------- helpers


def _float_dtype() -> Any:
    # Decided at call time, so a schedule built outside ``enable_x64`` gives float64 inside.
    return jnp.result_type(float)


def _out(x: Any) -> Any:
    return jnp.asarray(x, dtype=_float_dtype())


def _steps(step: Any) -> Any:
    return jnp.asarray(step)


def _as_float(t: Any) -> Any:
    return jnp.asarray(t).astype(_float_dtype())


def _max_step(t: Any) -> int:
    if jnp.issubdtype(t.dtype, jnp.integer):
        return int(jnp.iinfo(t.dtype).max)
    return 2 ** 53


def _divmod(t: Any, n: int) -> tuple[Any, Any]:
    """``(t // n, t % n)``; a period larger than the step's dtype can hold never wraps."""
    if n > _max_step(t):
        return jnp.zeros_like(t), t
    return t // n, t % n


def _power(base: Any, exponent: Any) -> Any:
    """``base ** exponent`` for a float exponent; ``exp(e log b)`` with ``log b`` in float64.

    A float32 ``base`` such as 0.95 is off by up to half an ulp, and ``pow`` multiplies that
    error by the exponent; taking the log in Python keeps float32 results within ~1e-6.
    """
    if isinstance(base, (int, float)) and not isinstance(base, bool) and base > 0:
        return jnp.exp(exponent * math.log(base))
    return jnp.power(base, exponent)


def _cosine_interp(start: Any, end: Any, num: Any, den: Any) -> Any:
    r"""``end + (start - end)(1 + cos(pi num/den))/2``, accurate near both ends.

    Written as :math:`\text{start} + (\text{end} - \text{start})\sin^2(\pi p/2)` in the first
    half and :math:`\text{end} + (\text{start} - \text{end})\sin^2(\pi(1-p)/2)` in the second,
    so the distance to the nearer end keeps its relative precision in float32, and the
    schedule hits ``start`` at ``p = 0`` and ``end`` at ``p = 1`` exactly.
    """
    first_half = 2 * num <= den
    p = jnp.where(first_half, num, den - num) / den
    s = jnp.sin(0.5 * jnp.pi * p) ** 2
    return jnp.where(first_half, start + (end - start) * s, end + (start - end) * s)


def _linear_interp(start: Any, end: Any, num: Any, den: Any) -> Any:
    """``start + (end - start) num/den``, measured from the nearer end (exact at both ends)."""
    first_half = 2 * num <= den
    p = jnp.where(first_half, num, den - num) / den
    return jnp.where(first_half, start + (end - start) * p, end + (start - end) * p)


def _check_int_sequence(where: str, name: str, values: Any) -> list[int]:
    """Check a sequence of ints ``>= 0`` in non-decreasing order and return it as a list."""
    want = "a sequence of ints >= 0 in non-decreasing order"
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"{where}: {name} must be {want}, got {values!r} "
                        f"({type(values).__name__})")
    values = list(values)
    if not all(is_int(v) for v in values):
        raise TypeError(f"{where}: {name} must be {want}, got {values!r}")
    unsorted = any(a > b for a, b in zip(values[:-1], values[1:], strict=True))
    if unsorted or any(v < 0 for v in values):
        raise ValueError(f"{where}: {name} must be {want}, got {values!r}")
    return [int(v) for v in values]


# --------------------------------------------------------------------------- decays


@checked
def step_decay(init_value: Real, step_size: Count, gamma: NonNegative = 0.1) -> Schedule:
    r"""Multiply by ``gamma`` every ``step_size`` steps (PyTorch's ``StepLR``).

    .. math::
        \eta_t = \eta_0 \, \gamma^{\lfloor t / s \rfloor}

    Args:
      init_value: :math:`\eta_0`, the value at step 0.
      step_size: :math:`s \ge 1`, the number of steps between decays.
      gamma: :math:`\gamma \ge 0`, the factor applied at each decay (PyTorch's default 0.1).

    Examples:
      >>> sched = step_decay(0.1, step_size=30, gamma=0.1)
      >>> [round(float(sched(t)), 6) for t in (0, 29, 30, 60)]
      [0.1, 0.1, 0.01, 0.001]

    Matches ``torch.optim.lr_scheduler.StepLR(opt, step_size, gamma)``.
    """

    def schedule(step: Any) -> Any:
        decays, _ = _divmod(_steps(step), step_size)
        return _out(init_value * _power(gamma, _as_float(decays)))

    return schedule


@checked
def multistep_decay(init_value: Real, milestones: Sequence[int], gamma: NonNegative = 0.1
                    ) -> Schedule:
    r"""Multiply by ``gamma`` at each milestone (PyTorch's ``MultiStepLR``).

    .. math::
        \eta_t = \eta_0 \, \gamma^{\#\{i \,:\, m_i \le t\}}

    A milestone listed twice decays twice, as in PyTorch.

    Args:
      init_value: :math:`\eta_0`, the value at step 0.
      milestones: the steps :math:`m_i` at which the value drops, ints ``>= 0`` in
        non-decreasing order (may be empty).
      gamma: :math:`\gamma \ge 0`, the factor applied at each milestone (PyTorch's default
        0.1).

    Examples:
      >>> sched = multistep_decay(0.1, milestones=[30, 80], gamma=0.1)
      >>> [round(float(sched(t)), 6) for t in (0, 30, 79, 80)]
      [0.1, 0.01, 0.01, 0.001]

    Matches ``torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)``.
    """
    marks = _check_int_sequence("multistep_decay", "milestones", milestones)

    def schedule(step: Any) -> Any:
        t = _steps(step)
        top = _max_step(t)
        kept = [m for m in marks if m <= top]  # a milestone past the dtype is never reached
        if not kept:
            return _out(init_value + jnp.zeros(t.shape, _float_dtype()))
        passed = jnp.searchsorted(jnp.asarray(kept, dtype=t.dtype), t, side="right")
        return _out(init_value * _power(gamma, _as_float(passed)))

    return schedule


@checked
def exponential_decay(init_value: Real, gamma: NonNegative) -> Schedule:
    r"""Multiply by ``gamma`` every step (PyTorch's ``ExponentialLR``).

    .. math::
        \eta_t = \eta_0 \, \gamma^t

    Args:
      init_value: :math:`\eta_0`, the value at step 0.
      gamma: :math:`\gamma \ge 0`, the factor per step.

    Examples:
      >>> sched = exponential_decay(0.1, gamma=0.5)
      >>> [round(float(sched(t)), 6) for t in (0, 1, 2)]
      [0.1, 0.05, 0.025]

    Matches ``torch.optim.lr_scheduler.ExponentialLR(opt, gamma)``.
    """

    def schedule(step: Any) -> Any:
        return _out(init_value * _power(gamma, _as_float(_steps(step))))

    return schedule


# --------------------------------------------------------------------------- cosine


@checked
def cosine_annealing(init_value: Real, t_max: Count, eta_min: Real = 0.0) -> Schedule:
    r"""Cosine from ``init_value`` down to ``eta_min`` over ``t_max`` steps (``CosineAnnealingLR``).

    .. math::
        \eta_t = \eta_{\min} + \tfrac12 (\eta_0 - \eta_{\min})
                 \left(1 + \cos\frac{\pi t}{T_{\max}}\right)

    The formula holds for every :math:`t`: past ``t_max`` the cosine goes on, so the
    value climbs back to ``init_value`` at ``2 * t_max`` and repeats with period
    ``2 * t_max``. That is what PyTorch's recursive ``CosineAnnealingLR`` does when stepped
    past ``T_max``. To stay at ``eta_min`` instead, use :func:`warmup_cosine` with
    ``warmup_steps=0`` (or :func:`join` with a :func:`constant`).

    Args:
      init_value: :math:`\eta_0`, the value at step 0.
      t_max: :math:`T_{\max} \ge 1`, the step at which the value reaches ``eta_min``.
      eta_min: :math:`\eta_{\min}`, the value at ``t_max``.

    Examples:
      >>> sched = cosine_annealing(0.1, t_max=100)
      >>> [round(float(sched(t)), 6) for t in (0, 50, 100, 200)]
      [0.1, 0.05, 0.0, 0.1]

    Matches ``torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max, eta_min)`` at every
    step, including past ``T_max``.
    """

    def schedule(step: Any) -> Any:
        # Fold t into [0, t_max] using the period 2 t_max and the symmetry about t_max:
        # exact in integers, so large steps lose no precision.
        _, t = _divmod(_steps(step), 2 * t_max)
        if t_max > _max_step(t):
            u = t
        else:  # t_max - (t - t_max) cannot overflow where it is used
            u = jnp.where(t <= t_max, t, t_max - (t - t_max))
        return _out(_cosine_interp(init_value, eta_min, _as_float(u), float(t_max)))

    return schedule


def _restart_starts(t_0: int, t_mult: int, top: int) -> tuple[list[int], list[int]]:
    """The first step and the length of each cycle, for cycles starting at or before ``top``."""
    starts, lengths = [0], [t_0]
    while starts[-1] + lengths[-1] <= top:
        starts.append(starts[-1] + lengths[-1])
        lengths.append(lengths[-1] * t_mult)
    return starts, lengths


@checked
def cosine_warm_restarts(init_value: Real, t_0: Count, t_mult: Count = 1, eta_min: Real = 0.0
                         ) -> Schedule:
    r"""Cosine annealing restarted every cycle, cycles growing by ``t_mult`` (SGDR).

    Loshchilov & Hutter, 2017, *SGDR: Stochastic Gradient Descent with Warm Restarts*.
    Cycle :math:`i` lasts :math:`T_i = T_0 \, T_{\text{mult}}^i` steps; with :math:`T_{cur}`
    the steps since the last restart,

    .. math::
        \eta_t = \eta_{\min} + \tfrac12 (\eta_0 - \eta_{\min})
                 \left(1 + \cos\frac{\pi T_{cur}}{T_i}\right)

    so the value is ``init_value`` at each restart and never quite reaches ``eta_min``.

    Args:
      init_value: :math:`\eta_0`, the value at each restart.
      t_0: :math:`T_0 \ge 1`, the length of the first cycle.
      t_mult: :math:`T_{\text{mult}} \ge 1`, an int, the growth of each next cycle.
      eta_min: :math:`\eta_{\min}`, the value the cosine heads for.

    Examples:
      >>> sched = cosine_warm_restarts(0.1, t_0=10, t_mult=2)
      >>> [round(float(sched(t)), 6) for t in (0, 5, 10, 20, 30)]
      [0.1, 0.05, 0.1, 0.05, 0.1]

    Matches ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0, T_mult,
    eta_min)`` stepped without an ``epoch`` argument.
    """

    def schedule(step: Any) -> Any:
        t = _steps(step)
        if t_mult == 1:
            _, t_cur = _divmod(t, t_0)
            t_i: Any = float(t_0)
        else:
            # Cycle boundaries are few (logarithmic in the largest step), so look them up.
            starts, lengths = _restart_starts(t_0, t_mult, _max_step(t))
            cycle = jnp.searchsorted(jnp.asarray(starts, dtype=t.dtype), t, side="right") - 1
            cycle = jnp.maximum(cycle, 0)
            t_cur = t - jnp.asarray(starts, dtype=t.dtype)[cycle]
            t_i = jnp.asarray(lengths, dtype=_float_dtype())[cycle]
        return _out(_cosine_interp(init_value, eta_min, _as_float(t_cur), t_i))

    return schedule


@checked
def warmup_cosine(peak_value: Real, warmup_steps: Annotated[int, Int(low=0)], total_steps: Count,
                  end_value: Real = 0.0, init_value: Real = 0.0) -> Schedule:
    r"""Linear warmup to ``peak_value``, cosine decay to ``end_value``, then constant.

    With :math:`W` = ``warmup_steps`` and :math:`T` = ``total_steps``:

    .. math::
        \eta_t = \begin{cases}
          \eta_{\text{init}} + (\eta_{\text{peak}} - \eta_{\text{init}})\, t / W
            & t < W \\
          \eta_{\text{end}} + \tfrac12 (\eta_{\text{peak}} - \eta_{\text{end}})
            \left(1 + \cos\frac{\pi (t - W)}{T - W}\right) & W \le t \le T \\
          \eta_{\text{end}} & t > T
        \end{cases}

    Args:
      peak_value: the value at step ``warmup_steps``.
      warmup_steps: :math:`W \ge 0`; 0 starts the cosine at once.
      total_steps: :math:`T > W`, the step at which ``end_value`` is reached; the cosine
        phase lasts ``total_steps - warmup_steps`` steps.
      end_value: the value from ``total_steps`` on.
      init_value: the value at step 0.

    Examples:
      >>> sched = warmup_cosine(0.1, warmup_steps=10, total_steps=110, end_value=0.001)
      >>> [round(float(sched(t)), 6) for t in (0, 5, 10, 60, 110, 500)]
      [0.0, 0.05, 0.1, 0.0505, 0.001, 0.001]

    PyTorch has no single twin; for ``init_value > 0`` it equals ``SequentialLR`` of
    ``LinearLR(start_factor=init_value/peak_value, total_iters=warmup_steps)`` and
    ``CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min=end_value)`` with
    ``milestones=[warmup_steps]``, up to ``total_steps`` (after which PyTorch's cosine
    climbs back up, and this schedule stays at ``end_value``).
    """
    if total_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine: total_steps must be an int > warmup_steps "
                         f"({warmup_steps}), got {total_steps}")
    decay_steps = total_steps - warmup_steps

    def schedule(step: Any) -> Any:
        t = _steps(step)
        u = jnp.clip(t - warmup_steps, 0, decay_steps)
        out = _cosine_interp(peak_value, end_value, _as_float(u), float(decay_steps))
        if warmup_steps:
            ramp = _linear_interp(init_value, peak_value, _as_float(t), float(warmup_steps))
            out = jnp.where(t < warmup_steps, ramp, out)
        return _out(out)

    return schedule


# --------------------------------------------------------------------------- polynomial


@checked
def linear(init_value: Real, end_value: Real, transition_steps: Count) -> Schedule:
    r"""Straight line from ``init_value`` to ``end_value``, then constant.

    .. math::
        \eta_t = \eta_0 + (\eta_{\text{end}} - \eta_0) \, \frac{\min(t, T)}{T}

    Args:
      init_value: :math:`\eta_0`, the value at step 0.
      end_value: the value from ``transition_steps`` on.
      transition_steps: :math:`T \ge 1`.

    Examples:
      >>> sched = linear(0.0, 0.1, transition_steps=10)  # a linear warmup
      >>> [round(float(sched(t)), 6) for t in (0, 5, 10, 20)]
      [0.0, 0.05, 0.1, 0.1]

    Matches ``torch.optim.lr_scheduler.LinearLR(opt, start_factor=init_value / lr,
    end_factor=end_value / lr, total_iters=transition_steps)`` for an optimizer with
    learning rate ``lr`` (PyTorch needs ``0 < start_factor <= 1`` and
    ``0 <= end_factor <= 1``; this schedule takes any values).
    """

    def schedule(step: Any) -> Any:
        t = jnp.clip(_steps(step), 0, transition_steps)
        return _out(_linear_interp(init_value, end_value, _as_float(t), float(transition_steps)))

    return schedule


@checked
def polynomial(init_value: Real, end_value: Real, power: Positive, transition_steps: Count
               ) -> Schedule:
    r"""Polynomial decay from ``init_value`` to ``end_value``, then constant.

    .. math::
        \eta_t = \eta_{\text{end}} + (\eta_0 - \eta_{\text{end}})
                 \left(1 - \frac{\min(t, T)}{T}\right)^{p}

    Args:
      init_value: :math:`\eta_0`, the value at step 0.
      end_value: the value from ``transition_steps`` on.
      power: :math:`p > 0`; 1 is a straight line.
      transition_steps: :math:`T \ge 1`.

    Examples:
      >>> sched = polynomial(0.1, 0.0, power=2.0, transition_steps=10)
      >>> [round(float(sched(t)), 6) for t in (0, 5, 10, 20)]
      [0.1, 0.025, 0.0, 0.0]

    With ``end_value=0`` it matches ``torch.optim.lr_scheduler.PolynomialLR(opt,
    total_iters=transition_steps, power=power)``.
    """

    def schedule(step: Any) -> Any:
        left = transition_steps - jnp.clip(_steps(step), 0, transition_steps)
        frac = _as_float(left) / transition_steps
        return _out(end_value + (init_value - end_value) * jnp.power(frac, power))

    return schedule


# --------------------------------------------------------------------------- cycles


@checked
def one_cycle(max_value: Real, total_steps: Count, pct_start: Fraction = 0.3,
              anneal: Literal["cos", "linear"] = "cos", div_factor: Positive = 25.0,
              final_div_factor: Positive = 1e4, three_phase: Flag = False) -> Schedule:
    r"""The 1cycle policy (Smith & Topin, 2017, *Super-Convergence*), as PyTorch's ``OneCycleLR``.

    With :math:`\eta_{\max}` = ``max_value``, the schedule starts at
    :math:`\eta_{\text{init}} = \eta_{\max} / \text{div\_factor}`, rises to
    :math:`\eta_{\max}`, then falls to
    :math:`\eta_{\min} = \eta_{\text{init}} / \text{final\_div\_factor}`. With
    :math:`N` = ``total_steps`` and :math:`p` = ``pct_start``, the phases end at PyTorch's
    steps

    - two phases: :math:`e_1 = pN - 1` (init → max) and :math:`e_2 = N - 1` (max → min);
    - ``three_phase``: :math:`e_1 = pN - 1` (init → max), :math:`e_2 = 2pN - 2`
      (max → init) and :math:`e_3 = N - 1` (init → min).

    A step :math:`t` belongs to the first phase with :math:`t \le e_k`; with that phase's
    start :math:`e_{k-1}` (:math:`e_0 = 0`), its endpoints :math:`a \to b` and
    :math:`q = (t - e_{k-1}) / (e_k - e_{k-1})`,

    .. math::
        \eta_t = b + \tfrac12 (a - b)(1 + \cos \pi q) \quad\text{(cos)}, \qquad
        \eta_t = a + (b - a)\, q \quad\text{(linear)}

    From step ``total_steps - 1`` on the value stays at its value there (:math:`\eta_{\min}`
    for the usual ``pct_start``): PyTorch raises after ``total_steps`` steps, and its value
    at exactly ``total_steps`` overshoots the end of the last phase (below
    :math:`\eta_{\min}`, and negative with ``anneal="linear"``); no update of a run of
    ``total_steps`` updates uses it.

    Args:
      max_value: :math:`\eta_{\max}`, the peak value.
      total_steps: :math:`N \ge 1`, the number of updates in the run.
      pct_start: :math:`p \in [0, 1]`, the fraction of the steps spent rising.
      anneal: ``"cos"`` or ``"linear"``, the shape of each phase.
      div_factor: :math:`> 0`; the first value is ``max_value / div_factor``.
      final_div_factor: :math:`> 0`; the last value is ``max_value / (div_factor *
        final_div_factor)``.
      three_phase: rise, fall back to the first value, then fall to the last value, as in
        the paper; the default (two phases) is fastai's variant.

    Examples:
      >>> sched = one_cycle(0.1, total_steps=100)
      >>> [round(float(sched(t)), 6) for t in (0, 29, 99)]
      [0.004, 0.1, 0.0]

    Matches ``torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_value,
    total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal,
    div_factor=div_factor, final_div_factor=final_div_factor, three_phase=three_phase)``
    for steps ``0 .. total_steps - 1`` (the learning rate; :func:`one_cycle_momentum` gives
    the momentum PyTorch cycles with ``cycle_momentum=True``). Where PyTorch divides by
    zero (a phase of zero length, e.g. ``pct_start * total_steps == 1``), the step gets the
    end value of that phase.
    """

    first = max_value / div_factor
    last = first / final_div_factor
    phases = _one_cycle_phases(total_steps, pct_start, three_phase, first, max_value, last)
    return _phased(phases, total_steps, anneal)


def _one_cycle_phases(total_steps: int, pct_start: float, three_phase: bool, first: float,
                      peak: float, last: float) -> list[tuple[float, float, float]]:
    """PyTorch's OneCycleLR phases ``(end_step, start_value, end_value)``: ``first -> peak ->
    last``, or ``first -> peak -> first -> last`` with ``three_phase``."""
    # PyTorch's phase ends, computed in Python floats as it does.
    e1 = float(pct_start * total_steps) - 1
    if three_phase:
        return [(e1, first, peak), (float(2 * pct_start * total_steps) - 2, peak, first),
                (total_steps - 1, first, last)]
    return [(e1, first, peak), (total_steps - 1, peak, last)]


def _phased(phases: list[tuple[float, float, float]], total_steps: int, anneal: str
            ) -> Schedule:
    """The schedule that anneals through ``phases`` (as OneCycleLR), constant from
    ``total_steps - 1`` on."""

    def phase_value(t: Any, start_step: float, end_step: float, a: Any, b: Any) -> Any:
        span = end_step - start_step
        if span == 0:  # PyTorch divides by zero; this step is the end of the phase
            return b + jnp.zeros(t.shape, _float_dtype())
        num = _as_float(t) - start_step
        if anneal == "cos":
            return _cosine_interp(a, b, num, span)
        return _linear_interp(a, b, num, span)

    def schedule(step: Any) -> Any:
        t = jnp.minimum(_steps(step), total_steps - 1)
        values, start = [], 0.0
        for end_step, a, b in phases:
            values.append(phase_value(t, start, end_step, a, b))
            start = end_step
        out = values[-1]
        # The first phase with t <= end wins; t is an int, so compare with floor(end).
        for (end_step, _, _), value in zip(phases[-2::-1], values[-2::-1], strict=True):
            out = jnp.where(t <= math.floor(end_step), value, out)
        return _out(out)

    return schedule


@checked
def one_cycle_momentum(total_steps: Count, pct_start: Fraction = 0.3,
                       anneal: Literal["cos", "linear"] = "cos",
                       base_momentum: NonNegative = 0.85, max_momentum: NonNegative = 0.95,
                       three_phase: Flag = False) -> Schedule:
    r"""The momentum of the 1cycle policy, as PyTorch's ``OneCycleLR(cycle_momentum=True)``.

    The momentum moves against the learning rate of :func:`one_cycle` with the same
    ``total_steps``, ``pct_start``, ``anneal`` and ``three_phase``: it starts at
    :math:`\mu_{\max}` = ``max_momentum``, falls to :math:`\mu_{\text{base}}` =
    ``base_momentum`` while the learning rate rises, and climbs back while it falls. The
    phases end at the same steps as :func:`one_cycle`'s (:math:`e_1 = pN - 1`, ...):

    - two phases: :math:`\mu_{\max} \to \mu_{\text{base}}` until :math:`e_1`, then
      :math:`\mu_{\text{base}} \to \mu_{\max}` until :math:`e_2 = N - 1`;
    - ``three_phase``: :math:`\mu_{\max} \to \mu_{\text{base}} \to \mu_{\max}` (ending at
      :math:`e_2 = 2pN - 2`), then :math:`\mu_{\max}` until :math:`e_3 = N - 1`.

    Within a phase :math:`a \to b`, with :math:`q = (t - e_{k-1}) / (e_k - e_{k-1})`,

    .. math::
        \mu_t = b + \frac12 (a - b)(1 + \cos \pi q) \quad\text{(cos)}, \qquad
        \mu_t = a + (b - a)\, q \quad\text{(linear)}

    and from step ``total_steps - 1`` on the value stays at its value there
    (:math:`\mu_{\max}`). Pass it as SGD's ``momentum`` or as Adam's ``b1``, which is what
    PyTorch cycles (``momentum``, or ``betas[0]`` for optimizers with ``betas``).

    Args:
      total_steps: :math:`N \ge 1`, the number of updates in the run.
      pct_start: :math:`p \in [0, 1]`, the fraction of the steps spent with the learning
        rate rising (the momentum falling).
      anneal: ``"cos"`` or ``"linear"``, the shape of each phase.
      base_momentum: :math:`\mu_{\text{base}} \ge 0`, the lowest momentum (PyTorch's
        default 0.85).
      max_momentum: :math:`\mu_{\max} \ge 0`, the first and last momentum (PyTorch's
        default 0.95).
      three_phase: the paper's three phases (see :func:`one_cycle`); the default is two.

    Examples:
      >>> mom = one_cycle_momentum(total_steps=100)
      >>> [round(float(mom(t)), 6) for t in (0, 29, 99)]
      [0.95, 0.85, 0.95]

    Matches the ``momentum`` (or ``betas[0]``) that ``torch.optim.lr_scheduler.OneCycleLR(
    opt, max_lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal,
    base_momentum=base_momentum, max_momentum=max_momentum, three_phase=three_phase)``
    sets for steps ``0 .. total_steps - 1``, with the same zero-length-phase rule as
    :func:`one_cycle`.
    """
    # OneCycleLR's momentum phases: the lr's first/peak/last are max/base/max momentum.
    phases = _one_cycle_phases(total_steps, pct_start, three_phase, max_momentum,
                               base_momentum, max_momentum)
    return _phased(phases, total_steps, anneal)


@checked
def cyclic(base_value: Real, max_value: Real, step_size_up: Count,
           step_size_down: int | None = None,
           mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
           gamma: Positive = 1.0) -> Schedule:
    r"""Cyclical learning rate between two bounds (Smith, 2017), as PyTorch's ``CyclicLR``.

    Each cycle lasts :math:`C = s_{\text{up}} + s_{\text{down}}` steps: the value rises
    linearly for :math:`s_{\text{up}}` steps and falls back for :math:`s_{\text{down}}`.
    With :math:`c = \lfloor t / C \rfloor + 1` the cycle number and :math:`r = t \bmod C`,

    .. math::
        h_t = \begin{cases} r / s_{\text{up}} & r \le s_{\text{up}} \\
                            (C - r) / s_{\text{down}} & \text{otherwise} \end{cases}
        \qquad
        \eta_t = \eta_{\text{base}} + (\eta_{\max} - \eta_{\text{base}}) \, h_t \, \sigma_t

    with the amplitude scale :math:`\sigma_t = 1` (``"triangular"``),
    :math:`2^{-(c-1)}` (``"triangular2"``, halved each cycle) or :math:`\gamma^t`
    (``"exp_range"``).

    Args:
      base_value: :math:`\eta_{\text{base}}`, the value at the start of each cycle.
      max_value: :math:`\eta_{\max}`, the peak of the first cycle.
      step_size_up: :math:`s_{\text{up}} \ge 1`, the steps of the rise.
      step_size_down: :math:`s_{\text{down}} \ge 0`, the steps of the fall; ``None`` for
        ``step_size_up``; 0 gives a sawtooth.
      mode: ``"triangular"``, ``"triangular2"`` or ``"exp_range"``.
      gamma: :math:`\gamma > 0`, used by ``"exp_range"`` only.

    Examples:
      >>> sched = cyclic(0.01, 0.1, step_size_up=10, mode="triangular2")
      >>> [round(float(sched(t)), 6) for t in (0, 5, 10, 20, 30)]
      [0.01, 0.055, 0.1, 0.01, 0.055]

    Matches ``torch.optim.lr_scheduler.CyclicLR(opt, base_lr=base_value, max_lr=max_value,
    step_size_up=step_size_up, step_size_down=step_size_down, mode=mode, gamma=gamma)``
    (the learning rate; momentum cycling is not part of a schedule).
    """
    down = step_size_up if step_size_down is None else step_size_down
    check_int("cyclic", "step_size_down", down, low=0)
    period = step_size_up + down

    def schedule(step: Any) -> Any:
        t = _steps(step)
        cycle, r = _divmod(t, period)
        height = _as_float(r) / step_size_up
        if down:
            height = jnp.where(r <= step_size_up, height, _as_float(period - r) / down)
        if mode == "triangular2":
            height = height * jnp.exp2(-_as_float(cycle))
        elif mode == "exp_range":
            height = height * _power(gamma, _as_float(t))
        return _out(base_value + (max_value - base_value) * height)

    return schedule


# --------------------------------------------------------------------------- combinators


def join(schedules: Sequence[float | Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""Run ``schedules`` one after another, switching at ``boundaries``.

    Schedule :math:`i` is used for :math:`b_{i-1} \le t < b_i` (with :math:`b_{-1} = 0`,
    :math:`b_n = \infty`) and is called with the steps since its start:

    .. math::
        \eta_t = f_i(t - b_{i-1})

    Args:
      schedules: :math:`n + 1` schedules ``step -> value`` (a float is a constant).
      boundaries: :math:`n` steps :math:`b_i`, ints ``>= 0`` in non-decreasing order.

    Examples:
      >>> warm = linear(0.0, 0.1, transition_steps=10)
      >>> sched = join([warm, cosine_annealing(0.1, t_max=90)], boundaries=[10])
      >>> [round(float(sched(t)), 6) for t in (0, 5, 10, 55, 100)]
      [0.0, 0.05, 0.1, 0.05, 0.0]

    Like PyTorch's ``SequentialLR(opt, schedulers, milestones=boundaries)``, where each
    scheduler also restarts from its own step 0.
    """
    where = "join"
    if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence):
        raise TypeError(f"{where}: schedules must be a sequence of schedules, got "
                        f"{type(schedules).__name__}")
    fns: list[Callable[[Any], Any]] = [
        as_schedule(s, where, f"schedules[{i}]", low=None) for i, s in enumerate(schedules)]
    marks = _check_int_sequence(where, "boundaries", boundaries)
    if not fns or len(marks) != len(fns) - 1:
        raise ValueError(f"{where}: needs one boundary fewer than schedules, got "
                         f"{len(fns)} schedules and {len(marks)} boundaries")

    def schedule(step: Any) -> Any:
        t = _steps(step)
        out = fns[0](t)
        for mark, fn in zip(marks, fns[1:], strict=True):
            out = jnp.where(t < mark, out, fn(t - mark))
        return _out(out)

    return schedule


@checked
def per_epoch(schedule: float | Schedule, steps_per_epoch: Count) -> Schedule:
    r"""Step ``schedule`` once per epoch: a per-epoch schedule on the update count.

    Schedules count optimizer updates. A PyTorch script that calls ``scheduler.step()``
    once per epoch instead (``StepLR(opt, step_size=30)`` in an ImageNet recipe) sees
    epoch numbers; with :math:`S` = ``steps_per_epoch`` updates per epoch,

    .. math::
        \eta_t = f(\lfloor t / S \rfloor)

    Args:
      schedule: :math:`f`, a schedule ``epoch -> value`` (a float is a constant).
      steps_per_epoch: :math:`S \ge 1`, the updates per epoch (``len(loader)``).

    Examples:
      >>> sched = per_epoch(step_decay(0.1, step_size=2), steps_per_epoch=10)
      >>> [round(float(sched(t)), 6) for t in (0, 19, 20, 40)]
      [0.1, 0.1, 0.01, 0.001]

    Matches a PyTorch scheduler stepped after every ``steps_per_epoch``-th
    ``optimizer.step()``.
    """
    fn = as_schedule(schedule, "per_epoch", "schedule", low=None)

    def per_epoch_schedule(step: Any) -> Any:
        epoch, _ = _divmod(_steps(step), steps_per_epoch)
        # broadcast: a float (constant) gives one value per step too
        return jnp.broadcast_to(_out(fn(epoch)), epoch.shape)

    return per_epoch_schedule
