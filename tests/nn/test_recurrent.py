"""lstm and gru against a float64 numpy loop and torch, gradients against finite
differences, shape errors, jit and a batch size that is not baked in."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain.nn import ModuleError
from funtrain.nn import recurrent as R
from funtrain.nn.recurrent import gru, lstm

B, T, F, H = 2, 5, 3, 8  # the docstrings' shapes, so init compiles once per layer
LAYERS = {"lstm": lstm, "gru": gru}


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _np_params(kind, f, h, seed):
    """Random float64 params laid out as torch's weights transposed (gates on the last axis)."""
    g = {"lstm": 4, "gru": 3}[kind]
    rng = np.random.default_rng(seed)
    return {"w_ih": rng.uniform(-0.7, 0.7, (f, g * h)), "w_hh": rng.uniform(-0.7, 0.7, (h, g * h)),
            "b_ih": rng.uniform(-0.5, 0.5, (g * h,)), "b_hh": rng.uniform(-0.5, 0.5, (g * h,))}


def _gate(p, name, idx, h):
    """Gate ``idx``'s slice of param ``name``: the PyTorch ``W_i?``/``W_h?``/``b_i?``/``b_h?``."""
    return p[name][..., idx * h:(idx + 1) * h]


def np_lstm(p, x, h0, c0, reverse=False):
    """PyTorch's LSTM equations, one explicit step per time index, float64."""
    hid = p["w_hh"].shape[0]
    W = {(s, g): _gate(p, f"w_{s}", k, hid) for s in ("ih", "hh")
         for k, g in enumerate("ifgo")}
    b = {(s, g): _gate(p, f"b_{s}", k, hid) for s in ("ih", "hh")
         for k, g in enumerate("ifgo")}
    h, c = h0.copy(), c0.copy()
    out = np.zeros((x.shape[0], x.shape[1], hid))
    order = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in order:
        xt = x[:, t]

        def pre(g, xt=xt, h=h):
            return xt @ W["ih", g] + b["ih", g] + h @ W["hh", g] + b["hh", g]

        i, f, g, o = _sigmoid(pre("i")), _sigmoid(pre("f")), np.tanh(pre("g")), _sigmoid(pre("o"))
        c = f * c + i * g
        h = o * np.tanh(c)
        out[:, t] = h
    return out, (h, c)


def np_gru(p, x, h0, reverse=False):
    """PyTorch's GRU equations, one explicit step per time index, float64."""
    hid = p["w_hh"].shape[0]
    W_ir, W_iz, W_in = (_gate(p, "w_ih", k, hid) for k in range(3))
    W_hr, W_hz, W_hn = (_gate(p, "w_hh", k, hid) for k in range(3))
    b_ir, b_iz, b_in = (_gate(p, "b_ih", k, hid) for k in range(3))
    b_hr, b_hz, b_hn = (_gate(p, "b_hh", k, hid) for k in range(3))
    h = h0.copy()
    out = np.zeros((x.shape[0], x.shape[1], hid))
    order = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in order:
        xt = x[:, t]
        r = _sigmoid(xt @ W_ir + b_ir + h @ W_hr + b_hr)
        z = _sigmoid(xt @ W_iz + b_iz + h @ W_hz + b_hz)
        n = np.tanh(xt @ W_in + b_in + r * (h @ W_hn + b_hn))
        h = (1.0 - z) * n + z * h
        out[:, t] = h
    return out, h


# --------------------------------------------------------------------------- numpy reference


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_carry", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_float64_numpy_loop(kind, with_carry, reverse):
    rng = np.random.default_rng(1)
    p = _np_params(kind, F, H, seed=2)
    x = rng.standard_normal((B, T, F))
    h0 = rng.standard_normal((B, H)) if with_carry else np.zeros((B, H))
    c0 = rng.standard_normal((B, H)) if with_carry else np.zeros((B, H))
    layer = LAYERS[kind](H, return_state=True, reverse=reverse)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}
        xj = jnp.asarray(x, jnp.float64)
        if kind == "lstm":
            carry = (jnp.asarray(h0), jnp.asarray(c0)) if with_carry else None
            out, (h, c) = layer.apply(params, xj, carry) if with_carry else layer.apply(params, xj)
            ref_out, (ref_h, ref_c) = np_lstm(p, x, h0, c0, reverse)
            np.testing.assert_allclose(np.asarray(c), ref_c, rtol=0, atol=1e-10)
            assert c.dtype == jnp.float64
        else:
            carry = jnp.asarray(h0) if with_carry else None
            out, h = layer.apply(params, xj, carry) if with_carry else layer.apply(params, xj)
            ref_out, ref_h = np_gru(p, x, h0, reverse)
        assert out.dtype == jnp.float64 and out.shape == (B, T, H)
        np.testing.assert_allclose(np.asarray(out), ref_out, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(h), ref_h, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- torch


def _torch_params(mod, suffix=""):
    return {
        "w_ih": jnp.asarray(getattr(mod, f"weight_ih_l0{suffix}").detach().numpy().T),
        "w_hh": jnp.asarray(getattr(mod, f"weight_hh_l0{suffix}").detach().numpy().T),
        "b_ih": jnp.asarray(getattr(mod, f"bias_ih_l0{suffix}").detach().numpy()),
        "b_hh": jnp.asarray(getattr(mod, f"bias_hh_l0{suffix}").detach().numpy()),
    }


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_torch(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    # Bidirectional: the forward direction checks reverse=False, the backward one reverse=True.
    mod = cls(F, H, batch_first=True, bidirectional=True)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, T, F)).astype(np.float32)
    h0 = rng.standard_normal((2, B, H)).astype(np.float32)
    c0 = rng.standard_normal((2, B, H)).astype(np.float32)
    with torch.no_grad():
        if kind == "lstm":
            ref, (ref_h, ref_c) = mod(torch.from_numpy(x), (torch.from_numpy(h0),
                                                            torch.from_numpy(c0)))
        else:
            ref, ref_h = mod(torch.from_numpy(x), torch.from_numpy(h0))
    ref = ref.numpy()
    for d, (suffix, reverse) in enumerate((("", False), ("_reverse", True))):
        layer = LAYERS[kind](H, return_state=True, reverse=reverse)
        params = _torch_params(mod, suffix)
        carry = (h0[d], c0[d]) if kind == "lstm" else h0[d]
        out, state = layer.apply(params, jnp.asarray(x), carry)
        np.testing.assert_allclose(out, ref[..., d * H:(d + 1) * H], rtol=1e-5, atol=1e-5)
        h = state[0] if kind == "lstm" else state
        np.testing.assert_allclose(h, ref_h[d].numpy(), rtol=1e-5, atol=1e-5)
        if kind == "lstm":
            np.testing.assert_allclose(state[1], ref_c[d].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_default_init_is_pytorchs(kind):
    params = LAYERS[kind](H).init(jax.random.key(0), jnp.zeros((1, T, F)))
    g = {"lstm": 4, "gru": 3}[kind]
    shapes = {"w_ih": (F, g * H), "w_hh": (H, g * H), "b_ih": (g * H,), "b_hh": (g * H,)}
    assert {k: v.shape for k, v in params.items()} == shapes
    for v in params.values():
        assert v.dtype == jnp.float32
        v = np.asarray(v)
        assert np.max(np.abs(v)) <= 1.0 / np.sqrt(H)
        assert np.std(v) > 0.2 / np.sqrt(H)  # spread over the range, not constant
    assert not np.allclose(params["b_ih"], params["b_hh"])  # independent draws


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind,reverse", [("lstm", False), ("gru", True)])
def test_grads_match_finite_differences(kind, reverse):
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        layer = LAYERS[kind](H, return_state=True, reverse=reverse)
        # float64 numpy throughout: only the jitted loss and grad compile
        params = _np_params(kind, F, H, 7)
        x = rng.standard_normal((B, T, F))
        n_carry = 2 if kind == "lstm" else 1
        carry = tuple(rng.standard_normal((B, H)) for _ in range(n_carry))
        w_out = rng.standard_normal((B, T, H))
        w_carry = [rng.standard_normal((B, H)) for _ in range(n_carry)]

        def loss(args):
            p, xx, cc = args
            out, state = layer.apply(p, xx, cc if kind == "lstm" else cc[0])
            state = state if kind == "lstm" else (state,)
            return jnp.sum(out * w_out) + sum(jnp.sum(s * w) for s, w in
                                              zip(state, w_carry, strict=True))

        args = (params, x, carry)
        grad = jax.jit(jax.grad(loss))(args)
        leaves, treedef = jax.tree.flatten(args)
        direction = jax.tree.unflatten(
            treedef, [rng.standard_normal(v.shape) for v in leaves])
        eps = 1e-5

        def shifted(s):
            return jax.tree.map(lambda a, d: a + s * d, args, direction)

        loss_jit = jax.jit(loss)
        fd = (float(loss_jit(shifted(eps))) - float(loss_jit(shifted(-eps)))) / (2 * eps)
        analytic = sum(float(np.vdot(g, d)) for g, d in
                       zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True))
        assert abs(fd - analytic) <= 1e-6 * abs(analytic), (fd, analytic)
        # Every input gets a gradient.
        for g in jax.tree.leaves(grad):
            assert np.max(np.abs(np.asarray(g))) > 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_errors(kind):
    make = LAYERS[kind]
    layer = make(H)
    params = layer.init(jax.random.key(0), jnp.zeros((1, T, F)))
    g = {"lstm": 4, "gru": 3}[kind]
    with pytest.raises(ModuleError, match=rf"{kind} layer.*\(batch, time, features\).*"
                                          r"shape \(2, 3\) \(rank 2\)"):
        layer.apply(params, jnp.zeros((2, F)))
    with pytest.raises(ModuleError, match=r"\(batch, time, features\).*rank 2"):
        layer.init(jax.random.key(0), jnp.zeros((2, F)))
    with pytest.raises(ModuleError, match=rf"{kind} layer.*expected an input with 3 features.*"
                                          rf"w_ih has shape \(3, {g * H}\).*\(2, 5, 7\)"):
        layer.apply(params, jnp.zeros((2, T, 7)))
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match=rf"{kind}: hidden_size must be a positive int, "
                                             rf"got {bad!r}"):
            make(bad)
    with pytest.raises(ModuleError, match=r"missing key path\(s\) 'b_hh'"):
        layer.apply({k: v for k, v in params.items() if k != "b_hh"}, jnp.zeros((2, T, F)))
    # Params for another hidden size.
    with pytest.raises(ModuleError, match=rf"'w_hh' has shape \(5, {g * 5}\), expected "
                                          rf".* = \({H}, {g * H}\) for hidden_size {H}"):
        layer.apply(_np_params(kind, F, 5, 0), jnp.zeros((2, T, F)))
    # A carry of the wrong batch or hidden size.
    bad_h = jnp.zeros((3, H))
    carry = (bad_h, jnp.zeros((2, H))) if kind == "lstm" else bad_h
    with pytest.raises(ModuleError, match=rf"initial carry h has shape \(3, {H}\), expected "
                                          rf"\(batch, hidden\) = \(2, {H}\)"):
        layer.apply(params, jnp.zeros((2, T, F)), carry)


def test_lstm_carry_must_be_a_pair():
    layer = lstm(H)
    params = layer.init(jax.random.key(0), jnp.zeros((1, T, F)))
    with pytest.raises(ModuleError, match=r"carry \(h, c\) as a pair.*got a single array of "
                                          r"shape \(2, 8\)"):
        layer.apply(params, jnp.zeros((2, T, F)), jnp.zeros((2, H)))
    with pytest.raises(ModuleError, match=r"got a tuple of length 3"):
        layer.apply(params, jnp.zeros((2, T, F)), (jnp.zeros((2, H)),) * 3)
    with pytest.raises(ModuleError, match=r"initial carry c has shape \(2, 5\)"):
        layer.apply(params, jnp.zeros((2, T, F)), (jnp.zeros((2, H)), jnp.zeros((2, 5))))


def test_gru_carry_given_as_a_tuple_is_named():
    layer = gru(H)
    params = layer.init(jax.random.key(0), jnp.zeros((1, T, F)))
    with pytest.raises(ModuleError, match=rf"initial carry h must be an array of shape "
                                          rf"\(batch, hidden\) = \(2, {H}\), got a tuple"):
        layer.apply(params, jnp.zeros((2, T, F)), (jnp.zeros((2, H)),))


# --------------------------------------------------------------------------- jit, shapes


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_jit_and_batch_not_baked_in(kind):
    layer = LAYERS[kind](H, return_state=True)
    params = layer.init(jax.random.key(0), jax.ShapeDtypeStruct((1, T, F), jnp.float32))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 6, F)), jnp.float32)
    apply = jax.jit(layer.apply)
    out, state = apply(params, x)
    assert out.shape == (3, 6, H)
    assert all(s.shape == (3, H) for s in jax.tree.leaves(state))
    # Two halves, the second started from the first's final carry, give the same run.
    out_a, state_a = apply(params, x[:, :3])
    out_b, state_b = apply(params, x[:, 3:], state_a)
    np.testing.assert_allclose(jnp.concatenate([out_a, out_b], axis=1), out, rtol=1e-5,
                               atol=1e-6)
    for s1, s2 in zip(jax.tree.leaves(state_b), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_program_size_does_not_grow_with_time(kind):
    layer = LAYERS[kind](H)
    params = layer.init(jax.random.key(0), jnp.zeros((1, T, F)))

    def n_eqns(t):
        jaxpr = jax.make_jaxpr(layer.apply)(params, jnp.zeros((2, t, F)))
        return len(jaxpr.jaxpr.eqns), "scan" in str(jaxpr)

    assert n_eqns(3) == n_eqns(200)
    assert n_eqns(3)[1]


def test_dtypes():
    layer = lstm(H, param_dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), jnp.zeros((1, T, F), jnp.bfloat16))
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    assert layer.apply(params, jnp.ones((2, T, F), jnp.bfloat16)).dtype == jnp.bfloat16
    # float32 input promotes the computation (and the zero carry) to float32.
    assert layer.apply(params, jnp.ones((2, T, F), jnp.float32)).dtype == jnp.float32


def test_empty_sequence():
    out, (h, c) = lstm(H, return_state=True).apply(
        lstm(H).init(jax.random.key(0), jnp.zeros((1, T, F))), jnp.zeros((2, 0, F)))
    assert out.shape == (2, 0, H) and h.shape == (2, H)
    np.testing.assert_array_equal(c, 0)


def test_docstring_examples():
    result = doctest.testmod(R, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
