"""Layers: factories that return a ``Module``.

Every layer takes an optional ``name`` (the key its params live under in a parent
combinator; by default the parent numbers it, e.g. ``dense_0``). Layers with
parameters check their input shapes and their params dict, and their errors name
the layer's key path with the expected and actual shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from funtrain._typing import Array, Params, PRNGKey
from funtrain.nn import initializers as inits
from funtrain.nn.module import (
    Module,
    ModuleError,
    ModuleTypeError,
    _check_name,
    check_param_shape,
    check_params,
    check_rank,
)

Initializer = inits.Initializer


def _make(kind: str, init: Any, apply: Any, name: str | None) -> Module:
    if name is not None:
        _check_name(name, kind)
    return Module(init, apply, name, kind)


def _positive_int(value: Any, what: str, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{kind}: {what} must be a positive int, got {value!r}")
    return value


def _features_of(x: Any, kind: str) -> int:
    check_rank(x, None, kind, "an input of rank >= 1 with features on the last axis",
               min_rank=1)
    return int(x.shape[-1])


# --------------------------------------------------------------------------- dense


def dense(features: int, *, use_bias: bool = True, w_init: Initializer | None = None,
          b_init: Initializer | None = None, param_dtype: Any = jnp.float32,
          name: str | None = None) -> Module:
    """Affine map over the last axis: ``y = x @ w + b``.

    Args:
      features: output size.
      use_bias: whether to add ``b``.
      w_init: kernel initializer, default ``lecun_normal()``; ``w`` has shape ``(in, features)``.
      b_init: bias initializer, default ``zeros()``.
      param_dtype: dtype the params are stored in.
      name: key under which a parent stores the params.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = dense(3)
      >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> params["w"].shape, params["b"].shape
      ((4, 3), (3,))
    """
    kind = "dense"
    _positive_int(features, "features", kind)
    w_init = w_init or inits.lecun_normal()
    b_init = b_init or inits.zeros()
    keys = ("w", "b") if use_bias else ("w",)

    def init(key: PRNGKey, x: Any) -> Params:
        fan_in = _features_of(x, kind)
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (fan_in, features), param_dtype)}
        if use_bias:
            params["b"] = b_init(kb, (features,), param_dtype)
        return params

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_params(params, keys, kind)
        fan_in = _features_of(x, kind)
        w = params["w"]
        if w.ndim != 2 or w.shape[0] != fan_in:
            raise ModuleError(kind, f"expected an input with {w.shape[0]} features on the "
                              f"last axis (w has shape {tuple(w.shape)}), got input of shape "
                              f"{tuple(x.shape)}")
        y = jnp.matmul(x, w)
        if use_bias:
            check_param_shape(params, "b", (w.shape[1],), kind)
            y = y + params["b"]
        return y

    return _make(kind, init, apply, name)


# --------------------------------------------------------------------------- conv


def _tuple(value: int | Sequence[int], n: int, what: str, kind: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ModuleError(kind, f"{what} {value} has {len(value)} entries, but the input has "
                          f"{n} spatial dimension(s)")
    return value


def conv(features: int, kernel_size: int | Sequence[int], *, strides: int | Sequence[int] = 1,
         padding: str | Sequence[tuple[int, int]] = "SAME", dilation: int | Sequence[int] = 1,
         use_bias: bool = True, w_init: Initializer | None = None,
         b_init: Initializer | None = None, param_dtype: Any = jnp.float32,
         name: str | None = None) -> Module:
    """1-D or 2-D convolution, channels last (``NWC`` or ``NHWC``).

    The number of spatial dimensions comes from ``kernel_size`` when it is a
    tuple, and otherwise from the example input's rank (3 → 1-D, 4 → 2-D).

    Args:
      features: output channels.
      kernel_size: window size, an int or one int per spatial dimension.
      strides, dilation: ints or one per spatial dimension.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo, hi), ...)`` pairs.
      w_init: kernel initializer (``lecun_normal()``); ``w`` is ``(*kernel, in, features)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = conv(8, (3, 3))
      >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> params["w"].shape
      (3, 3, 1, 8)
    """
    kind = "conv"
    _positive_int(features, "features", kind)
    if not isinstance(kernel_size, int) and len(tuple(kernel_size)) not in (1, 2):
        raise ValueError(f"conv: kernel_size must be an int or a tuple of 1 or 2 ints, "
                         f"got {kernel_size!r}")
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"conv: padding must be 'SAME', 'VALID' or ((lo, hi), ...) pairs, "
                         f"got {padding!r}")
    w_init = w_init or inits.lecun_normal()
    b_init = b_init or inits.zeros()
    keys = ("w", "b") if use_bias else ("w",)

    def spatial_dims(x: Any) -> int:
        if isinstance(kernel_size, int):
            check_rank(x, (3, 4), kind, "a channels-last input of rank 3 (N, W, C) or 4 "
                       "(N, H, W, C)")
            return len(x.shape) - 2
        n = len(tuple(kernel_size))
        want = "(N, W, C)" if n == 1 else "(N, H, W, C)"
        check_rank(x, (n + 2,), kind, f"a channels-last input of rank {n + 2} {want} for a "
                   f"{n}-D kernel")
        return n

    def init(key: PRNGKey, x: Any) -> Params:
        n = spatial_dims(x)
        ks = _tuple(kernel_size, n, "kernel_size", kind)
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (*ks, int(x.shape[-1]), features), param_dtype)}
        if use_bias:
            params["b"] = b_init(kb, (features,), param_dtype)
        return params

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_params(params, keys, kind)
        n = spatial_dims(x)
        w = params["w"]
        if w.ndim != n + 2 or w.shape[-2] != x.shape[-1]:
            raise ModuleError(kind, f"expected an input with {w.shape[-2]} channels on the "
                              f"last axis (w has shape {tuple(w.shape)}), got input of shape "
                              f"{tuple(x.shape)}")
        spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[n]
        pad = padding.upper() if isinstance(padding, str) else tuple(map(tuple, padding))
        y = lax.conv_general_dilated(
            x, w.astype(jnp.result_type(x, w)),
            window_strides=_tuple(strides, n, "strides", kind),
            padding=pad,
            rhs_dilation=_tuple(dilation, n, "dilation", kind),
            dimension_numbers=spec,
        )
        if use_bias:
            check_param_shape(params, "b", (w.shape[-1],), kind)
            y = y + params["b"]
        return y

    return _make(kind, init, apply, name)


# --------------------------------------------------------------------------- pooling


def _pool(kind: str, reducer: str, window: int | Sequence[int],
          strides: int | Sequence[int] | None, padding: str, name: str | None) -> Module:
    if padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"{kind}: padding must be 'SAME' or 'VALID', got {padding!r}")

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_rank(x, (3, 4), kind, "a channels-last input of rank 3 (N, W, C) or 4 "
                   "(N, H, W, C)")
        n = x.ndim - 2
        win = (1, *_tuple(window, n, "window", kind), 1)
        st = (1, *_tuple(strides if strides is not None else window, n, "strides", kind), 1)
        if reducer == "max":
            init_val = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
            return lax.reduce_window(x, jnp.asarray(init_val, x.dtype), lax.max, win, st,
                                     padding.upper())
        total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, win, st, padding.upper())
        # Divide by the number of real (unpadded) elements in each window.
        count = lax.reduce_window(jnp.ones(x.shape[1:-1], x.dtype)[None, ..., None],
                                  jnp.zeros((), x.dtype), lax.add, win, st, padding.upper())
        return total / count

    return _make(kind, lambda key, x: {}, apply, name)


def max_pool(window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: str = "VALID", *, name: str | None = None) -> Module:
    """Max over windows of a channels-last input; ``strides`` defaults to ``window``."""
    return _pool("max_pool", "max", window, strides, padding, name)


def avg_pool(window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: str = "VALID", *, name: str | None = None) -> Module:
    """Mean over windows (padding excluded from the count); ``strides`` defaults to ``window``."""
    return _pool("avg_pool", "avg", window, strides, padding, name)


def global_avg_pool(*, name: str | None = None) -> Module:
    """Mean over all spatial axes: ``(N, ..., C) -> (N, C)``, accumulated in float32."""
    kind = "global_avg_pool"

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_rank(x, None, kind, "an input of rank >= 3 (N, ..., C)", min_rank=3)
        axes = tuple(range(1, x.ndim - 1))
        return jnp.mean(x, axis=axes, dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)

    return _make(kind, lambda key, x: {}, apply, name)


# --------------------------------------------------------------------------- embed


def embed(num_embeddings: int, features: int, *, w_init: Initializer | None = None,
          param_dtype: Any = jnp.float32, name: str | None = None) -> Module:
    """Lookup table: integer ids of any shape ``(...)`` to vectors ``(..., features)``.

    Args:
      num_embeddings: vocabulary size; ids must lie in ``[0, num_embeddings)``.
      features: vector size.
      w_init: table initializer, default ``normal(1.0)`` (PyTorch's ``nn.Embedding``).
    """
    kind = "embed"
    _positive_int(num_embeddings, "num_embeddings", kind)
    _positive_int(features, "features", kind)
    w_init = w_init or inits.normal(1.0)

    def check_ids(x: Any) -> None:
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ModuleTypeError(kind, f"expected integer ids, got dtype {x.dtype} with shape "
                                  f"{tuple(x.shape)}")

    def init(key: PRNGKey, x: Any) -> Params:
        check_ids(x)
        return {"embedding": w_init(key, (num_embeddings, features), param_dtype)}

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_params(params, ("embedding",), kind)
        check_ids(x)
        check_param_shape(params, "embedding", (num_embeddings, features), kind)
        return jnp.take(params["embedding"], x, axis=0)

    return _make(kind, init, apply, name)


# --------------------------------------------------------------------------- norms

# Norms and softmax compute in float32 (at least) but keep only input-dtype tensors for
# the backward pass: with a bf16 policy the saved activations stay bf16. The backward
# recomputes the normalised values in float32 from them.


def _normalize_impl(x: Array, scale: Array, bias: Array, eps: float, center: bool) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (no mean if not
    ``center``: RMS norm)."""
    return _normalize_fwd(x, scale, bias, eps, center)[0]


def _stats(x: Array, eps: float, center: bool) -> tuple[Array, Array, Array]:
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True) if center else jnp.zeros((), xf.dtype)
    centered = xf - mean
    rstd = lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
    return centered * rstd, mean, rstd


def _normalize_fwd(x, scale, bias, eps, center):  # noqa: ANN001, ANN202
    xhat, mean, rstd = _stats(x, eps, center)
    y = xhat * scale.astype(xhat.dtype) + bias.astype(xhat.dtype)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _normalize_bwd(eps, center, res, g):  # noqa: ANN001, ANN202
    x, mean, rstd, scale, bias = res
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    xhat = (xf - mean) * rstd
    gf = g.astype(xf.dtype)
    axes = tuple(range(x.ndim - 1))
    dscale = jnp.sum(gf * xhat, axis=axes)
    dbias = jnp.sum(gf, axis=axes)
    dxhat = gf * scale.astype(xf.dtype)
    proj = jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
    if center:
        dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True) - xhat * proj)
    else:
        dx = rstd * (dxhat - xhat * proj)
    return (dx.astype(x.dtype), dscale.astype(scale.dtype).reshape(scale.shape),
            dbias.astype(bias.dtype).reshape(bias.shape))


_normalize = jax.custom_vjp(_normalize_impl, nondiff_argnums=(3, 4))
_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _softmax_impl(logits: Array, out_dtype: Any = None, causal: bool = False) -> Array:
    """Softmax over the last axis in float32, returned (and saved) in ``out_dtype``.

    ``causal`` masks entries above the diagonal of the last two axes. The mask is built
    inside, so no mask or masked copy of the logits is kept for the backward pass (masked
    entries have weight 0, hence gradient 0).
    """
    return _softmax_fwd(logits, out_dtype, causal)[0]


def _softmax_fwd(logits, out_dtype, causal):  # noqa: ANN001, ANN202
    lf = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if causal:
        q, k = lf.shape[-2:]
        keep = jnp.arange(k)[None, :] <= jnp.arange(q)[:, None]
        lf = jnp.where(keep, lf, jnp.finfo(lf.dtype).min)
    y = jax.nn.softmax(lf, axis=-1).astype(out_dtype or logits.dtype)
    return y, (y, jnp.zeros((), logits.dtype))


def _softmax_bwd(out_dtype, causal, res, g):  # noqa: ANN001, ANN202
    y, proto = res
    yf = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    gf = g.astype(yf.dtype)
    return ((yf * (gf - jnp.sum(gf * yf, axis=-1, keepdims=True))).astype(proto.dtype),)


softmax_lowp = jax.custom_vjp(_softmax_impl, nondiff_argnums=(1, 2))
softmax_lowp.defvjp(_softmax_fwd, _softmax_bwd)



def layer_norm(*, epsilon: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
               name: str | None = None) -> Module:
    """Normalize over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Statistics are computed in float32 (at least) whatever the input dtype; the
    output has the input's dtype. ``epsilon`` matches PyTorch's ``nn.LayerNorm``.
    """
    kind = "layer_norm"
    if epsilon <= 0:
        raise ValueError(f"layer_norm: epsilon must be > 0, got {epsilon}")
    keys = tuple(k for k, on in (("scale", use_scale), ("bias", use_bias)) if on)

    def init(key: PRNGKey, x: Any) -> Params:
        f = _features_of(x, kind)
        params = {}
        if use_scale:
            params["scale"] = jnp.ones((f,), jnp.float32)
        if use_bias:
            params["bias"] = jnp.zeros((f,), jnp.float32)
        return params

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_params(params, keys, kind)
        f = _features_of(x, kind)
        for k in keys:
            check_param_shape(params, k, (f,), kind)
        scale = params["scale"] if use_scale else jnp.ones((f,), jnp.float32)
        bias = params["bias"] if use_bias else jnp.zeros((f,), jnp.float32)
        return _normalize(x, scale, bias, epsilon, True)

    return _make(kind, init, apply, name)


def rms_norm(*, epsilon: float = 1e-6, use_scale: bool = True,
             name: str | None = None) -> Module:
    """Root-mean-square norm over the last axis: ``x / sqrt(mean(x**2) + eps) * scale``.

    Statistics run in float32 at least; the output has the input's dtype
    (Zhang & Sennrich, 2019).
    """
    kind = "rms_norm"
    if epsilon <= 0:
        raise ValueError(f"rms_norm: epsilon must be > 0, got {epsilon}")
    keys = ("scale",) if use_scale else ()

    def init(key: PRNGKey, x: Any) -> Params:
        f = _features_of(x, kind)
        return {"scale": jnp.ones((f,), jnp.float32)} if use_scale else {}

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_params(params, keys, kind)
        f = _features_of(x, kind)
        if use_scale:
            check_param_shape(params, "scale", (f,), kind)
        scale = params["scale"] if use_scale else jnp.ones((f,), jnp.float32)
        return _normalize(x, scale, jnp.zeros((f,), scale.dtype), epsilon, False)

    return _make(kind, init, apply, name)


# --------------------------------------------------------------------------- dropout


def dropout(rate: float, *, name: str | None = None) -> Module:
    """Zero each element with probability ``rate`` and scale the rest by ``1 / (1 - rate)``.

    Active only for ``apply(..., train=True, key=key)``; with ``train=False`` it is the
    identity. The key is explicit: there is no hidden RNG.
    """
    kind = "dropout"
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        if not train or rate == 0.0:
            return x
        if key is None:
            raise ModuleError(kind, "train=True needs a PRNG key: call "
                              "apply(params, x, key=jax.random.key(...), train=True)")
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)

    return _make(kind, lambda key, x: {}, apply, name)


# --------------------------------------------------------------------------- stateless


def stateless(fn: Callable[..., Any], *, name: str | None = None,
              kind: str = "stateless") -> Module:
    """A parameter-free layer from any function of the inputs, e.g. ``stateless(jnp.cos)``."""
    if not callable(fn):
        raise TypeError(f"stateless: expected a callable, got {type(fn).__name__}")

    def apply(params: Params, *xs: Array, key: PRNGKey | None = None,
              train: bool = False) -> Any:
        return fn(*xs)

    return _make(kind, lambda key, *xs: {}, apply, name)


def relu(*, name: str | None = None) -> Module:
    """``max(x, 0)``."""
    return stateless(jax.nn.relu, name=name, kind="relu")


def gelu(*, approximate: bool = False, name: str | None = None) -> Module:
    """GELU; exact (erf) by default, as PyTorch; ``approximate=True`` uses the tanh form."""
    return stateless(lambda x: jax.nn.gelu(x, approximate=approximate), name=name, kind="gelu")


def silu(*, name: str | None = None) -> Module:
    """``x * sigmoid(x)`` (a.k.a. swish)."""
    return stateless(jax.nn.silu, name=name, kind="silu")


def tanh(*, name: str | None = None) -> Module:
    """Hyperbolic tangent."""
    return stateless(jnp.tanh, name=name, kind="tanh")


def sigmoid(*, name: str | None = None) -> Module:
    """Logistic sigmoid."""
    return stateless(jax.nn.sigmoid, name=name, kind="sigmoid")


def softmax(*, axis: int = -1, name: str | None = None) -> Module:
    """Softmax over ``axis``, computed in float32 at least; output keeps the input dtype."""

    def fn(x: Array) -> Array:
        return jax.nn.softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                              axis=axis).astype(x.dtype)

    return stateless(fn, name=name, kind="softmax")


def flatten(*, name: str | None = None) -> Module:
    """Flatten all axes but the first (batch): ``(N, ...) -> (N, prod(...))``."""
    kind = "flatten"

    def fn(x: Array) -> Array:
        if x.ndim < 1:
            raise ModuleError(kind, f"expected an input with a batch axis, got shape {x.shape}")
        return jnp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))

    return stateless(fn, name=name, kind=kind)


def reshape(shape: Sequence[int], *, name: str | None = None) -> Module:
    """Reshape every example to ``shape`` (the batch axis is kept): ``(N, ...) -> (N, *shape)``.

    One entry may be ``-1``.
    """
    kind = "reshape"
    shape = tuple(int(s) for s in shape)
    if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"reshape: shape must have positive entries and at most one -1, "
                         f"got {shape}")

    def fn(x: Array) -> Array:
        per_example = math.prod(x.shape[1:])
        known = math.prod(s for s in shape if s != -1)
        ok = per_example % known == 0 if -1 in shape else per_example == known
        if x.ndim < 1 or not ok:
            raise ModuleError(kind, f"cannot reshape input of shape {tuple(x.shape)} to "
                              f"(N, {', '.join(map(str, shape))}): {per_example} values per "
                              f"example")
        return jnp.reshape(x, (x.shape[0], *shape))

    return stateless(fn, name=name, kind=kind)


# --------------------------------------------------------------------------- attention


def multi_head_attention(num_heads: int, *, causal: bool = False, use_bias: bool = True,
                         w_init: Initializer | None = None, param_dtype: Any = jnp.float32,
                         name: str | None = None) -> Module:
    r"""Multi-head self-attention over ``(batch, seq, features)`` (Vaswani et al., 2017).

    .. math:: \mathrm{softmax}\big(QK^\top/\sqrt{d_h} + M\big)V, \quad
              Q, K, V = xW_q, xW_k, xW_v

    per head, then an output projection. The logits and softmax run in float32 whatever
    the input dtype; ``causal`` masks future positions. Params: ``query``, ``key``,
    ``value`` and ``out``, each ``{"w", "b"}``.
    """
    kind = "multi_head_attention"
    _positive_int(num_heads, "num_heads", kind)
    proj = {k: dense(1, use_bias=use_bias, w_init=w_init, param_dtype=param_dtype)
            for k in ("query", "key", "value", "out")}
    keys = ("w", "b") if use_bias else ("w",)

    def init(key: PRNGKey, x: Any) -> Params:
        check_rank(x, (3,), kind, "an input of shape (batch, seq, features)")
        d = int(x.shape[-1])
        if d % num_heads:
            raise ModuleError(kind, f"features {d} must be divisible by num_heads {num_heads}")
        w_fn = w_init or inits.lecun_normal()
        params = {}
        for k, sub in zip(proj, jax.random.split(key, 4), strict=True):
            params[k] = {"w": w_fn(sub, (d, d), param_dtype)}
            if use_bias:
                params[k]["b"] = jnp.zeros((d,), param_dtype)
        return params

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_rank(x, (3,), kind, "an input of shape (batch, seq, features)")
        extra = sorted(set(params) - set(proj))
        missing = sorted(set(proj) - set(params))
        if extra or missing:
            raise ModuleError(kind, f"params do not match the layer: missing {missing}, "
                              f"unexpected {extra} (expected keys {sorted(proj)})")
        b, t, d = x.shape
        h = num_heads

        def project(k: str, v: Array) -> Array:
            check_params(params[k], keys, kind)
            w = params[k]["w"]
            if w.shape != (v.shape[-1], d):
                raise ModuleError(kind, f"param '{{at}}{k}/w' has shape {tuple(w.shape)}, "
                                  f"expected {(v.shape[-1], d)} for input of shape "
                                  f"{tuple(x.shape)}")
            y = v @ w
            return y + params[k]["b"] if use_bias else y

        q, k_, v = (project(n, x).reshape(b, t, h, d // h) for n in ("query", "key", "value"))
        acc = jnp.promote_types(x.dtype, jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k_, preferred_element_type=acc)
        logits = logits / jnp.sqrt(jnp.asarray(d // h, acc))
        weights = softmax_lowp(logits, x.dtype, causal)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        # Tagged so remat policies ("names:attention_out") can keep it.
        ctx = checkpoint_name(ctx, "attention_out")
        return project("out", ctx)

    return _make(kind, init, apply, name)
