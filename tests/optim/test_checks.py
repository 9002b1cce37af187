"""Hyperparameters are checked once, by the block that uses them, naming what the user called."""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import optim
from funtrain._checks import IntArgumentError, check_int
from funtrain.optim import _checks, transforms


@pytest.fixture
def checked(monkeypatch):
    """Count the hyperparameters each check names (every check goes through ``named``)."""
    calls = collections.Counter()
    real = _checks.named

    def spy(where, name):
        where, name = real(where, name)
        calls[(where, name)] += 1
        return where, name

    for module in (_checks, transforms):
        monkeypatch.setattr(module, "named", spy)
    return calls


@pytest.mark.parametrize("name, kwargs, expected", [
    ("adamw", {}, {"learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"}),
    ("adam", {}, {"learning_rate", "b1", "b2", "eps", "eps_root"}),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9}, {"learning_rate", "momentum",
                                                      "dampening"}),
    ("rmsprop", {"momentum": 0.9}, {"learning_rate", "alpha", "eps", "momentum",
                                    "dampening"}),
    ("muon", {}, {"learning_rate", "momentum", "ns_steps", "weight_decay", "adam_b1",
                  "adam_b2", "adam_eps", "eps_root", "adam_learning_rate"}),
])
def test_each_hyperparameter_is_checked_once_under_the_callers_names(checked, name, kwargs,
                                                                     expected):
    optim.OPTIMIZERS[name](**kwargs)
    assert {n for (_, n) in checked} == expected
    assert {w for (w, _) in checked} == {name}
    assert set(checked.values()) == {1}


@pytest.mark.parametrize("build, message", [
    (lambda: optim.sgd(0.1, momentum=-1.0), "sgd: momentum must be >= 0.0, got -1.0"),
    (lambda: optim.rmsprop(alpha=1.5), r"rmsprop: alpha must be in \[0.0, 1.0\), got 1.5"),
    (lambda: optim.muon(adam_b1=1.5), r"muon: adam_b1 must be in \[0.0, 1.0\), got 1.5"),
    (lambda: optim.muon(adam_learning_rate=-1.0),
     r"muon: adam_learning_rate must be >= 0.0, got -1.0"),
    (lambda: optim.adafactor(eps=(-1.0, 1e-3)), r"adafactor: eps\[0\] must be > 0.0"),
    (lambda: optim.adafactor(eps=(None, -1.0)), r"adafactor: eps\[1\] must be >= 0.0"),
    (lambda: optim.trace(-1.0), "trace: decay must be >= 0.0"),  # called directly
    (lambda: optim.chain(optim.trace(0.5), optim.sgd(-1.0)),
     "sgd: learning_rate must be >= 0.0"),
])
def test_messages_name_the_optimizer_and_argument_the_user_wrote(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_check_int_says_what_came():
    with pytest.raises(IntArgumentError, match=r"f: n must be a positive int, got 2.0 \(float\)"):
        check_int("f", "n", 2.0)
    # a non-int is a wrong type and a wrong value: both excepts catch it
    for kind in (TypeError, ValueError):
        with pytest.raises(kind):
            check_int("f", "n", True)
    with pytest.raises(ValueError, match=r"f: n must be an int in \[1, 3\], got 4"):
        check_int("f", "n", 4, high=3)
    with pytest.raises(ValueError, match=r"f: n must be None or an int >= 0, got -1"):
        check_int("f", "n", -1, low=0, optional=True)
    check_int("f", "n", None, optional=True)


@pytest.mark.parametrize("build, message", [
    (lambda: optim.sgd(np.float64(-0.1)), "sgd: learning_rate must be >= 0.0, got -0.1"),
    (lambda: optim.adam(1e-3, b1=np.float32(1.0)), r"adam: b1 must be in \[0.0, 1.0\), got 1.0"),
    (lambda: optim.adamw(1e-3, weight_decay=np.float64("nan")),
     "adamw: weight_decay must be a number, got nan"),
    (lambda: optim.clip_by_global_norm(np.array(-1.0)), "max_norm must be > 0.0, got -1.0"),
    (lambda: optim.ema(optim.sgd(0.1), np.float64(1.5)), r"ema: decay must be a float in \[0, 1\)"),
    (lambda: optim.schedules.step_decay(0.1, 3, np.float64(-1.0)),
     "step_decay: gamma must be >= 0.0, got -1.0"),
])
def test_numpy_scalars_are_checked_as_numbers(build, message):
    # they were taken for injected arrays and not checked: adam(b1=np.float64(1.0)) gave NaN
    # updates, sgd(np.float64(-0.1)) climbed the loss
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_scalars_in_range_train_like_python_floats():
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.array([0.5, -0.5, 2.0])}
    for np_value in (np.float32, np.float64, np.array):
        for opt, ref in ((optim.adam(np_value(1e-2), b1=np_value(0.8)), optim.adam(1e-2, b1=0.8)),
                         (optim.ema(optim.sgd(0.1), np_value(0.5)), optim.ema(optim.sgd(0.1), 0.5)),
                         (optim.inject_hyperparams(optim.ema)(optim.sgd(0.1), np_value(0.5)),
                          optim.ema(optim.sgd(0.1), 0.5))):
            got = opt.update(grads, opt.init_state(params), params)[0]
            want = ref.update(grads, ref.init_state(params), params)[0]
            np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
