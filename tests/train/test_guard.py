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


def test_stop_mode_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    opt = optim.adam(0.1)
    step = train.make_train_step(loss_fn, opt)
    with pytest.raises(FloatingPointError, match=rf"fit: step {BAD_STEP}: loss is nan .*the "
                                                 r"last checkpoint \(step 4\) is intact"):
        train.fit(fresh(opt), step, batches(), progress=False, log_every=100,
                  checkpoint_dir=tmp_path, checkpoint_every=2)
    assert train.checkpoint.latest_step(tmp_path) == 4
    restored = train.checkpoint.restore(tmp_path, target=fresh(opt))
    assert bool(jnp.all(jnp.isfinite(restored.params["w"])))
