"""Every layer against numpy, gradients against finite differences, and shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from funtrain import nn

RNG = np.random.default_rng(0)


def rand(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def init_apply(layer, x, key=jax.random.key(0)):
    params = layer.init(key, x)
    return params, layer.apply(params, x)


def test_dense_matches_numpy():
    x = rand(5, 4)
    params, y = init_apply(nn.dense(3), x)
    np.testing.assert_allclose(y, np.asarray(x) @ params["w"] + params["b"], rtol=1e-5)
    assert params["w"].shape == (4, 3) and params["b"].shape == (3,)


def test_dense_batch_size_not_baked_in():
    layer = nn.dense(3)
    params = layer.init(jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.float32))
    assert layer.apply(params, rand(17, 4)).shape == (17, 3)
    assert layer.apply(params, rand(2, 6, 4)).shape == (2, 6, 3)


def test_dense_without_bias():
    params, _ = init_apply(nn.dense(3, use_bias=False), rand(2, 4))
    assert set(params) == {"w"}


def _np_conv2d(x, w, stride=1):
    """Direct loops: NHWC input, HWIO kernel, SAME padding as TF/XLA define it."""
    n, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    th, tw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - wd, 0)
    xp = np.pad(x, ((0, 0), (th // 2, th - th // 2), (tw // 2, tw - tw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, o))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, w)
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_matches_numpy(stride):
    x = rand(2, 6, 5, 3)
    params, y = init_apply(nn.conv(4, (3, 3), strides=stride), x)
    ref = _np_conv2d(np.asarray(x, np.float64), np.asarray(params["w"], np.float64), stride)
    np.testing.assert_allclose(y, ref + np.asarray(params["b"]), rtol=1e-4, atol=1e-5)


def test_conv1d_matches_numpy():
    x = rand(2, 7, 3)
    params, y = init_apply(nn.conv(4, 3, padding="VALID"), x)
    w = np.asarray(params["w"], np.float64)  # (3, 3, 4): W, I, O
    xs = np.asarray(x, np.float64)
    ref = np.stack([np.einsum("nwc,wco->no", xs[:, i:i + 3], w) for i in range(5)], axis=1)
    np.testing.assert_allclose(y, ref + np.asarray(params["b"]), rtol=1e-4, atol=1e-5)
    assert params["w"].shape == (3, 3, 4)


def test_pools_match_numpy():
    x = rand(2, 4, 4, 3)
    xs = np.asarray(x).reshape(2, 2, 2, 2, 2, 3)
    _, mx = init_apply(nn.max_pool(2), x)
    _, av = init_apply(nn.avg_pool(2), x)
    np.testing.assert_allclose(mx, xs.max(axis=(2, 4)), rtol=1e-6)
    np.testing.assert_allclose(av, xs.mean(axis=(2, 4)), rtol=1e-5)
    _, g = init_apply(nn.global_avg_pool(), x)
    np.testing.assert_allclose(g, np.asarray(x).mean(axis=(1, 2)), rtol=1e-5)


def test_avg_pool_same_padding_excludes_pad():
    x = jnp.ones((1, 3, 3, 1))
    _, y = init_apply(nn.avg_pool(2, strides=1, padding="SAME"), x)
    np.testing.assert_allclose(y, np.ones((1, 3, 3, 1)), rtol=1e-6)


def test_embed_matches_numpy_and_rejects_floats():
    ids = jnp.array([[0, 3], [2, 2]])
    params, y = init_apply(nn.embed(5, 4), ids)
    np.testing.assert_array_equal(y, np.asarray(params["embedding"])[np.asarray(ids)])
    with pytest.raises(TypeError, match=r"embed layer .*expected integer ids, got dtype float32"):
        nn.embed(5, 4).apply(params, jnp.zeros((2,)))
    # ids outside [0, 5), negative ones too, look up NaN (jnp.take wraps -1 to row 4)
    out = np.asarray(jax.jit(nn.embed(5, 4).apply)(params, jnp.array([-1, 5, 4])))
    assert np.isnan(out[:2]).all() and np.isfinite(out[2]).all()
    # int8 ids (raw bytes) with 256 rows: the marker 256 does not fit int8 and wrapped to 0
    table = {"embedding": jnp.ones((256, 2))}
    out = np.asarray(jax.jit(nn.embed(256, 2).apply)(table, jnp.array([-1, -128, 7], jnp.int8)))
    assert np.isnan(out[:2]).all() and (out[2] == 1).all()


def test_layer_norm_matches_numpy():
    x = rand(3, 6)
    layer = nn.layer_norm()
    params = layer.init(jax.random.key(0), x)
    params = {"scale": rand(6), "bias": rand(6)}
    y = layer.apply(params, x)
    xs = np.asarray(x, np.float64)
    ref = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref * np.asarray(params["scale"]) + np.asarray(params["bias"]),
                               rtol=1e-4, atol=1e-5)


def test_rms_norm_matches_numpy():
    x = rand(3, 6)
    params = {"scale": rand(6)}
    y = nn.rms_norm().apply(params, x)
    xs = np.asarray(x, np.float64)
    ref = xs / np.sqrt((xs ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(params["scale"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_norms_keep_dtype_and_compute_in_f32():
    x = (rand(2, 8) * 1e3).astype(jnp.bfloat16)
    for layer in (nn.layer_norm(), nn.rms_norm()):
        params, y = init_apply(layer, x)
        assert y.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


@pytest.mark.parametrize("name,fn", [
    ("relu", lambda x: np.maximum(x, 0)),
    ("tanh", np.tanh),
    ("silu", lambda x: x / (1 + np.exp(-x))),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
])
def test_activations_match_numpy(name, fn):
    x = rand(4, 5)
    _, y = init_apply(getattr(nn, name)(), x)
    np.testing.assert_allclose(y, fn(np.asarray(x, np.float64)), rtol=1e-5, atol=1e-6)


def test_gelu_exact_and_tanh():
    from math import erf
    x = rand(10)
    exact = np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in np.asarray(x, np.float64)])
    np.testing.assert_allclose(init_apply(nn.gelu(), x)[1], exact, rtol=1e-5, atol=1e-6)
    xs = np.asarray(x, np.float64)
    approx = 0.5 * xs * (1 + np.tanh(np.sqrt(2 / np.pi) * (xs + 0.044715 * xs ** 3)))
    np.testing.assert_allclose(init_apply(nn.gelu(approximate=True), x)[1], approx, rtol=1e-5,
                               atol=1e-6)


def test_softmax_matches_numpy_with_huge_values():
    x = jnp.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]])
    _, y = init_apply(nn.softmax(), x)
    xs = np.asarray(x, np.float64)
    e = np.exp(xs - xs.max(-1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-7)
    # integer logits: a float32 softmax (cast back to ints, it was all zeros)
    ints = jnp.array([[1, 2, 3]])
    _, y = init_apply(nn.softmax(), ints)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, jax.nn.softmax(ints.astype(jnp.float32)), rtol=1e-6)


def test_flatten_and_reshape():
    x = rand(2, 3, 4)
    assert init_apply(nn.flatten(), x)[1].shape == (2, 12)
    assert init_apply(nn.reshape((4, 3)), x)[1].shape == (2, 4, 3)
    assert init_apply(nn.reshape((-1, 2)), x)[1].shape == (2, 6, 2)
    assert nn.reshape((-1, 2)).apply({}, x[:0]).shape == (0, 6, 2)  # an empty batch
    with pytest.raises(ValueError, match=r"reshape layer .*cannot reshape input of shape "
                                         r"\(2, 3, 4\) to \(N, 5\)"):
        init_apply(nn.reshape((5,)), x)


def test_dropout_identity_in_eval_and_scaled_in_train():
    x = jnp.ones((1000,))
    layer = nn.dropout(0.25)
    assert layer.init(jax.random.key(0), x) == {}
    np.testing.assert_array_equal(layer.apply({}, x), x)
    y = np.asarray(layer.apply({}, x, key=jax.random.key(1), train=True))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    assert 0.65 < kept.mean() < 0.85
    with pytest.raises(ValueError, match="train=True needs a PRNG key"):
        layer.apply({}, x, train=True)
    with pytest.raises(ValueError, match=r"dropout: rate must be in \[0, 1\), got 1.0"):
        nn.dropout(1.0)


@pytest.mark.parametrize("layer,shape", [
    (nn.dense(3), (2, 4)),
    (nn.conv(2, (3, 3)), (1, 5, 5, 2)),
    (nn.conv(2, 3), (1, 6, 2)),
    (nn.layer_norm(), (2, 5)),
    (nn.rms_norm(), (2, 5)),
    (nn.gelu(), (3, 4)),
    (nn.silu(), (3, 4)),
    (nn.softmax(), (3, 4)),
    (nn.avg_pool(2), (1, 4, 4, 2)),
])
def test_gradients_match_finite_differences(layer, shape):
    x = rand(*shape)
    params = layer.init(jax.random.key(1), x)
    # Perturb ones/zeros init so scale/bias gradients are exercised (in numpy: no compiles).
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * np.asarray(rand(*p.shape)), params)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
        x64 = np.asarray(x, np.float64)
        # jitted, as a user runs it (and one compile instead of one per eager op)
        check_grads(jax.jit(layer.apply), (p64, x64), order=1, modes=["rev"],
                    atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- errors name the layer


def test_wrong_feature_size_names_layer_and_shapes():
    model = nn.serial(nn.dense(8), nn.relu(), nn.dense(2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"dense layer 'dense_0': expected an input with 4 "
                                         r"features .*got input of shape \(3, 5\)"):
        model.apply(params, jnp.zeros((3, 5)))


def test_wrong_rank_at_init_names_layer():
    model = nn.serial(nn.dense(8), nn.conv(4, (3, 3), name="stem"))
    with pytest.raises(ValueError, match=r"conv layer 'stem': expected a channels-last input of "
                                         r"rank 4 .*got input of shape \(2, 8\) \(rank 2\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 5)))


def test_conv_wrong_channels():
    layer = nn.conv(4, (3, 3))
    params = layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"conv layer \(at the root\): expected an input with 3 "
                                         r"channels"):
        layer.apply(params, jnp.zeros((1, 5, 5, 2)))


def test_nested_key_paths_in_errors():
    block = nn.serial(nn.dense(4), nn.relu(), nn.dense(4), name="block")
    model = nn.serial(nn.dense(4), nn.residual(block), nn.dense(2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    assert set(params["residual_0"]["block"]) == {"dense_0", "dense_1"}
    bad = jax.tree.map(lambda p: p, params)
    del bad["residual_0"]["block"]["dense_1"]["b"]
    with pytest.raises(ValueError, match=r"missing key path\(s\) 'residual_0/block/dense_1/b'"):
        model.apply(bad, jnp.zeros((2, 4)))


def test_missing_and_extra_params_key_paths():
    model = nn.serial(nn.dense(8), nn.relu(), nn.dense(2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    missing = {"dense_0": params["dense_0"]}
    with pytest.raises(ValueError, match=r"missing key path 'dense_1'"):
        model.apply(missing, jnp.zeros((2, 4)))
    extra = {**params, "head": params["dense_1"]}
    with pytest.raises(ValueError, match=r"unexpected key path\(s\) 'head' \(the children "
                                         r"are \['dense_0', 'relu_0', 'dense_1'\]\)"):
        model.apply(extra, jnp.zeros((2, 4)))
    extra_leaf = {**params, "dense_1": {**params["dense_1"], "gamma": params["dense_1"]["b"]}}
    with pytest.raises(ValueError, match=r"unexpected key path\(s\) 'dense_1/gamma'"):
        model.apply(extra_leaf, jnp.zeros((2, 4)))


def test_param_shape_mismatch_names_path():
    model = nn.serial(nn.dense(8), nn.dense(2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    params["dense_1"]["b"] = jnp.zeros((3,))
    with pytest.raises(ValueError, match=r"param 'dense_1/b' has shape \(3,\), expected \(2,\)"):
        model.apply(params, jnp.zeros((2, 4)))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dense: features must be a positive int, got 0"):
        nn.dense(0)
    with pytest.raises(ValueError, match="conv: padding must be"):
        nn.conv(3, 3, padding="FULL")
    with pytest.raises(ValueError, match="layer_norm: epsilon must be > 0"):
        nn.layer_norm(epsilon=0.0)
    with pytest.raises(ValueError, match="a layer name must be a non-empty string without '/'"):
        nn.dense(3, name="a/b")


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_matches_numpy(causal):
    x = rand(2, 5, 8)
    layer = nn.multi_head_attention(2, causal=causal)
    params = layer.init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)
    proj = {k: xs @ p[k]["w"] + p[k]["b"] for k in ("query", "key", "value")}
    out = np.zeros_like(xs)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        q, k, v = (proj[n][..., sl] for n in ("query", "key", "value"))
        logits = q @ k.transpose(0, 2, 1) / 2.0
        if causal:
            logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[..., sl] = w @ v
    ref = out @ p["out"]["w"] + p["out"]["b"]
    np.testing.assert_allclose(layer.apply(params, x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="features 6 must be divisible by num_heads 4"):
        nn.multi_head_attention(4).init(jax.random.key(0), jnp.zeros((1, 3, 6)))


def test_transformer_block_shapes_and_grads():
    block = nn.transformer_block(16, 4)
    x = rand(2, 6, 16)
    params = block.init(jax.random.key(0), x)
    assert set(params) == {"attn", "mlp"}
    assert jax.jit(block.apply)(params, x).shape == x.shape
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        x64 = np.asarray(x, np.float64)
        check_grads(jax.jit(lambda p: block.apply(p, x64)), (p64,),
                    order=1, modes=["rev"], atol=1e-4, rtol=1e-4)
