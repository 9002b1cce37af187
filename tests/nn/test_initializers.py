"""Initializers: fans, standard deviations and bounds, against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn
from funtrain.nn.initializers import compute_fans

SHAPE = (300, 200)  # fan_in 300, fan_out 200


@pytest.mark.parametrize("name,expected_std", [
    ("he_normal", np.sqrt(2 / 300)),
    ("glorot_normal", np.sqrt(2 / 500)),
    ("lecun_normal", np.sqrt(1 / 300)),
])
def test_normal_initializers_std(name, expected_std):
    w = np.asarray(getattr(nn, name)()(jax.random.key(0), SHAPE))
    assert abs(w.std() - expected_std) / expected_std < 0.02
    assert abs(w.mean()) < 0.01 * expected_std * 10


@pytest.mark.parametrize("name,limit", [
    ("he_uniform", np.sqrt(6 / 300)),
    ("glorot_uniform", np.sqrt(6 / 500)),
    ("lecun_uniform", np.sqrt(3 / 300)),
])
def test_uniform_initializers_bounds(name, limit):
    w = np.asarray(getattr(nn, name)()(jax.random.key(0), SHAPE))
    assert w.max() <= limit and w.min() >= -limit
    assert w.max() > 0.98 * limit and w.min() < -0.98 * limit
    assert abs(w.std() - limit / np.sqrt(3)) / (limit / np.sqrt(3)) < 0.02


def test_conv_fans_include_receptive_field():
    assert compute_fans((3, 3, 16, 32)) == (144, 288)
    assert compute_fans((7,)) == (7, 7)
    assert compute_fans(()) == (1, 1)


def test_constant_initializers_and_dtype():
    k = jax.random.key(0)
    assert np.all(np.asarray(nn.zeros()(k, (2, 3))) == 0)
    assert np.all(np.asarray(nn.ones()(k, (2, 3))) == 1)
    assert np.all(np.asarray(nn.constant(0.5)(k, (4,))) == 0.5)
    w = nn.normal(0.02)(k, (400, 400), jnp.bfloat16)
    assert w.dtype == jnp.bfloat16
    assert abs(float(np.asarray(w, np.float32).std()) - 0.02) < 0.001
    with pytest.raises(ValueError, match="normal: stddev must be > 0"):
        nn.normal(0.0)
    with pytest.raises(ValueError, match="mode must be 'fan_in', 'fan_out' or 'fan_avg'"):
        nn.variance_scaling(1.0, "fan_sum", "normal")


@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (600, 500)])  # one block / its own draw
def test_samples_are_the_same_eager_jitted_and_vmapped(shape):
    """Small params are cut from one fixed-size draw (one compiled sampler for every shape);
    the values must not depend on how init is called."""
    init = nn.he_normal()
    k = jax.random.key(3)
    eager = init(k, shape)
    # (to rounding: XLA may fuse the scaling into the sampler differently under jit)
    np.testing.assert_allclose(eager, jax.jit(lambda k: init(k, shape))(k), rtol=1e-6)
    np.testing.assert_allclose(
        eager, np.asarray(jax.vmap(lambda k: init(k, shape))(k[None]))[0], rtol=1e-6)
    # statistics in numpy: an eager reduction compiles a program per shape
    fan_in = np.prod(shape[:-1])
    assert abs(float(np.asarray(eager).std()) - np.sqrt(2 / fan_in)) < 0.05 * np.sqrt(2 / fan_in)
    u = np.asarray(nn.lecun_uniform()(k, shape))
    limit = np.sqrt(3 / fan_in)
    assert float(u.min()) >= -limit and float(u.max()) <= limit
    # Different keys, different values; two params of one layer never share values.
    assert not np.allclose(eager, init(jax.random.key(4), shape))


# ----------------------------------------------------------------------------- draws under jit


def _draw_shapes(fn, *args):
    """The shapes of the random bits ``fn(*args)`` draws when traced (nested jaxprs too)."""
    def eqns(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from eqns(sub)

    return [eqn.outvars[0].aval.shape for eqn in eqns(jax.make_jaxpr(fn)(*args).jaxpr)
            if eqn.primitive.name == "random_bits"]


def test_a_traced_init_draws_flat():
    """Under jit, XLA compiles threefry for a 4-d shape far slower than for the same count
    flat (a 3x3x8x16 kernel: 4.0 s against 0.24 s on a 2-core CPU), so every draw of a
    jitted init is 1-d, reshaped after."""
    model = nn.models.resnet(18, 10, stem="cifar", width=4)
    draws = _draw_shapes(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    assert len(draws) >= 20 and all(len(s) == 1 for s in draws), draws


def test_traced_dropout_draws_flat():
    """The same for dropout's masks: attention weights are 4-d (8x4x16x16: 3.7 s against
    0.35 s flat)."""
    block = nn.transformer_block(32, 4, dropout=0.1)
    x = jnp.zeros((2, 8, 32))
    params = block.init(jax.random.key(0), x)
    loss = lambda p: jnp.sum(block.apply(p, x, key=jax.random.key(1), train=True))  # noqa: E731
    draws = _draw_shapes(jax.grad(loss), params)
    assert len(draws) >= 2 and all(len(s) == 1 for s in draws), draws
