"""Layers: factories that return a ``Module``.

Every layer takes an optional ``name`` (the key its params live under in a parent
combinator; by default the parent numbers it, e.g. ``dense_0``). Layers with
parameters check their input shapes and their params dict, and their errors name
the layer's key path with the expected and actual shapes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from funtrain import quant
from funtrain._checks import check_int
from funtrain._random import draw_flat
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
    check_state,
)

Initializer = inits.Initializer


def _make(kind: str, init: Any, apply: Any, name: str | None) -> Module:
    if name is not None:
        _check_name(name, kind)
    return Module(init, apply, name, kind)


def _positive_int(value: Any, what: str, kind: str) -> int:
    check_int(kind, what, value)
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

    Examples:
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
        if w.shape[1] != features:  # params of another (wider or narrower) model
            raise ModuleError(kind, f"w has shape {tuple(w.shape)}, but this layer has "
                              f"{features} output features: expected w of shape "
                              f"({fan_in}, {features}); were the params made by another "
                              f"model's init?")
        y = quant.matmul(x, w) if isinstance(w, quant.QTensor) else jnp.matmul(x, w)
        if use_bias:
            check_param_shape(params, "b", (w.shape[1],), kind)
            y = y + params["b"]
        return y

    return _make(kind, init, apply, name)


# --------------------------------------------------------------------------- conv


def _tuple(value: int | Sequence[int], n: int, what: str, kind: str) -> tuple[int, ...]:
    """``value`` (checked by ``_check_sizes``) once per spatial dimension."""
    value = (value,) * n if isinstance(value, (int, np.integer)) else tuple(value)
    if len(value) != n:
        raise ModuleError(kind, f"{what} {value} has {len(value)} entries, but the input has "
                          f"{n} spatial dimension(s)")
    return value


Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _check_padding(padding: Any, kind: str) -> None:
    """Factory-time check: 'SAME', 'VALID', an int, ints, or (lo, hi) pairs."""
    if isinstance(padding, str):
        ok = padding.upper() in ("SAME", "VALID")
    elif isinstance(padding, int) and not isinstance(padding, bool):
        ok = padding >= 0
    else:
        try:
            items = list(padding)
            ok = bool(items) and all(
                (isinstance(p, int) and not isinstance(p, bool) and p >= 0)
                or (len(tuple(p)) == 2 and all(isinstance(q, int) for q in p))
                for p in items)
        except TypeError:
            ok = False
    if not ok:
        raise ValueError(f"{kind}: padding must be 'SAME', 'VALID', an int (the same on both "
                         f"sides, as PyTorch), one int per spatial dimension, or ((lo, hi), "
                         f"...) pairs; got {padding!r}")


def _padding(padding: Padding, n: int, kind: str) -> str | tuple[tuple[int, int], ...]:
    """Normalise a padding spec to XLA's: a string or one (lo, hi) pair per spatial dim."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * n
    items = list(padding)
    # each item is an int or a (lo, hi) pair; the Padding alias cannot say which
    pairs: Any = tuple((p, p) if isinstance(p, int) else tuple(p)  # type: ignore[arg-type]
                       for p in items)
    if len(pairs) != n:
        raise ModuleError(kind, f"padding {padding!r} has {len(pairs)} entries, but the input "
                          f"has {n} spatial dimension(s)")
    return pairs


def _spatial_dims(x: Any, kernel_size: Any, kind: str) -> int:
    """1 or 2 spatial dims, from a tuple kernel_size or else from the input's rank."""
    if isinstance(kernel_size, (int, np.integer)):
        check_rank(x, (3, 4), kind, "a channels-last input of rank 3 (N, W, C) or 4 "
                   "(N, H, W, C)")
        return len(x.shape) - 2
    n = len(tuple(kernel_size))
    want = "(N, W, C)" if n == 1 else "(N, H, W, C)"
    check_rank(x, (n + 2,), kind, f"a channels-last input of rank {n + 2} {want} for a "
               f"{n}-D kernel")
    return n


def _check_sizes(kind: str, **sizes: Any) -> None:
    """Factory-time: each window, stride or dilation is a positive int or 1 or 2 of them
    (a 0 would reach lax as a bare error, or divide by zero). ``None`` is left alone."""
    def ok(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and bool(v > 0)

    for what, value in sizes.items():
        if value is None or ok(value):
            continue
        seq = value.tolist() if isinstance(value, np.ndarray) and value.ndim == 1 else value
        if not (isinstance(seq, Sequence) and len(seq) in (1, 2) and all(map(ok, seq))):
            raise ValueError(f"{kind}: {what} must be a positive int or a tuple of 1 or 2 "
                             f"positive ints, got {value!r}")


def _check_kernel_shape(w: Any, kernel_size: Any, n: int, features: int, kind: str) -> None:
    """A conv-like ``w`` must be ``(*kernel, in, features)``: other shapes are another
    model's params."""
    expected = (*_tuple(kernel_size, n, "kernel_size", kind), w.shape[-2], features)
    if tuple(w.shape) != expected:
        raise ModuleError(kind, f"w has shape {tuple(w.shape)}, but this layer expects "
                          f"{expected} (kernel_size, in channels, {features} features); "
                          f"were the params made by another model's init?")


def _kernel_params(key: PRNGKey, x: Any, kind: str, kernel_size: Any, in_features: int,
                   features: int, use_bias: bool, w_init: Initializer, b_init: Initializer,
                   param_dtype: Any) -> Params:
    """A conv-like layer's params: ``w`` of shape ``(*kernel, in_features, features)``, ``b``."""
    n = _spatial_dims(x, kernel_size, kind)
    kw, kb = jax.random.split(key)
    ks = _tuple(kernel_size, n, "kernel_size", kind)
    params = {"w": w_init(kw, (*ks, in_features, features), param_dtype)}
    if use_bias:
        params["b"] = b_init(kb, (features,), param_dtype)
    return params


def _add_bias(params: Params, y: Array, use_bias: bool, kind: str) -> Array:
    if not use_bias:
        return y
    check_param_shape(params, "b", (params["w"].shape[-1],), kind)
    return y + params["b"]


_CONV_SPEC = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def conv(features: int, kernel_size: int | Sequence[int], *, strides: int | Sequence[int] = 1,
         padding: Padding = "SAME", dilation: int | Sequence[int] = 1,
         feature_group_count: int = 1, use_bias: bool = True,
         w_init: Initializer | None = None, b_init: Initializer | None = None,
         param_dtype: Any = jnp.float32, name: str | None = None) -> Module:
    """1-D or 2-D convolution, channels last (``NWC`` or ``NHWC``).

    The number of spatial dimensions comes from ``kernel_size`` when it is a
    tuple, and otherwise from the example input's rank (3 → 1-D, 4 → 2-D).

    Args:
      features: output channels.
      kernel_size: window size, an int or one int per spatial dimension.
      strides, dilation: ints or one per spatial dimension.
      padding: ``"SAME"``, ``"VALID"``, an int ``p`` (``p`` on both sides of every
        spatial dimension, PyTorch's ``padding=p``), one int per dimension, or explicit
        ``((lo, hi), ...)`` pairs.
      feature_group_count: split the input channels into this many groups, each
        convolved with its own ``features / groups`` filters (PyTorch's ``groups``);
        a depthwise conv is ``feature_group_count=in_channels``.
      w_init: kernel initializer (``lecun_normal()``); ``w`` is
        ``(*kernel, in / groups, features)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = conv(8, (3, 3))
      >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> params["w"].shape
      (3, 3, 1, 8)
    """
    kind = "conv"
    _positive_int(features, "features", kind)
    _positive_int(feature_group_count, "feature_group_count", kind)
    _check_sizes(kind, kernel_size=kernel_size, strides=strides, dilation=dilation)
    _check_padding(padding, kind)
    if features % feature_group_count:
        raise ValueError(f"conv: features ({features}) must be divisible by "
                         f"feature_group_count ({feature_group_count})")
    groups = feature_group_count
    w_init = w_init or inits.lecun_normal()
    b_init = b_init or inits.zeros()
    keys = ("w", "b") if use_bias else ("w",)

    def in_channels(x: Any) -> int:
        c = int(x.shape[-1])
        if c % groups:
            raise ModuleError(kind, f"input channels ({c}, input shape {tuple(x.shape)}) must "
                              f"be divisible by feature_group_count ({groups})")
        return c

    def init(key: PRNGKey, x: Any) -> Params:
        return _kernel_params(key, x, kind, kernel_size, in_channels(x) // groups, features,
                              use_bias, w_init, b_init, param_dtype)

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_params(params, keys, kind)
        n = _spatial_dims(x, kernel_size, kind)
        w = params["w"]
        if w.ndim != n + 2 or w.shape[-2] * groups != in_channels(x):
            raise ModuleError(kind, f"expected an input with {w.shape[-2] * groups} channels "
                              f"on the last axis (w has shape {tuple(w.shape)}), got input of "
                              f"shape {tuple(x.shape)}")
        _check_kernel_shape(w, kernel_size, n, features, kind)
        how: dict[str, Any] = dict(window_strides=_tuple(strides, n, "strides", kind),
                   padding=_padding(padding, n, kind),
                   rhs_dilation=_tuple(dilation, n, "dilation", kind),
                   dimension_numbers=_CONV_SPEC[n], feature_group_count=groups)
        if isinstance(w, quant.QTensor):
            y = quant.conv(x, w, **how)
        else:  # both in the promoted dtype: bf16 or uint8 images with float32 kernels
            dt = jnp.result_type(x, w)
            y = lax.conv_general_dilated(_as(x, dt), _as(w, dt), **how)
        _check_nonempty(kind, x, y)
        return _add_bias(params, y, use_bias, kind)

    return _make(kind, init, apply, name)


def conv_transpose(features: int, kernel_size: int | Sequence[int], *,
                   strides: int | Sequence[int] = 1, padding: Padding = "SAME",
                   dilation: int | Sequence[int] = 1, use_bias: bool = True,
                   w_init: Initializer | None = None, b_init: Initializer | None = None,
                   param_dtype: Any = jnp.float32, name: str | None = None) -> Module:
    """1-D or 2-D transposed convolution (the gradient of ``conv``), channels last.

    Each input pixel scatters ``x[i] * w`` into the output at ``i * strides``, as PyTorch's
    ``ConvTranspose`` and Keras's ``Conv2DTranspose`` define it: ``w[(*k, in, features)]``
    here is torch's ``weight`` ``(in, features, *k)`` with its axes moved.
    With ``padding="VALID"`` the output size is ``(H - 1) * s + d * (k - 1) + 1``; an int
    ``p`` (or one per dimension) crops ``p`` from both sides, PyTorch's ``padding=p``;
    ``"SAME"`` gives ``H * s``. Explicit ``((lo, hi), ...)`` pairs pad the stride-dilated
    input, as ``jax.lax.conv_transpose`` defines them (a spec may mix the two, per
    dimension). A padding that leaves no output is an error, as in PyTorch.

    Args:
      features: output channels.
      kernel_size: an int or one int per spatial dimension.
      strides, dilation: ints or one per spatial dimension (``dilation`` spaces the kernel).
      w_init: kernel initializer (``lecun_normal()``); ``w`` is ``(*kernel, in, features)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = conv_transpose(4, 3, strides=2)
      >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))
      >>> layer.apply(params, jnp.ones((1, 5, 5, 2))).shape
      (1, 10, 10, 4)
    """
    kind = "conv_transpose"
    _positive_int(features, "features", kind)
    _check_sizes(kind, kernel_size=kernel_size, strides=strides, dilation=dilation)
    _check_padding(padding, kind)
    w_init = w_init or inits.lecun_normal()
    b_init = b_init or inits.zeros()
    keys = ("w", "b") if use_bias else ("w",)

    def init(key: PRNGKey, x: Any) -> Params:
        return _kernel_params(key, x, kind, kernel_size, int(x.shape[-1]), features, use_bias,
                              w_init, b_init, param_dtype)

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_params(params, keys, kind)
        n = _spatial_dims(x, kernel_size, kind)
        w = params["w"]
        if w.ndim != n + 2 or w.shape[-2] != x.shape[-1]:
            raise ModuleError(kind, f"expected an input with {w.shape[-2]} channels on the "
                              f"last axis (w has shape {tuple(w.shape)}), got input of shape "
                              f"{tuple(x.shape)}")
        _check_kernel_shape(w, kernel_size, n, features, kind)
        ks, dil = w.shape[:n], _tuple(dilation, n, "dilation", kind)
        # "VALID" is PyTorch's padding=0: lax's "VALID" gives H * s, not (H - 1) * s + d (k -
        # 1) + 1, when the dilated kernel is shorter than the stride
        valid = isinstance(padding, str) and padding.upper() == "VALID"
        pad = _padding(0 if valid else padding, n, kind)
        st = _tuple(strides, n, "strides", kind)
        if not isinstance(pad, str):
            # An int entry is PyTorch's padding=p: it crops p from the full (VALID) output on
            # each side; a (lo, hi) pair pads the stride-dilated input, as lax's. Per entry.
            crop = (True,) * n if valid or isinstance(padding, int) else tuple(
                isinstance(p, (int, np.integer)) for p in padding)
            pad = tuple((d * (k - 1) - lo, d * (k - 1) - hi) if c else (lo, hi)
                        for (lo, hi), k, d, c in zip(pad, ks, dil, crop, strict=True))
            size = [(h - 1) * s + 1 + lo + hi - d * (k - 1) for h, s, (lo, hi), k, d
                    in zip(x.shape[1:-1], st, pad, ks, dil, strict=True)]
            if min(size) <= 0 and 0 not in x.shape[1:-1]:  # torch refuses it too
                raise ModuleError(kind, f"padding {padding!r} leaves no output: the input's "
                                  f"spatial shape {tuple(x.shape[1:-1])} would give "
                                  f"{tuple(size)}")
        # The scatter form: lax.conv_transpose correlates, so flip the kernel spatially.
        dt = jnp.result_type(x, w)
        y = lax.conv_transpose(
            _as(x, dt), jnp.flip(w, axis=tuple(range(n))).astype(dt),
            strides=st,
            padding=pad,
            rhs_dilation=dil,
            dimension_numbers=_CONV_SPEC[n],
        )
        return _add_bias(params, y, use_bias, kind)

    return _make(kind, init, apply, name)


# --------------------------------------------------------------------------- pooling


def _as(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype``, cast only when it differs (``x`` may be a ShapeDtypeStruct)."""
    return x if x.dtype == dtype else jnp.asarray(x).astype(dtype)


def _check_nonempty(kind: str, x: Array, y: Array) -> None:
    """A window or kernel larger than the (padded) input leaves no output position; torch
    raises, and an empty activation would silently feed a head of zero inputs."""
    if 0 in y.shape[1:-1] and 0 not in x.shape[1:-1]:
        raise ModuleError(kind, f"the input's spatial shape {tuple(x.shape[1:-1])} is too "
                          f"small for this layer's window: the output would have shape "
                          f"{tuple(y.shape)}, with no position left")


def _pool(kind: str, reducer: str, window: int | Sequence[int],
          strides: int | Sequence[int] | None, padding: Padding, count_include_pad: bool,
          name: str | None) -> Module:
    _check_sizes(kind, window=window, strides=strides)
    _check_padding(padding, kind)

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_rank(x, (3, 4), kind, "a channels-last input of rank 3 (N, W, C) or 4 "
                   "(N, H, W, C)")
        n = x.ndim - 2
        win = (1, *_tuple(window, n, "window", kind), 1)
        st = (1, *_tuple(strides if strides is not None else window, n, "strides", kind), 1)
        pad = _padding(padding, n, kind)
        if not isinstance(pad, str):
            for (lo, hi), w in zip(pad, win[1:-1], strict=True):
                if max(lo, hi) >= w:  # a window of padding alone: -inf, or 0/0 for avg_pool
                    raise ModuleError(kind, f"padding {padding!r} reaches the window size "
                                      f"{w}: some windows would hold padding only; pad less "
                                      f"than the window (PyTorch allows half of it)")
            pad = ((0, 0), *pad, (0, 0))
        # The init values are Python scalars: JAX then lowers to the differentiable
        # reduce_window_max/sum primitives (an array init value gives a generic
        # reduce_window, which has no gradient under jit).
        if reducer == "max":
            # integers: a scalar of x's own dtype (a Python int is int32, or int64 with x64)
            init_val = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else \
                np.array(jnp.iinfo(x.dtype).min, x.dtype)
            y = lax.reduce_window(x, init_val, lax.max, win, st, pad)
            _check_nonempty(kind, x, y)
            return y
        # Sums in float32 at least (bf16/fp16 sums lose digits or overflow); the mean of
        # integers is a float, as conv and dense promote them
        acc = jnp.promote_types(x.dtype, jnp.float32)
        out = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else acc
        total = lax.reduce_window(x.astype(acc), 0.0, lax.add, win, st, pad)
        _check_nonempty(kind, x, total)
        if count_include_pad:
            return (total / math.prod(win)).astype(out)
        # Divide by the number of real (unpadded) elements in each window.
        ones = jnp.ones((1, *x.shape[1:-1], 1), acc)
        count = lax.reduce_window(ones, 0.0, lax.add, win, st, pad)
        return (total / count).astype(out)

    return _make(kind, lambda key, x: {}, apply, name)


def max_pool(window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: Padding = "VALID", *, name: str | None = None) -> Module:
    """Max over windows of a channels-last input; ``strides`` defaults to ``window``.

    ``padding`` is ``"VALID"``, ``"SAME"``, an int (both sides, PyTorch's ``padding``),
    one int per spatial dimension, or ``((lo, hi), ...)`` pairs; padded entries never win.

    Examples:
      >>> import jax.numpy as jnp
      >>> layer = max_pool(3, strides=2, padding=1)  # ResNet's stem pool
      >>> layer.apply({}, jnp.zeros((1, 112, 112, 8))).shape
      (1, 56, 56, 8)
    """
    return _pool("max_pool", "max", window, strides, padding, False, name)


def avg_pool(window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: Padding = "VALID", *, count_include_pad: bool = False,
             name: str | None = None) -> Module:
    """Mean over windows; ``strides`` defaults to ``window``.

    ``padding`` as in ``max_pool``. By default padded entries are left out of each
    window's count (``count_include_pad=False``); PyTorch's ``AvgPool2d`` default counts
    them (``count_include_pad=True``).
    """
    return _pool("avg_pool", "avg", window, strides, padding, count_include_pad, name)


def global_avg_pool(*, name: str | None = None) -> Module:
    """Mean over all spatial axes: ``(N, ..., C) -> (N, C)``, accumulated in float32."""
    kind = "global_avg_pool"

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_rank(x, None, kind, "an input of rank >= 3 (N, ..., C)", min_rank=3)
        axes = tuple(range(1, x.ndim - 1))
        acc = jnp.promote_types(x.dtype, jnp.float32)  # the mean of integers is a float
        out = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else acc
        return jnp.mean(x, axis=axes, dtype=acc).astype(out)

    return _make(kind, lambda key, x: {}, apply, name)


# --------------------------------------------------------------------------- embed


def embed(num_embeddings: int, features: int, *, w_init: Initializer | None = None,
          param_dtype: Any = jnp.float32, name: str | None = None) -> Module:
    """Lookup table: integer ids of any shape ``(...)`` to vectors ``(..., features)``.

    Args:
      num_embeddings: vocabulary size; ids must lie in ``[0, num_embeddings)`` (others,
        negative ones too, look up a row of NaN).
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
        # an id outside [0, n) gives a NaN row (which the non-finite guard names), not the
        # row jnp.take would wrap a negative id to
        # (in int32 at least: int8 ids could not hold num_embeddings = 256)
        ids = x.astype(jnp.promote_types(x.dtype, jnp.int32))
        return jnp.take(params["embedding"], jnp.where(ids < 0, num_embeddings, ids), axis=0)

    return _make(kind, init, apply, name)


# --------------------------------------------------------------------------- norms

# Norms and softmax compute in float32 (at least) but keep only input-dtype tensors for
# the backward pass: with a bf16 policy the saved activations stay bf16. The backward
# recomputes the normalised values in float32 from them.


def _floating(x: Array, scale: Array) -> Array:
    """Integer (e.g. uint8 image) input in the scale's float dtype, as ``conv`` and
    ``dense`` promote it to their kernel's: a norm's output in an integer dtype would
    truncate (and wrap) the normalised values."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return jnp.asarray(x).astype(jnp.result_type(x.dtype, scale.dtype))


def _normalize_impl(x: Array, scale: Array, bias: Array, eps: float, center: bool,
                    axes: tuple[int, ...] = (-1,)) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias``, statistics over ``axes`` (no mean
    if not ``center``: RMS norm). ``scale`` and ``bias`` broadcast against the trailing
    axes of ``x``."""
    return _normalize_fwd(x, scale, bias, eps, center, axes)[0]


def _stats(x: Array, eps: float, center: bool, axes: tuple[int, ...]
           ) -> tuple[Array, Array, Array]:
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=axes, keepdims=True) if center else jnp.zeros((), xf.dtype)
    centered = xf - mean
    rstd = lax.rsqrt(jnp.mean(jnp.square(centered), axis=axes, keepdims=True) + eps)
    return centered * rstd, mean, rstd


def _normalize_fwd(x, scale, bias, eps, center, axes):  # noqa: ANN001, ANN202
    xhat, mean, rstd = _stats(x, eps, center, axes)
    y = xhat * scale.astype(xhat.dtype) + bias.astype(xhat.dtype)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _normalize_bwd(eps, center, axes, res, g):  # noqa: ANN001, ANN202
    x, mean, rstd, scale, bias = res
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    xhat = (xf - mean) * rstd
    gf = g.astype(xf.dtype)
    param_axes = tuple(range(x.ndim - scale.ndim))  # everything the params broadcast over
    dscale = jnp.sum(gf * xhat, axis=param_axes)
    dbias = jnp.sum(gf, axis=param_axes)
    dxhat = gf * scale.astype(xf.dtype)
    proj = jnp.mean(dxhat * xhat, axis=axes, keepdims=True)
    if center:
        dx = rstd * (dxhat - jnp.mean(dxhat, axis=axes, keepdims=True) - xhat * proj)
    else:
        dx = rstd * (dxhat - xhat * proj)
    return (dx.astype(x.dtype), dscale.astype(scale.dtype).reshape(scale.shape),
            dbias.astype(bias.dtype).reshape(bias.shape))


_normalize = jax.custom_vjp(_normalize_impl, nondiff_argnums=(3, 4, 5))
_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _softmax_impl(logits: Array, mask: Array | None = None, out_dtype: Any = None,
                  causal: bool = False) -> Array:
    """Softmax over the last axis in float32, returned (and saved) in ``out_dtype``.

    ``causal`` masks entries above the diagonal of the last two axes, and ``mask`` (a
    boolean array broadcastable to the logits, True = keep) masks the rest. The masks are
    applied inside, so no masked copy of the logits is kept for the backward pass (masked
    entries have weight 0, hence gradient 0).
    """
    return _softmax_fwd(logits, mask, out_dtype, causal)[0]


def _kept(shape: tuple[int, ...], mask: Any, causal: bool) -> Any:
    """The entries the softmax keeps (``None``: all of them)."""
    keep = None
    if causal:
        q, k = shape[-2:]
        keep = jnp.arange(k)[None, :] <= jnp.arange(q)[:, None]
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep


def _softmax_fwd(logits, mask, out_dtype, causal):  # noqa: ANN001, ANN202
    lf = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    keep = _kept(lf.shape, mask, causal)
    if keep is not None:
        lf = jnp.where(keep, lf, jnp.finfo(lf.dtype).min)
    y = jax.nn.softmax(lf, axis=-1).astype(out_dtype or logits.dtype)
    return y, (y, jnp.zeros((), logits.dtype), mask)


def _softmax_bwd(out_dtype, causal, res, g):  # noqa: ANN001, ANN202
    y, proto, mask = res
    yf = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    gf = g.astype(yf.dtype)
    dlogits = yf * (gf - jnp.sum(gf * yf, axis=-1, keepdims=True))
    keep = _kept(y.shape, mask, causal)
    if keep is not None:  # a masked logit was replaced by a constant: no gradient. A row
        dlogits = jnp.where(keep, dlogits, 0.0)  # with every entry masked has y != 0 there
    return dlogits.astype(proto.dtype), \
        None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)


softmax_lowp = jax.custom_vjp(_softmax_impl, nondiff_argnums=(2, 3))
softmax_lowp.defvjp(_softmax_fwd, _softmax_bwd)


def _affine_params(params: Params, f: int, kind: str, use_scale: bool, use_bias: bool
                   ) -> tuple[Array, Array]:
    """A norm's ``scale`` and ``bias`` (ones/zeros when switched off), shape-checked."""
    keys = [k for k, on in (("scale", use_scale), ("bias", use_bias)) if on]
    check_params(params, keys, kind)
    for k in keys:
        check_param_shape(params, k, (f,), kind)
    scale = params["scale"] if use_scale else jnp.ones((f,), jnp.float32)
    bias = params["bias"] if use_bias else jnp.zeros((f,), jnp.float32)
    return scale, bias


def _init_affine(f: int, use_scale: bool, use_bias: bool) -> Params:
    params = {}
    if use_scale:
        params["scale"] = jnp.ones((f,), jnp.float32)
    if use_bias:
        params["bias"] = jnp.zeros((f,), jnp.float32)
    return params


def layer_norm(*, epsilon: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
               name: str | None = None) -> Module:
    """Normalize over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Statistics are computed in float32 (at least) whatever the input dtype; the
    output has the input's dtype. ``epsilon`` matches PyTorch's ``nn.LayerNorm``.
    """
    kind = "layer_norm"
    if epsilon <= 0:
        raise ValueError(f"layer_norm: epsilon must be > 0, got {epsilon}")

    def init(key: PRNGKey, x: Any) -> Params:
        return _init_affine(_features_of(x, kind), use_scale, use_bias)

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        scale, bias = _affine_params(params, _features_of(x, kind), kind, use_scale, use_bias)
        return _normalize(_floating(x, scale), scale, bias, epsilon, True, (-1,))

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
        return _normalize(_floating(x, scale), scale, jnp.zeros((f,), scale.dtype), epsilon,
                          False, (-1,))

    return _make(kind, init, apply, name)


BATCH_NORM_CONVENTIONS = {"pytorch": 0.1, "flax": 0.99}


def batch_norm(*, momentum: float | None = None, epsilon: float = 1e-5,
               convention: str = "pytorch", use_scale: bool = True, use_bias: bool = True,
               axis_name: Any = None, name: str | None = None) -> Module:
    r"""Batch normalization over every axis but the last (channels last), with running
    statistics in the model state (Ioffe & Szegedy, 2015).

    Train mode normalises with the batch's mean and biased variance and updates the state;
    eval mode normalises with the running statistics and leaves the state unchanged.

    .. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    Conventions for the running statistics (``convention=``):

    - ``"pytorch"`` (default, ``torch.nn.BatchNorm2d``): ``momentum`` (default 0.1) is
      the weight of the new batch, :math:`r \leftarrow (1 - m)\,r + m\,b`, and the
      running variance takes the *unbiased* batch variance (``n / (n - 1)``).
    - ``"flax"`` (``flax.linen.BatchNorm``): ``momentum`` (default 0.99) is the decay,
      :math:`r \leftarrow m\,r + (1 - m)\,b`, with the biased batch variance.

    Statistics are always computed and kept in float32 (float64 for a float64 input),
    whatever the precision policy; the output has the input's dtype.

    Args:
      momentum: see the conventions; ``None`` takes the convention's default.
      epsilon: added to the variance (1e-5, as both PyTorch and flax).
      convention: ``"pytorch"`` or ``"flax"``.
      use_scale, use_bias: learn ``scale`` (γ) and ``bias`` (β) (PyTorch's ``affine``).
      axis_name: a mapped axis name (``jax.vmap``/``shard_map``/``pmap``) over which to
        average the batch statistics: synchronised BatchNorm under data parallelism.

    Params are ``{"scale", "bias"}`` and the state ``{"mean", "var", "count"}``, each of
    shape ``(channels,)`` except ``count``, the number of train-mode updates (PyTorch's
    ``num_batches_tracked``). An empty batch leaves the state as it is (its statistics
    would be NaN). Eval mode before any update is an error where it can be seen:
    in an eager call, and in ``train.make_eval_step``/``train.evaluate``, which check each
    new state on the host; inside a function you ``jax.jit`` yourself the count is not
    known, and fresh statistics (mean 0, variance 1) are used, as PyTorch does.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> bn = batch_norm()
      >>> params, state = bn.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
      >>> y, state = bn.apply(params, jnp.ones((2, 4, 4, 3)), state=state, train=True)
      >>> int(state["count"]), state["mean"].shape
      (1, (3,))
    """
    kind = "batch_norm"
    if convention not in BATCH_NORM_CONVENTIONS:
        raise ValueError(f"batch_norm: convention must be one of "
                         f"{sorted(BATCH_NORM_CONVENTIONS)}, got {convention!r}")
    if momentum is None:
        momentum = BATCH_NORM_CONVENTIONS[convention]
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batch_norm: momentum must be a float in [0, 1], got {momentum!r}")
    if not epsilon > 0:
        raise ValueError(f"batch_norm: epsilon must be > 0, got {epsilon!r}")
    # The weight the new batch gets in the running average.
    new_weight = momentum if convention == "pytorch" else 1.0 - momentum

    def features(x: Any) -> int:
        check_rank(x, None, kind, "an input of rank >= 2 (N, ..., C), channels last",
                   min_rank=2)
        return int(x.shape[-1])

    def init(key: PRNGKey, x: Any) -> tuple[Params, Any]:
        f = features(x)
        dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64
        state = {"mean": jnp.zeros((f,), dtype), "var": jnp.ones((f,), dtype),
                 "count": jnp.zeros((), jnp.int32)}
        return _init_affine(f, use_scale, use_bias), state

    def check_stats(state: Any, f: int) -> None:
        check_state(state, kind)
        if not isinstance(state, dict) or set(state) != {"mean", "var", "count"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ModuleError(kind, f"model state must be a dict with keys ['count', 'mean', "
                              f"'var'], got {got} (was it made by another model?)")
        for k in ("mean", "var"):
            if tuple(state[k].shape) != (f,):
                raise ModuleError(kind, f"model state '{{at}}{k}' has shape "
                                  f"{tuple(state[k].shape)}, expected ({f},) for an input of "
                                  f"{f} channels (was it made by another model?)")

    def batch_stats(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array, Any]:
        # Two passes (mean, then mean of squared deviations): E[x^2] - E[x]^2 cancels
        # badly in float32 when the mean is large against the spread.
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xf, axis=axes)
        if axis_name is not None:
            mean = lax.pmean(mean, axis_name)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
        n = math.prod(x.shape[a] for a in axes)
        if axis_name is not None:
            var = lax.pmean(var, axis_name)
            n = n * lax.psum(1, axis_name)
        return mean, var, n

    def apply(params: Params, x: Array, *, state: Any = None, key: PRNGKey | None = None,
              train: bool = False) -> tuple[Array, Any]:
        f = features(x)
        scale, bias = _affine_params(params, f, kind, use_scale, use_bias)
        check_stats(state, f)
        x = _floating(x, scale)
        axes = tuple(range(x.ndim - 1))
        if not train:
            count = state["count"]
            if not isinstance(count, jax.core.Tracer) and int(count) == 0:
                raise ModuleError(kind, "eval mode (train=False) before any statistics exist: "
                                  "the running mean and variance have never been updated. "
                                  "Train first (apply(..., train=True) returns the updated "
                                  "state), or load trained statistics")
            rstd = lax.rsqrt(state["var"] + epsilon)
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            y = (xf - state["mean"]) * (rstd * scale) + bias
            return y.astype(x.dtype), state
        if axis_name is None and math.prod(x.shape[:-1]) == 1:  # torch raises too
            raise ModuleError(kind, f"train=True needs more than one value per channel for "
                              f"the batch statistics, got an input of shape "
                              f"{tuple(x.shape)}: the variance of one value is 0, so the "
                              f"output would be the bias alone. Use a larger batch, or "
                              f"train=False")
        if x.size == 0:  # no statistics: keep the running ones (shapes match on every device)
            return _normalize(x, scale, bias, epsilon, True, axes), state
        if axis_name is None:
            y = _normalize(x, scale, bias, epsilon, True, axes)
            mean, var, n = batch_stats(lax.stop_gradient(x), axes)
        else:  # statistics across devices: plain autodiff through the collectives
            mean, var, n = batch_stats(x, axes)
            xf = x.astype(mean.dtype)
            y = ((xf - mean) * lax.rsqrt(var + epsilon) * scale + bias).astype(x.dtype)
            mean, var = lax.stop_gradient((mean, var))
        if convention == "pytorch":
            var = var * (n / jnp.maximum(n - 1, 1))
        w = new_weight
        new_state = {"mean": ((1 - w) * state["mean"] + w * mean).astype(state["mean"].dtype),
                     "var": ((1 - w) * state["var"] + w * var).astype(state["var"].dtype),
                     "count": state["count"] + 1}
        return y, new_state

    if name is not None:
        _check_name(name, kind)
    return Module(init, apply, name, kind, True)


def group_norm(num_groups: int = 32, *, epsilon: float = 1e-5, use_scale: bool = True,
               use_bias: bool = True, name: str | None = None) -> Module:
    """Group normalization (Wu & He, 2018): per example, over the spatial axes and each
    group of ``channels / num_groups`` channels (channels last). No batch statistics and
    no model state, so train and eval mode agree. ``num_groups=1`` is a layer norm over
    all of an example's features; ``num_groups=channels`` is instance norm. Matches
    ``torch.nn.GroupNorm``; statistics run in float32 at least.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> gn = group_norm(2)
      >>> params = gn.init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)))
      >>> gn.apply(params, jnp.ones((2, 4, 4, 6))).shape
      (2, 4, 4, 6)
    """
    kind = "group_norm"
    _positive_int(num_groups, "num_groups", kind)
    if not epsilon > 0:
        raise ValueError(f"group_norm: epsilon must be > 0, got {epsilon!r}")

    def features(x: Any) -> int:
        check_rank(x, None, kind, "an input of rank >= 2 (N, ..., C), channels last",
                   min_rank=2)
        f = int(x.shape[-1])
        if f % num_groups:
            raise ModuleError(kind, f"channels ({f}, input shape {tuple(x.shape)}) must be "
                              f"divisible by num_groups ({num_groups})")
        return f

    def init(key: PRNGKey, x: Any) -> Params:
        return _init_affine(features(x), use_scale, use_bias)

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        f = features(x)
        scale, bias = _affine_params(params, f, kind, use_scale, use_bias)
        g = num_groups
        xg = _floating(x, scale).reshape(*x.shape[:-1], g, f // g)
        axes = (*range(1, x.ndim - 1), xg.ndim - 1)  # spatial axes and the group's channels
        y = _normalize(xg, scale.reshape(g, f // g), bias.reshape(g, f // g), epsilon, True,
                       axes)
        return y.reshape(x.shape)

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
        keep = draw_flat(jax.random.bernoulli, key, x.shape, p=1.0 - rate)
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
    """Softmax over ``axis``, computed in float32 at least; output keeps the input dtype
    (float32 for integer inputs).

    The backward pass keeps only the output, in the input's dtype (bf16 under a bf16
    policy), as attention's softmax does: not a float32 copy of the logits."""

    def fn(x: Array) -> Array:
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.float32  # ints
        y = softmax_lowp(jnp.moveaxis(x, axis, -1), None, dtype, False)
        return jnp.moveaxis(y, -1, axis)

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
        # -1 resolved here: reshape cannot infer it for an empty batch
        full = tuple(per_example // known if s == -1 else s for s in shape)
        return jnp.reshape(x, (x.shape[0], *full))

    return stateless(fn, name=name, kind=kind)


# --------------------------------------------------------------------------- attention


def multi_head_attention(num_heads: int, *, causal: bool = False, dropout: float = 0.0,
                         use_bias: bool = True, w_init: Initializer | None = None,
                         param_dtype: Any = jnp.float32, implementation: str | None = None,
                         name: str | None = None) -> Module:
    r"""Multi-head self-attention over ``(batch, seq, features)`` (Vaswani et al., 2017).

    .. math:: \mathrm{softmax}\big(QK^\top/\sqrt{d_h} + M\big)V, \quad
              Q, K, V = xW_q, xW_k, xW_v

    per head, then an output projection. ``apply(params, x, mask=None, *, key, train)``:
    ``causal`` masks future positions, and ``mask`` masks keys, either a padding mask of
    shape ``(batch, seq)`` (True = a real token) or a boolean array broadcastable to
    ``(batch, heads, seq, seq)``; both may be used together. With ``dropout > 0`` and
    ``train=True`` the attention weights are dropped (needs ``key``).

    On a GPU, in bf16/fp16, the attention is ``jax.nn.dot_product_attention`` with
    cuDNN's fused kernel (``implementation=None`` picks it there when the head size is a
    multiple of 8 up to 128, with ``causal`` or no mask, and no attention dropout).
    Elsewhere it is funtrain's own path, whose float32 softmax keeps only compute-dtype
    tensors for the backward pass (half the saved bytes under bf16; jax's XLA path keeps
    float32 copies). ``"xla"`` or
    ``"cudnn"`` force ``jax.nn.dot_product_attention`` with that implementation;
    ``"funtrain"`` forces funtrain's path. All agree to rounding. Logits and softmax run in
    float32 whatever the input dtype. A 2-D ``mask`` is always a ``(batch, seq)`` padding
    mask. Params: ``query``, ``key``, ``value`` and ``out``, each ``{"w", "b"}``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> attn = multi_head_attention(2, causal=True)
      >>> x = jnp.ones((2, 5, 8))
      >>> params = attn.init(jax.random.key(0), x)
      >>> attn.apply(params, x, jnp.array([[1, 1, 1, 0, 0], [1] * 5], bool)).shape
      (2, 5, 8)
    """
    kind = "multi_head_attention"
    _positive_int(num_heads, "num_heads", kind)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"multi_head_attention: dropout must be in [0, 1), got {dropout}")
    if implementation not in (None, "xla", "cudnn", "funtrain"):
        raise ValueError(f"multi_head_attention: implementation must be None, 'xla', "
                         f"'cudnn' or 'funtrain', got {implementation!r}")
    names = ("query", "key", "value", "out")
    keys = ("w", "b") if use_bias else ("w",)

    def init(key: PRNGKey, x: Any, mask: Any = None) -> Params:
        check_rank(x, (3,), kind, "an input of shape (batch, seq, features)")
        d = int(x.shape[-1])
        if d % num_heads:
            raise ModuleError(kind, f"features {d} must be divisible by num_heads {num_heads}")
        w_fn = w_init or inits.lecun_normal()
        params = {}
        for k, sub in zip(names, jax.random.split(key, 4), strict=True):
            params[k] = {"w": w_fn(sub, (d, d), param_dtype)}
            if use_bias:
                params[k]["b"] = jnp.zeros((d,), param_dtype)
        return params

    def as_mask(mask: Any, b: int, t: int) -> Array | None:
        """A boolean mask broadcastable to (batch, heads, q, k)."""
        if mask is None:
            return None
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            if not jnp.issubdtype(mask.dtype, jnp.integer):
                raise ModuleTypeError(kind, f"mask must be boolean (True = attend), got dtype "
                                      f"{mask.dtype}")
            mask = mask != 0
        if mask.shape == (b, t):
            return mask[:, None, None, :]
        try:
            jnp.broadcast_shapes(mask.shape, (b, num_heads, t, t))
        except ValueError:
            ok = False
        else:
            ok = mask.ndim == 4
        if not ok:
            raise ModuleError(kind, f"mask must have shape (batch, seq) = {(b, t)} or be "
                              f"broadcastable to (batch, heads, seq, seq) = "
                              f"{(b, num_heads, t, t)}, got {tuple(mask.shape)}")
        return mask

    def apply(params: Params, x: Array, mask: Any = None, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_rank(x, (3,), kind, "an input of shape (batch, seq, features)")
        extra = sorted(set(params) - set(names))
        missing = sorted(set(names) - set(params))
        if extra or missing:
            raise ModuleError(kind, f"params do not match the layer: missing {missing}, "
                              f"unexpected {extra} (expected keys {sorted(names)})")
        b, t, d = x.shape
        h = num_heads
        if d % h:
            raise ModuleError(kind, f"features {d} must be divisible by num_heads {h}")
        drop = train and dropout > 0.0
        if drop and key is None:
            raise ModuleError(kind, "train=True with dropout > 0 needs a PRNG key: call "
                              "apply(params, x, key=jax.random.key(...), train=True)")

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
        m = as_mask(mask, b, t)
        impl = implementation
        if impl is None:
            # cuDNN's fused kernel on GPUs for half precision; everywhere else funtrain's
            # path (jax's own XLA path saves f32 copies of the weights for the backward).
            # The projections' dtype decides (bf16 inputs with f32 weights give f32 q).
            fused = (not drop and m is None and jax.default_backend() == "gpu"
                     and q.dtype in (jnp.bfloat16, jnp.float16) and (d // h) % 8 == 0
                     and d // h <= 128)
            impl = "cudnn" if fused else "funtrain"
        if impl == "funtrain":
            acc = jnp.promote_types(q.dtype, jnp.float32)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k_, preferred_element_type=acc)
            logits = logits / jnp.sqrt(jnp.asarray(d // h, acc))
            weights = softmax_lowp(logits, m, q.dtype, causal)
            if drop:
                assert key is not None  # checked above
                keep = draw_flat(jax.random.bernoulli, key, weights.shape, p=1.0 - dropout)
                weights = jnp.where(keep, weights / (1.0 - dropout),
                                    jnp.zeros((), weights.dtype)).astype(weights.dtype)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        else:
            if drop:
                raise ModuleError(kind, f"implementation={impl!r} has no attention dropout; "
                                  f"use implementation=None or 'funtrain' with dropout > 0")
            # impl is one of the names jax accepts (checked by the factory)
            ctx = jax.nn.dot_product_attention(  # type: ignore[call-overload]
                q, k_, v, mask=m, is_causal=causal, implementation=impl)
        ctx = ctx.reshape(b, t, d)
        # Tagged so remat policies ("names:attention_out") can keep it.
        ctx = checkpoint_name(ctx, "attention_out")
        return project("out", ctx)

    return _make(kind, init, apply, name)
