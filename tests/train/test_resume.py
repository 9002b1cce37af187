"""fit(checkpoint_dir=..., resume=True) continues bitwise where an interrupted run stopped."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, train


class Interrupt(Exception):
    pass


def setup():
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(x=rng.standard_normal((96, 8)).astype(np.float32),
                           y=rng.integers(0, 3, 96).astype(np.int32))
    model = nn.serial(nn.dense(16), nn.relu(), nn.dropout(0.2), nn.dense(3))
    opt = optim.adamw(1e-2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8)))
    state = train.TrainState.create(params, opt, jax.random.key(1))
    step = train.make_train_step(train.classifier_loss(model), opt)
    loader = ds.batches(16, key=jax.random.key(2), drop_remainder=True)  # 6 steps an epoch
    return state, step, loader


def test_resume_after_an_interruption_is_bitwise(tmp_path):
    state, step, loader = setup()
    _, full = train.fit(state, step, loader, epochs=3, progress=False)

    stop_at = random.Random(7).randrange(3, 17)  # some step inside the run

    def log_fn(i, metrics):
        if i == stop_at:
            raise Interrupt

    state, step, loader = setup()
    with pytest.raises(Interrupt):
        train.fit(state, step, loader, epochs=3, progress=False, log_every=1, log_fn=log_fn,
                  checkpoint_dir=tmp_path, checkpoint_every=2)
    saved = train.checkpoint.latest_step(tmp_path)
    assert saved is not None and saved <= stop_at + 1

    template, step, loader = setup()
    resumed_state, resumed = train.fit(template, step, loader, epochs=3, progress=False,
                                       checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    assert resumed.train["step"][0] == saved
    assert resumed.train["loss"] == full.train["loss"][saved:]
    assert int(resumed_state.step) == 18
    assert train.checkpoint.latest_step(tmp_path) == 18


def test_checkpoint_arguments_are_checked(tmp_path):
    state, step, loader = setup()
    with pytest.raises(ValueError, match="resume and checkpoint_every need checkpoint_dir"):
        train.fit(state, step, loader, resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1, got 0"):
        train.fit(state, step, loader, checkpoint_dir=tmp_path, checkpoint_every=0,
                  progress=False)
