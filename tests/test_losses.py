"""funtrain.losses against float64 numpy references, plus dtypes, masks, errors and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funtrain import data, losses
from tests.reference import losses as ref

N, C = 6, 5
RTOL, ATOL = 1e-5, 1e-6
RNG = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def int_labels(n=N, c=C):
    return RNG.integers(0, c, size=n).astype(np.int32)


def soft_labels(n=N, c=C):
    p = RNG.random((n, c))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def random_mask(shape):
    m = RNG.random(shape) < 0.6
    m.flat[0] = True  # keep at least one entry
    return m


def close(actual, expected, rtol=RTOL, atol=ATOL):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32, actual.dtype
    assert actual.shape == np.shape(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# Every loss as (funtrain fn, reference fn, inputs factory, per-example shape).
def _ce_int():
    return randn(N, C), int_labels()


def _ce_soft():
    return randn(N, C), soft_labels()


def _bce():
    return randn(N, C, scale=3.0), (RNG.random((N, C)) < 0.5).astype(np.float32)


def _reg():
    return randn(N, C, scale=2.0), randn(N, C, scale=2.0)


LOSSES = {
    "ce_int": (losses.softmax_cross_entropy, ref.softmax_cross_entropy, _ce_int, (N,)),
    "ce_soft": (losses.softmax_cross_entropy, ref.softmax_cross_entropy, _ce_soft, (N,)),
    "bce": (losses.binary_cross_entropy, ref.binary_cross_entropy, _bce, (N, C)),
    "mse": (losses.mse, ref.mse, _reg, (N, C)),
    "l1": (losses.l1, ref.l1, _reg, (N, C)),
    "huber": (losses.huber, ref.huber, _reg, (N, C)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_reference(name, reduction):
    fn, ref_fn, make, _ = LOSSES[name]
    a, b = make()
    close(fn(a, b, reduction=reduction), ref_fn(a, b, reduction=reduction))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_reference_with_mask(name, reduction):
    fn, ref_fn, make, shape = LOSSES[name]
    a, b = make()
    for mask in (random_mask(shape), random_mask(shape[-1:]), random_mask(shape).astype(np.int32)):
        close(fn(a, b, reduction=reduction, mask=mask),
              ref_fn(a, b, reduction=reduction, mask=mask))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_false_mask_gives_zero(name):
    fn, _, make, shape = LOSSES[name]
    a, b = make()
    mask = np.zeros(shape, bool)
    assert float(fn(a, b, mask=mask)) == 0.0
    assert float(fn(a, b, reduction="sum", mask=mask)) == 0.0
    none = fn(a, b, reduction="none", mask=mask)
    assert none.shape == shape and not np.any(np.asarray(none))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mask_that_does_not_broadcast_names_both_shapes(name):
    fn, _, make, shape = LOSSES[name]
    a, b = make()
    bad = np.ones((4,), bool)
    msg = re.escape(f"mask of shape (4,) does not broadcast to the per-example loss shape {shape}")
    with pytest.raises(ValueError, match=msg):
        fn(a, b, mask=bad)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_reduction_name(name):
    fn, _, make, _ = LOSSES[name]
    a, b = make()
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        fn(a, b, reduction="avg")


def test_reduce_directly():
    v = RNG.random((3, 4)).astype(np.float32)
    m = random_mask((3, 4))
    for reduction in ("mean", "sum", "none"):
        close(losses.reduce(jnp.asarray(v), reduction, m), ref.reduce(v, reduction, m))
    close(losses.reduce(jnp.asarray(v)), v.astype(np.float64).mean())
    with pytest.raises(ValueError, match=r"^myloss: reduction must be one of"):
        losses.reduce(jnp.asarray(v), "max", where="myloss")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_reduce_counts_past_what_half_precision_can(dtype):
    """70,000 entries: float16 cannot count them (65504 is its largest) and bfloat16 counts
    in steps of 256 there; the mean must still be the mean."""
    v = jnp.full(70_000, 0.1, dtype)
    for mask in (None, jnp.ones(70_000, bool)):
        mean = losses.reduce(v, "mean", mask)
        assert mean.dtype == dtype
        np.testing.assert_allclose(float(mean), float(v[0]), rtol=1e-2)


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 0.99])
def test_cross_entropy_label_smoothing_matches_reference(eps):
    logits, labels = randn(N, C), int_labels()
    soft = soft_labels()
    for lab in (labels, soft):
        close(losses.softmax_cross_entropy(logits, lab, label_smoothing=eps, reduction="none"),
              ref.softmax_cross_entropy(logits, lab, label_smoothing=eps, reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_int_labels_equals_one_hot(eps, reduction):
    logits, labels = randn(N, C), int_labels()
    one_hot = np.eye(C, dtype=np.float32)[labels]
    mask = random_mask((N,))
    a = losses.softmax_cross_entropy(logits, labels, label_smoothing=eps, reduction=reduction,
                                     mask=mask)
    b = losses.softmax_cross_entropy(logits, one_hot, label_smoothing=eps, reduction=reduction,
                                     mask=mask)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_cross_entropy_batched_leading_axes():
    logits, labels = randn(2, 3, C), RNG.integers(0, C, size=(2, 3)).astype(np.int32)
    out = losses.softmax_cross_entropy(logits, labels, reduction="none")
    close(out, ref.softmax_cross_entropy(logits, labels, reduction="none"))
    assert out.shape == (2, 3)


def test_cross_entropy_docstring_value():
    out = losses.softmax_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))
    np.testing.assert_allclose(out, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_huge_logits_finite_and_exact(scale, eps):
    logits = randn(N, C, scale=scale)
    labels = int_labels()
    logits[0] = [scale, -scale, 0.0, scale, -scale]  # exact ties and extremes
    for lab in (labels, np.eye(C, dtype=np.float32)[labels], soft_labels()):
        out = losses.softmax_cross_entropy(logits, lab, label_smoothing=eps, reduction="none")
        assert np.all(np.isfinite(out))
        close(out, ref.softmax_cross_entropy(logits, lab, label_smoothing=eps, reduction="none"))


def test_cross_entropy_near_float32_max_int_labels():
    """±3e38 are finite float32 logits; with the label on the max the loss is exactly 0."""
    logits = np.array([[3e38, -3e38, 0.0], [-3e38, 0.0, 3e38]], np.float32)
    labels = np.array([0, 2], np.int32)
    out = losses.softmax_cross_entropy(logits, labels, reduction="none")
    close(out, ref.softmax_cross_entropy(logits, labels, reduction="none"))
    assert float(losses.softmax_cross_entropy(logits, labels)) == 0.0


def test_cross_entropy_near_float32_max_one_hot_labels():
    logits = np.array([[3e38, -3e38, 0.0]], np.float32)
    one_hot = np.array([[1.0, 0.0, 0.0]], np.float32)
    out = losses.softmax_cross_entropy(logits, one_hot, reduction="none")
    assert np.all(np.isfinite(out))
    close(out, ref.softmax_cross_entropy(logits, one_hot, reduction="none"))


def test_cross_entropy_gradient_in_the_targets_is_minus_log_softmax():
    """d CE / d q = -log softmax(z), also where a target is 0 (distillation through a
    trainable teacher); a where around q * log p had made it 0 there."""
    with jax.enable_x64(True):
        logits = jnp.asarray(RNG.standard_normal((3, C)))
        q = jnp.asarray(np.eye(C)[[0, 2, 1]] * 0.5 + np.eye(C)[[1, 1, 2]] * 0.5)  # zeros too
        g = jax.jit(jax.grad(lambda t: losses.softmax_cross_entropy(logits, t,
                                                                    reduction="sum")))(q)
        np.testing.assert_allclose(g, -np.asarray(jax.nn.log_softmax(logits)), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_narrow_integer_labels_are_compared_with_the_class_count_exactly(dtype):
    """uint8 labels of a byte-level model (256 classes): compared with C in uint8, C wrapped
    to 0 and every label counted as out of range (NaN)."""
    classes = 256 if dtype == np.uint8 else 200
    labels = np.array([0, 3, 100, 127], dtype)
    logits = np.zeros((4, classes), np.float32)
    out = losses.softmax_cross_entropy(logits, labels, reduction="none")
    np.testing.assert_allclose(np.asarray(out), np.log(classes), rtol=1e-6)
    assert int(losses.invalid_labels(logits, labels)) == 0


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_gradient_is_softmax_minus_target(eps):
    """d CE / d logits = softmax(z) - q, checked in float64."""
    with jax.enable_x64(True):
        logits = jnp.asarray(RNG.standard_normal((N, C)))
        labels = int_labels()
        expected = ref.softmax(logits) - ref.smoothed_targets(labels, C, eps)

        def grad(lab, reduction):
            return jax.grad(lambda z: losses.softmax_cross_entropy(
                z, lab, label_smoothing=eps, reduction=reduction))(logits)

        g_sum = grad(labels, "sum")
        assert g_sum.dtype == jnp.float64
        np.testing.assert_allclose(g_sum, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad(labels, "mean"), expected / N, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad(np.eye(C)[labels], "sum"), expected,
                                   rtol=1e-12, atol=1e-12)


def test_cross_entropy_hessian_is_diag_p_minus_p_p_transposed():
    """Second order (forward over reverse) and forward mode, in float64."""
    with jax.enable_x64(True):
        z = jnp.asarray(RNG.standard_normal(C))
        h = jax.hessian(lambda z: losses.softmax_cross_entropy(z[None], jnp.array([1])))(z)
        p = ref.softmax(np.asarray(z)[None])[0]
        np.testing.assert_allclose(h, np.diag(p) - np.outer(p, p), rtol=1e-12, atol=1e-14)
        t = jnp.asarray(RNG.standard_normal(C))
        _, dt = jax.jvp(lambda z: losses.softmax_cross_entropy(z[None], jnp.array([1])),
                        (z,), (t,))
        np.testing.assert_allclose(dt, np.dot(p - np.eye(C)[1], t), rtol=1e-12)


def test_cross_entropy_gradient_float32():
    logits, labels = randn(N, C), int_labels()
    g = jax.grad(lambda z: losses.softmax_cross_entropy(z, labels, reduction="sum"))(logits)
    assert g.dtype == jnp.float32
    close(g, ref.softmax(logits) - ref.one_hot(labels, C))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(2, 8), const=st.floats(-1e3, 1e3),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 10.0, 1e3]))
def test_cross_entropy_properties(n, c, const, seed, scale):
    """CE >= 0; constant logits give log C regardless of the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n).astype(np.int32)
    logits = (scale * rng.standard_normal((n, c))).astype(np.float32)
    out = np.asarray(losses.softmax_cross_entropy(logits, labels, reduction="none"))
    assert np.all(out >= 0) and np.all(np.isfinite(out))
    uniform = np.full((n, c), const, np.float32)
    out = losses.softmax_cross_entropy(uniform, labels, reduction="none")
    np.testing.assert_allclose(out, np.full(n, np.log(c)), rtol=1e-5)


# ----------------------------------------------------------------------------- BCE, regression


def test_bce_soft_labels_and_huge_logits():
    z = np.array([[1e30, -1e30, 1e4, -1e4, 0.0], [3e38, -3e38, 50.0, -50.0, 1e-3]], np.float32)
    for y in (np.ones_like(z), np.zeros_like(z), np.full_like(z, 0.3)):
        out = losses.binary_cross_entropy(z, y, reduction="none")
        assert np.all(np.isfinite(out))
        close(out, ref.binary_cross_entropy(z, y, reduction="none"))


def test_bce_and_l1_gradients_at_the_kink():
    """BCE's gradient is sigmoid(z) - y at z = 0 too (a zero-initialised head starts
    there); L1's is 0 where p == t, as in PyTorch, and sign(p - t) elsewhere."""
    z = jnp.asarray([0.0, 0.0, 2.0, -3.0])
    y = jnp.asarray([0.0, 1.0, 0.3, 1.0])
    got = jax.jit(jax.grad(lambda z: losses.binary_cross_entropy(z, y, reduction="sum")))(z)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.asarray(z))) - np.asarray(y),
                               rtol=1e-6)
    p, t = jnp.asarray([1.0, 2.0, -1.0]), jnp.asarray([1.0, 0.5, 0.0])
    got = jax.jit(jax.grad(lambda p: losses.l1(p, t, reduction="sum")))(p)
    np.testing.assert_array_equal(got, [0.0, 1.0, -1.0])


def test_bce_at_zero_is_log2():
    out = losses.binary_cross_entropy(np.zeros(3, np.float32), np.array([0.0, 1.0, 0.5]))
    np.testing.assert_allclose(out, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("delta", [0.1, 1.0, 2.5])
def test_huber_matches_reference_across_delta(delta):
    p = np.linspace(-4, 4, 33, dtype=np.float32)
    t = np.zeros_like(p)
    t[::2] = 0.5
    close(losses.huber(p, t, delta=delta, reduction="none"),
          ref.huber(p, t, delta=delta, reduction="none"))


def test_huber_at_delta_boundary_is_continuous():
    d = 1.5
    r = np.array([d - 1e-3, d, d + 1e-3], np.float32)
    out = np.asarray(losses.huber(r, np.zeros_like(r), delta=d, reduction="none"))
    np.testing.assert_allclose(out[1], 0.5 * d * d, rtol=1e-6)
    assert out[0] < out[1] < out[2]


# ----------------------------------------------------------------------------- dtypes


LOW_PRECISION = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_inputs_give_float32(name, dtype):
    fn, ref_fn, make, _ = LOSSES[name]
    a, b = make()
    a = jnp.asarray(a, dtype)
    if name != "ce_int":
        b = jnp.asarray(b, dtype)
    out = fn(a, b, reduction="none")
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    # the reference sees the same (rounded) half-precision values
    a64 = np.asarray(a.astype(jnp.float32), np.float64)
    b64 = np.asarray(b).astype(np.float64) if name != "ce_int" else np.asarray(b)
    close(out, ref_fn(a64, b64, reduction="none"))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_half_precision_large_values_stay_finite(dtype):
    """Values whose squares / differences overflow in half precision but not in float32."""
    big = jnp.asarray([[6e4, -6e4, 0.0]], dtype)
    out = losses.softmax_cross_entropy(big, jnp.array([1]))
    assert out.dtype == jnp.float32 and np.isfinite(out)
    close(out, ref.softmax_cross_entropy(np.asarray(big.astype(jnp.float32)), np.array([1])),
          rtol=1e-5)
    p, t = jnp.asarray([300.0, -300.0], dtype), jnp.asarray([-300.0, 300.0], dtype)
    out = losses.mse(p, t)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 360000.0, rtol=1e-6)


def test_integer_and_bool_regression_targets_are_promoted():
    p = np.array([0.5, 2.0, -1.0], np.float32)
    out = losses.mse(p, np.array([1, 2, 0], np.int32))
    assert out.dtype == jnp.float32
    close(out, ref.mse(p, np.array([1, 2, 0])))
    out = losses.binary_cross_entropy(p, np.array([True, False, True]))
    close(out, ref.binary_cross_entropy(p, np.array([1.0, 0.0, 1.0])))


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_and_top_k_match_reference():
    logits, labels = randn(20, 7), RNG.integers(0, 7, size=20).astype(np.int32)
    mask = random_mask((20,))
    close(losses.accuracy(logits, labels), ref.accuracy(logits, labels))
    close(losses.accuracy(logits, labels, mask=mask), ref.accuracy(logits, labels, mask=mask))
    for k in range(1, 8):
        close(losses.top_k_accuracy(logits, labels, k=k), ref.top_k_accuracy(logits, labels, k))
        close(losses.top_k_accuracy(logits, labels, k=k, mask=mask),
              ref.top_k_accuracy(logits, labels, k, mask=mask))
    assert float(losses.top_k_accuracy(logits, labels, k=7)) == 1.0


def test_accuracy_one_hot_labels_equal_int_labels():
    logits, labels = randn(N, C), int_labels()
    one_hot = np.eye(C, dtype=np.float32)[labels]
    assert float(losses.accuracy(logits, one_hot)) == float(losses.accuracy(logits, labels))
    assert (float(losses.top_k_accuracy(logits, one_hot, k=3))
            == float(losses.top_k_accuracy(logits, labels, k=3)))


def test_accuracy_known_values_and_ties():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    labels = np.array([1, 1, 0], np.int32)
    np.testing.assert_allclose(losses.accuracy(logits, labels), 2 / 3, rtol=1e-6)
    # all-tied row: the lower class index wins
    assert float(losses.accuracy(logits[2:], np.array([0]))) == 1.0
    assert float(losses.accuracy(logits[2:], np.array([2]))) == 0.0
    assert float(losses.top_k_accuracy(logits[2:], np.array([1]), k=2)) == 1.0
    assert float(losses.top_k_accuracy(logits[2:], np.array([2]), k=2)) == 0.0
    assert float(losses.accuracy(logits, labels, mask=np.zeros(3, bool))) == 0.0


@pytest.mark.parametrize("k", [0, -1, C + 1, 2.0, "2", None])
def test_top_k_out_of_range(k):
    with pytest.raises(ValueError, match=re.escape(f"k must be an int in [1, {C}]") + ".*got"):
        losses.top_k_accuracy(randn(N, C), int_labels(), k=k)


# ----------------------------------------------------------------------------- errors


def test_wrong_int_label_shape():
    msg = re.escape("integer labels must have shape (6,) (logits' shape without the class "
                    "axis), got (6, 1)")
    with pytest.raises(ValueError, match=msg):
        losses.softmax_cross_entropy(randn(N, C), int_labels()[:, None])
    with pytest.raises(ValueError, match=re.escape("got (5,)")):
        losses.accuracy(randn(N, C), int_labels(n=5))


def test_wrong_one_hot_label_shape():
    msg = re.escape("one-hot/probability labels must have the logits' shape (6, 5), got (6, 4)")
    with pytest.raises(ValueError, match=msg):
        losses.softmax_cross_entropy(randn(N, C), soft_labels(c=4))
    with pytest.raises(ValueError, match="integer class labels need an integer dtype"):
        losses.softmax_cross_entropy(randn(N, C), int_labels().astype(np.float32))


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5, float("nan")])
def test_label_smoothing_out_of_range(eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got"):
        losses.softmax_cross_entropy(randn(N, C), int_labels(), label_smoothing=eps)


@pytest.mark.parametrize("delta", [0.0, -1.0])
def test_huber_delta_must_be_positive(delta):
    with pytest.raises(ValueError, match=re.escape(f"huber: delta must be > 0, got {delta}")):
        losses.huber(randn(3), randn(3), delta=delta)


@pytest.mark.parametrize("fn", [losses.mse, losses.l1, losses.huber,
                                losses.binary_cross_entropy])
def test_mismatched_prediction_target_shapes(fn):
    msg = re.escape("predictions have shape (6, 5) but targets have shape (5, 6); they must match")
    with pytest.raises(ValueError, match=msg):
        fn(randn(6, 5), randn(5, 6))
    # broadcastable but different shapes are rejected too
    with pytest.raises(ValueError, match="they must match"):
        fn(randn(6, 5), randn(5))


def test_reference_cross_entropy_agrees_with_sklearn_log_loss():
    """Cross-check of the reference itself against an independent implementation."""
    log_loss = pytest.importorskip("sklearn.metrics").log_loss

    logits, labels = RNG.standard_normal((N, C)), int_labels()
    expected = log_loss(labels, ref.softmax(logits), labels=np.arange(C))
    np.testing.assert_allclose(ref.softmax_cross_entropy(logits, labels), expected, rtol=1e-12)


def test_top_k_accepts_numpy_ints_and_rejects_bools():
    logits = np.array([[0.1, 0.5, 0.2]], np.float32)
    assert float(losses.top_k_accuracy(logits, np.array([2]), k=np.int64(2))) == 1.0
    with pytest.raises(ValueError, match="k must be an int"):
        losses.top_k_accuracy(logits, np.array([2]), k=True)


def test_huber_rejects_nan_delta():
    with pytest.raises(ValueError, match="huber: delta must be > 0, got nan"):
        losses.huber(np.zeros(2), np.zeros(2), delta=float("nan"))


def test_integer_one_hot_labels():
    # check_batch accepts integer one-hot labels, so the losses take them too: an integer
    # array of the logits' own shape cannot be class ids (those lack the class axis)
    logits, ids = randn(N, C), int_labels()
    one_hot = np.eye(C, dtype=np.int32)[ids]
    data.check_batch({"x": logits, "y": one_hot}, num_classes=C)
    for fn in (losses.softmax_cross_entropy, losses.accuracy):
        np.testing.assert_allclose(fn(logits, one_hot), fn(logits, ids), rtol=1e-6)
    assert int(losses.invalid_labels(logits, one_hot)) == 0
    smoothed = losses.softmax_cross_entropy(logits, one_hot.astype(np.uint8), label_smoothing=0.1)
    np.testing.assert_allclose(smoothed, losses.softmax_cross_entropy(
        logits, ids, label_smoothing=0.1), rtol=1e-6)
    grad = jax.jit(jax.grad(losses.softmax_cross_entropy))(logits, one_hot)
    np.testing.assert_allclose(grad, jax.grad(losses.softmax_cross_entropy)(logits, ids),
                               rtol=1e-6, atol=1e-7)
    # a row that is not one-hot is NaN and counted, as an out-of-range class id
    bad, k = one_hot.copy(), np.asarray(ids)
    bad[1] *= 2
    bad[2, :] = 0
    bad[3, (k[3] + 1) % C] = 1
    bad[4, k[4]], bad[4, (k[4] + 1) % C] = -1, 2  # sums to 1
    per_example = np.asarray(losses.softmax_cross_entropy(logits, bad, reduction="none"))
    np.testing.assert_array_equal(np.isnan(per_example), [False, True, True, True, True, False])
    want = np.asarray(losses.softmax_cross_entropy(logits, ids, reduction="none"))
    np.testing.assert_allclose(per_example[[0, 5]], want[[0, 5]], rtol=1e-6)
    assert int(losses.invalid_labels(logits, bad)) == 4
