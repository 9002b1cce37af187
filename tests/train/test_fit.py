"""fit: accuracy on digits, determinism, both feeds, continuing, caching, data errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, train
from funtrain.train import feed


class Recorder:
    """A callback that records every call (and optionally raises at a step)."""

    def __init__(self, raise_at=None, error=KeyboardInterrupt):
        self.calls, self.steps, self.raise_at, self.error = [], {}, raise_at, error

    def on_step(self, step, metrics):
        self.steps[step] = metrics
        if step == self.raise_at:
            raise self.error

    def __getattr__(self, name):
        if name.startswith("on_") or name == "close":
            return lambda *a: self.calls.append((name, a[0] if a else None))
        raise AttributeError(name)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return data.load_digits()


@functools.cache  # one step and eval step for every run: fit's programs compile once
def mlp_steps():
    model = nn.mlp([256, 10])
    opt = optim.sgd(0.05, momentum=0.9)
    return (model, opt, train.make_train_step(train.classifier_loss(model), opt),
            train.make_eval_step(train.classifier_eval(model)))


def run(digits, *, seed=0, epochs=6, **kw):
    train_set, test_set = digits
    model, opt, step, eval_step = mlp_steps()
    k_init, k_shuffle, k_run = jax.random.split(jax.random.key(seed), 3)
    params = model.init(k_init, jnp.zeros((1, 64)))
    state = train.TrainState.create(params, opt, k_run)
    kw = {"progress": False, "log_every": 7, **kw}
    return train.fit(
        state, step, train_set.batches(32, key=k_shuffle, drop_remainder=True),
        epochs=epochs, eval_step=eval_step, eval_data=test_set.batches(256), **kw)


def test_fit_reaches_accuracy_bar_and_fills_history(digits):
    rec = Recorder()
    state, history = run(digits, callbacks=[rec])
    steps = 6 * (len(digits[0]) // 32)
    assert int(state.step) == steps
    assert len(history.train["loss"]) == steps
    assert history.train["step"] == list(range(1, steps + 1))  # global step after the update
    assert "nonfinite" not in history.train  # the guard's input, not a metric
    assert [e["epoch"] for e in history.eval] == list(range(6))
    assert [e["step"] for e in history.eval] == [steps // 6 * (i + 1) for i in range(6)]
    assert history.eval[-1]["accuracy"] >= 0.95
    assert np.mean(history.train["loss"][-20:]) < np.mean(history.train["loss"][:20])
    assert sorted(rec.steps) == history.train["step"]  # every step reaches the callbacks
    for i, step in enumerate(history.train["step"]):
        assert rec.steps[step]["loss"] == history.train["loss"][i]
    assert not history.interrupted and history.stop_reason is None


def test_same_seed_gives_identical_params(digits):
    s1, h1 = run(digits, epochs=1)
    s2, h2 = run(digits, epochs=1)
    jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
    assert h1.train["loss"] == h2.train["loss"]


@pytest.mark.parametrize("kw", [{"device_data": False}, {"steps_per_call": 4},
                                {"steps_per_call": 5, "device_data": False}])
def test_feeds_and_chunk_sizes_agree(digits, kw):
    """The device-resident feed (default for a Loader), the host feed, and any number of
    steps per call train the same run (up to float reassociation)."""
    s1, h1 = run(digits, epochs=1, steps_per_call=1)
    s2, h2 = run(digits, epochs=1, **kw)
    np.testing.assert_allclose(h1.train["loss"], h2.train["loss"], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 s1.params, s2.params)


def test_a_convolutional_step_runs_one_per_call_on_cpu(monkeypatch):
    """XLA:CPU runs convolutions inside a while loop several times slower, so by default a
    step that convolves (forward or backward) gets one step per call and no loop there; an
    MLP's step keeps whole-epoch scans. Both train the run that 4 steps per call trains."""
    sizes = []
    chunk = feed._steps_on_device
    monkeypatch.setattr(feed, "_steps_on_device",
                        lambda *a, **kw: sizes.append(kw["size"]) or chunk(*a, **kw))
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(x=rng.standard_normal((32, 6, 6, 1)).astype(np.float32),
                           y=rng.integers(0, 3, 32).astype(np.int32))
    cnn = nn.serial(nn.conv(4, (3, 3)), nn.relu(), nn.flatten(), nn.dense(3))
    mlp = nn.serial(nn.flatten(), nn.dense(8), nn.relu(), nn.dense(3))
    for model, default in ((cnn, 1), (mlp, 8)):
        params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
        opt = optim.adam(1e-2)
        step = train.make_train_step(train.classifier_loss(model), opt)
        state = train.TrainState.create(params, opt, jax.random.key(1))
        loader = ds.batches(4, key=jax.random.key(2))
        assert feed.convolves_on_cpu(step, state, loader) == (model is cnn)
        runs = []
        for kw in ({}, {"steps_per_call": 4}):
            sizes.clear()
            state = train.TrainState.create(params, opt, jax.random.key(1))
            runs.append(train.fit(state, step, loader, progress=False, **kw))
            assert set(sizes) == {kw.get("steps_per_call", default)}
        (s1, h1), (s2, h2) = runs
        np.testing.assert_allclose(h1.train["loss"], h2.train["loss"], rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     s1.params, s2.params)


@pytest.mark.parametrize("steps_per_call", [2, None])
@pytest.mark.parametrize("feed_kind", ["device, sliced", "device, gathered", "host"])
def test_device_epochs_are_the_loaders_batches(feed_kind, steps_per_call, monkeypatch):
    """Every feed serves each epoch in the Loader's order, bit for bit, and its smaller last
    batch too (drop_remainder=False); per-step vector metrics keep their shape. By default
    a device epoch of 4 full batches and a smaller one scans the 4 and runs the last alone
    (a scan of all 5 once sliced rows 18-22 for the last batch: 18 and 19 twice)."""
    if feed_kind == "device, gathered":  # large batches gather rows inside the scan
        monkeypatch.setattr(feed.DeviceFeed, "GATHER_BYTES", 0)
    device_data = feed_kind != "host"
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(x=rng.standard_normal((23, 3)).astype(np.float32),
                           y=np.arange(23, dtype=np.int32))
    seen = []

    def step(state, batch):  # records each batch's labels through the metrics
        return state, {"y": jnp.pad(batch["y"], (0, 5 - batch["y"].shape[0]),
                                    constant_values=-1)}

    loader = ds.batches(5, key=jax.random.key(3))
    state = train.TrainState.create({"w": jnp.zeros(1)}, optim.sgd(0.1), jax.random.key(0))
    _, history = train.fit(state, step, loader, epochs=2, progress=False,
                           steps_per_call=steps_per_call, device_data=device_data)
    seen = np.asarray(history.train["y"])
    expected = [b["y"] for e in range(2) for b in loader.epoch(e)]
    assert len(seen) == len(expected) == 10
    for got, want in zip(seen, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got)[:len(want)], want)


def test_calling_fit_again_continues_bitwise(digits):
    """epochs counts the passes of each call; two calls equal one call of both."""
    train_set, _ = digits
    model = nn.mlp([32, 10])
    opt = optim.adam(1e-2)
    step = train.make_train_step(train.classifier_loss(model), opt)
    loader = train_set.batches(64, key=jax.random.key(1), drop_remainder=True)
    fresh = lambda: train.TrainState.create(model.init(jax.random.key(0), jnp.zeros((1, 64))),
                                            opt, jax.random.key(2))
    whole, hw = train.fit(fresh(), step, loader, epochs=2, progress=False)
    part, h1 = train.fit(fresh(), step, loader, epochs=1, progress=False)
    part, h2 = train.fit(part, step, loader, epochs=1, progress=False)
    assert int(part.step) == int(whole.step) == 2 * len(loader)
    assert h2.train["step"][0] == len(loader) + 1
    assert h1.train["loss"] + h2.train["loss"] == hw.train["loss"]
    jax.tree.map(np.testing.assert_array_equal, part.params, whole.params)


def test_a_second_fit_call_compiles_nothing(digits):
    train_set, test_set = digits
    model = nn.mlp([16, 10])
    opt = optim.adamw(1e-3)
    step = train.make_train_step(train.classifier_loss(model), opt)
    ev = train.make_eval_step(train.classifier_eval(model))
    state = train.TrainState.create(model.init(jax.random.key(0), jnp.zeros((1, 64))), opt,
                                    jax.random.key(1))
    args = dict(eval_step=ev, eval_data=test_set.batches(256), progress=False)
    state, _ = train.fit(state, step, train_set.batches(32, key=jax.random.key(2)), **args)
    compiles = []
    listener = lambda name, secs, **kw: compiles.append(name) if name.endswith(
        "backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # a new Loader object over the same data: nothing about it is compiled in
        state, history = train.fit(state, step, train_set.batches(32, key=jax.random.key(2)),
                                   epochs=2, **args)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert int(state.step) == 3 * -(-len(train_set) // 32)
    assert compiles == []


def test_data_of_unknown_length_and_host_checks():
    opt = optim.sgd(0.1)
    loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - 1.0) ** 2)
    step = train.make_train_step(loss_fn, opt)
    make = lambda: train.TrainState.create({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    batches = lambda epoch: ({"x": np.full((4, 2), epoch + 1.0, np.float32)} for _ in range(3))
    state, history = train.fit(make(), step, batches, epochs=2, progress=False)
    assert int(state.step) == 6 and history.train["step"] == [1, 2, 3, 4, 5, 6]
    bad = [{"x": np.ones((4, 2), np.float32)}, {"x": np.full((4, 2), np.nan, np.float32)}]
    with pytest.raises(ValueError, match=r"fit: epoch 0 batch 1: 'x' has 8 non-finite"):
        train.fit(make(), step, bad, progress=False, check_data=True)


def test_checked_mode_checks_a_device_resident_dataset_once():
    x = np.ones((8, 2), np.float32)
    ds = data.ArrayDataset(x=x, y=np.array([0, 1, 2, 0, 1, 2, 0, 5], np.int32))
    opt = optim.sgd(0.1)
    state = train.TrainState.create({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    step = train.make_train_step(lambda p, b: jnp.mean(b["x"] @ p["w"]), opt)
    with pytest.raises(ValueError, match=r"fit: train_data: labels out of range: 'y' "
                                         r"contains 5, expected values in \[0, 3\)"):
        train.fit(state, step, ds.batches(4), progress=False, check_data=True, num_classes=3)


def test_progress_bar_shows_running_means(digits, capsys):
    run(digits, epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "train 1/1" in err and "loss=" in err and "eval_accuracy=" in err


def test_fit_rejects_one_shot_iterators_and_bad_arguments():
    opt = optim.sgd(0.1)
    state = train.TrainState.create({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    step = train.make_train_step(lambda p, b: jnp.sum((b["x"] @ p["w"]) ** 2), opt)
    batches = ({"x": np.ones((2, 2), np.float32)} for _ in range(3))
    with pytest.raises(TypeError, match="one-shot iterator, but epochs=2"):
        train.fit(state, step, batches, epochs=2, progress=False)
    # evaluated after each of two epochs, a one-shot eval iterator would be empty the second
    # time (after the first epoch's training): refused up front
    with pytest.raises(TypeError, match="eval_data is a one-shot iterator, but it is "
                                        "evaluated more than once"):
        train.fit(state, step, [{"x": np.ones((2, 2), np.float32)}], epochs=2, progress=False,
                  eval_step=lambda p, b: {}, eval_data=iter([{"x": np.ones((2, 2))}]))
    with pytest.raises(ValueError, match="train_data yielded no batches in epoch 0"):
        train.fit(state, step, [], epochs=1, progress=False)
    with pytest.raises(ValueError, match="train_data yielded no batches in epoch 0"):
        train.fit(state, step, lambda e: iter(()), epochs=1, progress=False)
    with pytest.raises(ValueError, match="pass eval_step and eval_data together"):
        train.fit(state, step, [], eval_step=lambda p, b: {}, progress=False)
    with pytest.raises(ValueError, match="EarlyStopping acts on evaluations, but fit has no "
                                         "eval_step and eval_data"):
        train.fit(state, step, [{"x": np.ones((2, 2), np.float32)}], progress=False,
                  callbacks=[train.callbacks.EarlyStopping()])
    with pytest.raises(TypeError, match=r"fit: state must be a TrainState \(TrainState.create"
                                        r"\(params, optimizer, key\)\), got dict"):
        train.fit(state.params, step, [{"x": np.ones((2, 2), np.float32)}], progress=False)
    hand_step = lambda s, b: (s, {"loss": jnp.zeros(()), "step": jnp.zeros(())})
    with pytest.raises(ValueError, match=r"fit: the train step returned a metric named 'step'"):
        train.fit(state, hand_step, [{"x": np.ones((2, 2), np.float32)}], progress=False)
    with pytest.raises(ValueError, match=r"fit: eval_step returned metrics named \['epoch'\]"):
        train.fit(state, step, [{"x": np.ones((2, 2), np.float32)}], progress=False,
                  eval_step=lambda p, b: {"epoch": jnp.ones(())},
                  eval_data=[{"x": np.ones((2, 2), np.float32)}])
    with pytest.raises(TypeError, match=r"make_train_step: the step takes \(state, batch\) "
                                        r"with state a TrainState .*got dict"):
        step(state.params, {"x": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        train.fit(state, step, [], epochs=0, progress=False)
    with pytest.raises(ValueError, match="steps_per_call must be None or a positive int"):
        train.fit(state, step, [{}], steps_per_call=0, progress=False)
    with pytest.raises(TypeError, match="device_data=True needs train_data to be a Loader"):
        train.fit(state, step, [{"x": np.ones((2, 2))}], device_data=True, progress=False)


def test_evaluate_weights_by_batch_size():
    ds = data.ArrayDataset(x=np.arange(10, dtype=np.float32))
    step = train.make_eval_step(lambda p, b: {"mean": jnp.mean(b["x"])})
    result = train.evaluate(step, {}, ds.batches(4))  # batches of 4, 4, 2
    assert result["mean"] == pytest.approx(4.5)
    # a float16 metric is summed in float32: 100 batches of 256 at 3.0 overflowed to inf
    step = train.make_eval_step(lambda p, b: jnp.mean(b["x"]).astype(jnp.float16))
    ones = data.ArrayDataset(x=np.full(25_600, 3.0, np.float32))
    assert train.evaluate(step, {}, ones.batches(256))["loss"] == 3.0


def test_evaluate_takes_the_batch_size_past_per_batch_scalars():
    # "gain" sorts before "x": a 0-d per-batch leaf (as the train step allows) is no batch size
    step = train.make_eval_step(lambda p, b: {"mean": jnp.mean(b["x"]) * b["gain"]})
    batches = [{"gain": np.float32(2.0), "x": np.full(3, 1.0, np.float32)},
               {"gain": np.float32(2.0), "x": np.full(1, 5.0, np.float32)}]
    assert train.evaluate(step, {}, batches)["mean"] == pytest.approx(2.0 * (3 + 5) / 4)


def test_plan_cuts_at_epochs_multiples_and_intervals():
    chunks = list(feed.plan(3, 20, 8, 4, cuts=(6,)))
    assert [(c.first, c.size) for c in chunks] == [(3, 1), (4, 2), (6, 2), (8, 4), (12, 4),
                                                   (16, 2), (18, 2)]
    assert [c.scanned for c in chunks] == [False, False, False, True, True, False, False]
    assert [c.epoch_end for c in chunks] == [False, False, True, False, True, False, False]
    # an epoch of 5 full batches and a smaller 6th: the 6th is a chunk of its own
    chunks = list(feed.plan(0, 12, 6, 5, cuts=(), full=5))
    assert [(c.first, c.size, c.scanned) for c in chunks] == [(0, 5, True), (5, 1, False),
                                                              (6, 5, True), (11, 1, False)]
    assert [c.first for c in feed.plan(0, 6, 6, 3, (), full=5)] == [0, 3, 5]
    auto = feed.auto_steps_per_call
    assert auto(468) == 468 and auto(1877) == 1877 and auto(6, (2,)) == 2  # whole epochs
    assert auto(468, target=64) == 52 and auto(1875, target=64) == 25
    assert auto(1877, target=64) == 32  # a prime: chunks of 32, remainders step by step


def test_the_progress_bar_leaves_compile_time_out_of_its_rate():
    from funtrain.train import loop
    from funtrain.train.callbacks import ProgressBar

    before = loop._compile_seconds()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(jnp.ones(7))  # something new to compile
    assert loop._compile_seconds() > before
    bar = ProgressBar(total=10, initial=0, desc="t")
    start = bar.bar.start_t
    bar.exclude_time(2.5)
    assert bar.bar.start_t == pytest.approx(start + 2.5)
    bar.advance(4, {"loss": np.array([1.0, 2.0, 3.0, 6.0]), "accuracy": np.array([0.5] * 4)})
    assert bar._postfix == {"loss": "3", "accuracy": "0.5"}  # means since the last refresh
    bar.close()


def test_only_numeric_in_memory_loaders_go_to_the_device():
    ds = data.ArrayDataset(x=np.ones((4, 2), np.float32), y=np.arange(4))
    assert feed.fits_on_device(ds.batches(2))
    named = data.ArrayDataset(x=np.ones((4, 2), np.float32), name=np.array(list("abcd")))
    assert not feed.fits_on_device(named.batches(2))
    assert not feed.fits_on_device([{"x": np.ones((2, 2))}])


def test_a_call_that_ends_mid_epoch_evaluates_its_final_state():
    # per-epoch evaluation: a call that starts (or a callback stops it) mid-epoch ended
    # without evaluating its last state, so history.eval[-1] was an older step
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    ds = data.ArrayDataset(x=x, y=(x[:, 0] > 0).astype(np.int32))
    loader = ds.batches(16, key=jax.random.key(2))  # 7 steps an epoch
    model, opt = nn.dense(2), optim.sgd(0.1)
    state = train.TrainState.create(model.init(jax.random.key(0), x[:1]), opt, jax.random.key(1))
    step = train.make_train_step(train.classifier_loss(model), opt)
    evaluate = {"eval_step": train.make_eval_step(train.classifier_eval(model)),
                "eval_data": ds.batches(50), "progress": False}
    state, _ = train.fit(state, step, [next(loader.epoch(0))] * 3, progress=False)
    state, history = train.fit(state, step, loader, epochs=1, **evaluate)
    assert [(e["epoch"], e["step"]) for e in history.eval] == [(0, 7), (1, 10)]
    state, history = train.fit(state, step, loader, epochs=1, callbacks=[Stop(at=12)],
                               steps_per_call=1, log_every=1, **evaluate)
    # a stop follows the dispatched steps by up to one call: 12 or 13, evaluated either way
    assert int(state.step) in (12, 13)
    assert [e["step"] for e in history.eval] == [int(state.step)]


class Stop:
    """Asks fit to stop once it has seen step ``at``."""

    def __init__(self, at):
        self.at, self.stop_training = at, False

    def on_step(self, step, metrics):
        self.stop_training = step >= self.at


def test_evaluate_names_a_vector_metric():
    # a hand-written eval step's per-class vector failed in float(): "only 0-dimensional
    # arrays can be converted to Python scalars"
    data_ = [{"x": np.ones((4, 2), np.float32)}]
    with pytest.raises(ValueError, match=r"evaluate: eval_step's metric 'per_class' must be "
                                         r"a scalar \(a mean over the batch\), got shape \(3,\)"):
        train.evaluate(lambda p, b: {"per_class": jnp.ones(3)}, {}, data_)
