"""serial / residual / parallel, naming, determinism and jit/grad composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn


def normal(*shape):
    """Test input from numpy: an eager jax.random draw compiles threefry for each shape."""
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)


def test_serial_auto_names_and_skips_paramless_layers():
    model = nn.serial(nn.dense(8), nn.relu(), nn.dropout(0.1), nn.dense(4), nn.dense(2,
                                                                                     name="head"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    assert list(params) == ["dense_0", "dense_1", "head"]
    assert params["dense_0"]["w"].shape == (3, 8)
    assert params["head"]["w"].shape == (4, 2)


def test_serial_matches_manual_composition():
    model = nn.serial(nn.dense(5), nn.tanh(), nn.dense(2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    x = normal(4, 3)
    h = np.tanh(np.asarray(x) @ params["dense_0"]["w"] + params["dense_0"]["b"])
    ref = h @ np.asarray(params["dense_1"]["w"]) + np.asarray(params["dense_1"]["b"])
    np.testing.assert_allclose(model.apply(params, x), ref, rtol=1e-5, atol=1e-6)


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match=r"two children share the name\(s\) \['head'\]"):
        nn.serial(nn.dense(2, name="head"), nn.dense(2, name="head"))


def test_non_module_child_gets_a_hint():
    with pytest.raises(TypeError, match=r"child 1 is .*expected a Module; did you mean relu\(\)"):
        nn.serial(nn.dense(2), nn.relu)


def test_residual_adds_input_and_checks_shape():
    block = nn.residual(nn.dense(4), nn.relu(), nn.dense(4))
    x = normal(3, 4)
    params = block.init(jax.random.key(0), x)
    body = nn.serial(nn.dense(4), nn.relu(), nn.dense(4))
    np.testing.assert_allclose(block.apply(params, x), x + body.apply(params, x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"residual layer .*maps an input of shape \(3, 4\) to "
                                         r"\(3, 5\)"):
        nn.residual(nn.dense(5)).init(jax.random.key(0), x)


def test_parallel_combines():
    x = normal(2, 4)
    par = nn.parallel(nn.dense(3), nn.dense(5))
    params = par.init(jax.random.key(0), x)
    a, b = par.apply(params, x)
    assert a.shape == (2, 3) and b.shape == (2, 5)
    cat = nn.parallel(nn.dense(3), nn.dense(5), combine="concat")
    np.testing.assert_allclose(cat.apply(params, x), np.concatenate([a, b], -1), rtol=1e-6)
    summed = nn.parallel(nn.dense(3), nn.dense(3), combine="sum")
    p2 = summed.init(jax.random.key(0), x)
    y = summed.apply(p2, x)
    np.testing.assert_allclose(y, nn.dense(3).apply(p2["dense_0"], x)
                               + nn.dense(3).apply(p2["dense_1"], x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"parallel layer .*cannot combine branch outputs of "
                                         r"shapes \[\(2, 3\), \(2, 5\)\]"):
        nn.parallel(nn.dense(3), nn.dense(5), combine="sum").init(jax.random.key(0), x)


def test_serial_passes_tuples_as_several_args():
    model = nn.serial(nn.parallel(nn.dense(3), nn.dense(3)), nn.stateless(lambda a, b: a * b))
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)))
    assert model.apply(params, jnp.ones((4, 2))).shape == (4, 3)


def test_same_seed_same_params_and_different_seed_differs():
    model = nn.mlp([16, 4])
    x = jnp.zeros((1, 8))
    a = model.init(jax.random.key(3), x)
    b = model.init(jax.random.key(3), x)
    c = model.init(jax.random.key(4), x)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["dense_0"]["w"], c["dense_0"]["w"])


def test_init_and_apply_compose_with_jit_grad_vmap():
    model = nn.serial(nn.dense(8), nn.gelu(), nn.dropout(0.5), nn.dense(1))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 3)))
    x = jnp.ones((5, 3))
    loss = lambda p, k: jnp.mean(model.apply(p, x, key=k, train=True) ** 2)
    g = jax.jit(jax.grad(loss))(params, jax.random.key(1))
    assert jax.tree.structure(g) == jax.tree.structure(params)
    per_example = jax.vmap(lambda xi: model.apply(params, xi[None]))(x)
    assert per_example.shape == (5, 1, 1)


def test_dropout_keys_differ_per_layer():
    model = nn.serial(nn.dropout(0.5), nn.dropout(0.5, name="second"))
    # Each dropout gets its own split key: masks are not identical.
    x = jnp.ones((1, 64))
    first = nn.serial(nn.dropout(0.5)).apply({}, x, key=jax.random.key(0), train=True)
    both = model.apply({}, x, key=jax.random.key(0), train=True)
    assert not np.array_equal(np.asarray(first) != 0, np.asarray(both) != 0)


def test_reference_models():
    mlp = nn.mlp([256, 10])
    params = mlp.init(jax.random.key(0), jnp.zeros((1, 784)))
    assert [params[k]["w"].shape for k in params] == [(784, 256), (256, 10)]
    # He init: std of the first layer is sqrt(2 / 784).
    assert abs(float(np.std(np.asarray(params["dense_0"]["w"]))) - np.sqrt(2 / 784)) < 0.003
    cnn = nn.cnn(10)
    cp = cnn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    assert cnn.apply(cp, jnp.zeros((3, 8, 8, 1))).shape == (3, 10)
    with pytest.raises(ValueError, match="mlp: sizes must name at least one layer"):
        nn.mlp([])


def test_residual_extras_draw_keys_apart_from_the_body():
    """fold_in(key, 1) is the key serial hands the body's second child: an activation
    dropout drew the same mask as a dropout nested there."""
    ident = nn.stateless(lambda h: h, kind="id")
    block = nn.residual(ident, nn.serial(ident, nn.dropout(0.5)), activation=nn.dropout(0.5))
    x = jnp.ones((1, 4096))
    y = np.asarray(block.apply(block.init(jax.random.key(0), x), x, key=jax.random.key(42),
                               train=True))
    # y = 2 a (1 + 2 b) for the activation's mask a and the body's b: 0, 2 or 6
    assert set(np.unique(y)) <= {0.0, 2.0, 6.0}
    kept = y[y != 0]
    assert 0.4 < np.mean(kept == 2.0) < 0.6  # b independent of a (identical masks: 0)


def test_parallel_sum_refuses_outputs_that_only_broadcast():
    block = nn.parallel(nn.dense(3), nn.dense(1), combine="sum")
    with pytest.raises(nn.ModuleError, match=r"parallel layer .*cannot combine branch outputs "
                       r"of shapes \[\(2, 3\), \(2, 1\)\]: 'sum' needs outputs of one shape"):
        block.init(jax.random.key(0), jnp.zeros((2, 4)))
