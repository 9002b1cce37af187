"""make_train_step / make_eval_step / scan_steps: correctness, determinism, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import losses, nn, optim, train


def linear_problem():
    # numpy inputs: eager jax.random and matmul would each compile a program
    x = np.random.default_rng(1).standard_normal((32, 3)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5], np.float32) + np.float32(0.3)
    return {"x": x, "y": y}


def mse_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    return losses.mse(pred, batch["y"])


def fresh_state(opt):
    return train.TrainState.create({"w": jnp.zeros(3), "b": jnp.zeros(())}, opt,
                                   jax.random.key(0))


def test_step_equals_manual_forward_backward_update():
    opt = optim.sgd(0.1, momentum=0.9)
    batch = linear_problem()
    step = train.make_train_step(mse_loss, opt)
    state = fresh_state(opt)
    p, s = {"w": jnp.zeros(3), "b": jnp.zeros(())}, opt.init_state(
        {"w": jnp.zeros(3), "b": jnp.zeros(())})
    for _ in range(5):
        state, metrics = step(state, batch)
        loss, g = jax.value_and_grad(mse_loss)(p, batch)
        u, s = opt.update(g, s, p)
        p = optim.apply_updates(p, u)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], optim.global_norm(g), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.params, p)
    assert int(state.step) == 5


def test_an_optax_optimizer_trains_as_its_own_loop():
    """optax's (init, update) pairs pass check_optimizer, so the step takes them as they
    are (its state check called init_state, which optax lacks)."""
    optax = pytest.importorskip("optax")
    tx = optax.adamw(1e-2)
    batch = linear_problem()
    step = train.make_train_step(mse_loss, tx)
    state = fresh_state(tx)
    p = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    s = tx.init(p)
    for _ in range(3):
        state, _ = step(state, batch)
        u, s = tx.update(jax.grad(mse_loss)(p, batch), s, p)
        p = optax.apply_updates(p, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.params, p)


def test_aux_metrics_and_key_are_passed():
    seen = []

    def loss_fn(params, batch, key):
        seen.append(key)
        return mse_loss(params, batch), {"bias": params["b"]}

    opt = optim.sgd(0.1)
    step = train.make_train_step(loss_fn, opt, jit=False)
    state, metrics = step(fresh_state(opt), linear_problem())
    assert set(metrics) == {"loss", "grad_norm", "bias", "nonfinite"}
    assert jax.dtypes.issubdtype(seen[0].dtype, jax.dtypes.prng_key)


def test_donation_leaves_created_params_usable():
    opt = optim.sgd(0.1)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = train.TrainState.create(params, opt, jax.random.key(0))
    train.make_train_step(mse_loss, opt)(state, linear_problem())
    assert float(jnp.sum(params["w"])) == 0.0  # still alive: create() copied it


def test_donation_leaves_arrays_the_optimizer_holds_usable():
    """pruned's masks and an injected jax scalar sit in the optimizer state: the first
    step's donation deleted them, for the caller and for a second create (a resume)."""
    from funtrain import sparsity
    params = {"w": jnp.arange(1.0, 5.0), "b": jnp.zeros(())}
    masks = sparsity.magnitude(params, 0.5)
    lr = jnp.asarray(0.1)
    batch = {"x": jnp.ones((4, 4)), "y": jnp.ones(4)}
    loss = lambda p, b: jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)
    for opt in (sparsity.pruned(optim.sgd(0.1), masks=masks),
                optim.inject_hyperparams(optim.sgd)(learning_rate=lr)):
        step = train.make_train_step(loss, opt)
        for _ in range(2):  # the second create reads the optimizer's arrays again
            state, _ = step(train.TrainState.create(params, opt, jax.random.key(0)), batch)
            assert np.isfinite(float(jnp.sum(state.params["w"])))
    assert not masks["w"].is_deleted() and float(lr) == pytest.approx(0.1)


def test_scan_steps_equals_single_steps():
    model = nn.serial(nn.dense(8), nn.relu(), nn.dropout(0.2), nn.dense(3))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    opt = optim.sgd(0.05, momentum=0.9)
    loss_fn = train.classifier_loss(model)
    rng = np.random.default_rng(2)  # numpy inputs: no threefry or slicing programs
    xs = rng.standard_normal((6, 8, 4)).astype(np.float32)
    ys = rng.integers(0, 3, (6, 8)).astype(np.int32)
    single = train.make_train_step(loss_fn, opt)
    s1 = train.TrainState.create(params, opt, jax.random.key(9))
    losses_single = []
    for i in range(6):
        s1, m = single(s1, {"x": xs[i], "y": ys[i]})
        losses_single.append(float(m["loss"]))
    step = train.make_train_step(loss_fn, opt)
    multi = train.scan_steps(step)
    s2, m2 = multi(train.TrainState.create(params, opt, jax.random.key(9)), {"x": xs, "y": ys})
    np.testing.assert_allclose(m2["loss"], losses_single, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 s1.params, s2.params)
    # scan_steps(step) again, as fit does on each call: the compiled scan is reused
    compiles = []
    listener = lambda name, secs, **kw: compiles.append(name) if name.endswith(
        "backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train.scan_steps(step)(s2, {"x": xs, "y": ys})
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    # jit=False exists to be traced by the user: a state of tracers is no deleted buffer
    mine = jax.jit(train.scan_steps(train.make_train_step(loss_fn, opt, jit=False), jit=False))
    s3, m3 = mine(train.TrainState.create(params, opt, jax.random.key(9)), {"x": xs, "y": ys})
    np.testing.assert_allclose(m3["loss"], losses_single, rtol=1e-5)


def test_bad_loss_fn_outputs():
    opt = optim.sgd(0.1)
    # an aux metric named "step" overwrote the logs' step numbers, "loss" the loss itself
    def reporting(name):
        return lambda p, b: (mse_loss(p, b), {name: 0.25})

    for name in ("step", "loss"):
        clash = reporting(name)
        with pytest.raises(ValueError, match=rf"loss_fn's aux metrics \['{name}'\] clash with "
                                             rf"the train step's own metrics"):
            train.make_train_step(clash, opt)(fresh_state(opt), linear_problem())
    with pytest.raises(ValueError, match=r"make_eval_step: metric 'epoch' has a name History"):
        train.make_eval_step(lambda p, b: {"epoch": 1.0})({}, {"x": jnp.ones((2, 1))})
    per_example = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar floating loss, got shape "
                                         r"\(32,\)"):
        train.make_train_step(per_example, opt)(fresh_state(opt), linear_problem())
    bad_aux = lambda p, b: (mse_loss(p, b), 3.0)
    with pytest.raises(TypeError, match=r"\(loss, aux\) with aux a dict"):
        train.make_train_step(bad_aux, opt)(fresh_state(opt), linear_problem())
    with pytest.raises(TypeError, match="optimizer must be an Optimizer"):
        train.make_train_step(mse_loss, "sgd")


def test_eval_step_rejects_non_scalar_metrics():
    step = train.make_eval_step(lambda p, b: {"err": b["x"] @ p["w"]})
    with pytest.raises(ValueError, match=r"metric 'err' must be a scalar .*got shape \(32,\)"):
        step({"w": jnp.zeros(3)}, linear_problem())


def test_grad_norm_false_drops_the_metric_not_the_training():
    opt = optim.adam(0.05)
    batch = linear_problem()
    with_norm = train.make_train_step(mse_loss, opt)
    without = train.make_train_step(mse_loss, opt, grad_norm=False)
    a, b = fresh_state(opt), fresh_state(opt)
    for _ in range(3):
        a, ma = with_norm(a, batch)
        b, mb = without(b, batch)
        assert "grad_norm" not in mb and "grad_norm" in ma
        assert float(ma["loss"]) == float(mb["loss"])
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    # the guard still stops a run whose gradients blow up, one step later, through the loss
    huge = {**batch, "y": batch["y"] * 1e30}
    state = fresh_state(optim.sgd(1e3))
    step = train.make_train_step(mse_loss, optim.sgd(1e3), grad_norm=False)
    with pytest.raises(FloatingPointError, match=r"fit: step \d+: the loss"):
        train.fit(state, step, [huge] * 4, progress=False, log_every=1)


def test_global_norm_joins_small_leaves_and_keeps_large_ones_apart():
    rng = np.random.default_rng(0)
    leaves = {f"s{i}": rng.standard_normal(5).astype(np.float32) for i in range(40)}
    leaves["large"] = rng.standard_normal(70_000).astype(np.float32)
    leaves["half"] = rng.standard_normal(3).astype(jnp.bfloat16)
    want = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in leaves.values()))
    got = jax.jit(optim.global_norm)(leaves)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    text = jax.jit(optim.global_norm).lower(leaves).as_text()
    # the 40 leaves of one shape in 5 stacks of 8, the bf16 leaf (of a shape of its own)
    # alone, the large leaf alone, and one reduction to add them: a reduction per 8 leaves
    assert text.count("stablehlo.reduce") == 5 + 1 + 1 + 1
    leaves.update({f"t{i}": rng.standard_normal(i + 1).astype(np.float32) for i in range(6, 9)})
    text = jax.jit(optim.global_norm).lower(leaves).as_text()
    assert text.count("stablehlo.reduce") == 5 + 1 + 1 + 1  # shapes of their own: one vector


@pytest.mark.parametrize("case", ["injected", "schedule, skipped step", "schedule, multi_steps"])
def test_the_reported_learning_rate_is_the_one_the_update_used(case):
    """SGD on a linear loss of gradient 1 moves w by exactly -lr: the metric must say the
    lr of that move (the injected one of this update, not the last; a schedule at the
    optimizer's count, which skipped steps and micro-steps do not advance)."""
    sched = optim.schedules.exponential_decay(0.5, 0.5)
    good, bad = {"x": jnp.ones(())}, {"x": jnp.asarray(jnp.nan)}
    opt, kw, batches = {
        "injected": (optim.inject_hyperparams(optim.sgd)(learning_rate=sched), {},
                     [good] * 3),
        "schedule, skipped step": (optim.sgd(sched), {"learning_rate": sched,
                                                      "skip_nonfinite": True},
                                   [good, bad, good, good]),
        "schedule, multi_steps": (optim.multi_steps(optim.sgd(sched), 2),
                                  {"learning_rate": sched}, [good] * 4),
    }[case]
    state = train.TrainState.create({"w": jnp.zeros(())}, opt, jax.random.key(0))
    step = train.make_train_step(lambda p, b: jnp.sum(p["w"] * b["x"]), opt, **kw)
    moves = []
    for batch in batches:
        before = float(state.params["w"])
        state, metrics = step(state, batch)
        moved = before - float(state.params["w"])
        if moved:
            assert float(metrics["learning_rate"]) == moved, (case, len(moves))
            moves.append(moved)
    assert moves == [0.5, 0.25, 0.125][:len(moves)] and len(moves) >= 2


@pytest.mark.parametrize("wrap, expected", [
    (lambda o: optim.apply_if_finite(o, 5), [0.1, 0.05, 0.05, 0.1 / 3]),
    (lambda o: optim.multi_steps(optim.apply_if_finite(o, 5), 1), [0.1, 0.05, 0.05, 0.1 / 3]),
    # no skip allowed: the NaN step is applied, so the schedule advances
    (lambda o: optim.apply_if_finite(o, 0), [0.1, 0.05, 0.1 / 3, 0.025]),
])
def test_learning_rate_metric_follows_the_optimizer_s_own_count(wrap, expected):
    """A step apply_if_finite skipped does not advance the optimizer's schedule: the metric
    ran one step ahead of the rate applied from then on."""
    sched = lambda c: 0.1 / (1.0 + c)
    opt = wrap(optim.sgd(sched))
    state = train.TrainState.create({"w": jnp.zeros(())}, opt, jax.random.key(0))
    step = train.make_train_step(lambda p, b: p["w"] * b["g"], opt, learning_rate=sched,
                                 grad_norm=False)
    reported, applied = [], []
    for g in (1.0, float("nan"), 1.0, 1.0):
        before = float(state.params["w"])
        state, metrics = step(state, {"g": jnp.asarray(g)})
        reported.append(float(metrics["learning_rate"]))
        applied.append(before - float(state.params["w"]))  # the grad is 1: the lr itself
    np.testing.assert_allclose(reported, expected, rtol=1e-6)
    if np.isfinite(applied[-1]):  # skipped, not applied: the others are the rates reported
        np.testing.assert_allclose([applied[i] for i in (0, 2, 3)],
                                   [expected[i] for i in (0, 2, 3)], rtol=1e-6)
