"""Float64 pure-Python references for learning-rate schedules.

Written from the papers and from the formulas and algorithms in PyTorch's documentation of
``torch.optim.lr_scheduler`` (``get_lr`` / ``step`` as documented), never from funtrain's
code. Each function gives the value at one integer step ``t >= 0``, the optimizer's ``lr``
after ``t`` calls of ``scheduler.step()``.
"""

import math
from bisect import bisect_right


def step_decay(t, init_value, step_size, gamma=0.1):
    """StepLR: lr = base_lr * gamma ** (t // step_size)."""
    return init_value * gamma ** (t // step_size)


def multistep_decay(t, init_value, milestones, gamma=0.1):
    """MultiStepLR: lr = base_lr * gamma ** bisect_right(milestones, t)."""
    return init_value * gamma ** bisect_right(sorted(milestones), t)


def exponential_decay(t, init_value, gamma):
    """ExponentialLR: lr = base_lr * gamma ** t."""
    return init_value * gamma ** t


def cosine_annealing(t, init_value, t_max, eta_min=0.0):
    """SGDR's closed form, eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2, any t."""
    return eta_min + (init_value - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2


def cosine_annealing_recursive(n, init_value, t_max, eta_min=0.0):
    """Values at t = 0..n-1 from CosineAnnealingLR's documented recursion.

    eta_{t+1} = eta_min + (eta_t - eta_min) (1 + cos((t+1) pi / T)) / (1 + cos(t pi / T));
    where the denominator is 0 (t = T, 3T, ...) the next value is the closed form's.
    """
    out, lr = [], init_value
    for t in range(n):
        if t > 0:
            if (t - 1) % (2 * t_max) == t_max:  # 0/0: the recursion's limit
                lr = cosine_annealing(t, init_value, t_max, eta_min)
            else:
                den = 1 + math.cos((t - 1) * math.pi / t_max)
                lr = eta_min + (lr - eta_min) * (1 + math.cos(t * math.pi / t_max)) / den
        out.append(lr)
    return out


def cosine_warm_restarts(t, init_value, t_0, t_mult=1, eta_min=0.0):
    """CosineAnnealingWarmRestarts, by replaying its step(): T_cur += 1, restart at T_i."""
    t_cur, t_i = 0, t_0
    for _ in range(t):
        t_cur += 1
        if t_cur >= t_i:
            t_cur -= t_i
            t_i *= t_mult
    return eta_min + (init_value - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


def warmup_cosine(t, peak_value, warmup_steps, total_steps, end_value=0.0, init_value=0.0):
    """Linear warmup over W steps, then half a cosine over total - W steps, then constant."""
    if t < warmup_steps:
        return init_value + (peak_value - init_value) * t / warmup_steps
    if t >= total_steps:
        return end_value
    frac = (t - warmup_steps) / (total_steps - warmup_steps)
    return end_value + (peak_value - end_value) * (1 + math.cos(math.pi * frac)) / 2


def linear(t, init_value, end_value, transition_steps):
    """LinearLR's closed form in values: init + (end - init) * min(t, T) / T."""
    return init_value + (end_value - init_value) * min(t, transition_steps) / transition_steps


def polynomial(t, init_value, end_value, power, transition_steps):
    """PolynomialLR (end 0): base * (1 - min(t, T) / T) ** power, shifted to end at end_value."""
    frac = 1 - min(t, transition_steps) / transition_steps
    return end_value + (init_value - end_value) * frac ** power


def one_cycle(t, max_value, total_steps, pct_start=0.3, anneal="cos", div_factor=25.0,
              final_div_factor=1e4, three_phase=False):
    """OneCycleLR.get_lr for 0 <= t <= total_steps (PyTorch raises beyond)."""
    if t > total_steps:
        raise ValueError(f"OneCycleLR is not defined past total_steps, got t={t}")
    initial = max_value / div_factor
    minimum = initial / final_div_factor
    values = ([(initial, max_value), (max_value, initial), (initial, minimum)] if three_phase
              else [(initial, max_value), (max_value, minimum)])
    return _phased(t, _phase_ends(total_steps, pct_start, three_phase), values, anneal)


def _phase_ends(total_steps, pct_start, three_phase):
    """OneCycleLR's phase end steps (PyTorch's ``end_step`` of each phase)."""
    if three_phase:
        return [float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2,
                total_steps - 1]
    return [float(pct_start * total_steps) - 1, total_steps - 1]


def _phased(t, ends, values, anneal):
    """OneCycleLR's interpolation over phases ending at ``ends``, each from a start value
    to an end value (``values``)."""
    phases = [(end, a, b) for end, (a, b) in zip(ends, values, strict=True)]
    start = 0.0
    for i, (end, a, b) in enumerate(phases):
        if t <= end or i == len(phases) - 1:
            pct = (t - start) / (end - start)
            if anneal == "cos":
                return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
            return (b - a) * pct + a
        start = end
    raise AssertionError("unreachable")


def one_cycle_momentum(t, total_steps, pct_start=0.3, anneal="cos", base_momentum=0.85,
                       max_momentum=0.95, three_phase=False):
    """OneCycleLR's momentum (cycle_momentum=True) for 0 <= t <= total_steps.

    Smith & Topin's 1cycle as PyTorch documents it: the momentum moves inversely to the
    learning rate, max -> base while the lr rises, base -> max while it falls; with
    three_phase it stays at max_momentum during the final annihilation phase. The phase
    ends are the learning rate's (see ``one_cycle``).
    """
    if t > total_steps:
        raise ValueError(f"OneCycleLR is not defined past total_steps, got t={t}")
    hi, lo = max_momentum, base_momentum
    values = [(hi, lo), (lo, hi), (hi, hi)] if three_phase else [(hi, lo), (lo, hi)]
    return _phased(t, _phase_ends(total_steps, pct_start, three_phase), values, anneal)


def per_epoch(t, schedule, steps_per_epoch):
    """A scheduler stepped once per epoch: after t updates it has stepped t // S times."""
    return schedule(t // steps_per_epoch)


def cyclic(t, base_value, max_value, step_size_up, step_size_down=None, mode="triangular",
           gamma=1.0):
    """CyclicLR.get_lr, as documented (last_epoch = t)."""
    up = float(step_size_up)
    down = float(step_size_down) if step_size_down is not None else up
    total = up + down
    ratio = up / total
    cycle = math.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    height = (max_value - base_value) * scale
    if mode == "triangular":
        return base_value + height
    if mode == "triangular2":
        return base_value + height / (2.0 ** (cycle - 1))
    return base_value + height * gamma ** t


def cyclic_smith(t, base_value, max_value, step_size, mode="triangular", gamma=1.0):
    """Smith (2017), section 3.1, symmetric cycles: the paper's own formula."""
    cycle = math.floor(1 + t / (2 * step_size))
    x = abs(t / step_size - 2 * cycle + 1)
    scale = {"triangular": 1.0, "triangular2": 1 / 2 ** (cycle - 1),
             "exp_range": gamma ** t}[mode]
    return base_value + (max_value - base_value) * max(0.0, 1 - x) * scale


def join(t, schedules, boundaries):
    """Schedule i on [b_{i-1}, b_i), called with t - b_{i-1}."""
    i = bisect_right(boundaries, t)
    start = boundaries[i - 1] if i else 0
    return schedules[i](t - start)


def constant(t, value):
    return value
