"""Model state (BatchNorm statistics) in training: TrainState.model_state through the train
and eval steps, scan_steps, fit, exact resume, the non-finite guard, and a small ResNet
on digits."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, losses, nn, optim, train

IMAGE = (6, 6, 2)


class Interrupt(Exception):
    pass


@functools.cache  # one model, so the steps and jits below compile once per module
def small_model():
    """Three BatchNorms: at the root, inside a residual, and one with flax's convention.
    No bias before a BatchNorm: its gradient is 0 up to rounding, which Adam would blow up
    to steps of +-lr, so runs that differ only in rounding (scan vs steps) would drift."""
    return nn.serial(nn.conv(4, 3, use_bias=False), nn.batch_norm(), nn.relu(),
                     nn.residual(nn.conv(4, 3, use_bias=False), nn.batch_norm(name="bn"),
                                 activation=nn.relu(), name="block"),
                     nn.global_avg_pool(), nn.dense(8, use_bias=False),
                     nn.batch_norm(convention="flax"), nn.relu(), nn.dense(3))


def bn_states(tree, path=""):
    """``{key path: state}`` of every BatchNorm in a model state."""
    if isinstance(tree, dict) and {"count", "mean", "var"} <= set(tree):
        return {path: tree}
    return {k: s for name, v in tree.items()
            for k, s in bn_states(v, f"{path}/{name}".lstrip("/")).items()}


def counts(model_state):
    return {k: np.asarray(s["count"]).tolist() for k, s in bn_states(model_state).items()}


def snapshot(tree):
    """Host copies (a donated state's buffers are gone after the step)."""
    return jax.tree.map(np.array, jax.device_get(tree))


def tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def tree_close(a, b, tol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def dataset(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = rng.standard_normal((n, *IMAGE)).astype(np.float32) + y[:, None, None, None]
    return data.ArrayDataset(x=x, y=y)


@functools.cache  # a step compiles once per config, not once per test
def make_step(skip_nonfinite, policy):
    opt = optim.adamw(1e-2)
    step = train.make_train_step(train.classifier_loss(small_model()), opt,
                                 skip_nonfinite=skip_nonfinite, policy=policy)
    return opt, step


@functools.cache
def eval_step_fn():
    return train.make_eval_step(train.classifier_eval(small_model()))


@functools.cache
def jit_apply():
    """The model's apply, compiled once (the reference values for the steps)."""
    return jax.jit(small_model().apply, static_argnames="train")


def setup(*, skip_nonfinite=False, policy=None):
    model = small_model()
    params, model_state = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
    opt, step = make_step(skip_nonfinite, policy)
    state = train.TrainState.create(params, opt, jax.random.key(1), model_state=model_state)
    return model, state, step


def batches(k, size=16, seed=0):
    ds = dataset(k * size, seed)
    return [ds[i * size:(i + 1) * size] for i in range(k)]


# ----------------------------------------------------------------------------- steps


def test_create_copies_the_model_state():
    model = small_model()
    params, model_state = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
    opt = optim.sgd(0.1)
    state = train.TrainState.create(params, opt, jax.random.key(1), model_state=model_state)
    tree_equal(state.model_state, model_state)
    assert all(a is not b for a, b in zip(jax.tree.leaves(state.model_state),
                                          jax.tree.leaves(model_state), strict=True))
    assert train.TrainState.create(params, opt, jax.random.key(1)).model_state is None
    # a precision policy casts the params, never the statistics
    cast = train.TrainState.create(params, opt, jax.random.key(1), model_state=model_state,
                                   policy="params=bfloat16,compute=bfloat16,output=float32")
    assert {p.dtype for p in jax.tree.leaves(cast.params)} == {jnp.dtype(jnp.bfloat16)}
    dtypes = lambda tree: jax.tree.map(lambda a: a.dtype, tree)  # noqa: E731
    assert dtypes(cast.model_state) == dtypes(model_state)
    assert jnp.dtype(jnp.float32) in jax.tree.leaves(dtypes(cast.model_state))
    with pytest.raises(TypeError, match=r"params is a \(params, state\) pair.*"
                                        r"model_state=state"):
        train.TrainState.create((params, model_state), opt, jax.random.key(1))


def test_train_step_updates_the_model_state():
    model, state, step = setup()
    before = snapshot((state.params, state.model_state))
    assert set(counts(state.model_state)) == {"batch_norm_0", "block/bn", "batch_norm_1"}
    for i, batch in enumerate(batches(3), start=1):
        state, metrics = step(state, batch)
        assert set(metrics) >= {"loss", "accuracy", "grad_norm"}
        assert set(counts(state.model_state).values()) == {i}
        if i == 1:  # the state the loss returned: train mode on the params before the update
            _, want = jit_apply()(before[0], batch["x"], state=before[1], train=True)
            tree_close(state.model_state, want)
    for s in bn_states(state.model_state).values():
        assert (s["mean"].dtype, s["var"].dtype) == (jnp.float32, jnp.float32)
        assert not np.allclose(s["mean"], 0.0)


def test_policy_keeps_the_model_state_float32():
    _, state, step = setup(policy="params=float32,compute=bfloat16,output=float32")
    for batch in batches(2):
        state, _ = step(state, batch)
    assert set(counts(state.model_state).values()) == {2}
    for s in bn_states(state.model_state).values():
        assert (s["mean"].dtype, s["var"].dtype, s["count"].dtype) == (
            jnp.float32, jnp.float32, jnp.int32)


def test_scan_steps_equals_single_steps():
    data4 = batches(4)
    _, state, step = setup()
    for batch in data4:
        state, metrics = step(state, batch)
    _, scanned, scan_step = setup()
    scanned, stacked = train.scan_steps(scan_step)(
        scanned, jax.tree.map(lambda *xs: np.stack(xs), *data4))
    assert counts(scanned.model_state) == counts(state.model_state)
    assert set(counts(scanned.model_state).values()) == {4}
    tree_close(scanned.model_state, state.model_state, 1e-5)
    tree_close(scanned.params, state.params, 1e-5)
    np.testing.assert_allclose(stacked["loss"][-1], metrics["loss"], rtol=1e-5)


def test_eval_step_reads_the_model_state():
    _, state, step = setup()
    eval_step = eval_step_fn()
    batch = batches(1, seed=1)[0]
    state, _ = step(state, batches(1)[0])
    params, one = snapshot((state.params, state.model_state))
    got = eval_step(params, batch, one)

    @jax.jit  # the reference values in one program, not op by op
    def reference(params, x, y, state):
        logits, same = small_model().apply(params, x, state=state)  # eval mode
        return same, losses.softmax_cross_entropy(logits, y), losses.accuracy(logits, y)

    same, loss, accuracy = reference(params, batch["x"], batch["y"], one)
    tree_equal(same, one)
    assert float(got["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(got["accuracy"]) == pytest.approx(float(accuracy))
    # inside the user's own jit (its statistics are traced there, so unchecked): same values
    in_jit = jax.jit(eval_step)(params, batch, one)
    assert float(in_jit["loss"]) == pytest.approx(float(got["loss"]), rel=1e-6)
    # other statistics, other results (same params)
    _, two = jit_apply()(params, batches(1, seed=2)[0]["x"] * 3.0, state=one, train=True)
    assert float(eval_step(params, batch, two)["loss"]) != pytest.approx(float(got["loss"]))
    # evaluate passes model_state on, weighting batches by size
    loader = dataset(40, seed=1).batches(16)  # 16 + 16 + 8
    whole = eval_step(params, dataset(40, seed=1)[:], one)
    result = train.evaluate(eval_step, params, loader, model_state=one)
    assert result["loss"] == pytest.approx(float(whole["loss"]), rel=1e-5)


def test_a_params_and_state_pair_passed_as_params_is_named():
    """``TrainState.create(model.init(...))`` for a stateful model: the pair is caught. A
    pair of param dicts (an encoder's and a decoder's) is params like any tree."""
    pair = small_model().init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
    with pytest.raises(TypeError, match=r"TrainState.create: params is a \(params, state\) "
                                        r"pair.*model_state=state"):
        train.TrainState.create(pair, optim.sgd(0.1), jax.random.key(1))
    enc, dec = nn.dense(4), nn.dense(3)
    two = (enc.init(jax.random.key(0), jnp.zeros((1, 5))),
           dec.init(jax.random.key(1), jnp.zeros((1, 4))))
    state = train.TrainState.create(two, optim.adam(1e-3), jax.random.key(1))
    assert jax.tree.structure(state.params) == jax.tree.structure(two)


def test_missing_or_unused_model_state_is_a_clear_error():
    model = small_model()
    params, model_state = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
    opt = optim.sgd(0.1)
    batch = batches(1)[0]
    # the model has state, the TrainState does not
    state = train.TrainState.create(params, opt, jax.random.key(1))
    step = train.make_train_step(train.classifier_loss(model), opt)
    with pytest.raises(ValueError, match=r"loss_fn takes a model_state argument but "
                                         r"state.model_state is None; create the state with "
                                         r"TrainState.create\(params, optimizer, key, "
                                         r"model_state=...\)"):
        step(state, batch)
    # the TrainState has state, the loss_fn does not take it
    state = train.TrainState.create(params, opt, jax.random.key(1), model_state=model_state)

    def loss_fn(params, batch, key):
        return jnp.mean(model.apply(params, batch["x"], state=model_state, train=True)[0])

    with pytest.raises(TypeError, match=r"state.model_state is set .* but loss_fn takes 3 "
                                        r"positional argument\(s\).*classifier_loss\(model\)"):
        train.make_train_step(loss_fn, opt)(state, batch)

    def no_new_state(params, batch, key, model_state):
        logits, _ = model.apply(params, batch["x"], state=model_state, train=True)
        return losses.softmax_cross_entropy(logits, batch["y"]), {}

    with pytest.raises(TypeError, match=r"must return \(loss, aux_metrics_dict, "
                                        r"new_model_state\), got a tuple of 2 entries"):
        train.make_train_step(no_new_state, opt)(state, batch)


def test_eval_without_model_state_is_a_clear_error():
    model = small_model()
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
    eval_step = train.make_eval_step(train.classifier_eval(model))
    with pytest.raises(ValueError, match=r"eval_fn takes a model_state .* but none was "
                                         r"given; call eval_step\(params, batch, "
                                         r"state.model_state\)"):
        train.evaluate(eval_step, params, batches(1))
    two_args = train.make_eval_step(lambda p, b: {"loss": jnp.zeros(())})
    _, state = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
    with pytest.raises(TypeError, match=r"a model_state was given .* but eval_fn takes "
                                        r"\(params, batch\)"):
        train.evaluate(two_args, params, batches(1), model_state=state)


def test_nonfinite_step_leaves_the_model_state_bitwise_unchanged():
    good, bad = batches(2)
    bad = {**bad, "x": bad["x"].copy()}
    bad["x"][3, 0, 0, 0] = np.nan
    _, state, step = setup(skip_nonfinite=True)
    state, _ = step(state, good)
    before = snapshot(state._replace(rng=None))
    state, metrics = step(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(metrics["skipped"]) == 1 and int(state.skipped_steps) == 1
    assert int(state.step) == 2
    tree_equal(snapshot(state.model_state), before.model_state)
    tree_equal(snapshot(state.params), before.params)
    tree_equal(snapshot(state.opt_state), before.opt_state)
    state, metrics = step(state, good)  # and training goes on from there
    assert int(metrics["skipped"]) == 0
    assert set(counts(state.model_state).values()) == {2}
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(snapshot(state.model_state)))
    # without the guard the NaN batch poisons the statistics
    _, state, step = setup()
    state, _ = step(state, bad)
    assert np.isnan(np.asarray(state.model_state["batch_norm_0"]["mean"])).any()


# ----------------------------------------------------------------------------- fit


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_counts_after_fit_equal_the_steps(steps_per_call):
    _, state, step = setup()
    loader = dataset().batches(16, key=jax.random.key(2), drop_remainder=True)  # 6 a epoch
    state, history = train.fit(state, step, loader, epochs=2, progress=False,
                               steps_per_call=steps_per_call)
    assert int(state.step) == len(history.train["loss"]) == 12
    assert counts(state.model_state) == {"batch_norm_0": 12, "block/bn": 12,
                                         "batch_norm_1": 12}


def fit_run(epochs, **kw):
    _, state, step = setup()
    loader = dataset().batches(16, key=jax.random.key(2), drop_remainder=True)  # 6 a epoch
    return train.fit(state, step, loader, epochs=epochs, progress=False,
                     eval_step=eval_step_fn(),
                     eval_data=dataset(32, seed=1).batches(16), **kw)


@pytest.mark.slow  # over 10 s on 2 cores
@pytest.mark.parametrize("interrupt", ["mid-epoch", "epoch-end"])
def test_resume_is_bitwise_with_model_state(tmp_path, interrupt):
    full_state, full = fit_run(3)
    if interrupt == "mid-epoch":  # killed inside the run, from a checkpoint every 2 steps
        stop_at = random.Random(7).randrange(3, 17)

        class Kill:
            def on_step(self, step, metrics):
                if step == stop_at:
                    raise Interrupt

        with pytest.raises(Interrupt):
            fit_run(3, log_every=1, callbacks=[Kill()], checkpoint_dir=tmp_path,
                    checkpoint_every=2)
        saved = train.checkpoint.latest_step(tmp_path)
        assert saved is not None and saved <= stop_at
        first = full.train["loss"][:saved]
    else:  # one epoch, saved at its end, then resume to three
        _, part = fit_run(1, checkpoint_dir=tmp_path)
        saved = train.checkpoint.latest_step(tmp_path)
        assert saved == 6
        first = part.train["loss"]
        assert first == full.train["loss"][:6]
    # the checkpoint holds the model state, statistics as they were at that step
    paths = {leaf["path"] for leaf in train.checkpoint.read_manifest(tmp_path)["leaves"]}
    for bn in ("batch_norm_0", "block/bn", "batch_norm_1"):
        assert {f"model_state/{bn}/{k}" for k in ("count", "mean", "var")} <= paths
    assert counts(train.checkpoint.restore(tmp_path)["model_state"]) == {
        "batch_norm_0": saved, "block/bn": saved, "batch_norm_1": saved}

    state, resumed = fit_run(3, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    assert resumed.train["step"][0] == saved + 1
    assert first + resumed.train["loss"] == full.train["loss"]
    assert int(state.step) == 18
    tree_equal(snapshot(state.params), snapshot(full_state.params))
    tree_equal(snapshot(state.model_state), snapshot(full_state.model_state))
    tree_equal(snapshot(state.opt_state), snapshot(full_state.opt_state))
    assert resumed.eval[-1] == full.eval[-1]
    final = train.checkpoint.restore(tmp_path)
    assert train.checkpoint.latest_step(tmp_path) == 18
    tree_equal(final["model_state"], snapshot(full_state.model_state))


def test_resume_into_a_template_without_model_state_names_it(tmp_path):
    fit_run(1, checkpoint_dir=tmp_path)
    _, state, _ = setup()
    with pytest.raises(train.CheckpointError, match=r"Extra key paths in the checkpoint: "
                                                    r"model_state/batch_norm_0/count"):
        train.checkpoint.restore(tmp_path, target=state._replace(model_state=None))


@pytest.mark.slow
def test_small_resnet_on_digits():
    """ResNet-18 (CIFAR stem, width 16) on the 8×8 digits: > 95% test accuracy in 3 epochs
    of batch 32, Adam with cosine decay from 1e-2 (97.8% at seed 0, 97.2-98.6% over seeds
    0-5; about 14 s alone on a shared 2-core CPU, compilation included)."""
    pytest.importorskip("sklearn")
    train_set, test_set = data.load_digits(flatten=False)
    model = nn.models.resnet(18, 10, stem="cifar", width=16)
    shuffle_key, run_key = jax.random.split(jax.random.key(0))
    params, model_state = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    loader = train_set.batches(32, key=shuffle_key, drop_remainder=True)
    epochs = 3
    opt = optim.adam(optim.schedules.cosine_annealing(1e-2, epochs * len(loader)))
    state = train.TrainState.create(params, opt, run_key, model_state=model_state)
    state, history = train.fit(
        state, train.make_train_step(train.classifier_loss(model), opt), loader,
        epochs=epochs, eval_step=train.make_eval_step(train.classifier_eval(model)),
        eval_data=test_set.batches(360), progress=False, log_every=100)
    assert history.eval[-1]["accuracy"] > 0.95
    steps = epochs * len(loader)
    assert int(state.step) == steps
    found = counts(state.model_state)
    assert len(found) == 20 and set(found.values()) == {steps}  # stem, 16 in blocks, 3 down
