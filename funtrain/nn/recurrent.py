"""Recurrent layers: ``lstm`` and ``gru`` over ``(batch, time, features)``.

Both follow PyTorch's equations and gate order, so weights port from
``torch.nn.LSTM`` / ``torch.nn.GRU`` by a transpose (``w_ih == weight_ih_l0.T``).
The input projection for all time steps is one matmul; the recurrence is a
``lax.scan`` over time, so compile time does not grow with the sequence length.

``apply(params, x, carry0=None)`` takes an optional initial carry (``(h, c)`` for
``lstm``, ``h`` for ``gru``, each ``(batch, hidden)``; zeros by default). With
``return_state=True`` it returns ``(outputs, final_carry)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from funtrain._typing import Array, Params, PRNGKey
from funtrain.nn import initializers as inits
from funtrain.nn.layers import _make, _positive_int
from funtrain.nn.module import (
    Module,
    ModuleError,
    check_param_shape,
    check_params,
    check_rank,
)

Initializer = inits.Initializer

_KEYS = ("w_ih", "w_hh", "b_ih", "b_hh")

# A cell maps (carry tuple, precomputed input gates (B, G*H), w_hh, b_hh) to the new
# carry tuple; the first entry of the carry is the output h.
Cell = Callable[[tuple[Array, ...], Array, Array, Array], tuple[Array, ...]]


def _lstm_cell(carry: tuple[Array, ...], gx: Array, w_hh: Array,
               b_hh: Array) -> tuple[Array, ...]:
    # b_hh is already folded into gx, outside the scan.
    h, c = carry
    i, f, g, o = jnp.split(gx + h @ w_hh, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


def _gru_cell(carry: tuple[Array, ...], gx: Array, w_hh: Array,
              b_hh: Array) -> tuple[Array, ...]:
    (h,) = carry
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(h @ w_hh + b_hh, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return ((1.0 - z) * n + z * h,)


def _recurrent(kind: str, gates: int, cell: Cell, carry_names: tuple[str, ...],
               fold_b_hh: bool, hidden_size: int, return_state: bool, reverse: bool,
               w_init: Initializer | None, b_init: Initializer | None, param_dtype: Any,
               name: str | None) -> Module:
    _positive_int(hidden_size, "hidden_size", kind)
    hid = hidden_size
    default = inits.uniform(1.0 / math.sqrt(hid))
    w_init = w_init or default
    b_init = b_init or default
    carry_desc = carry_names[0] if len(carry_names) == 1 else f"({', '.join(carry_names)})"

    def check_input(x: Any) -> None:
        check_rank(x, (3,), kind, "an input of shape (batch, time, features)")

    def carry_tuple(carry: Any, batch: int) -> tuple[Any, ...]:
        """The initial carry as a tuple of ``(batch, hidden)`` arrays, checked."""
        want = f"(batch, hidden) = {(batch, hid)}"
        if len(carry_names) == 1:
            parts = (carry,)
        elif not isinstance(carry, (tuple, list)) or len(carry) != len(carry_names):
            if isinstance(carry, (tuple, list)):
                got = f"a {type(carry).__name__} of length {len(carry)}"
            elif hasattr(carry, "shape"):
                got = f"a single array of shape {tuple(carry.shape)}"
            else:
                got = type(carry).__name__
            raise ModuleError(kind, f"expected the initial carry {carry_desc} as a pair of "
                              f"arrays of shape {want}, got {got}")
        else:
            parts = tuple(carry)
        for n, part in zip(carry_names, parts, strict=True):
            if not hasattr(part, "shape"):  # e.g. a GRU's h given as a 1-tuple (h,)
                raise ModuleError(kind, f"initial carry {n} must be an array of shape {want}, "
                                  f"got a {type(part).__name__}")
            shape = tuple(part.shape)
            if shape != (batch, hid):
                raise ModuleError(kind, f"initial carry {n} has shape {shape}, expected "
                                  f"{want} for input of batch size {batch}")
        return parts

    def init(key: PRNGKey, x: Any, carry: Any = None) -> Params:
        check_input(x)
        features = int(x.shape[-1])
        if carry is not None:
            carry_tuple(carry, int(x.shape[0]))
        k_ih, k_hh, kb_ih, kb_hh = jax.random.split(key, 4)
        return {
            "w_ih": w_init(k_ih, (features, gates * hid), param_dtype),
            "w_hh": w_init(k_hh, (hid, gates * hid), param_dtype),
            "b_ih": b_init(kb_ih, (gates * hid,), param_dtype),
            "b_hh": b_init(kb_hh, (gates * hid,), param_dtype),
        }

    def apply(params: Params, x: Array, carry: Any = None, *, key: PRNGKey | None = None,
              train: bool = False) -> Any:
        check_params(params, _KEYS, kind)
        check_input(x)
        batch, _, features = x.shape
        w_ih = params["w_ih"]
        if w_ih.ndim == 2 and w_ih.shape[0] != features:
            raise ModuleError(kind, f"expected an input with {w_ih.shape[0]} features on the "
                              f"last axis (w_ih has shape {tuple(w_ih.shape)}), got input of "
                              f"shape {tuple(x.shape)}")
        w_hh = params["w_hh"]
        if tuple(w_hh.shape) != (hid, gates * hid):
            raise ModuleError(kind, f"param '{{at}}w_hh' has shape {tuple(w_hh.shape)}, expected "
                              f"(hidden, {gates} * hidden) = {(hid, gates * hid)} for "
                              f"hidden_size {hid}")
        check_param_shape(params, "w_ih", (features, gates * hid), kind)
        check_param_shape(params, "b_ih", (gates * hid,), kind)
        check_param_shape(params, "b_hh", (gates * hid,), kind)

        parts = None if carry is None else carry_tuple(carry, batch)
        dtype = jnp.result_type(x, *(params[k] for k in _KEYS), *(parts or ()))
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(dtype, jnp.float32)
        w_ih, w_hh, b_ih, b_hh = (params[k].astype(dtype) for k in _KEYS)
        if parts is None:
            parts = tuple(jnp.zeros((batch, hid), dtype) for _ in carry_names)
        else:
            parts = tuple(jnp.asarray(p, dtype) for p in parts)

        # All time steps' input projections in one matmul, time-major for the scan.
        # In the LSTM b_hh adds outside the nonlinearities, so it folds in here once.
        bias = b_ih + b_hh if fold_b_hh else b_ih
        gx = jnp.einsum("btf,fg->tbg", x.astype(dtype), w_ih) + bias

        def step(c: tuple[Array, ...], g: Array) -> tuple[tuple[Array, ...], Array]:
            c = cell(c, g, w_hh, b_hh)
            return c, c[0]

        final, ys = lax.scan(step, parts, gx, reverse=reverse)
        out = jnp.swapaxes(ys, 0, 1)
        if not return_state:
            return out
        return out, (final if len(carry_names) > 1 else final[0])

    return _make(kind, init, apply, name)


def lstm(hidden_size: int, *, return_state: bool = False, reverse: bool = False,
         w_init: Initializer | None = None, b_init: Initializer | None = None,
         param_dtype: Any = jnp.float32, name: str | None = None) -> Module:
    r"""Long short-term memory over ``(batch, time, features)`` (Hochreiter & Schmidhuber, 1997).

    PyTorch's ``nn.LSTM`` equations, gates ``i, f, g, o`` in that order:

    .. math:: i, f, o = \sigma(W_{i\cdot} x + b_{i\cdot} + W_{h\cdot} h + b_{h\cdot}),\quad
              g = \tanh(\dots),\quad c' = f c + i g,\quad h' = o \tanh(c')

    Params: ``w_ih (features, 4*hidden)``, ``w_hh (hidden, 4*hidden)``, ``b_ih`` and
    ``b_hh (4*hidden,)``; ``w_ih`` is ``torch``'s ``weight_ih_l0.T``. Call as
    ``apply(params, x)`` or ``apply(params, x, (h0, c0))`` with ``h0, c0`` of shape
    ``(batch, hidden)`` (zeros by default). Computes in the result dtype of the input,
    params and carry.

    Args:
      hidden_size: size of ``h`` and ``c``.
      return_state: return ``(outputs, (h, c))`` instead of ``outputs (batch, time, hidden)``.
      reverse: run from the last time step to the first; outputs stay aligned with the input.
      w_init: initializer for ``w_ih`` and ``w_hh`` (applied to the whole fused matrix),
        default ``uniform(1 / sqrt(hidden_size))`` as PyTorch.
      b_init: initializer for ``b_ih`` and ``b_hh``, default as ``w_init``'s default.
      param_dtype: dtype the params are stored in.
      name: key under which a parent stores the params.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = lstm(8, return_state=True)
      >>> x = jnp.zeros((2, 5, 3))
      >>> params = layer.init(jax.random.key(0), x)
      >>> params["w_ih"].shape, params["w_hh"].shape, params["b_ih"].shape
      ((3, 32), (8, 32), (32,))
      >>> out, (h, c) = layer.apply(params, x)
      >>> out.shape, h.shape, c.shape
      ((2, 5, 8), (2, 8), (2, 8))
    """
    return _recurrent("lstm", 4, _lstm_cell, ("h", "c"), True, hidden_size, return_state, reverse,
                      w_init, b_init, param_dtype, name)


def gru(hidden_size: int, *, return_state: bool = False, reverse: bool = False,
        w_init: Initializer | None = None, b_init: Initializer | None = None,
        param_dtype: Any = jnp.float32, name: str | None = None) -> Module:
    r"""Gated recurrent unit over ``(batch, time, features)`` (Cho et al., 2014).

    PyTorch's ``nn.GRU`` equations, gates ``r, z, n`` in that order:

    .. math:: r, z = \sigma(W_{i\cdot} x + b_{i\cdot} + W_{h\cdot} h + b_{h\cdot}),\quad
              n = \tanh(W_{in} x + b_{in} + r (W_{hn} h + b_{hn})),\quad
              h' = (1 - z) n + z h

    Params: ``w_ih (features, 3*hidden)``, ``w_hh (hidden, 3*hidden)``, ``b_ih`` and
    ``b_hh (3*hidden,)``; ``w_ih`` is ``torch``'s ``weight_ih_l0.T``. Call as
    ``apply(params, x)`` or ``apply(params, x, h0)`` with ``h0`` of shape
    ``(batch, hidden)`` (zeros by default).

    Args:
      hidden_size: size of ``h``.
      return_state: return ``(outputs, h)`` instead of ``outputs (batch, time, hidden)``.
      reverse: run from the last time step to the first; outputs stay aligned with the input.
      w_init: initializer for ``w_ih`` and ``w_hh`` (applied to the whole fused matrix),
        default ``uniform(1 / sqrt(hidden_size))`` as PyTorch.
      b_init: initializer for ``b_ih`` and ``b_hh``, default as ``w_init``'s default.
      param_dtype: dtype the params are stored in.
      name: key under which a parent stores the params.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = gru(8)
      >>> x = jnp.zeros((2, 5, 3))
      >>> params = layer.init(jax.random.key(0), x)
      >>> params["w_ih"].shape, params["w_hh"].shape
      ((3, 24), (8, 24))
      >>> layer.apply(params, x, jnp.ones((2, 8))).shape
      (2, 5, 8)
    """
    return _recurrent("gru", 3, _gru_cell, ("h",), False, hidden_size, return_state, reverse,
                      w_init, b_init, param_dtype, name)
