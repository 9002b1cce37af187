"""SGD against the float64 reference in tests/reference/sgd.py, to 1e-10 in x64 mode, and
with a OneCycleLR-cycled momentum against torch.optim.SGD when torch is installed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import optim
from tests.reference import schedules as ref_schedules
from tests.reference.sgd import sgd_trajectory

A = np.random.default_rng(0).standard_normal((4, 4))
Q = A @ A.T / 4 + np.eye(4)  # SPD quadratic 0.5 x^T Q x - c^T x
C = np.arange(4.0)


def np_grad(theta):
    return Q @ theta - C


def run_funtrain(opt, steps):
    """Run ``opt`` on the quadratic with params split across a nested dict."""
    params = {"layer": {"w": jnp.asarray([1.0, -2.0], jnp.float64)},
              "b": jnp.asarray([0.5, 3.0], jnp.float64)}

    def loss(p):
        x = jnp.concatenate([p["layer"]["w"], p["b"]])
        return 0.5 * x @ Q @ x - C @ x

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), s

    state = opt.init_state(params)
    traj = [np.concatenate([params["layer"]["w"], params["b"]])]
    for _ in range(steps):
        params, state = step(params, state)
        traj.append(np.concatenate([np.asarray(params["layer"]["w"]), np.asarray(params["b"])]))
    return traj


CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.05, momentum=0.8, weight_decay=0.1),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3),
    "schedule": dict(lr=lambda t: 0.1 * 0.9 ** t, momentum=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sgd_matches_float64_reference(case):
    kw = dict(CASES[case])
    lr = kw.pop("lr")
    steps = 25
    with jax.enable_x64(True):
        jlr = (lambda t: 0.1 * 0.9 ** t) if callable(lr) else lr
        got = run_funtrain(optim.sgd(jlr, **kw), steps)
    ref = sgd_trajectory([1.0, -2.0, 0.5, 3.0], np_grad, steps, lr, **kw)
    assert len(got) == steps + 1
    for t, (a, b) in enumerate(zip(got, ref, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"step {t}")
    # The trajectory must actually move toward the optimum.
    opt = np.linalg.solve(Q, C)
    if not kw.get("weight_decay"):
        assert np.linalg.norm(got[-1] - opt) < np.linalg.norm(got[0] - opt)


def test_first_step_uses_schedule_zero():
    params = {"w": jnp.ones(())}
    opt = optim.sgd(lambda t: jnp.where(t == 0, 1.0, 100.0))
    u, _ = opt.update({"w": jnp.ones(())}, opt.init_state(params), params)
    assert float(u["w"]) == -1.0


def test_sgd_float32_params_keep_dtype():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    opt = optim.sgd(0.1, momentum=0.9)
    state = opt.init_state(params)
    u, state = opt.update({"w": jnp.ones((3,), jnp.bfloat16)}, state, params)
    new = optim.apply_updates(params, u)
    assert new["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs,message", [
    (dict(learning_rate=-0.1), "sgd: learning_rate must be >= 0.0, got -0.1"),
    (dict(learning_rate="fast"), "sgd: learning_rate must be a float, got str"),
    (dict(learning_rate=0.1, momentum=-0.5), "sgd: momentum must be >= 0.0, got -0.5"),
    (dict(learning_rate=0.1, weight_decay=-1.0), "sgd: weight_decay must be >= 0.0"),
    (dict(learning_rate=0.1, dampening=1.5), r"sgd: dampening must be in \[0.0, 1.0\], got 1.5"),
    (dict(learning_rate=0.1, nesterov=True), "sgd: nesterov=True needs momentum > 0"),
    (dict(learning_rate=float("nan")), "sgd: learning_rate must be a number, got nan"),
])
def test_sgd_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        optim.sgd(**kwargs)


# --------------------------------------------------------------------------- momentum schedules

N = 25  # updates in a run: OneCycleLR's total_steps
SCHEDULE_CASES = {
    "one_cycle": dict(momentum=dict()),
    "one_cycle_linear_three_phase": dict(momentum=dict(anneal="linear", three_phase=True,
                                                       pct_start=0.4)),
    "nesterov": dict(momentum=dict(base_momentum=0.5, max_momentum=0.9), nesterov=True),
    "dampening_weight_decay": dict(momentum=dict(), dampening=0.3, weight_decay=0.1),
}


def _momentum(kw):
    """funtrain's one_cycle_momentum and its float64 reference (t -> value)."""
    return (optim.schedules.one_cycle_momentum(N, **kw),
            lambda t: ref_schedules.one_cycle_momentum(t, N, **kw))


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_sgd_momentum_schedule_matches_float64_reference(case):
    kw = dict(SCHEDULE_CASES[case])
    mom, mom_ref = _momentum(kw.pop("momentum"))
    lr = optim.schedules.one_cycle(0.1, N)
    with jax.enable_x64(True):
        got = run_funtrain(optim.sgd(lr, momentum=mom, **kw), N)
    want = sgd_trajectory([1.0, -2.0, 0.5, 3.0], np_grad, N,
                          lambda t: ref_schedules.one_cycle(t, 0.1, N), momentum=mom_ref, **kw)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"step {t}")
    # The schedule matters: a float momentum takes another path.
    fixed = sgd_trajectory([1.0, -2.0, 0.5, 3.0], np_grad, N,
                           lambda t: ref_schedules.one_cycle(t, 0.1, N), momentum=0.9, **kw)
    assert np.abs(got[-1] - fixed[-1]).max() > 1e-4


def _torch_one_cycle_sgd(steps, cycle=None, **sgd_kw):
    """Params of torch.optim.SGD under OneCycleLR (momentum cycled) on the quadratic."""
    torch = pytest.importorskip("torch")
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=0.1, momentum=0.9, foreach=False, **sgd_kw)
    cycle = cycle or dict(base_momentum=0.8, max_momentum=0.95)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps,
                                                    **cycle)
    out = [theta.detach().numpy().copy()]
    for _ in range(steps):
        theta.grad = torch.tensor(np_grad(theta.detach().numpy()), dtype=torch.float64)
        opt.step()
        scheduler.step()
        out.append(theta.detach().numpy().copy())
    return out


@pytest.mark.parametrize("sgd_kw", [{}, {"nesterov": True}, {"dampening": 0.3},
                                    {"weight_decay": 0.1}], ids=str)
def test_sgd_one_cycle_momentum_matches_torch_one_cycle_lr(sgd_kw):
    want = _torch_one_cycle_sgd(N, **sgd_kw)
    lr = optim.schedules.one_cycle(0.1, N)
    mom = optim.schedules.one_cycle_momentum(N, base_momentum=0.8, max_momentum=0.95)
    with jax.enable_x64(True):
        got = run_funtrain(optim.sgd(lr, momentum=mom, **sgd_kw), N)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")


@pytest.mark.parametrize("sgd_kw", [{}, {"nesterov": True}, {"dampening": 0.3}], ids=str)
def test_a_momentum_of_zero_mid_run_skips_the_buffer_as_torch(sgd_kw):
    """OneCycleLR with base_momentum=0 sets the momentum to exactly 0 at the end of its first
    phase: torch.optim.SGD then steps with the gradient and leaves its buffer as it is
    (``if momentum != 0``); the float64 reference and funtrain do the same."""
    cycle = dict(pct_start=0.4, base_momentum=0.0, max_momentum=0.9)
    mom, mom_ref = _momentum(cycle)
    assert float(mom(9)) == mom_ref(9) == 0.0  # pct_start * N - 1
    lr, lr_ref = optim.schedules.one_cycle(0.1, N, pct_start=0.4), \
        (lambda t: ref_schedules.one_cycle(t, 0.1, N, pct_start=0.4))
    want = _torch_one_cycle_sgd(N, cycle, **sgd_kw)
    ref = sgd_trajectory([1.0, -2.0, 0.5, 3.0], np_grad, N, lr_ref, momentum=mom_ref, **sgd_kw)
    with jax.enable_x64(True):
        got = run_funtrain(optim.sgd(lr, momentum=mom, **sgd_kw), N)
    for t, (a, b, c) in enumerate(zip(got, ref, want, strict=True)):
        np.testing.assert_allclose(b, c, rtol=1e-10, atol=1e-12, err_msg=f"reference, step {t}")
        np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12, err_msg=f"funtrain, step {t}")


def test_a_momentum_warmup_from_zero_matches_torch():
    """A momentum schedule that starts at 0 (a warm-up): torch.optim.SGD creates its buffer
    at the first nonzero momentum (b = g); without dampening funtrain's buffer, untouched
    while the momentum is 0, gives the same steps (``trace`` documents the dampened case)."""
    torch = pytest.importorskip("torch")
    warm = optim.schedules.linear(0.0, 0.9, 5)
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    want = [theta.detach().numpy().copy()]
    for t in range(N):
        opt.param_groups[0]["momentum"] = ref_schedules.linear(t, 0.0, 0.9, 5)
        theta.grad = torch.tensor(np_grad(theta.detach().numpy()), dtype=torch.float64)
        opt.step()
        want.append(theta.detach().numpy().copy())
    with jax.enable_x64(True):
        got = run_funtrain(optim.sgd(0.1, momentum=warm, nesterov=True), N)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")


def test_momentum_schedule_reuses_the_trace_count():
    params = {"w": jnp.ones((3,))}
    sched = optim.sgd(0.1, momentum=optim.schedules.one_cycle_momentum(10))
    fixed = optim.sgd(0.1, momentum=0.9)
    assert jax.tree.structure(sched.init_state(params)) == \
        jax.tree.structure(fixed.init_state(params))


def test_constant_momentum_schedule_equals_the_float_bitwise():
    # Inputs from numpy: made with eager jnp ops, each would compile.
    params = {"w": jax.device_put(np.linspace(-1.0, 1.0, 7, dtype=np.float32))}
    grads = [{"w": np.sin(np.arange(7.0, dtype=np.float32) + k)} for k in range(4)]
    runs = []
    for momentum in (0.9, optim.schedules.constant(0.9), lambda t: 0.9):
        opt = optim.sgd(0.1, momentum=momentum, nesterov=True)
        update = jax.jit(opt.update)
        state, p = opt.init_state(params), params
        for g in grads:
            u, state = update(g, state, p)
            p = optim.apply_updates(p, u)
        runs.append(np.asarray(p["w"]))
    np.testing.assert_array_equal(runs[1], runs[0])
    np.testing.assert_array_equal(runs[2], runs[0])


def test_momentum_schedule_keeps_a_bfloat16_buffer_in_scan():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    opt = optim.sgd(0.1, momentum=optim.schedules.one_cycle_momentum(8))

    def body(carry, _):
        p, s = carry
        u, s = opt.update({"w": jnp.ones((3,), jnp.bfloat16)}, s, p)
        return (optim.apply_updates(p, u), s), None

    (p, state), _ = jax.lax.scan(body, (params, opt.init_state(params)), length=8)
    assert p["w"].dtype == jnp.bfloat16
    assert state[0].trace["w"].dtype == jnp.bfloat16 and int(state[0].count) == 8


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(momentum=lambda t: -0.5), ValueError, r"sgd: momentum\(0\) must be >= 0.0, got -0.5"),
    (dict(momentum=lambda: 0.9), TypeError,
     r"sgd: momentum is a schedule, so it must take the step count"),
    (dict(momentum=lambda t: jnp.ones(2)), ValueError,
     r"sgd: momentum is a schedule; it must return a scalar, got shape \(2,\)"),
    (dict(momentum=lambda t: 0.9, nesterov=True, dampening=0.1), ValueError,
     r"sgd: nesterov=True needs dampening == 0, got dampening=0.1"),
])
def test_sgd_rejects_bad_momentum_schedules(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        optim.sgd(0.1, **kwargs)
