"""Mixed precision in the train step: bf16 accuracy, fp16 loss scaling, skipped steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, losses, nn, optim, precision, train

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def train_digits(digits, policy=None, loss_scale=None, epochs=5, loss_factor=1.0, lr=0.05):
    train_set, test_set = digits
    model = nn.mlp([256, 10])
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    opt = optim.sgd(lr, momentum=0.9)

    def loss_fn(p, batch):
        logits = model.apply(p, batch["x"])
        return loss_factor * losses.softmax_cross_entropy(logits, batch["y"])

    state = train.TrainState.create(params, opt, jax.random.key(1), policy=policy,
                                    loss_scale=loss_scale)
    step = train.make_train_step(loss_fn, opt, policy=policy)
    state, hist = train.fit(state, step, train_set.batches(32, key=jax.random.key(2),
                                                           drop_remainder=True),
                            epochs=epochs, progress=False,
                            eval_step=train.make_eval_step(train.classifier_eval(model)),
                            eval_data=test_set.batches(512))
    return state, hist


def test_bf16_matches_fp32_accuracy_within_one_point(digits):
    s32, h32 = train_digits(digits)
    s16, h16 = train_digits(digits, policy="params=float32,compute=bfloat16,output=float32")
    # Master weights stay float32.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    acc32, acc16 = h32.eval[-1]["accuracy"], h16.eval[-1]["accuracy"]
    assert acc16 >= 0.95
    assert abs(acc32 - acc16) <= 0.01, (acc32, acc16)


def test_fp16_needs_loss_scaling_for_tiny_gradients(digits):
    """A loss scaled by 1e-8 gives gradients that underflow in float16 without a loss scale.

    Both runs compensate with a 1e8 larger learning rate, so in exact arithmetic they are
    the same run; only the loss scale differs.
    """
    policy = "params=float32,compute=float16,output=float32"
    kw = dict(policy=policy, epochs=3, loss_factor=1e-8, lr=0.05 * 1e8)
    _, unscaled = train_digits(digits, loss_scale=precision.StaticLossScale(1.0), **kw)
    state, scaled = train_digits(digits, loss_scale=precision.DynamicLossScale(), **kw)
    assert unscaled.eval[-1]["accuracy"] < 0.5  # the gradients underflowed to (mostly) zero
    assert np.mean(unscaled.train["grad_norm"]) < 1e-3 * np.mean(scaled.train["grad_norm"])
    assert scaled.eval[-1]["accuracy"] >= 0.9
    assert float(state.loss_scale.loss_scale) > 1.0


def test_non_finite_step_is_skipped_bitwise_and_scale_recovers():
    period = 4
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}
    opt = optim.adam(0.1)

    def loss_fn(p, batch):
        pred = batch["x"] @ p["w"] + p["b"]
        return jnp.mean((pred - batch["y"]) ** 2) * batch["poison"]

    state = train.TrainState.create(
        params, opt, jax.random.key(0),
        loss_scale=precision.DynamicLossScale(initial=2.0 ** 10, period=period))
    step = train.make_train_step(loss_fn, opt, donate=False)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4), "poison": jnp.array(1.0)}
    state, _ = step(state, batch)
    before = state
    state, m = step(state, {**batch, "poison": jnp.array(jnp.inf)})
    jax.tree.map(np.testing.assert_array_equal, state.params, before.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, before.opt_state)
    assert float(m["loss_scale"]) == 2.0 ** 9
    assert int(m["skipped_steps"]) == 1
    scales = []
    for _ in range(period):
        state, m = step(state, batch)
        scales.append(float(m["loss_scale"]))
    assert scales == [2.0 ** 9] * (period - 1) + [2.0 ** 10]
    assert int(state.skipped_steps) == 1
    assert not np.array_equal(state.params["w"], before.params["w"])


def test_with_policy_casts_and_overrides():
    model = nn.serial(nn.dense(8), nn.layer_norm(), nn.relu(), nn.dense(3, name="head"))
    mixed = nn.with_policy(model, "p=f32,c=bf16,o=f32", overrides={"head": "float32"})
    params = mixed.init(jax.random.key(0), jnp.zeros((1, 4)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    seen = {}

    def spy(p, x):
        seen.update({k: v["w"].dtype for k, v in p.items() if "w" in v})
        return model.apply(p, x)

    probe = nn.Module(model.init, lambda p, x, key=None, train=False: spy(p, x))
    out = nn.with_policy(probe, "p=f32,c=bf16,o=f32", overrides={"head": "float32"}).apply(
        params, jnp.ones((2, 4)))
    assert seen == {"dense_0": jnp.bfloat16, "head": jnp.float32}
    assert out.dtype == jnp.float32
    assert mixed.apply(params, jnp.ones((2, 4))).dtype == jnp.float32
    # as documented: the output dtype defaults to the compute dtype, float32 head or not
    default = nn.with_policy(model, "p=f32,c=bf16", overrides={"head": "float32"})
    assert default.apply(params, jnp.ones((2, 4))).dtype == jnp.bfloat16


def _dot_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [str(e.invars[0].aval.dtype) for e in jaxpr.eqns  # the activations
            if e.primitive.name == "dot_general"]


def test_an_early_float32_override_leaves_the_later_layers_in_bf16():
    """Each child casts its inputs to its own compute dtype: a float32 first layer outputs
    float32, and the next layer computes in bf16 again (it used to run in float32, and so
    did every layer after it); a float32 head keeps its float32 output. Also nested in a
    model, where the override's key path is relative to the wrapped model."""
    model = nn.serial(nn.dense(8), nn.relu(), nn.dense(8), nn.dense(3, name="head"))
    x = jnp.ones((2, 4))
    for overrides, want in (({"dense_0": "float32"}, ["float32", "bfloat16", "bfloat16"]),
                            ({"head": "float32"}, ["bfloat16", "bfloat16", "float32"])):
        mixed = nn.with_policy(model, "p=f32,c=bf16,o=f32", overrides=overrides)
        params = mixed.init(jax.random.key(0), x)
        assert _dot_dtypes(mixed.apply, params, x) == want
        outer = nn.serial(nn.dense(4, name="stem"), mixed)
        outer_params = outer.init(jax.random.key(0), x)
        assert _dot_dtypes(outer.apply, outer_params, x) == ["float32", *want]
        grads = jax.jit(jax.grad(lambda p, m=mixed: jnp.sum(m.apply(p, x) ** 2)))(params)
        assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
                   for g in jax.tree.leaves(grads))
    # a nested with_policy runs its own policy, overrides or not: the outer one's casts
    # stop at it
    inner = nn.with_policy(nn.serial(nn.dense(8), nn.tanh(), nn.dense(8)), "float32")
    outer = nn.with_policy(nn.serial(nn.dense(8), inner, nn.dense(3, name="head")),
                           "p=f32,c=bf16,o=f32", overrides={"head": "float32"})
    params = outer.init(jax.random.key(0), x)
    assert _dot_dtypes(outer.apply, params, x) == ["bfloat16", "float32", "float32", "float32"]


def test_with_policy_rejects_an_override_that_matches_nothing():
    model = nn.with_policy(nn.mlp([4, 2]), "bf16", overrides={"head": "float32"})
    with pytest.raises(ValueError, match="override pattern 'head' matches no param key path"):
        model.init(jax.random.key(0), jnp.zeros((1, 3)))


def test_loss_scale_must_live_in_the_state():
    opt = optim.sgd(0.1)
    state = train.TrainState.create({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    step = train.make_train_step(lambda p, b: jnp.sum(p["w"] ** 2), opt,
                                 loss_scale=precision.DynamicLossScale())
    with pytest.raises(ValueError, match=r"state.loss_scale is None; create the state with "
                                         r"TrainState.create\(..., loss_scale=...\)"):
        step(state, {})


@pytest.mark.parametrize("bad", [1024.0, 1024, "dynamic", jnp.float32(1024.0)])
def test_loss_scale_must_be_a_loss_scale(bad):
    # a bare number failed deep inside with "'float' object has no attribute 'dtype'" or,
    # as a jax scalar, "DynamicJaxprTracer has no attribute scale" from the jitted step
    opt, loss_fn = optim.sgd(0.1), lambda p, b: jnp.sum(p["w"] ** 2)
    msg = r"loss_scale must be a loss scale from funtrain.precision \(StaticLossScale"
    with pytest.raises(TypeError, match="TrainState.create: " + msg):
        train.TrainState.create({"w": jnp.zeros(2)}, opt, jax.random.key(0), loss_scale=bad)
    with pytest.raises(TypeError, match="make_train_step: " + msg):
        train.make_train_step(loss_fn, opt, loss_scale=bad)
    if isinstance(bad, str):
        return  # not an array, so jax itself refuses it in the state, naming state.loss_scale
    state = train.TrainState.create({"w": jnp.zeros(2)}, opt, jax.random.key(0),
                                    loss_scale=precision.StaticLossScale(2.0))
    with pytest.raises(TypeError, match="make_train_step: state.loss_scale must be a loss "
                                        "scale"):
        train.make_train_step(loss_fn, opt)(state._replace(loss_scale=bad), {})


def test_step_and_state_loss_scales_must_agree():
    # the step's loss_scale= was only read as a flag: a DynamicLossScale step trained a
    # StaticLossScale state with the static scale, without a word
    opt, loss_fn = optim.sgd(0.1), lambda p, b: jnp.sum(p["w"] ** 2)
    state = train.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0),
                                    loss_scale=precision.StaticLossScale(4.0))
    step = train.make_train_step(loss_fn, opt, loss_scale=precision.DynamicLossScale())
    with pytest.raises(ValueError, match="the step was built with a DynamicLossScale but "
                                         "state.loss_scale is a StaticLossScale"):
        step(state, {})
    same = train.make_train_step(loss_fn, opt, loss_scale=precision.StaticLossScale(1.0))
    state, metrics = same(state, {})  # same kind, other value: the state's value counts
    assert float(metrics["loss_scale"]) == 4.0


def test_create_copies_key_and_scale_and_checks_the_key():
    opt = optim.sgd(0.1)
    key, scale = jax.random.key(0), precision.DynamicLossScale()
    weak = {"w": jnp.full((2,), 0.5)}
    state = train.TrainState.create(weak, opt, key, loss_scale=scale)
    step = train.make_train_step(lambda p, b: jnp.sum(p["w"] ** 2), opt)
    for _ in range(3):
        state, _ = step(state, {})
    assert step._cache_size() == 1  # no recompilation from weak types or the loss scale
    jax.random.split(key)  # the caller's key and scale are still alive after donation
    assert float(scale.loss_scale) == 2.0 ** 15
    with pytest.raises(TypeError, match="key must be a PRNG key such as jax.random.key"):
        train.TrainState.create(weak, opt, 0)


def test_injected_nesterov_momentum_jits():
    opt = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9, nesterov=True)
    params = {"w": jnp.ones(3)}
    u, _ = jax.jit(opt.update)(params, opt.init_state(params), params)
    ref, _ = optim.sgd(0.1, momentum=0.9, nesterov=True).update(
        params, optim.sgd(0.1, momentum=0.9, nesterov=True).init_state(params), params)
    np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-6)
