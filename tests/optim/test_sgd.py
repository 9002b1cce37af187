"""SGD against the float64 reference in tests/reference/sgd.py, to 1e-10 in x64 mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import optim
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
    qj, cj = jnp.asarray(Q), jnp.asarray(C)

    def loss(p):
        x = jnp.concatenate([p["layer"]["w"], p["b"]])
        return 0.5 * x @ qj @ x - cj @ x

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
