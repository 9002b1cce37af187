"""Schedules against float64 references (tests/reference/schedules.py) and PyTorch.

Each schedule is evaluated on a vector of steps in one call (boundaries included: 0, the
end of warmup, t_max, past the end), in float32 to ~1e-6 and under x64 to 1e-12, eagerly
and under ``jax.jit(jax.vmap(...))`` with traced scalar steps. When torch is installed the
values also equal ``optimizer.param_groups[0]["lr"]`` after ``t`` calls of
``scheduler.step()``.
"""

import doctest
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funtrain.optim import schedules as S
from tests.reference import schedules as R


class Case(NamedTuple):
    make: Any  # () -> funtrain schedule
    ref: Any  # t -> float64 value
    steps: list


# Every case is evaluated on LENGTH steps (its steps repeated), so eager evaluation reuses
# the primitives compiled for the previous cases and the file stays fast.
LENGTH = 128


def padded(steps):
    return [int(t) for t in np.resize(np.asarray(list(steps)), LENGTH)]


def evaluate(sched, steps, dtype=None):
    """``sched`` called eagerly at ``steps``, as numpy. It is called on LENGTH steps (``steps``
    repeated) and the first ``len(steps)`` values are kept: one shape for every test."""
    steps = list(steps)
    return np.asarray(sched(jnp.asarray(padded(steps), dtype)))[:len(steps)]


def case(name, steps, **kw):
    return Case(lambda: getattr(S, name)(**kw), lambda t: getattr(R, name)(t, **kw),
                padded(steps))


def per_epoch_case():
    def ref(t):
        return R.per_epoch(t, lambda e: R.cosine_annealing(e, 0.1, 6, 0.001), 7)

    return Case(lambda: S.per_epoch(S.cosine_annealing(0.1, 6, 0.001), 7), ref,
                padded([*range(100), 10**4, 10**5 + 3]))


def join_case():
    parts = [S.linear(0.0, 0.1, 5), S.cosine_annealing(0.1, 20, 0.01), 0.001]
    refs = [lambda t: R.linear(t, 0.0, 0.1, 5), lambda t: R.cosine_annealing(t, 0.1, 20, 0.01),
            lambda t: 0.001]
    return Case(lambda: S.join(parts, [5, 25]), lambda t: R.join(t, refs, [5, 25]),
                padded(range(40)))


CASES = {
    "constant": case("constant", [0, 1, 7, 10**6], value=0.3),
    "step_decay": case("step_decay", range(40), init_value=0.1, step_size=7, gamma=0.5),
    "step_decay_default_gamma": case("step_decay", range(0, 40, 3), init_value=0.2,
                                     step_size=10),
    "multistep": case("multistep_decay", range(40), init_value=0.1,
                      milestones=[0, 3, 10, 10, 25], gamma=0.3),
    "multistep_empty": case("multistep_decay", [0, 5, 100], init_value=0.1, milestones=[]),
    "exponential": case("exponential_decay", range(80), init_value=0.1, gamma=0.95),
    "cosine": case("cosine_annealing", [*range(85), 1234, 12345], init_value=0.1, t_max=20,
                   eta_min=0.001),
    "cosine_no_min": case("cosine_annealing", range(30), init_value=0.5, t_max=7),
    "cosine_t_max_1": case("cosine_annealing", range(6), init_value=0.5, t_max=1),
    "warm_restarts": case("cosine_warm_restarts", range(30), init_value=0.1, t_0=5,
                          eta_min=0.01),
    "warm_restarts_mult": case("cosine_warm_restarts", range(100), init_value=0.1, t_0=3,
                               t_mult=2),
    "warm_restarts_mult3": case("cosine_warm_restarts", [*range(20), 51, 52, 53, 500],
                                init_value=0.3, t_0=2, t_mult=3, eta_min=0.05),
    "warmup_cosine": case("warmup_cosine", range(70), peak_value=0.1, warmup_steps=10,
                          total_steps=50, end_value=0.001, init_value=0.01),
    "warmup_cosine_no_warmup": case("warmup_cosine", range(40), peak_value=0.1,
                                    warmup_steps=0, total_steps=30),
    "linear_up": case("linear", range(20), init_value=0.0, end_value=0.1,
                      transition_steps=10),
    "linear_down": case("linear", range(20), init_value=0.1, end_value=0.02,
                        transition_steps=13),
    "polynomial": case("polynomial", range(30), init_value=0.1, end_value=0.0, power=0.9,
                       transition_steps=20),
    "polynomial_end": case("polynomial", range(25), init_value=0.1, end_value=0.01,
                           power=2.0, transition_steps=15),
    "one_cycle": case("one_cycle", range(50), max_value=0.1, total_steps=50),
    "one_cycle_linear": case("one_cycle", range(37), max_value=0.1, total_steps=37,
                             pct_start=0.25, anneal="linear", div_factor=10.0,
                             final_div_factor=100.0),
    "one_cycle_three_phase": case("one_cycle", range(40), max_value=0.1, total_steps=40,
                                  three_phase=True),
    "one_cycle_three_linear": case("one_cycle", range(33), max_value=0.1, total_steps=33,
                                   pct_start=0.4, anneal="linear", three_phase=True),
    "one_cycle_tiny_warmup": case("one_cycle", range(10), max_value=0.1, total_steps=10,
                                  pct_start=0.05),
    "cyclic": case("cyclic", range(40), base_value=0.01, max_value=0.1, step_size_up=5),
    "cyclic_triangular2": case("cyclic", range(50), base_value=0.01, max_value=0.1,
                               step_size_up=4, step_size_down=7, mode="triangular2"),
    "cyclic_exp_range": case("cyclic", range(50), base_value=0.01, max_value=0.1,
                             step_size_up=6, mode="exp_range", gamma=0.97),
    "cyclic_sawtooth": case("cyclic", range(20), base_value=0.01, max_value=0.1,
                            step_size_up=6, step_size_down=0),
    "join": join_case(),
    "one_cycle_momentum": case("one_cycle_momentum", range(50), total_steps=50),
    "one_cycle_momentum_linear": case("one_cycle_momentum", range(37), total_steps=37,
                                      pct_start=0.25, anneal="linear", base_momentum=0.8,
                                      max_momentum=0.9),
    "one_cycle_momentum_three_phase": case("one_cycle_momentum", range(40), total_steps=40,
                                           three_phase=True),
    "one_cycle_momentum_three_linear": case("one_cycle_momentum", range(33), total_steps=33,
                                            pct_start=0.4, anneal="linear", three_phase=True),
    "one_cycle_momentum_tiny_warmup": case("one_cycle_momentum", range(10), total_steps=10,
                                           pct_start=0.05, base_momentum=0.0),
    "per_epoch": per_epoch_case(),
}


def reference(c):
    return np.array([c.ref(int(t)) for t in c.steps], dtype=np.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(name):
    c = CASES[name]
    got = c.make()(jnp.asarray(c.steps, jnp.int32))
    assert got.dtype == jnp.float32 and got.shape == (LENGTH,)
    np.testing.assert_allclose(got, reference(c), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_reference(name):
    c = CASES[name]
    sched = c.make()  # built outside x64: the dtype is decided when it is called
    with jax.enable_x64(True):
        got = sched(jnp.asarray(c.steps))
        assert got.dtype == jnp.float64
        got = np.asarray(got)
    np.testing.assert_allclose(got, reference(c), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(CASES))
def test_jit_and_vmap_with_traced_steps(name):
    c = CASES[name]
    sched = c.make()
    steps = jnp.asarray(c.steps, jnp.int32)
    traced = jax.jit(jax.vmap(sched))(steps)  # each call sees a traced int32 scalar
    assert traced.dtype == jnp.float32 and traced.shape == steps.shape
    np.testing.assert_allclose(traced, sched(steps), rtol=1e-6, atol=1e-12)
    scalar = sched(c.steps[-1])  # a Python int
    assert scalar.shape == () and scalar.dtype == jnp.float32
    np.testing.assert_allclose(scalar, traced[-1], rtol=1e-6)


def test_symmetric_cyclic_matches_smith_2017():
    for mode, gamma in [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.98)]:
        sched = S.cyclic(0.02, 0.2, step_size_up=6, mode=mode, gamma=gamma)
        with jax.enable_x64(True):
            got = evaluate(sched, range(60))
        want = [R.cyclic_smith(t, 0.02, 0.2, 6, mode, gamma) for t in range(60)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=mode)


# --------------------------------------------------------------------------- behaviours


def test_cosine_annealing_continues_past_t_max():
    sched = S.cosine_annealing(0.1, t_max=10, eta_min=0.01)
    with jax.enable_x64(True):
        v = evaluate(sched, range(61))
    want = R.cosine_annealing_recursive(61, 0.1, 10, 0.01)  # the documented recursion
    np.testing.assert_allclose(v, want, rtol=1e-12)
    assert v[10] == v[30] == v[50] == 0.01 and v[20] == v[40] == v[60] == 0.1
    # Huge int32 steps fold exactly into one period.
    big = 2**31 - 1
    assert float(sched(big)) == float(sched(big % 20))


def test_warm_restarts_restart_at_init_value():
    sched = S.cosine_warm_restarts(0.1, t_0=3, t_mult=2, eta_min=0.01)
    starts = [0, 3, 9, 21, 45, 93, 3 * (2**29 - 1)]
    np.testing.assert_allclose(evaluate(sched, starts, jnp.int32), 0.1, rtol=1e-7)
    last = 2**31 - 1  # an int32 step still in a cycle of 3 * 2**29 steps
    t_cur = 2**31 - 1 - 3 * (2**29 - 1)
    np.testing.assert_allclose(evaluate(sched, [last], jnp.int32),
                               R.cosine_annealing(t_cur, 0.1, 3 * 2**29, 0.01), rtol=1e-5)


def test_schedules_that_end_stay_at_their_end():
    far = [100, 1000, 2**31 - 1]
    with jax.enable_x64(True):
        np.testing.assert_array_equal(
            evaluate(S.warmup_cosine(0.1, 5, 50, end_value=0.002), far, jnp.int32), 0.002)
        np.testing.assert_array_equal(evaluate(S.linear(0.1, 0.003, 50), far, jnp.int32),
                                      0.003)
        np.testing.assert_array_equal(
            evaluate(S.polynomial(0.1, 0.004, 0.5, 50), far, jnp.int32), 0.004)
        for kw in [{}, {"anneal": "linear"}, {"three_phase": True}]:
            sched = S.one_cycle(0.1, total_steps=50, **kw)
            last = float(sched(49))
            np.testing.assert_allclose(last, 0.1 / 25 / 1e4, rtol=1e-12, err_msg=str(kw))
            np.testing.assert_array_equal(evaluate(sched, [50, *far]), last)


def test_one_cycle_phase_boundaries_follow_pytorch():
    # pct_start * total_steps = 30.000000000000004: PyTorch's first phase ends at step 29.
    sched = S.one_cycle(1.0, total_steps=100)
    np.testing.assert_allclose(float(sched(29)), 1.0, rtol=1e-6)
    assert float(sched(28)) < 1.0 and float(sched(30)) < 1.0
    # pct_start * total_steps == 1: PyTorch divides by zero at step 0; we give the peak.
    np.testing.assert_allclose(float(S.one_cycle(1.0, total_steps=10, pct_start=0.1)(0)), 1.0)


def test_one_cycle_momentum_moves_against_the_learning_rate():
    for kw in [{}, {"anneal": "linear"}, {"three_phase": True}]:
        lr = evaluate(S.one_cycle(0.1, total_steps=100, **kw), range(100))
        mom = evaluate(S.one_cycle_momentum(total_steps=100, **kw), range(100))
        np.testing.assert_allclose(mom[[0, 29, 99]], [0.95, 0.85, 0.95], rtol=1e-6,
                                   err_msg=str(kw))
        # Where the lr rises the momentum falls, and the other way round.
        dlr, dmom = np.diff(lr), np.diff(mom)
        moving = np.abs(dmom) > 1e-7
        assert np.all(np.sign(dlr[moving]) == -np.sign(dmom[moving])), kw
    # It stays at max_momentum from total_steps - 1 on; a zero-length phase gets its end.
    far = [49, 50, 1000, 2**31 - 1]
    np.testing.assert_array_equal(evaluate(S.one_cycle_momentum(50, base_momentum=0.8), far,
                                           jnp.int32), np.float32(0.95))
    np.testing.assert_allclose(float(S.one_cycle_momentum(10, pct_start=0.1)(0)), 0.85,
                               rtol=1e-7)


def test_per_epoch_holds_each_value_for_an_epoch():
    sched = S.per_epoch(S.step_decay(1.0, step_size=1, gamma=0.5), steps_per_epoch=3)
    np.testing.assert_array_equal(evaluate(sched, range(9)), [1, 1, 1, 0.5, 0.5, 0.5, 0.25,
                                                              0.25, 0.25])
    # A float is a constant, one value per step; a plain function sees the epoch number.
    assert S.per_epoch(0.1, 5)(jnp.arange(LENGTH)).shape == (LENGTH,)
    np.testing.assert_array_equal(evaluate(S.per_epoch(lambda e: 1.0 * e, 4), range(9)),
                                  [0, 0, 0, 0, 1, 1, 1, 1, 2])
    # An epoch longer than the step's dtype holds never wraps.
    assert evaluate(S.per_epoch(lambda e: 1.0 + e, 2**40), [2**31 - 1], jnp.int32)[0] == 1.0


def test_join_passes_the_steps_since_the_boundary():
    seen = S.join([lambda t: 1.0 * t, lambda t: 100.0 + t, 0.5], boundaries=[3, 5])
    np.testing.assert_array_equal(evaluate(seen, range(8)), [0, 1, 2, 100, 101, 0.5, 0.5, 0.5])
    assert S.join([S.constant(0.2)], [])(7) == jnp.float32(0.2)


def test_constant_as_schedule_and_value_at():
    c = S.constant(0.1)
    assert c(3).shape == () and c(3).dtype == jnp.float32
    assert c(jnp.arange(LENGTH)).shape == (LENGTH,)
    with jax.enable_x64(True):
        assert c(3).dtype == jnp.float64
    fn = S.as_schedule(0.2, "sgd")
    assert fn(5) == 0.2 and S.as_schedule(c, "sgd") is c
    assert S.value_at(0.3, 9) == 0.3 and S.value_at(lambda t: 2 * t, 4) == 8
    with pytest.raises(ValueError, match=r"sgd: learning_rate must be >= 0.0, got -1"):
        S.as_schedule(-1.0, "sgd")


def test_docstring_examples_run():
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 12 and result.failed == 0


@settings(max_examples=30, deadline=None)
@given(init=st.floats(1e-4, 10.0), frac=st.floats(0.0, 1.0), t_max=st.integers(1, 10**6),
       at=st.floats(0.0, 1.0))
def test_cosine_annealing_stays_in_range_and_decreases(init, frac, t_max, at):
    eta_min = init * frac
    t = min(int(at * t_max), t_max - 1)
    v = evaluate(S.cosine_annealing(init, t_max, eta_min), [t, t + 1])
    tol = 1e-6 * init
    assert eta_min - tol <= v[1] <= v[0] + tol and v[0] <= init + tol
    assert v[0] >= eta_min - tol


# --------------------------------------------------------------------------- PyTorch


def torch_lrs(make_scheduler, lr, n):
    """``param_groups[0]['lr']`` after t = 0 .. n-1 calls of ``scheduler.step()``."""
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(torch.optim.lr_scheduler, opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


TORCH_CASES = {
    "step_decay": (S.step_decay(0.1, 7, 0.5), 0.1, lambda L, o: L.StepLR(o, 7, 0.5), 40),
    "multistep": (S.multistep_decay(0.1, [0, 3, 10, 10, 25], 0.3), 0.1,
                  lambda L, o: L.MultiStepLR(o, [0, 3, 10, 10, 25], 0.3), 40),
    "exponential": (S.exponential_decay(0.1, 0.95), 0.1,
                    lambda L, o: L.ExponentialLR(o, 0.95), 80),
    "cosine": (S.cosine_annealing(0.1, 20, 0.001), 0.1,
               lambda L, o: L.CosineAnnealingLR(o, T_max=20, eta_min=0.001), LENGTH),
    "cosine_no_min": (S.cosine_annealing(0.5, 7), 0.5,
                      lambda L, o: L.CosineAnnealingLR(o, T_max=7), 50),
    "warm_restarts": (S.cosine_warm_restarts(0.1, 5, eta_min=0.01), 0.1,
                      lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=0.01), 30),
    "warm_restarts_mult": (S.cosine_warm_restarts(0.1, 3, t_mult=2), 0.1,
                           lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2), 100),
    "linear_up": (S.linear(0.02, 0.1, 10), 0.1,
                  lambda L, o: L.LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=10),
                  20),
    "linear_down": (S.linear(0.1, 0.025, 12), 0.1,
                    lambda L, o: L.LinearLR(o, start_factor=1.0, end_factor=0.25,
                                            total_iters=12), 20),
    "polynomial": (S.polynomial(0.1, 0.0, 0.9, 20), 0.1,
                   lambda L, o: L.PolynomialLR(o, total_iters=20, power=0.9), 30),
    "polynomial_square": (S.polynomial(0.1, 0.0, 2.0, 15), 0.1,
                          lambda L, o: L.PolynomialLR(o, total_iters=15, power=2.0), 25),
    "warmup_cosine": (
        S.warmup_cosine(0.1, 10, 50, end_value=0.001, init_value=0.01), 0.1,
        lambda L, o: L.SequentialLR(o, [
            L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10),
            L.CosineAnnealingLR(o, T_max=40, eta_min=0.001)], milestones=[10]), 51),
    "join": (S.join([S.linear(0.01, 0.1, 5), S.exponential_decay(0.1, 0.9)], [5]), 0.1,
             lambda L, o: L.SequentialLR(o, [
                 L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=5),
                 L.ExponentialLR(o, 0.9)], milestones=[5]), 30),
    "cyclic": (S.cyclic(0.01, 0.1, 5), 0.1,
               lambda L, o: L.CyclicLR(o, 0.01, 0.1, step_size_up=5, cycle_momentum=False), 40),
    "cyclic_triangular2": (
        S.cyclic(0.01, 0.1, 4, 7, mode="triangular2"), 0.1,
        lambda L, o: L.CyclicLR(o, 0.01, 0.1, step_size_up=4, step_size_down=7,
                                mode="triangular2", cycle_momentum=False), 50),
    "cyclic_exp_range": (
        S.cyclic(0.01, 0.1, 6, mode="exp_range", gamma=0.97), 0.1,
        lambda L, o: L.CyclicLR(o, 0.01, 0.1, step_size_up=6, mode="exp_range", gamma=0.97,
                                cycle_momentum=False), 50),
    "cyclic_sawtooth": (
        S.cyclic(0.01, 0.1, 6, 0), 0.1,
        lambda L, o: L.CyclicLR(o, 0.01, 0.1, step_size_up=6, step_size_down=0,
                                cycle_momentum=False), 20),
}
for _kw, _n in [({}, 50), ({"anneal": "linear", "pct_start": 0.25, "div_factor": 10.0,
                           "final_div_factor": 100.0}, 37),
                ({"three_phase": True}, 40), ({"three_phase": True, "anneal": "linear",
                                               "pct_start": 0.4}, 33),
                ({"pct_start": 0.05}, 10), ({"pct_start": 0.29}, 100), ({}, 1)]:
    _torch_kw = {("anneal_strategy" if k == "anneal" else k): v for k, v in _kw.items()}
    TORCH_CASES[f"one_cycle_{_n}_{'_'.join(map(str, _kw.values())) or 'default'}"] = (
        S.one_cycle(0.1, _n, **_kw), 0.1,
        lambda L, o, n=_n, kw=_torch_kw: L.OneCycleLR(o, max_lr=0.1, total_steps=n,
                                                     cycle_momentum=False, **kw), _n)


def torch_momentums(kind, n, **one_cycle_kw):
    """The momentum ``OneCycleLR`` gives SGD (``param_groups[0]["momentum"]``) or Adam
    (``param_groups[0]["betas"][0]``) after t = 0 .. n-1 calls of ``scheduler.step()``."""
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    if kind == "sgd":
        opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam([param], lr=0.1, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=n,
                                                    **one_cycle_kw)
    out = []
    for _ in range(n):
        group = opt.param_groups[0]
        out.append(group["momentum"] if kind == "sgd" else group["betas"][0])
        if kind == "adam":
            assert group["betas"][1] == 0.99  # only beta1 cycles
        opt.step()
        scheduler.step()
    return out


MOMENTUM_TORCH_CASES = [
    ({}, 50), ({"anneal": "linear", "pct_start": 0.25, "base_momentum": 0.8,
                "max_momentum": 0.9}, 37),
    ({"three_phase": True}, 40),
    ({"three_phase": True, "anneal": "linear", "pct_start": 0.4}, 33),
    ({"pct_start": 0.05, "base_momentum": 0.5, "max_momentum": 0.99}, 10),
    ({"pct_start": 0.29}, 100), ({}, 1),
]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("kw,n", MOMENTUM_TORCH_CASES,
                         ids=[f"{n}-{'-'.join(map(str, kw.values())) or 'default'}"
                              for kw, n in MOMENTUM_TORCH_CASES])
def test_one_cycle_momentum_matches_torch(kind, kw, n):
    torch_kw = {("anneal_strategy" if k == "anneal" else k): v for k, v in kw.items()}
    want = torch_momentums(kind, n, **torch_kw)
    sched = S.one_cycle_momentum(n, **kw)
    with jax.enable_x64(True):
        got = evaluate(sched, range(n))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    got32 = evaluate(sched, range(n), jnp.int32)
    np.testing.assert_allclose(got32, want, rtol=1e-6)


@pytest.mark.parametrize("make_sched,make_torch", [
    (lambda: S.step_decay(0.1, 3, 0.5), lambda L, o: L.StepLR(o, 3, 0.5)),
    (lambda: S.cosine_annealing(0.1, 4, 0.01), lambda L, o: L.CosineAnnealingLR(o, 4, 0.01)),
], ids=["step_decay", "cosine"])
def test_per_epoch_matches_torch_stepped_once_per_epoch(make_sched, make_torch):
    torch = pytest.importorskip("torch")
    steps_per_epoch, n = 5, 60
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = make_torch(torch.optim.lr_scheduler, opt)
    want = []
    for t in range(n):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        if (t + 1) % steps_per_epoch == 0:  # the end of an epoch
            scheduler.step()
    with jax.enable_x64(True):
        got = evaluate(S.per_epoch(make_sched(), steps_per_epoch), range(n))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_matches_torch_lr_scheduler(name):
    sched, lr, make, n = TORCH_CASES[name]
    assert n <= LENGTH
    want = torch_lrs(make, lr, n)
    with jax.enable_x64(True):
        got = evaluate(sched, range(n))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


# --------------------------------------------------------------------------- errors


ERRORS = [
    (lambda: S.constant("a"), TypeError, r"constant: value must be a float, got str"),
    (lambda: S.step_decay(0.1, 0), ValueError, r"step_decay: step_size must be a positive "
                                               r"int, got 0"),
    (lambda: S.step_decay(0.1, 2.5), TypeError, r"step_decay: step_size must be a positive "
                                                r"int, got 2\.5 \(float\)"),
    (lambda: S.step_decay(0.1, 5, -0.1), ValueError, r"step_decay: gamma must be >= 0\.0, "
                                                     r"got -0\.1"),
    (lambda: S.step_decay(float("nan"), 5), ValueError, r"step_decay: init_value must be a "
                                                        r"number, got nan"),
    (lambda: S.multistep_decay(0.1, [10, 5]), ValueError,
     r"multistep_decay: milestones must be a sequence of ints >= 0 in non-decreasing order, "
     r"got \[10, 5\]"),
    (lambda: S.multistep_decay(0.1, [-1]), ValueError, r"multistep_decay: milestones .*got "
                                                       r"\[-1\]"),
    (lambda: S.multistep_decay(0.1, [1.5]), TypeError, r"multistep_decay: milestones .*got "
                                                       r"\[1\.5\]"),
    (lambda: S.multistep_decay(0.1, 10), TypeError, r"multistep_decay: milestones must be a "
                                                    r"sequence .*got 10 \(int\)"),
    (lambda: S.exponential_decay(0.1, -0.5), ValueError, r"exponential_decay: gamma must be "
                                                         r">= 0\.0, got -0\.5"),
    (lambda: S.cosine_annealing(0.1, 0), ValueError, r"cosine_annealing: t_max must be a "
                                                     r"positive int, got 0"),
    (lambda: S.cosine_annealing(0.1, 10, eta_min=None), TypeError,
     r"cosine_annealing: eta_min must be a float, got NoneType"),
    (lambda: S.cosine_warm_restarts(0.1, 0), ValueError, r"cosine_warm_restarts: t_0 must be "
                                                         r"a positive int, got 0"),
    (lambda: S.cosine_warm_restarts(0.1, 5, t_mult=0), ValueError,
     r"cosine_warm_restarts: t_mult must be a positive int, got 0"),
    (lambda: S.cosine_warm_restarts(0.1, 5, t_mult=1.5), TypeError,
     r"cosine_warm_restarts: t_mult must be a positive int, got 1\.5 \(float\)"),
    (lambda: S.warmup_cosine(0.1, -1, 10), ValueError, r"warmup_cosine: warmup_steps must be "
                                                       r"an int >= 0, got -1"),
    (lambda: S.warmup_cosine(0.1, 10, 10), ValueError, r"warmup_cosine: total_steps must be "
                                                       r"an int > warmup_steps \(10\), got 10"),
    (lambda: S.warmup_cosine(0.1, 0, 0), ValueError, r"warmup_cosine: total_steps must be a "
                                                     r"positive int, got 0"),
    (lambda: S.linear(0.0, 0.1, 0), ValueError, r"linear: transition_steps must be a positive "
                                                r"int, got 0"),
    (lambda: S.polynomial(0.1, 0.0, 0.0, 10), ValueError, r"polynomial: power must be > 0\.0, "
                                                          r"got 0\.0"),
    (lambda: S.polynomial(0.1, 0.0, 1.0, True), TypeError, r"polynomial: transition_steps must "
                                                           r"be a positive int, got True"),
    (lambda: S.one_cycle(0.1, 0), ValueError, r"one_cycle: total_steps must be a positive int, "
                                              r"got 0"),
    (lambda: S.one_cycle(0.1, 100, pct_start=1.5), ValueError,
     r"one_cycle: pct_start must be in \[0\.0, 1\.0\], got 1\.5"),
    (lambda: S.one_cycle(0.1, 100, anneal="cosine"), ValueError,
     r"one_cycle: anneal must be 'cos' or 'linear', got 'cosine'"),
    (lambda: S.one_cycle(0.1, 100, div_factor=0.0), ValueError,
     r"one_cycle: div_factor must be > 0\.0, got 0\.0"),
    (lambda: S.one_cycle(0.1, 100, final_div_factor=-1.0), ValueError,
     r"one_cycle: final_div_factor must be > 0\.0, got -1\.0"),
    (lambda: S.one_cycle(0.1, 100, three_phase="yes"), TypeError,
     r"one_cycle: three_phase must be a bool, got 'yes'"),
    (lambda: S.one_cycle_momentum(0), ValueError, r"one_cycle_momentum: total_steps must be a "
                                                   r"positive int, got 0"),
    (lambda: S.one_cycle_momentum(100, pct_start=-0.1), ValueError,
     r"one_cycle_momentum: pct_start must be in \[0\.0, 1\.0\], got -0\.1"),
    (lambda: S.one_cycle_momentum(100, anneal="cosine"), ValueError,
     r"one_cycle_momentum: anneal must be 'cos' or 'linear', got 'cosine'"),
    (lambda: S.one_cycle_momentum(100, base_momentum=-0.1), ValueError,
     r"one_cycle_momentum: base_momentum must be >= 0\.0, got -0\.1"),
    (lambda: S.one_cycle_momentum(100, max_momentum=float("nan")), ValueError,
     r"one_cycle_momentum: max_momentum must be a number, got nan"),
    (lambda: S.one_cycle_momentum(100, max_momentum="high"), TypeError,
     r"one_cycle_momentum: max_momentum must be a float, got str"),
    (lambda: S.one_cycle_momentum(100, three_phase=1), TypeError,
     r"one_cycle_momentum: three_phase must be a bool, got 1"),
    (lambda: S.per_epoch(S.constant(0.1), 0), ValueError,
     r"per_epoch: steps_per_epoch must be a positive int, got 0"),
    (lambda: S.per_epoch(S.constant(0.1), 2.5), TypeError,
     r"per_epoch: steps_per_epoch must be a positive int, got 2\.5 \(float\)"),
    (lambda: S.per_epoch(S.constant(0.1), True), TypeError,
     r"per_epoch: steps_per_epoch must be a positive int, got True \(bool\)"),
    (lambda: S.per_epoch("fast", 10), TypeError, r"per_epoch: schedule must be a float, "
                                                 r"got str"),
    (lambda: S.per_epoch(lambda: 0.1, 10), TypeError,
     r"per_epoch: schedule is a schedule, so it must take the step count"),
    (lambda: S.cyclic(0.01, 0.1, 0), ValueError, r"cyclic: step_size_up must be a positive "
                                                 r"int, got 0"),
    (lambda: S.cyclic(0.01, 0.1, 5, -2), ValueError, r"cyclic: step_size_down must be an int "
                                                     r">= 0, got -2"),
    (lambda: S.cyclic(0.01, 0.1, 5, mode="exp"), ValueError,
     r"cyclic: mode must be one of 'triangular', 'triangular2', 'exp_range', got 'exp'"),
    (lambda: S.cyclic(0.01, 0.1, 5, mode="exp_range", gamma=0.0), ValueError,
     r"cyclic: gamma must be > 0\.0, got 0\.0"),
    (lambda: S.join([S.constant(0.1)], [5]), ValueError,
     r"join: needs one boundary fewer than schedules, got 1 schedules and 1 boundaries"),
    (lambda: S.join([], []), ValueError, r"join: needs one boundary fewer than schedules, got "
                                         r"0 schedules and 0 boundaries"),
    (lambda: S.join([0.1, 0.2, 0.3], [10, 5]), ValueError,
     r"join: boundaries must be a sequence of ints >= 0 in non-decreasing order, got "
     r"\[10, 5\]"),
    (lambda: S.join([0.1, "fast"], [5]), TypeError, r"join: schedules\[1\] must be a float, "
                                                    r"got str"),
    (lambda: S.join(S.constant(0.1), []), TypeError, r"join: schedules must be a sequence of "
                                                     r"schedules, got function"),
]


@pytest.mark.parametrize("make,exc,message", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_construction_errors_name_the_argument(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_default_float_dtype_and_no_python_branching_on_step():
    # jax.make_jaxpr fails on any Python `if` over the traced step.
    for name, c in CASES.items():
        jaxpr = jax.make_jaxpr(c.make())(jnp.int32(3))
        assert jaxpr.out_avals[0].dtype == jnp.float32, name
    assert math.isclose(float(S.exponential_decay(1.0, 0.0)(0)), 1.0)
