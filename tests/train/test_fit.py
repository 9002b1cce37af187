"""fit on digits: accuracy bar, determinism, steps_per_call, history, data errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, train

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def run(digits, *, seed=0, epochs=6, steps_per_call=1, progress=False, log_fn=None):
    train_set, test_set = digits
    model = nn.mlp([256, 10])
    k_init, k_shuffle, k_run = jax.random.split(jax.random.key(seed), 3)
    params = model.init(k_init, jnp.zeros((1, 64)))
    opt = optim.sgd(0.05, momentum=0.9)
    state = train.TrainState.create(params, opt, k_run)
    return train.fit(
        state, train.make_train_step(train.classifier_loss(model), opt),
        train_set.batches(32, key=k_shuffle, drop_remainder=True), epochs=epochs,
        eval_step=train.make_eval_step(train.classifier_eval(model)),
        eval_data=test_set.batches(256), steps_per_call=steps_per_call, progress=progress,
        log_every=7, log_fn=log_fn)


def test_fit_reaches_accuracy_bar_and_fills_history(digits):
    logged = []
    state, history = run(digits, log_fn=lambda step, m: logged.append((step, m["loss"])))
    steps = 6 * (len(digits[0]) // 32)
    assert int(state.step) == steps
    assert len(history.train["loss"]) == steps
    assert history.train["step"] == list(range(steps))
    assert [e["epoch"] for e in history.eval] == list(range(6))
    assert history.eval[-1]["accuracy"] >= 0.95
    assert np.mean(history.train["loss"][-20:]) < np.mean(history.train["loss"][:20])
    assert logged
    for step, loss in logged:  # log_fn gets the step index and that step's metrics
        assert history.train["loss"][step] == pytest.approx(loss)


def test_same_seed_gives_identical_params(digits):
    s1, h1 = run(digits, epochs=1)
    s2, h2 = run(digits, epochs=1)
    jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
    assert h1.train["loss"] == h2.train["loss"]


def test_steps_per_call_matches_one_step_per_call(digits):
    s1, h1 = run(digits, epochs=1)
    s4, h4 = run(digits, epochs=1, steps_per_call=4)
    np.testing.assert_allclose(h1.train["loss"], h4.train["loss"], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 s1.params, s4.params)


def test_progress_bar_runs(digits, capsys):
    run(digits, epochs=1, progress=True)
    assert "train 1/1" in capsys.readouterr().err


def test_fit_rejects_one_shot_iterators_and_empty_data():
    opt = optim.sgd(0.1)
    state = train.TrainState.create({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    step = train.make_train_step(lambda p, b: jnp.sum((b["x"] @ p["w"]) ** 2), opt)
    batches = ({"x": np.ones((2, 2), np.float32)} for _ in range(3))
    with pytest.raises(TypeError, match="one-shot iterator, but epochs=2"):
        train.fit(state, step, batches, epochs=2, progress=False)
    with pytest.raises(ValueError, match="train_data yielded no batches in epoch 0"):
        train.fit(state, step, [], epochs=1, progress=False)
    with pytest.raises(ValueError, match="pass eval_step and eval_data together"):
        train.fit(state, step, [], eval_step=lambda p, b: {}, progress=False)
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        train.fit(state, step, [], epochs=0, progress=False)


def test_evaluate_weights_by_batch_size():
    ds = data.ArrayDataset(x=np.arange(10, dtype=np.float32))
    step = train.make_eval_step(lambda p, b: {"mean": jnp.mean(b["x"])})
    result = train.evaluate(step, {}, ds.batches(4))  # batches of 4, 4, 2
    assert result["mean"] == pytest.approx(4.5)
