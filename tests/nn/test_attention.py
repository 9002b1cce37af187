"""Attention: jax.nn.dot_product_attention and funtrain's path agree; masks; dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn

# numpy data: an eager jax.random draw compiles threefry for its shape
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
PAD = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)


def _reference(params, x, mask=None, causal=False, heads=2):
    """float64 numpy attention written from the formula, with a key padding mask."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)
    b, t, d = xs.shape
    dh = d // heads
    proj = {k: xs @ p[k]["w"] + p[k]["b"] for k in ("query", "key", "value")}
    out = np.zeros_like(xs)
    keep = np.ones((b, t, t), bool)
    if causal:
        keep &= np.tril(np.ones((t, t), bool))
    if mask is not None:
        keep &= np.asarray(mask)[:, None, :]
    for h in range(heads):
        sl = slice(dh * h, dh * (h + 1))
        q, k, v = (proj[n][..., sl] for n in ("query", "key", "value"))
        logits = np.where(keep, q @ k.transpose(0, 2, 1) / np.sqrt(dh), -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out[..., sl] = (w / w.sum(-1, keepdims=True)) @ v
    return out @ p["out"]["w"] + p["out"]["b"]


@pytest.mark.parametrize("implementation", [None, "xla", "funtrain"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_every_implementation_matches_the_reference(implementation, causal, masked):
    layer = nn.multi_head_attention(2, causal=causal, implementation=implementation)
    params = layer.init(jax.random.key(1), X)
    mask = PAD if masked else None
    out = jax.jit(layer.apply)(params, X, mask)
    np.testing.assert_allclose(out, _reference(params, X, mask, causal), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pad", ["right", "left"])
def test_implementations_agree_on_gradients(pad):
    """Left padding with a causal mask leaves query rows that see no key: their output is a
    constant, so no gradient may flow from it (funtrain's softmax once sent one back)."""
    mask = PAD if pad == "right" else PAD[:, ::-1]

    def loss(impl, p, x):
        layer = nn.multi_head_attention(2, causal=True, implementation=impl)
        return jnp.sum(layer.apply(p, x, mask) ** 2)

    params = nn.multi_head_attention(2).init(jax.random.key(1), X)
    g_xla = jax.jit(jax.grad(lambda p, x: loss("xla", p, x), argnums=(0, 1)))(params, X)
    g_ft = jax.jit(jax.grad(lambda p, x: loss("funtrain", p, x), argnums=(0, 1)))(params, X)
    for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_ft), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_full_broadcastable_mask_and_integer_mask():
    layer = nn.multi_head_attention(2)
    params = layer.init(jax.random.key(1), X)
    pad = np.asarray(PAD)
    full = np.broadcast_to(pad[:, None, None, :], (2, 2, 5, 5))
    np.testing.assert_allclose(layer.apply(params, X, full), layer.apply(params, X, PAD),
                               rtol=1e-6)
    np.testing.assert_allclose(layer.apply(params, X, pad.astype(np.int32)),
                               layer.apply(params, X, PAD), rtol=1e-6)


def test_padded_keys_do_not_change_the_real_positions():
    """Changing what sits at padded positions leaves every output that cannot see it."""
    layer = nn.multi_head_attention(2)
    params = layer.init(jax.random.key(1), X)
    x2 = np.asarray(X).copy()
    x2[0, 3:] = 100.0
    a, b = layer.apply(params, X, PAD), layer.apply(params, x2, PAD)
    np.testing.assert_allclose(a[0, :3], b[0, :3], rtol=1e-5, atol=1e-6)


def test_attention_dropout_is_keyed_and_off_in_eval():
    layer = nn.multi_head_attention(2, dropout=0.5)
    params = layer.init(jax.random.key(1), X)
    base = layer.apply(params, X)
    np.testing.assert_allclose(base, nn.multi_head_attention(2).apply(params, X), rtol=1e-6)
    a = layer.apply(params, X, key=jax.random.key(2), train=True)
    b = layer.apply(params, X, key=jax.random.key(2), train=True)
    c = layer.apply(params, X, key=jax.random.key(3), train=True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, base) and not np.allclose(a, c)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        layer.apply(params, X, train=True)
    with pytest.raises(ValueError, match="implementation='xla' has no attention dropout"):
        nn.multi_head_attention(2, dropout=0.5, implementation="xla").apply(
            params, X, key=jax.random.key(2), train=True)


def test_transformer_block_dropout_in_train_mode_only():
    block = nn.transformer_block(8, 2, dropout=0.3)
    params = block.init(jax.random.key(0), X)
    plain = nn.transformer_block(8, 2).apply(params, X)
    np.testing.assert_allclose(block.apply(params, X), plain, rtol=1e-6)
    dropped = block.apply(params, X, key=jax.random.key(1), train=True)
    assert not np.allclose(dropped, plain)


def test_mask_errors():
    layer = nn.multi_head_attention(2)
    params = layer.init(jax.random.key(1), X)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, seq\) = \(2, 5\)"):
        layer.apply(params, X, jnp.ones((2, 4), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        layer.apply(params, X, jnp.ones((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="implementation must be None, 'xla', 'cudnn'"):
        nn.multi_head_attention(2, implementation="flash")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        nn.multi_head_attention(2, dropout=1.0)


def test_padding_mask_through_transformer_block_and_gpt():
    block = nn.transformer_block(8, 2, causal=False)
    params = block.init(jax.random.key(0), X)
    x2 = np.asarray(X).copy()
    x2[0, 3:] = 50.0
    a, b = block.apply(params, X, PAD), block.apply(params, x2, PAD)
    np.testing.assert_allclose(a[0, :3], b[0, :3], rtol=1e-5, atol=1e-5)
    assert not np.allclose(block.apply(params, X)[0, :3], block.apply(params, x2)[0, :3])
    model = nn.models.gpt(32, 8, 2, 2, 16)
    ids = np.random.default_rng(2).integers(0, 32, (2, 8)).astype(np.int32)
    gp = model.init(jax.random.key(3), ids)
    left_pad = np.array([[0, 0] + [1] * 6, [1] * 8], bool)
    changed = ids.copy()
    changed[0, :2] = 5
    apply = jax.jit(model.apply)  # one compile for both calls
    l1 = apply(gp, ids, left_pad)
    l2 = apply(gp, changed, left_pad)
    np.testing.assert_allclose(l1[0, 2:], l2[0, 2:], rtol=1e-5, atol=1e-5)


def test_default_kernel_follows_the_projections_dtype(monkeypatch):
    """On a GPU the default picks cuDNN's fused kernel only for half-precision q/k/v. bf16
    inputs with float32 weights give float32 projections, which cuDNN refuses ("Q must be
    fp16/bf16"), so they take funtrain's path (seen on an H200 with jax 0.11)."""
    import funtrain.nn.layers as layers

    chosen = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kw):
        chosen.append(implementation)
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(layers.jax.nn, "dot_product_attention", spy)
    layer = nn.multi_head_attention(2, causal=True)
    x16 = jnp.zeros((2, 8, 16), jnp.bfloat16)
    params = layer.init(jax.random.key(0), x16)  # float32 weights
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32))))
    grad(params, x16)
    assert chosen == []  # float32 q: funtrain's path
    grad(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), x16)
    assert chosen == ["cudnn"]  # bf16 q: the fused kernel
