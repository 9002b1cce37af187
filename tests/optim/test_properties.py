"""Every optimizer: convergence, structure and dtypes, jit parity, memory, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funtrain import optim, train

# Settings that converge on the test problems below (not tuned for anything else).
CONFIGS = {
    "sgd": dict(learning_rate=0.05, momentum=0.9),
    "rmsprop": dict(learning_rate=0.01),
    "adagrad": dict(learning_rate=0.5),
    "adadelta": dict(learning_rate=10.0),
    "adam": dict(learning_rate=0.05),
    "adamw": dict(learning_rate=0.05, weight_decay=1e-4),
    "amsgrad": dict(learning_rate=0.05),
    "adamax": dict(learning_rate=0.05),
    "nadam": dict(learning_rate=0.05),
    "radam": dict(learning_rate=0.05),
    "lion": dict(learning_rate=lambda t: 0.05 * 0.99 ** t),
    "lamb": dict(learning_rate=0.05),
    "lars": dict(learning_rate=1.0, trust_coefficient=0.1),
    "adafactor": dict(learning_rate=0.1),
    "schedule_free_adamw": dict(learning_rate=0.05),
    "muon": dict(learning_rate=0.05, adam_learning_rate=0.05, weight_decay=0.0),
}


def test_every_optimizer_has_a_config():
    assert set(CONFIGS) == set(optim.OPTIMIZERS)


def run(opt, loss, params, steps, jit=True):
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    state = opt.init_state(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def quadratic(p):
    x = jnp.concatenate([p["w"].ravel(), p["b"], p["s"][None]])
    scales = jnp.linspace(0.5, 3.0, x.size)
    return 0.5 * jnp.sum(scales * (x - 1.0) ** 2)


# Built in numpy, not weak-typed: a weak-typed scalar param recompiles the jitted step
# once it comes back strong from the first update. device_put, unlike jnp.asarray, moves
# host arrays without compiling a program per shape.
START = {"w": np.array([[2.0, -1.0], [0.0, 3.0]], np.float32),
         "b": np.array([-2.0, 0.5], np.float32), "s": np.array(4.0, np.float32)}


def start(dtype=jnp.float32):
    return {k: jax.device_put(x.astype(dtype)) for k, x in START.items()}


def start_grads(dtype=jnp.float32):
    """Gradients for ``start(dtype)``, made on the host: test input, nothing to compile."""
    return {k: jax.device_put((0.1 * x + 0.3).astype(dtype)) for k, x in START.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converges_on_a_quadratic(name):
    opt = optim.OPTIMIZERS[name](**CONFIGS[name])
    p0 = start()
    p, state = run(opt, quadratic, p0, 400)
    if name == "schedule_free_adamw":
        p = optim.schedule_free_eval_params(state, p)
    assert float(quadratic(p)) < 0.02 * float(quadratic(p0)), float(quadratic(p))


def rosenbrock(p):
    x, y = p["xy"][0], p["xy"][1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


# Adagrad (step sizes decay too fast) and RAdam (its un-rectified first steps are plain
# momentum SGD, which diverges at an Adam-sized lr here) are checked on the quadratic only.
ROSEN = {
    "sgd": dict(learning_rate=1e-3, momentum=0.9),
    "rmsprop": dict(learning_rate=1e-3, momentum=0.9),
    "adam": dict(learning_rate=0.02),
    "adamw": dict(learning_rate=0.02, weight_decay=0.0),
    "nadam": dict(learning_rate=0.02),
    "amsgrad": dict(learning_rate=0.05),
    "adamax": dict(learning_rate=0.1),
    "lion": dict(learning_rate=lambda t: 0.01 * 0.999 ** t),
}


@pytest.mark.parametrize("name", sorted(ROSEN))
def test_reaches_the_rosenbrock_valley_floor(name):
    opt = optim.OPTIMIZERS[name](**ROSEN[name])
    p, _ = run(opt, rosenbrock, {"xy": jnp.array([-1.2, 1.0])}, 3000)
    np.testing.assert_allclose(np.asarray(p["xy"]), [1.0, 1.0], atol=0.05)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_structure_and_dtype_preserved(name, dtype):
    opt = optim.OPTIMIZERS[name](**CONFIGS[name])
    params, grads = start(dtype), start_grads(dtype)
    state = opt.init_state(params)
    updates, new_state = jax.jit(opt.update)(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.dtype == p.dtype and u.shape == p.shape
    new = optim.apply_updates(params, updates)
    assert all(x.dtype == dtype for x in jax.tree.leaves(new))
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(new))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_jit_and_no_jit_identical(name):
    opt = optim.OPTIMIZERS[name](**CONFIGS[name])
    a, _ = run(opt, quadratic, start(), 3, jit=True)
    b, _ = run(opt, quadratic, start(), 3, jit=False)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7), a, b)


def test_state_bytes_matches_the_seed_table():
    params = {"w": jnp.zeros((100, 50)), "b": jnp.zeros(50)}
    p_bytes = optim.state_bytes(params)
    ratio = lambda opt: optim.state_bytes(jax.eval_shape(opt.init_state, params)) / p_bytes
    assert ratio(optim.sgd(0.1)) == 0.0
    assert ratio(optim.sgd(0.1, momentum=0.9)) == pytest.approx(1.0, abs=1e-3)
    assert ratio(optim.adam()) == pytest.approx(2.0, abs=1e-3)
    assert ratio(optim.adamw()) == pytest.approx(2.0, abs=1e-3)
    assert ratio(optim.adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)) == pytest.approx(
        1.0, abs=1e-3)
    assert ratio(optim.adafactor()) < 0.1  # factored: rows + cols, no first moment
    # a whole TrainState: its typed key counts as its words (2 uint32 for threefry)
    state = train.TrainState.create(params, optim.sgd(0.1), jax.random.key(0))
    assert optim.state_bytes(state) == p_bytes + 4 + 8 + 4  # + step, key, skipped_steps


def test_bf16_moments_are_stored_in_bf16():
    opt = optim.adamw(mu_dtype=jnp.bfloat16)
    state = opt.init_state(start())
    adam_state = state[0]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(adam_state.mu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam_state.nu))
    _, new = opt.update(start(), state, start())
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new[0].mu))


def test_clip_by_global_norm_reports_the_pre_clip_norm():
    opt = optim.chain(optim.clip_by_global_norm(1.0, eps=0.0), optim.sgd(1.0))
    g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    u, state = opt.update(g, opt.init_state(g), g)
    assert float(state[0].norm) == 5.0
    np.testing.assert_allclose(u["a"], [-0.6], rtol=1e-6)
    u, state = opt.update({"a": jnp.array([0.3]), "b": jnp.array([0.4])}, state, g)
    np.testing.assert_allclose(u["a"], [-0.3], rtol=1e-6)  # below max_norm: unchanged
    np.testing.assert_allclose(optim.clip(0.5).update(g, ())[0]["a"], [0.5])


@pytest.mark.parametrize("call,message", [
    (lambda: optim.adam(-1e-3), "adam: learning_rate must be >= 0.0, got -0.001"),
    (lambda: optim.adam(b1=1.0), r"adam: b1 must be in \[0.0, 1.0\), got 1.0"),
    (lambda: optim.adamw(b2=-0.1), r"adamw: b2 must be in \[0.0, 1.0\), got -0.1"),
    (lambda: optim.adam(eps=0.0), r"adam: eps must be > 0 \(or pass eps_root > 0"),
    (lambda: optim.adamw(weight_decay=-0.01), "adamw: weight_decay must be >= 0.0, got -0.01"),
    (lambda: optim.rmsprop(eps=-1.0), "rmsprop: eps must be > 0"),
    (lambda: optim.rmsprop(alpha=1.5), r"rmsprop: alpha must be in \[0.0, 1.0\), got 1.5"),
    (lambda: optim.lion(b1=2.0), r"lion: b1 must be in \[0.0, 1.0\)"),
    (lambda: optim.lamb(weight_decay=-1.0), "lamb: weight_decay must be >= 0.0"),
    (lambda: optim.adagrad(initial_accumulator_value=-1.0),
     "initial_accumulator_value must be >= 0.0"),
    (lambda: optim.nadam(convention="keras"), "nadam: convention must be 'pytorch' or 'optax'"),
    (lambda: optim.amsgrad(convention="tf"), "amsgrad: convention must be 'pytorch' or 'optax'"),
    (lambda: optim.adafactor(eps=(-1.0, 1e-3)), r"adafactor: eps\[0\] must be > 0.0"),
    (lambda: optim.lamb(eps=0.0), r"lamb: eps must be > 0 \(or pass eps_root"),
    (lambda: optim.adafactor(eps=1e-3), r"adafactor: eps must be a pair"),
    (lambda: optim.muon(adjust_lr="rms"), "muon: adjust_lr must be 'original'"),
    (lambda: optim.schedule_free_adamw(b1=0.0), r"b1 must be in \(0.0, 1.0\)"),
    (lambda: optim.clip_by_global_norm(0.0), "clip_by_global_norm: max_norm must be > 0.0"),
    (lambda: optim.sgd(0.1, momentum=float("nan")), "sgd: momentum must be a number, got nan"),
])
def test_bad_hyperparameters_named_at_construction(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_mask_of_the_wrong_structure():
    opt = optim.adamw(mask={"w": True, "b": False})
    with pytest.raises(ValueError, match=r"Missing key paths in mask: s"):
        opt.init_state(start())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grads_of_another_tree_name_the_key_path(name):
    opt = optim.OPTIMIZERS[name](**CONFIGS[name])
    params = start()
    grads = {"w": params["w"], "b": params["b"], "t": params["s"]}
    with pytest.raises(ValueError, match=r"Missing key paths in (grads|updates): s\. Extra key "
                                         r"paths in (grads|updates): t"):
        opt.update(grads, opt.init_state(params), params)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=4),
       st.sampled_from(["adam", "sgd", "lion", "adafactor", "muon", "lamb"]))
@pytest.mark.slow  # over 10 s on 2 cores
def test_random_trees_keep_structure_and_stay_finite(shapes, name):
    # Inputs and checks in numpy, the update jitted (as users run it): one program per
    # example instead of one per eager op and new shape.
    host = {f"p{i}": {"w": np.full(s, 0.5 + i, np.float32), "b": np.ones(s[-1:], np.float32)}
            for i, s in enumerate(shapes)}
    params = jax.device_put(host)
    opt = optim.OPTIMIZERS[name](**CONFIGS[name])
    grads = jax.device_put(jax.tree.map(lambda x: np.sin(x) * np.float32(0.1), host))
    u, state = jax.jit(opt.update)(grads, opt.init_state(params), params)
    assert jax.tree.structure(u) == jax.tree.structure(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u))
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(params),
                                                   strict=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_size_leaves_are_left_alone(name):
    # An empty leaf (a layer with 0 units, a masked-out embedding) must not divide by its
    # size or norm: it stays empty and the other leaves update as without it.
    # The leaves besides the empty ones are test_structure_and_dtype_preserved's float32
    # case: the update without the empty leaves is that test's compiled program.
    opt = getattr(optim, name)(**CONFIGS[name])
    empty = jax.device_put({"empty": np.zeros((0, 4), np.float32), "e1": np.zeros(0, np.float32)})
    params, grads = {**start(), **empty}, {**start_grads(), **empty}
    updates, _ = jax.jit(opt.update)(grads, opt.init_state(params), params)
    assert updates["empty"].shape == (0, 4) and updates["e1"].shape == (0,)
    alone = start()
    ref, _ = jax.jit(opt.update)(start_grads(), opt.init_state(alone), alone)
    for k in alone:
        np.testing.assert_allclose(updates[k], ref[k], rtol=1e-6)
