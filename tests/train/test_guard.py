"""The non-finite guard: skip mode on the device, stop mode in fit naming the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import optim, train

BAD_STEP = 5


def batches(n=12):
    out = []
    for i in range(n):
        poison = np.float32(np.nan if i == BAD_STEP else 1.0)
        out.append({"x": np.full((4, 3), 0.1 * (i + 1), np.float32), "poison": poison})
    return out


def loss_fn(p, b):
    return jnp.mean((b["x"] @ p["w"] - 1.0) ** 2) * b["poison"]


def fresh(opt):
    return train.TrainState.create({"w": jnp.ones(3)}, opt, jax.random.key(0))


def test_skip_mode_leaves_the_step_bitwise_unchanged():
    opt = optim.adam(0.1)
    step = train.make_train_step(loss_fn, opt, skip_nonfinite=True, donate=False)
    state = fresh(opt)
    for i, b in enumerate(batches()):
        before = state
        state, m = step(state, b)
        if i == BAD_STEP:
            jax.tree.map(np.testing.assert_array_equal, state.params, before.params)
            jax.tree.map(np.testing.assert_array_equal, state.opt_state, before.opt_state)
            assert int(m["skipped"]) == 1
    assert int(state.skipped_steps) == 1
    assert bool(jnp.all(jnp.isfinite(state.params["w"])))
    # fit accepts the skipped step and reports it.
    state, hist = train.fit(fresh(opt), train.make_train_step(loss_fn, opt, skip_nonfinite=True),
                            batches(), progress=False)
    assert hist.train["skipped"][BAD_STEP] == 1 and int(state.skipped_steps) == 1


def overflow_setup(skip):
    """sgd(3e38): loss and gradients are finite, the updated params overflow to inf."""
    opt = optim.sgd(3e38)
    step = train.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"] - 1.0) ** 2), opt,
                                 skip_nonfinite=skip)
    return fresh(opt), step, [{"x": np.full((4, 3), 2.0, np.float32)} for _ in range(12)]


def test_updated_params_are_guarded_and_never_checkpointed(tmp_path):
    state, step, data = overflow_setup(skip=False)
    with pytest.raises(FloatingPointError, match=r"fit: step 1: the updated params are not "
                                                 r"finite \(params/w\), so they were not "
                                                 r"checkpointed") as err:
        train.fit(state, step, data, progress=False, checkpoint_dir=tmp_path,
                  checkpoint_every=1)
    assert train.checkpoint.all_steps(tmp_path) == []
    assert int(err.value.state.step) >= 1  # the state is still handed back
    # without checkpoints, the next step's loss stops the run
    state, step, data = overflow_setup(skip=False)
    with pytest.raises(FloatingPointError, match=r"fit: step 2: the loss and the gradients "
                                                 r"are not finite"):
        train.fit(state, step, data, progress=False, log_every=1)


def test_a_run_of_skipped_steps_stops_naming_the_cause():
    state, step, data = overflow_setup(skip=True)
    with pytest.raises(FloatingPointError, match=r"fit: 10 steps in a row were skipped as "
                                                 r"non-finite \(steps 1 to 10\), the last because "
                                                 r"the updated params were not finite") as err:
        train.fit(state, step, data, progress=False, max_consecutive_skips=10, log_every=1)
    np.testing.assert_array_equal(err.value.state.params["w"], np.ones(3))  # never applied


def test_stop_mode_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    opt = optim.adam(0.1)
    step = train.make_train_step(loss_fn, opt)
    with pytest.raises(FloatingPointError, match=rf"fit: step {BAD_STEP + 1}: the loss and the "
                                                 r"gradients are not finite \(loss nan.*the "
                                                 r"last checkpoint \(step 4\) is intact"):
        train.fit(fresh(opt), step, batches(), progress=False, log_every=100,
                  checkpoint_dir=tmp_path, checkpoint_every=2)
    assert train.checkpoint.latest_step(tmp_path) == 4
    restored = train.checkpoint.restore(tmp_path, target=fresh(opt))
    assert bool(jnp.all(jnp.isfinite(restored.params["w"])))
