"""group_norm, conv_transpose, grouped/depthwise conv and padded pooling, forward, against
float64 numpy written from their definitions and against torch (skipped without it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def nchw(x):
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


# ----------------------------------------------------------------------------- group_norm


def np_group_norm(x, g, scale, bias, eps=1e-5):
    n, *spatial, c = x.shape
    xg = x.astype(np.float64).reshape(n, -1, g, c // g)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = xg.var(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * scale + bias


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_norm_matches_numpy(groups):
    x = rand(3, 4, 5, 6) * 3 + 1
    layer = nn.group_norm(groups)
    params = layer.init(jax.random.key(0), x)
    params = {"scale": jnp.asarray(rand(6)), "bias": jnp.asarray(rand(6))}
    ref = np_group_norm(x, groups, np.asarray(params["scale"]), np.asarray(params["bias"]))
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), ref, rtol=1e-4, atol=1e-5)


def test_group_norm_matches_torch_and_errors():
    torch = pytest.importorskip("torch")
    x = rand(2, 5, 5, 8)
    layer = nn.group_norm(4)
    t = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(rand(8)))
        t.bias.copy_(torch.from_numpy(rand(8)))
    params = {"scale": jnp.asarray(t.weight.detach().numpy()),
              "bias": jnp.asarray(t.bias.detach().numpy())}
    ref = nhwc(t(torch.from_numpy(nchw(x))).detach().numpy())
    np.testing.assert_allclose(layer.apply(params, x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"channels \(6, input shape \(2, 6\)\) must be "
                                         r"divisible by num_groups \(4\)"):
        layer.init(jax.random.key(0), jnp.zeros((2, 6)))


# ----------------------------------------------------------------------------- conv_transpose


def np_conv_transpose(x, w, stride, crop=0):
    """Scatter: each input pixel adds x[i] * w at i * stride; then crop each side."""
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    out = np.zeros((n, (h - 1) * stride + kh, (wd - 1) * stride + kw, o))
    for i in range(h):
        for j in range(wd):
            out[:, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum(
                "nc,hwco->nhwo", x[:, i, j].astype(np.float64), w)
    return out[:, crop:out.shape[1] - crop, crop:out.shape[2] - crop]


# kernels shorter than the stride too: "VALID" is (H - 1) s + k, not lax's H s
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, "VALID"), (3, 2, "VALID"), (3, 2, 1),
                                                   (3, 3, 2), (2, 3, "VALID"), (1, 2, "VALID")])
def test_conv_transpose_is_the_scatter_of_its_kernel(kernel, stride, padding):
    x = rand(2, 4, 5, 3)
    layer = nn.conv_transpose(4, kernel, strides=stride, padding=padding, use_bias=False)
    params = layer.init(jax.random.key(0), x)
    crop = 0 if padding == "VALID" else padding
    ref = np_conv_transpose(x, np.asarray(params["w"], np.float64), stride, crop)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), ref, rtol=1e-4, atol=1e-5)


def test_conv_transpose_matches_torch_and_sizes():
    torch = pytest.importorskip("torch")
    x = rand(2, 5, 6, 3)
    layer = nn.conv_transpose(4, (3, 2), strides=2, padding=1)
    params = layer.init(jax.random.key(0), x)
    tw = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(params["w"]),
                                                            (2, 3, 0, 1))))
    ref = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(nchw(x)), tw, torch.from_numpy(np.array(params["b"])), stride=2,
        padding=1)
    np.testing.assert_allclose(layer.apply(params, x), nhwc(ref.numpy()), rtol=1e-5,
                               atol=1e-5)
    same = nn.conv_transpose(2, 3, strides=2)
    assert same.apply(same.init(jax.random.key(0), x), x).shape == (2, 10, 12, 2)
    one_d = nn.conv_transpose(2, 4, strides=2, padding="VALID")
    x1 = rand(2, 5, 3)
    assert one_d.apply(one_d.init(jax.random.key(0), x1), x1).shape == (2, 12, 2)
    # an int entry is torch's crop in a spec that also holds a lax pair (it was read as a
    # pair once any entry was one): dimension 0 as torch's padding=1, dimension 1 lax's
    # (torch's crop p is lax's pair (d (k - 1) - p) on each side: (2, 2) for k = 3, p = 0)
    mixed = nn.conv_transpose(4, (3, 2), strides=2, padding=(0, (0, 0)))
    pairs = nn.conv_transpose(4, (3, 2), strides=2, padding=((2, 2), (0, 0)))
    np.testing.assert_array_equal(mixed.apply(params, x), pairs.apply(params, x))
    assert mixed.apply(params, x).shape[1] == (5 - 1) * 2 + 3  # torch's height at padding 0
    # a padding that leaves no output: torch refuses; here it was an empty array, or a bare
    # lax error from a model's init
    with pytest.raises(ValueError, match=r"conv_transpose layer .*padding 1 leaves no output: "
                                         r"the input's spatial shape \(1, 1\) would give"):
        tiny = nn.conv_transpose(2, 2, padding=1)
        tiny.apply(tiny.init(jax.random.key(0), rand(1, 1, 1, 1)), rand(1, 1, 1, 1))
    with pytest.raises(ValueError, match="padding 5 leaves no output"):
        nn.serial(nn.conv_transpose(2, 3, padding=5)).init(jax.random.key(0), rand(1, 3, 3, 1))


# ----------------------------------------------------------------------------- conv


@pytest.mark.parametrize("groups,features", [(3, 6), (6, 6), (6, 12)])  # grouped, depthwise
def test_grouped_and_depthwise_conv_match_torch(groups, features):
    torch = pytest.importorskip("torch")
    x = rand(2, 7, 6, 6)
    layer = nn.conv(features, 3, strides=2, padding=1, feature_group_count=groups)
    params = layer.init(jax.random.key(0), x)
    assert params["w"].shape == (3, 3, 6 // groups, features)
    tw = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(params["w"]),
                                                            (3, 2, 0, 1))))
    ref = torch.nn.functional.conv2d(torch.from_numpy(nchw(x)), tw,
                                     torch.from_numpy(np.array(params["b"])), stride=2,
                                     padding=1, groups=groups)
    np.testing.assert_allclose(layer.apply(params, x), nhwc(ref.numpy()), rtol=1e-5,
                               atol=1e-5)


def test_conv_group_errors():
    with pytest.raises(ValueError, match=r"features \(5\) must be divisible by "
                                         r"feature_group_count \(2\)"):
        nn.conv(5, 3, feature_group_count=2)
    with pytest.raises(ValueError, match=r"input channels \(3, input shape .*\) must be "
                                         r"divisible by feature_group_count \(2\)"):
        nn.conv(4, 3, feature_group_count=2).init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID', an int"):
        nn.conv(4, 3, padding="FULL")


# ----------------------------------------------------------------------------- pooling


def test_padded_pools_match_torch():
    torch = pytest.importorskip("torch")
    x = rand(2, 7, 6, 3)
    tx = torch.from_numpy(nchw(x))
    got = nn.max_pool(3, strides=2, padding=1).apply({}, x)
    ref = torch.nn.functional.max_pool2d(tx, 3, stride=2, padding=1)
    np.testing.assert_allclose(got, nhwc(ref.numpy()), rtol=1e-6)
    for include in (True, False):
        got = nn.avg_pool(3, strides=2, padding=1, count_include_pad=include).apply({}, x)
        ref = torch.nn.functional.avg_pool2d(tx, 3, stride=2, padding=1,
                                             count_include_pad=include)
        np.testing.assert_allclose(got, nhwc(ref.numpy()), rtol=1e-5, atol=1e-6)


def test_max_pool_gradient_under_jit_routes_to_the_max():
    """The first release's bug: no jitted gradient through pooling, so no CNN trained."""
    x = jnp.asarray(rand(1, 4, 4, 1))
    g = jax.jit(jax.grad(lambda x: jnp.sum(nn.max_pool(2).apply({}, x))))(x)
    blocks = np.asarray(x).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
    expected = (blocks == blocks.max(axis=1, keepdims=True)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(g).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3)
                                  .reshape(4, 4), expected)
    g_avg = jax.jit(jax.grad(lambda x: jnp.sum(nn.avg_pool(2, padding="SAME").apply({}, x))))(x)
    np.testing.assert_allclose(g_avg, np.full((1, 4, 4, 1), 0.25))


def test_avg_pool_sums_in_float32():
    x = jnp.full((1, 8, 8, 1), 2000.0, jnp.float16)  # a float16 sum would overflow to inf
    y = nn.avg_pool(8).apply({}, x)
    assert y.dtype == jnp.float16 and float(np.asarray(y)[0, 0, 0, 0]) == 2000.0
    xb = (rand(2, 7, 7, 3) + 10).astype(jnp.bfloat16)  # cast in numpy: no compile
    ref = np.asarray(xb, np.float64).reshape(2, 1, 7, 1, 7, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(nn.avg_pool(7).apply({}, xb), np.float64), ref,
                               rtol=4e-3)


# ----------------------------------------------------------------------------- input dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.uint8])
def test_conv_on_bf16_or_uint8_images_with_float32_kernels(dtype):
    """Raw uint8 images, or bf16 ones, into float32 kernels: promoted as dense promotes
    (the conv once refused the mixed dtypes). The gradient flows under jit."""
    x = jnp.asarray(np.abs(rand(2, 6, 6, 3)) * 40).astype(dtype)
    for layer in (nn.conv(4, 3), nn.conv_transpose(4, 3, strides=2)):
        params = layer.init(jax.random.key(0), x)
        y = layer.apply(params, x)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, layer.apply(params, x.astype(jnp.float32)), rtol=1e-6)
        g = jax.jit(jax.grad(lambda p, layer=layer: jnp.sum(layer.apply(p, x) ** 2)))(params)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(g))


def test_avg_pools_of_integers_are_float_means():
    x = jnp.asarray(np.array([1, 2, 2, 2], np.uint8).reshape(1, 2, 2, 1))
    for layer in (nn.avg_pool(2), nn.global_avg_pool()):
        y = layer.apply({}, x)
        assert y.dtype == jnp.float32 and float(np.asarray(y).ravel()[0]) == 1.75


@pytest.mark.parametrize("layer", [nn.max_pool(2, padding=2), nn.avg_pool(3, padding=(1, 3)),
                                   nn.max_pool(2, padding=((0, 0), (2, 0)))],
                         ids=["max_pool", "avg_pool", "pairs"])
def test_pool_padding_as_large_as_the_window_is_an_error(layer):
    """A window of padding alone gave -inf (max) or NaN (avg, 0/0); torch refuses."""
    with pytest.raises(ValueError, match=r"reaches the window size \d: some windows would "
                                         r"hold padding only"):
        layer.apply({}, jnp.ones((1, 4, 4, 1)))


def test_max_pool_keeps_any_integer_dtype():
    x = (np.arange(16) % 7).reshape(1, 4, 4, 1)
    want = x.reshape(1, 2, 2, 2, 2, 1).max(axis=(2, 4))
    for dtype in (jnp.uint8, jnp.int8, jnp.int16, jnp.uint32, jnp.int32):
        y = nn.max_pool(2).apply({}, jnp.asarray(x, dtype))
        assert y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y), want)


@pytest.mark.parametrize("layer", [nn.max_pool(3), nn.avg_pool(3),
                                   nn.conv(2, 3, padding="VALID")],
                         ids=["max_pool", "avg_pool", "conv"])
def test_a_window_larger_than_the_input_is_an_error(layer):
    """torch raises "output size is too small"; an empty activation would feed a head with
    no inputs and train only its bias."""
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(nn.ModuleError, match=r"the input's spatial shape \(2, 2\) is too "
                                             r"small for this layer's window"):
        layer.apply(layer.init(jax.random.key(0), x), x)


# ----------------------------------------------------------------------------- integer input


@pytest.mark.parametrize("make", [nn.layer_norm, nn.rms_norm, lambda: nn.group_norm(2),
                                  nn.batch_norm])
def test_norms_promote_integer_input_to_float32_like_conv(make):
    """uint8 images straight into a norm: float32 out (the params' dtype, as conv), equal to
    the float input's (the output in uint8 truncated and wrapped the normalised values);
    grads under jit; bf16 params give bf16, as conv's do."""
    layer = make()
    x = np.random.default_rng(3).integers(0, 256, (4, 3, 3, 4)).astype(np.uint8)
    init = layer.init(jax.random.key(0), jnp.zeros((1, 3, 3, 4)))
    params, state = init if layer.stateful else (init, None)

    def run(p, x):
        out = layer.apply(p, x, state=state, train=True) if layer.stateful else \
            layer.apply(p, x)
        return out[0] if layer.stateful else out

    got, want = run(params, x), run(params, x.astype(np.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(run(p, x) ** 3)))(params)
    want_grads = jax.grad(lambda p: jnp.sum(run(p, x.astype(np.float32)) ** 3))(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-3)
    low = jax.tree.map(lambda p: p.astype(jnp.bfloat16)
                       if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    assert run(low, x).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("call, message", [
    (lambda: nn.conv(4, 3, strides=0), r"conv: strides must be a positive int or a tuple of "
                                       r"1 or 2 positive ints, got 0"),
    (lambda: nn.conv(4, 3, dilation=(1, 0)), r"conv: dilation must be .*got \(1, 0\)"),
    (lambda: nn.conv_transpose(4, (0, 3)), r"conv_transpose: kernel_size must be .*got "
                                           r"\(0, 3\)"),
    (lambda: nn.max_pool(2, strides=0), r"max_pool: strides must be .*got 0"),
    (lambda: nn.avg_pool(0), r"avg_pool: window must be .*got 0"),
])
def test_zero_windows_strides_and_dilations_are_refused_when_built(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_conv_transpose_refuses_params_of_another_model():
    x = jnp.zeros((1, 5, 5, 2))
    other = nn.conv_transpose(8, 5).init(jax.random.key(0), x)
    with pytest.raises(nn.ModuleError, match=r"conv_transpose layer .*w has shape \(5, 5, 2, 8\)"
                       r", but this layer expects \(3, 3, 2, 4\).*another model's init"):
        nn.conv_transpose(4, 3).apply(other, x)


def test_sizes_given_as_numpy_ints_or_arrays_build_and_run():
    x = jnp.zeros((1, 8, 8, 2))
    for layer in (nn.conv(4, np.int64(3), strides=np.array([2, 2])),
                  nn.conv(4, np.array([3, 3])), nn.conv_transpose(4, np.int64(3)),
                  nn.max_pool(np.array([2, 2]))):
        params = layer.init(jax.random.key(0), x)
        assert layer.apply(params, x).ndim == 4
