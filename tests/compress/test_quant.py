"""funtrain.quant: round-trip bounds, int4 packing, integer kernels against float64
references, checkpoints and jit, QAT's straight-through gradient, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn, quant
from funtrain.train import checkpoint

MODEL = nn.mlp([32, 10])
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 16)))


def normal(seed, shape):
    """Test input from numpy: an eager jax.random call compiles threefry per shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


X = normal(1, (8, 16))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_round_trip_error_is_at_most_half_a_step(bits, granularity):
    q = quant.quantize(PARAMS, bits=bits, granularity=granularity)
    for path in ("dense_0", "dense_1"):
        w = np.asarray(PARAMS[path]["w"], np.float64)
        qw = q[path]["w"]
        # reference scale, from the formula: max |w| / (2^(bits-1) - 1)
        amax = np.abs(w).max(axis=0, keepdims=True) if granularity == "per_channel" else \
            np.abs(w).max()
        scale = amax / (2 ** (bits - 1) - 1)
        np.testing.assert_allclose(np.asarray(qw.scale, np.float64), np.broadcast_to(
            scale, np.shape(qw.scale)), rtol=1e-6)
        err = np.abs(np.asarray(quant.dequantize(q)[path]["w"], np.float64) - w)
        assert (err <= np.broadcast_to(scale, w.shape) / 2 * (1 + 1e-5)).all()
        assert np.abs(np.asarray(qw.integers())).max() <= 2 ** (bits - 1) - 1
    assert q["dense_0"]["b"] is PARAMS["dense_0"]["b"]  # biases stay float


def test_bf16_weights_keep_the_bound_in_float32_and_a_float32_matmul_uses_it():
    w = normal(2, (64, 16)).astype(jnp.bfloat16)
    qw = quant.quantize({"w": w})["w"]
    assert qw.dequantize().dtype == jnp.bfloat16  # the weight's own dtype by default
    w64 = np.asarray(w, np.float64)
    scale = np.abs(w64).max(axis=0, keepdims=True) / 127
    err = np.abs(np.asarray(qw.dequantize(jnp.float32), np.float64) - w64)
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    # a float32 input multiplies the float32 dequantized weight, not one rounded to bf16
    x = normal(3, (4, 64))
    exact = np.asarray(qw.integers(), np.float64) * np.asarray(qw.scale, np.float64)
    want = np.asarray(x, np.float64) @ exact  # the old bf16 detour was 0.047 off
    np.testing.assert_allclose(np.asarray(quant.matmul(x, qw)), want, rtol=1e-5, atol=1e-5)


def test_zero_and_tiny_channels_stay_finite():
    """A channel of zeros, and one whose max |w| / qmax is below float32's smallest normal
    (it flushes to 0): scale 1, integers 0, never 0 / 0 = NaN, forward or backward."""
    w = jnp.zeros((4, 3), jnp.float32).at[1:, 1].set(5e-38).at[:, 2].set(0.5)
    for bits in (8, 4):
        q = quant.quantize_leaf(w, bits)
        np.testing.assert_array_equal(np.asarray(q.scale)[0, :2], [1.0, 1.0])
        np.testing.assert_array_equal(np.asarray(q.integers())[:, :2], 0)
        fq, g = jax.jit(jax.value_and_grad(lambda w, b=bits: jnp.sum(quant.fake_quant(w, b))))(w)
        assert np.isfinite(float(fq)) and np.isfinite(np.asarray(g)).all()
    x = jnp.zeros((2, 4)).at[1, 1:].set(5e-38)  # a dynamic input row just as small
    out = quant.matmul(x, quant.quantize_leaf(jnp.ones((4, 3)), dynamic=True))
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_quantized_params_run_through_remat_repeat():
    """A stacked (scanned) block's kernels quantize like any others and the model runs on
    them: they are dequantized before the scan (its leading axis once broke the scan)."""
    from funtrain import remat

    deep = nn.serial(remat.repeat(nn.serial(nn.dense(8), nn.relu()), 3), nn.dense(2))
    x = normal(2, (2, 8))
    q = quant.quantize(deep.init(jax.random.key(0), x))
    assert isinstance(q["repeat_0"]["dense_0"]["w"], quant.QTensor)
    got = jax.jit(deep.apply)(q, x)
    np.testing.assert_allclose(got, deep.apply(quant.dequantize(q), x), rtol=1e-6)


def test_int4_packs_two_per_byte_and_round_trips_bitwise():
    q = jnp.asarray(np.random.default_rng(0).integers(-8, 8, size=(7, 5)), jnp.int8)
    packed = quant.pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (18,)  # 35 values, padded to 36
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, (7, 5))), np.asarray(q))
    w = quant.quantize(PARAMS, bits=4)["dense_0"]["w"]
    assert w.values.nbytes * 2 == PARAMS["dense_0"]["w"].size


def _int8_dot(hlo):
    """A dot_general whose operands are int8 and whose result is int32 (not a float dot
    after a convert)."""
    import re

    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    return any(re.search(r"tensor<[^>]*xi8>, tensor<[^>]*xi8>\) -> tensor<[^>]*xi32>", line)
               for line in dots)


def _int8_reference(x, w):
    """float64: quantize the input with its scale, multiply the integers, rescale."""
    xs = np.asarray(x, np.float64)
    xq = np.clip(np.round(xs / float(w.act_scale)), -127, 127)
    wq = np.asarray(w.integers(), np.float64)
    return xq @ wq * float(w.act_scale) * np.asarray(w.scale, np.float64).reshape(-1)


def test_calibrated_dense_runs_an_int8_matmul_under_jit():
    q = quant.calibrate(lambda p, b: MODEL.apply(p, b), quant.quantize(PARAMS), [X])
    w = q["dense_0"]["w"]
    np.testing.assert_allclose(float(w.act_scale), np.abs(np.asarray(X)).max() / 127,
                               rtol=1e-6)
    layer = nn.dense(32, name="dense_0")
    got = jax.jit(layer.apply)(q["dense_0"], X)
    want = _int8_reference(X, w) + np.asarray(PARAMS["dense_0"]["b"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert _int8_dot(jax.jit(MODEL.apply).lower(q, X).as_text())
    full = jax.jit(MODEL.apply)(q, X)
    np.testing.assert_allclose(np.asarray(full), np.asarray(MODEL.apply(PARAMS, X)),
                               atol=0.05)


def test_calibrate_leaves_kernels_without_an_integer_path_on_floats():
    """conv_transpose has no integer kernel: calibrate warns and leaves it on its
    dequantized weights (it once refused the whole model), and calibrates the conv."""
    model = nn.serial(nn.conv(4, 3), nn.relu(), nn.conv_transpose(2, 3, strides=2))
    x = normal(3, (2, 6, 6, 3))
    q = quant.quantize(model.init(jax.random.key(0), x))
    with pytest.warns(UserWarning, match=r"'conv_transpose_0/w' \(a kernel without an "
                                         r"integer path.*keep act_scale=None"):
        c = quant.calibrate(lambda p, b: model.apply(p, b), q, [x])
    assert c["conv_0"]["w"].act_scale is not None
    assert c["conv_transpose_0"]["w"].act_scale is None
    want = np.asarray(model.apply(quant.dequantize(q), x))
    np.testing.assert_allclose(jax.jit(model.apply)(c, x), want,
                               atol=0.02 * np.abs(want).max())


def test_percentile_calibration_clips_outliers():
    xs = np.asarray(X).copy()
    xs[0, 0] = 100.0
    q = quant.quantize(PARAMS)
    by_max = quant.calibrate(lambda p, b: MODEL.apply(p, b), q, [xs])
    by_pct = quant.calibrate(lambda p, b: MODEL.apply(p, b), q, [xs], method="percentile",
                             percentile=99.0)
    assert float(by_pct["dense_0"]["w"].act_scale) < float(by_max["dense_0"]["w"].act_scale) / 10


def test_quantized_conv_matches_its_dequantized_float_conv():
    model = nn.serial(nn.conv(4, 3), nn.relu(), nn.flatten(), nn.dense(3))
    x = normal(2, (2, 6, 6, 2))
    params = model.init(jax.random.key(3), x)
    q = quant.quantize(params)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(q, x)),
                               np.asarray(model.apply(quant.dequantize(q), x)), rtol=1e-5,
                               atol=1e-6)
    c = quant.calibrate(lambda p, b: model.apply(p, b), q, [x])
    out = jax.jit(model.apply)(c, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply(params, x)), atol=0.1)


def test_quantized_params_survive_checkpoint_and_jit(tmp_path):
    q = quant.calibrate(lambda p, b: MODEL.apply(p, b), quant.quantize(PARAMS, bits=4), [X])
    checkpoint.save(tmp_path, q, 1)
    back = checkpoint.restore(tmp_path, target=q)
    assert isinstance(back["dense_0"]["w"], quant.QTensor) and back["dense_0"]["w"].bits == 4
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(MODEL.apply)(back, X)),
                                  np.asarray(jax.jit(MODEL.apply)(q, X)))


def test_fake_quant_forward_rounds_and_gradient_passes_straight_through():
    w = PARAMS["dense_0"]["w"]
    np.testing.assert_allclose(np.asarray(quant.fake_quant(w, 4)),
                               np.asarray(quant.dequantize(quant.quantize({"w": w}, 4))["w"]),
                               rtol=1e-6)
    g = jax.jit(jax.grad(lambda w: jnp.sum(quant.fake_quant(w, 4) * 3.0)))(w)
    np.testing.assert_array_equal(np.asarray(g), 3.0)  # the rounding's gradient is 1
    clipped = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, 8, scale=jnp.float32(0.01))))(
        jnp.array([0.5, 1.274, 2.0]))
    # 1.274 rounds to 127 (kept: clipping starts at 127.5 steps); 2.0 is clipped
    np.testing.assert_array_equal(np.asarray(clipped), [1.0, 1.0, 0.0])
    # every weight, the largest of each channel included, gets the straight-through 1
    wide = normal(5, (8, 20000))
    for bits in (8, 4):
        g = jax.grad(lambda w, b=bits: jnp.sum(quant.fake_quant(w, b)))(wide)
        assert (np.asarray(g) == 1.0).all()


def test_quantized_dense_promotes_like_a_float_dense():
    x = jnp.arange(16, dtype=jnp.int32).reshape(1, 16) % 3
    q = quant.quantize(PARAMS)
    got = nn.dense(32, name="dense_0").apply(q["dense_0"], x)
    want = nn.dense(32, name="dense_0").apply(quant.dequantize(q)["dense_0"], x)
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_qat_trains_under_jit_grad():
    model = quant.qat(MODEL, bits=4, activation_bits=8)
    y = jnp.arange(8) % 10
    loss = lambda p: jnp.mean(-jax.nn.log_softmax(model.apply(p, X))[jnp.arange(8), y])  # noqa: E731
    grads = jax.jit(jax.grad(loss))(PARAMS)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
               for g in jax.tree.leaves(grads))


def test_qat_leaves_integer_inputs_alone():
    """Token ids are not activations: activation_bits must not round them."""
    model = nn.serial(nn.embed(1000, 8), nn.dense(4))
    ids = jnp.asarray([[1, 2, 3, 500, 999]], jnp.int32)
    params = model.init(jax.random.key(0), ids)
    got = quant.qat(model, bits=8, activation_bits=8).apply(params, ids)
    want = quant.qat(model, bits=8).apply(params, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("call, message", [
    (lambda: quant.quantize(PARAMS, bits=2), "quant.quantize: bits must be 4 or 8, got 2"),
    (lambda: quant.quantize(PARAMS, granularity="row"), "granularity must be one of"),
    (lambda: quant.quantize({"table": {"w": jnp.arange(6).reshape(2, 3)}}),
     "key path 'table/w' holds int32 values; only floating-point leaves can be quantized"),
    (lambda: quant.calibrate(lambda p, b: MODEL.apply(p, b), quant.quantize(PARAMS), []),
     "batches yielded nothing"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        call()


def test_dynamic_activations_quantize_each_row_at_run_time():
    q = quant.quantize(PARAMS, activations="dynamic")
    w = q["dense_0"]["w"]
    xs = np.asarray(X, np.float64)
    row = np.abs(xs).max(axis=1, keepdims=True) / 127  # reference: one scale per row
    want = (np.clip(np.round(xs / row), -127, 127) @ np.asarray(w.integers(), np.float64)
            * row * np.asarray(w.scale, np.float64).reshape(-1)
            + np.asarray(PARAMS["dense_0"]["b"], np.float64))
    got = jax.jit(nn.dense(32, name="dense_0").apply)(q["dense_0"], X)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert _int8_dot(jax.jit(MODEL.apply).lower(q, X).as_text())
    with pytest.raises(ValueError, match="activations must be None or 'dynamic'"):
        quant.quantize(PARAMS, activations="static")
    # a NaN row stays NaN (its scale was taken as 1: a finite, wrong row), the others not
    bad = jnp.asarray(np.asarray(X).copy()).at[2, 3].set(jnp.nan)
    out = np.asarray(jax.jit(nn.dense(32, name="dense_0").apply)(q["dense_0"], bad))
    assert np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()


def test_calibrate_refuses_kernels_that_share_a_name():
    """Parts quantized in separate calls repeat their key paths ('dense_0/w' in each): their
    inputs would be recorded, and scaled, together."""
    parts = {"enc": quant.quantize(PARAMS), "dec": quant.quantize(PARAMS)}
    with pytest.raises(ValueError, match=r"several quantized kernels are named "
                                         r"\['dense_0/w', 'dense_1/w'\]"):
        quant.calibrate(lambda p, b: MODEL.apply(p["enc"], b), parts, [X])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_calibrate_refuses_non_finite_inputs(bad):
    # one NaN in the batches made act_scale NaN, and every later output NaN, for any input
    batch = np.array(X)
    batch[0, 1] = bad
    with pytest.raises(ValueError, match=r"the input of 'dense_0/w' holds 1 non-finite "
                                         r"value\(s\) \(nan/inf\)"):
        quant.calibrate(lambda p, b: MODEL.apply(p, b), quant.quantize(PARAMS), [X, batch])
