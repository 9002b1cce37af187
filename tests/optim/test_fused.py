"""Fused flat buffers: the same training as unfused params, through the jitted step."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, precision, train
from funtrain.optim.fused import FlatParams, flat_mask, fuse, layout_of, pack, unfuse
from funtrain.train import checkpoint

MODEL = nn.mlp([16, 4])
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 8)))
_rng = np.random.default_rng(0)
BATCHES = [jax.device_put({"x": _rng.standard_normal((32, 8)).astype(np.float32),  # no compile
                           "y": _rng.integers(0, 4, 32).astype(np.int32)}) for _ in range(4)]
LOSS = train.classifier_loss(MODEL)

# Element-wise rules: the fused run computes the same bits. The others run per leaf
# (leafwise) or reduce in another order, so they agree to a few ulps.
ELEMENTWISE = {"sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw", "amsgrad", "adamax",
               "nadam", "radam", "lion", "schedule_free_adamw"}
KWARGS = {"lars": {"learning_rate": 0.1}, "sgd": {"learning_rate": 0.1, "momentum": 0.9}}


def train_params(opt, fused, steps=4, loss=LOSS, params=PARAMS):
    state = train.TrainState.create(params, opt, jax.random.key(1), fused=fused)
    step = train.make_train_step(loss, opt)
    for i in range(steps):
        state, _ = step(state, BATCHES[i % len(BATCHES)])
    return state


def _host(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def assert_same(a, b, exact=True):
    """Same structure and dtypes; bitwise equal, or (``exact=False``) equal up to rounding:
    rules that reduce (norms, trust ratios) sum in another order over buffers."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = _host(x), _host(y)
        assert x.dtype == y.dtype
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_trains_the_same_fused(name):
    opt = optim.OPTIMIZERS[name](**KWARGS.get(name, {}))
    fused = train_params(opt, True)
    assert isinstance(fused.params, FlatParams)
    plain = train_params(opt, False)
    assert_same(unfuse(fused.params), plain.params, name in ELEMENTWISE)
    assert_same(unfuse(fused.opt_state), plain.opt_state, name in ELEMENTWISE)


def test_elementwise_state_is_buffers_and_per_leaf_rules_keep_leaves():
    adam = train.TrainState.create(PARAMS, optim.adamw(1e-3), jax.random.key(0), fused=True)
    mu = adam.opt_state[0].mu
    assert isinstance(mu, FlatParams)
    assert [b.shape for b in mu.buffers] == [(20,), (192,)]  # vectors, matrices
    lamb = train.TrainState.create(PARAMS, optim.adafactor(), jax.random.key(0), fused=True)
    # adafactor's factored statistics need each matrix's shape: they stay per leaf
    assert not any(isinstance(x, FlatParams) for x in
                   jax.tree.leaves(lamb.opt_state, is_leaf=lambda x: isinstance(x, FlatParams)))


def test_masks_per_buffer_or_per_element():
    # decay only the matrices: the default grouping makes the mask one bool per buffer
    matrices = optim.labels_to_mask(lambda path, p: p.ndim > 1)
    flat = fuse(PARAMS)
    assert flat_mask(matrices(PARAMS), flat) == (False, True)
    # a mask that splits a buffer (dense_1 only) becomes element-wise, and trains the same
    first = optim.labels_to_mask(lambda path, p: path[0] == "dense_1")
    mixed = flat_mask(first(PARAMS), flat)
    assert all(m.dtype == bool and m.shape == (size,) for m, (_, _, size)
               in zip(mixed, flat.layout.groups, strict=True))
    for mask in (matrices, first):
        opt = optim.adamw(1e-2, weight_decay=0.5, mask=mask)
        assert_same(unfuse(train_params(opt, True).params), train_params(opt, False).params)


@pytest.mark.slow  # over 10 s on 2 cores
def test_wrappers_over_fused_params():
    cases = [optim.chain(optim.clip_by_global_norm(0.1), optim.adam(1e-2)),
             optim.multi_steps(optim.adam(1e-2), 2),
             optim.apply_if_finite(optim.adam(1e-2), 3),
             optim.ema(optim.adam(1e-2), 0.9),
             optim.inject_hyperparams(optim.adam)(learning_rate=1e-2),
             optim.masked(optim.adam(1e-2), optim.labels_to_mask(lambda path, p: p.ndim > 1)),
             optim.freeze(optim.labels_to_mask(lambda path, p: path[0] == "dense_0")),
             optim.chain(optim.freeze(lambda p: jax.tree.map(lambda x: x > 0, p)),
                         optim.sgd(0.1))]
    for opt in cases:
        assert_same(unfuse(train_params(opt, True).params), train_params(opt, False).params,
                    exact=False)  # clip_by_global_norm sums in another order


def test_layout_groups_by_dtype_and_label_and_round_trips():
    params = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.arange(3.0), "c": jnp.zeros(()),
              "d": {"e": jnp.full((2, 2, 2), 2.0), "f": jnp.ones(4, jnp.bfloat16)}}
    flat = fuse(params)
    assert [g[:2] for g in flat.layout.groups] == [
        ("bfloat16:matrices", "bfloat16"), ("float32:vectors", "float32"),
        ("float32:matrices", "float32"), ("bfloat16:vectors", "bfloat16")]
    assert [b.dtype for b in flat.buffers] == [jnp.bfloat16, jnp.float32, jnp.float32,
                                               jnp.bfloat16]
    assert_same(flat.unflatten(), params)
    by_top = fuse(params, group=lambda path, leaf: path.split("/")[0])
    assert [g[0] for g in by_top.layout.groups] == [
        "bfloat16:a", "float32:b", "float32:c", "float32:d", "bfloat16:d"]
    assert_same(by_top.unflatten(), params)
    # numpy buffers (a checkpoint's host copy) unflatten to views
    host = FlatParams(tuple(np.asarray(b) for b in flat.buffers), flat.layout)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host.unflatten()))


def test_pack_refuses_a_tree_of_other_shapes():
    layout = layout_of(PARAMS)
    other = jax.tree.map(lambda x: np.zeros(x.shape + (1,), np.float32), PARAMS)
    with pytest.raises(ValueError, match=r"the leaf at key path dense_0/b is float32\[16, 1\], "
                                         r"which does not fit the layout's float32\[16\]"):
        pack(other, layout)


def test_a_per_leaf_rule_after_a_block_that_upcasts_the_updates():
    """bfloat16 params whose updates a block makes float32 (apply_updates casts back): a
    per-leaf rule after it (LAMB's trust ratio) packs the float32 updates, as unfused."""
    params = {"b": jnp.ones(3, jnp.bfloat16), "w": jnp.ones((2, 3), jnp.bfloat16)}
    upcast = optim.Optimizer(lambda p: optim.EmptyState(), lambda g, s, p=None: (
        jax.tree.map(lambda x: x.astype(jnp.float32), g), s))
    opt = optim.chain(upcast, optim.lamb(1e-2))
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    want, _ = opt.update(grads, opt.init_state(params), params)
    flat = fuse(params)
    got, _ = opt.update(fuse(grads), opt.init_state(flat), flat)
    assert [b.dtype for b in got.buffers] == [jnp.float32] * 2
    assert_same(got.unflatten(), want)


def test_gradient_arrives_as_one_concatenate_per_buffer():
    flat = fuse(PARAMS)

    def loss(f):
        return LOSS(f.unflatten(), BATCHES[0], None)[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss))(flat)
    prims = {e.primitive.name for e in jaxpr.eqns}
    assert "concatenate" in prims and "pad" not in prims
    grads = jax.jit(jax.grad(loss))(flat)
    assert isinstance(grads, FlatParams)
    expected = jax.jit(jax.grad(lambda p: LOSS(p, BATCHES[0], None)[0]))(PARAMS)
    np.testing.assert_allclose(np.concatenate([np.asarray(g).ravel() for g in
                                               jax.tree.leaves(unfuse(grads))]),
                               np.concatenate([np.asarray(g).ravel() for g in
                                               jax.tree.leaves(expected)]),
                               rtol=1e-6, atol=1e-8)


def test_checkpoints_cross_between_fused_and_unfused():
    # test_every_optimizer_trains_the_same_fused's adamw: its compiled steps are reused
    opt = optim.OPTIMIZERS["adamw"]()
    step = train.make_train_step(LOSS, opt)
    fused, plain = train_params(opt, True, 2), train_params(opt, False, 2)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, fused, 2)
        checkpoint.save(d, plain, 3)
        # the file holds leaves: it reads back without a target, as the params tree
        raw = checkpoint.restore(d, step=2)
        assert set(raw["params"]) == {"dense_0", "dense_1"}
        into_plain = checkpoint.restore(
            d, target=train.TrainState.create(PARAMS, opt, jax.random.key(1)), step=2)
        assert_same(into_plain, plain)
        # jax.Arrays, as saved unfused (host copies of the buffers are not numpy leaves)
        for tree in (raw, into_plain):
            arrays = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
            assert arrays and all(isinstance(x, jax.Array) for x in arrays)
        assert into_plain.params["dense_0"]["w"].at[0, 0].set(1.0).shape == (
            plain.params["dense_0"]["w"].shape)
        template = jax.eval_shape(
            lambda: train.TrainState.create(PARAMS, opt, jax.random.key(1), fused=True))
        into_fused = checkpoint.restore(d, target=template, step=3)
        assert isinstance(into_fused.params, FlatParams)
        # device buffers (saved from host copies), placed like the target's
        assert all(isinstance(b, jax.Array) for b in into_fused.params.buffers)
        a, _ = step(into_fused, BATCHES[2])
        b, _ = step(fused, BATCHES[2])
        assert_same(a, b)


@pytest.mark.parametrize("case", ["bf16 params, f32 moments", "f32 params, bf16 mu",
                                  "bf16 params, f32 ema"])
def test_checkpoints_of_moments_in_another_dtype_than_the_params(case, tmp_path):
    """A fused moment buffer keeps the params' layout but has its own dtype: it restores
    into a fused state (concrete or eval_shape template) with its dtype and layout."""
    params = {"b": jnp.zeros(3), "w": jnp.full((2, 3), 0.5, jnp.bfloat16)}
    opt = {"bf16 params, f32 moments": optim.adam(1e-2),
           "f32 params, bf16 mu": optim.adam(1e-2, mu_dtype=jnp.bfloat16),
           "bf16 params, f32 ema": optim.ema(optim.sgd(0.1), 0.9)}[case]
    if case == "f32 params, bf16 mu":
        params["w"] = params["w"].astype(jnp.float32)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.25, params)
    state = train.TrainState.create(params, opt, jax.random.key(1), fused=True)
    _, opt_state = opt.update(fuse(grads), state.opt_state, state.params)  # moments not 0
    state = state._replace(opt_state=opt_state)
    checkpoint.save(tmp_path, state, 1)
    for template in (state, jax.eval_shape(lambda: state)):
        restored = checkpoint.restore(tmp_path, target=template, step=1)
        assert jax.tree.structure(restored) == jax.tree.structure(state)  # same layouts
        assert_same(restored, state)
    plain = train.TrainState.create(params, opt, jax.random.key(1))
    assert_same(checkpoint.restore(tmp_path, target=plain, step=1), unfuse(state))


def test_fit_with_evaluation_and_ema_is_the_same_fused():
    rng = np.random.default_rng(1)
    ds = data.ArrayDataset(x=rng.standard_normal((128, 8)).astype(np.float32),
                           y=rng.integers(0, 4, 128).astype(np.int32))
    opt = optim.ema(optim.adamw(1e-2), 0.9)
    step = train.make_train_step(LOSS, opt)
    evaluate = train.make_eval_step(train.classifier_eval(MODEL))
    runs = []
    for fused in (False, True):
        state = train.TrainState.create(PARAMS, opt, jax.random.key(1), fused=fused)
        state, history = train.fit(state, step, ds.batches(32, key=jax.random.key(2)),
                                   epochs=2, eval_step=evaluate, eval_data=ds.batches(64),
                                   eval_params=optim.ema_params, progress=False)
        runs.append((unfuse(state.params), history.train["loss"], history.eval))
    assert_same(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]


def test_model_given_fused_params_says_how_to_unpack():
    flat = fuse(PARAMS)
    with pytest.raises(nn.ModuleError, match=r"got FlatParams \(fused params: pass "
                                             r"params.unflatten\(\)\)"):
        MODEL.apply(flat, jnp.zeros((2, 8)))
    assert MODEL.apply(flat.unflatten(), jnp.zeros((2, 8))).shape == (2, 4)


@pytest.mark.parametrize("setting", ["bf16 compute", "f16 with loss scale", "skip mode"])
def test_fused_with_precision_loss_scale_skip_mode_and_batchnorm(setting):
    model = nn.serial(nn.dense(16), nn.batch_norm(), nn.relu(), nn.dense(4))
    params, model_state = model.init(jax.random.key(0), jnp.zeros((1, 8)))
    step_kw, state_kw = {
        "bf16 compute": ({"policy": "p=f32,c=bf16,o=f32"}, {"policy": "p=f32,c=bf16,o=f32"}),
        "f16 with loss scale": ({"policy": "p=f32,c=f16,o=f32",
                                 "loss_scale": precision.DynamicLossScale()},
                                {"policy": "p=f32,c=f16,o=f32",
                                 "loss_scale": precision.DynamicLossScale()}),
        "skip mode": ({"skip_nonfinite": True}, {}),
    }[setting]
    opt = optim.adamw(1e-2)
    step = train.make_train_step(train.classifier_loss(model), opt, **step_kw)
    runs = []
    for fused in (False, True):
        state = train.TrainState.create(params, opt, jax.random.key(1), fused=fused,
                                        model_state=model_state, **state_kw)
        for batch in BATCHES[:3]:
            state, metrics = step(state, batch)
        runs.append((unfuse(state.params), state.model_state, metrics["loss"]))
    # unscaling and the finiteness tests run over buffers: equal up to rounding
    assert_same(runs[0], runs[1], exact=setting != "f16 with loss scale")


def test_fit_resumes_a_fused_run_fused_or_unfused(tmp_path):
    rng = np.random.default_rng(2)
    ds = data.ArrayDataset(x=rng.standard_normal((128, 8)).astype(np.float32),
                           y=rng.integers(0, 4, 128).astype(np.int32))
    # test_fit_with_evaluation_and_ema_is_the_same_fused's: fit's compiled chunks are reused
    opt = optim.ema(optim.adamw(1e-2), 0.9)
    step = train.make_train_step(LOSS, opt)

    def run(fused, epochs, **kw):
        state = train.TrainState.create(PARAMS, opt, jax.random.key(1), fused=fused)
        return train.fit(state, step, ds.batches(32, key=jax.random.key(2)), epochs=epochs,
                         progress=False, **kw)[0]

    reference = run(False, 2)
    for fused in (True, False):  # a fused first epoch, then the rest from its checkpoint
        d = tmp_path / f"resume_{fused}"
        run(True, 1, checkpoint_dir=d)
        resumed = run(fused, 2, checkpoint_dir=d, resume=True)
        assert isinstance(resumed.params, FlatParams) == fused
        assert int(resumed.step) == int(reference.step)
        assert_same(unfuse(resumed.params), reference.params)


def test_errors_about_params_name_the_leaves_not_their_buffers(tmp_path):
    """The step's dtype checks and fit's non-finite guard name a fused leaf by its key path
    (as unfused), not by its buffer ('float32:matrices')."""
    opt = optim.sgd(0.1)
    loss = lambda p, b: jnp.sum(p["w"])  # noqa: E731
    ints = train.TrainState.create({"w": jnp.ones(2), "ids": jnp.arange(3)}, opt,
                                   jax.random.key(0), fused=True)
    with pytest.raises(TypeError, match=r"make_train_step: params 'ids' are int32"):
        train.make_train_step(loss, opt)(ints, {})
    half = train.TrainState.create({"w": jnp.ones(2), "h": jnp.ones(2, jnp.bfloat16)}, opt,
                                   jax.random.key(0), fused=True)
    with pytest.warns(UserWarning, match=r"make_train_step: params 'h' are bfloat16"):
        jax.eval_shape(train.make_train_step(loss, opt, jit=False), half, {})
    huge = optim.sgd(3e38)  # the update overflows: fit's guard refuses to checkpoint it
    state = train.TrainState.create({"b": jnp.zeros(3), "w": jnp.ones((3, 2))}, huge,
                                    jax.random.key(0), fused=True)
    step = train.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"] - 1.0) ** 2), huge)
    with pytest.raises(FloatingPointError, match=r"the updated params are not finite "
                                                 r"\(params/w\)"):
        train.fit(state, step, [{"x": np.full((4, 3), 2.0, np.float32)}] * 2, progress=False,
                  checkpoint_dir=tmp_path, checkpoint_every=1)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS) + ["element-wise mask"])
def test_buffers_padded_for_fsdp_train_the_same(name, monkeypatch):
    # On n devices TrainState.create pads each buffer to a multiple of n, so FSDP can split
    # it (a buffer of another size was replicated whole: no memory saved). The params and
    # updates stay zero there, so training is the same.
    opt = optim.adamw(1e-2, weight_decay=0.5, mask=optim.labels_to_mask(
        lambda path, p: path[0] == "dense_1")) if name == "element-wise mask" else \
        optim.OPTIMIZERS[name](**KWARGS.get(name, {}))
    monkeypatch.setattr(jax, "device_count", lambda: 7)
    fused = train_params(opt, True)
    sizes = {label: size for label, _, size in fused.params.layout.groups}
    assert sizes == {"float32:vectors": 21, "float32:matrices": 196}  # 20 and 192 used
    for buffer, used in zip(fused.params.buffers, (20, 192), strict=True):
        assert not np.asarray(buffer[used:]).any()
    plain = train_params(opt, False)
    assert_same(unfuse(fused.params), plain.params, name in ELEMENTWISE | {"element-wise mask"})
    assert_same(unfuse(fused.opt_state), plain.opt_state, name in ELEMENTWISE)


def test_padded_buffers_checkpoint_and_repad(monkeypatch, tmp_path):
    opt = optim.adamax(1e-2)  # its u gets eps in the padding: restored as 0, harmlessly
    monkeypatch.setattr(jax, "device_count", lambda: 7)
    fused, plain = train_params(opt, True, 2), train_params(opt, False, 2)
    checkpoint.save(tmp_path, fused, 2)
    saved = jax.device_get(unfuse(fused))
    assert_same(checkpoint.restore(tmp_path, target=plain, step=2), saved)
    back = checkpoint.restore(tmp_path, target=fused, step=2)
    assert back.params.layout == fused.params.layout
    step = train.make_train_step(LOSS, opt, donate=False)
    assert_same(step(back, BATCHES[2])[0].params, step(fused, BATCHES[2])[0].params)
    # into an unpadded (one-device) template, and already fused params padded by create
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    one = train.TrainState.create(PARAMS, opt, jax.random.key(1), fused=True)
    assert_same(unfuse(checkpoint.restore(tmp_path, target=one, step=2)), saved)
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    again = train.TrainState.create(fuse(PARAMS), opt, jax.random.key(1), fused=True)
    assert [size for _, _, size in again.params.layout.groups] == [20, 192]
    assert [size for _, _, size in fuse(fuse(PARAMS), multiple=7).layout.groups] == [21, 196]
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="fuse: multiple must be a positive int, got "):
            fuse(PARAMS, multiple=bad)
