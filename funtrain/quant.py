"""Quantization: int8/int4 weights as pytrees, integer matmuls, and quantization-aware training.

A quantized model is just params: :func:`quantize` turns the selected float leaves into
:class:`QTensor` s (symmetric integers plus float32 scales, int4 packed two per byte), and
the tree checkpoints and jits like any other (sharding rules see its leaves' key paths,
``dense_0/w/values`` and ``dense_0/w/scale``; int4 values are one flat array). ``nn.dense``
and ``nn.conv`` take a ``QTensor`` as their ``w``:

- by default they dequantize it on the fly (XLA fuses the scaling into the matmul's
  operand), so any model runs on quantized params unchanged;
- with ``quantize(..., activations="dynamic")`` they quantize each input row (each example
  for a convolution) with its own symmetric scale, ``max|x| / 127``, at run time (finer
  than torch's ``quantize_dynamic``, which uses one asymmetric scale per tensor), and run
  an int8 x int8 -> int32 matmul or convolution
  (``preferred_element_type=int32``), rescaled once at the end;
- after :func:`calibrate` (one activation scale per layer, from the max or a percentile
  of ``|x|`` over a few batches) they do the same with that fixed scale.

Quantization-aware training wraps a model with :func:`qat`: its weights (and optionally the
model's input) go through :func:`fake_quant`, which rounds in the forward pass and passes the
gradient straight through (a ``custom_vjp``). Export the trained params with
:func:`quantize`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from funtrain import nn, quant
  >>> model = nn.mlp([16, 3])
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8)))
  >>> q = quant.quantize(params, bits=8)
  >>> model.apply(q, jnp.ones((2, 8))).shape
  (2, 3)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funtrain._tree import KERNELS, key_path_selector, keystr
from funtrain.optim.fused import has_fused

__all__ = ["QTensor", "quantize", "dequantize", "calibrate", "fake_quant", "qat",
           "pack_int4", "unpack_int4", "DEFAULT_SELECT"]

DEFAULT_SELECT = KERNELS  # the kernels of dense and conv layers; biases and norms stay
_GRANULARITIES = ("per_channel", "per_tensor")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """Symmetric integer weights: ``w ≈ values * scale``.

    Attributes:
      values: int8 (``bits=8``), or uint8 holding two int4 values per byte (``bits=4``,
        packed over the flattened array; see :func:`pack_int4`).
      scale: float32, per output channel (the last axis, shape ``(1, ..., 1, out)``) or a
        scalar per tensor.
      act_scale: the input's scale for the integer matmul, from :func:`calibrate`, or
        ``None`` (dequantize on the fly, or quantize the input at run time: ``dynamic``).
      bits, shape, dtype: static: the bit width, and the float weight's shape and dtype.
      dynamic: static: without ``act_scale``, quantize the input per row at run time.
      name: static: the key path, so that :func:`calibrate` can tell the layers apart.
    """

    values: Any
    scale: Any
    act_scale: Any = None
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))
    name: str = dataclasses.field(default="", metadata=dict(static=True))
    dynamic: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def integers(self) -> jax.Array:
        """The integer values as int8, unpacked and in ``shape``."""
        if self.bits == 4:
            return unpack_int4(self.values, self.shape)
        return self.values

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float weight, in ``dtype`` (default: the original weight's dtype)."""
        return (self.integers().astype(jnp.float32) * self.scale).astype(dtype or self.dtype)

    def __jax_array__(self) -> jax.Array:  # any other use (attention's ``v @ w``) sees floats
        return self.dequantize()


# ----------------------------------------------------------------------------- int4 packing


def pack_int4(q: jax.Array) -> jax.Array:
    """int8 values in ``[-8, 7]`` as uint8, two per byte over the flattened array (the
    first in the low nibble; an odd count is padded with a zero)."""
    flat = jnp.ravel(q).astype(jnp.uint8) & 0xF
    if flat.size % 2:
        flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`pack_int4`: int8 values of ``shape``."""
    nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1).astype(jnp.int8)
    signed = (nibbles ^ 8) - 8  # sign-extend 4 bits
    return signed[:int(np.prod(shape))].reshape(shape)


# ----------------------------------------------------------------------------- quantize


def _check(where: str, bits: Any, granularity: Any) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if granularity not in _GRANULARITIES:
        raise ValueError(f"{where}: granularity must be one of {_GRANULARITIES}, got "
                         f"{granularity!r}")


def _scale(w: jax.Array, bits: int, granularity: str) -> jax.Array:
    """max |w| / qmax, over everything but the last (output) axis for per_channel."""
    qmax = 2 ** (bits - 1) - 1
    axes = tuple(range(w.ndim - 1)) if granularity == "per_channel" and w.ndim > 1 else None
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=axes is not None)
    return _amax_scale(amax, qmax)


def _amax_scale(amax: jax.Array, qmax: int) -> jax.Array:
    """``amax / qmax``, or 1 where that is not a normal float32 (an all-zero channel, or one
    so small that the quotient flushes to 0 and ``0 / scale`` would be NaN): its integers
    are 0 either way. A NaN stays NaN, so a NaN input or weight gives NaN, as in float."""
    normal = (amax >= qmax * float(jnp.finfo(jnp.float32).tiny)) | jnp.isnan(amax)
    return jnp.where(normal, amax / qmax, 1.0).astype(jnp.float32)


def _integers(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    qmax = 2 ** (bits - 1) - 1
    return jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -qmax, qmax).astype(jnp.int8)


def quantize_leaf(w: jax.Array, bits: int = 8, granularity: str = "per_channel",
                  name: str = "", dynamic: bool = False) -> QTensor:
    """One float array as a :class:`QTensor` (no checks: see :func:`quantize`)."""
    scale = _scale(w, bits, granularity)
    q = _integers(w, scale, bits)
    values = pack_int4(q) if bits == 4 else q
    return QTensor(values, scale, None, bits, tuple(w.shape), jnp.dtype(w.dtype), name,
                   dynamic)


def quantize(params: Any, bits: int = 8, granularity: str = "per_channel",
             select: str | Callable[[str, Any], bool] | None = None,
             activations: str | None = None) -> Any:
    """Post-training quantization: the selected leaves of ``params`` as :class:`QTensor` s.

    Symmetric, round to nearest: ``scale = max|w| / (2**(bits-1) - 1)`` per output channel
    (the last axis) or per tensor, ``values = round(w / scale)``; so ``|dequantize - w| <=
    scale / 2`` element by element, computed in float32 (``QTensor.dequantize(jnp.float32)``).
    Dequantized to a bfloat16 or float16 weight's own dtype, the cast adds that dtype's
    rounding (half its ulp: with bf16 and int8, up to about another ``scale / 2`` near
    ``max|w|``).

    Args:
      params: a params tree (``QTensor`` leaves already there are kept).
      bits: 8 (int8) or 4 (int4, packed two per byte).
      granularity: ``"per_channel"`` (default) or ``"per_tensor"``.
      select: which leaves: a regex searched in the key path (``"dense_0/w"``), a function
        ``(path, leaf) -> bool``, or ``None`` for :data:`DEFAULT_SELECT` (every ``w``).
      activations: ``None``: layers dequantize the weight and multiply in float;
        ``"dynamic"``: they quantize their input per row at run time and multiply int8 x
        int8 -> int32 (see the module docstring; :func:`calibrate` gives fixed scales).

    Raises:
      ValueError: bits other than 4/8, an unknown granularity or activations mode, or a
        selected leaf that is not floating point (the message names its key path).
    """
    _check("quant.quantize", bits, granularity)
    if has_fused(params):
        raise TypeError("quant.quantize: params are fused (TrainState.create(..., "
                        "fused=True)); quantize params.unflatten() instead")
    if activations not in (None, "dynamic"):
        raise ValueError(f"quant.quantize: activations must be None or 'dynamic', got "
                         f"{activations!r}")
    chosen = key_path_selector(select, "quant.quantize")

    def one(path: Any, leaf: Any) -> Any:
        name = keystr(path)
        if isinstance(leaf, QTensor) or not chosen(name, leaf):
            return leaf
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"quant.quantize: key path {name!r} holds {jnp.result_type(leaf)}"
                             f" values; only floating-point leaves can be quantized (narrow "
                             f"`select`)")
        return quantize_leaf(jnp.asarray(leaf), bits, granularity, name,
                             activations == "dynamic")

    return jax.tree_util.tree_map_with_path(one, params,
                                            is_leaf=lambda x: isinstance(x, QTensor))


def dequantize(params: Any) -> Any:
    """``params`` with every :class:`QTensor` back as a float array of its dtype."""
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QTensor) else x, params,
                        is_leaf=lambda x: isinstance(x, QTensor))


# ----------------------------------------------------------------------------- integer kernels


def _input_scale(w: QTensor, x: jax.Array, axes: tuple[int, ...]) -> jax.Array | None:
    """The input's scale: calibrated, per row (``axes`` reduced) at run time for a dynamic
    ``w``, or ``None`` (multiply in float)."""
    if w.act_scale is not None:
        return w.act_scale
    if not w.dynamic:
        return None
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
    return _amax_scale(amax, 127)


def _quantize_input(x: jax.Array, act_scale: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x.astype(jnp.float32) / act_scale), -127, 127).astype(jnp.int8)


def matmul(x: jax.Array, w: QTensor) -> jax.Array:
    """``x @ w`` for a quantized ``w`` (as ``nn.dense`` calls it): int8 x int8 -> int32
    with a calibrated or dynamic input scale, else on the dequantized weight."""
    _record(w, x)
    dt = jnp.result_type(x, w.dtype)  # as a float matmul promotes (an int input too)
    s = _input_scale(w, x, (x.ndim - 1,))
    if s is None:
        return jnp.matmul(x.astype(dt), w.dequantize(dt))  # no detour through a bf16 weight
    acc = lax.dot_general(_quantize_input(x, s), w.integers(),
                          (((x.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * (s * w.scale.reshape(-1))).astype(dt)


def conv(x: jax.Array, w: QTensor, **conv_kwargs: Any) -> jax.Array:
    """``lax.conv_general_dilated(x, w, ...)`` for a quantized ``w`` (as ``nn.conv`` calls
    it), in integers with a calibrated or dynamic (per example) input scale."""
    _record(w, x)
    dt = jnp.result_type(x, w.dtype)
    s = _input_scale(w, x, tuple(range(1, x.ndim)))
    if s is None:
        return lax.conv_general_dilated(x.astype(dt), w.dequantize(dt), **conv_kwargs)
    acc = lax.conv_general_dilated(_quantize_input(x, s), w.integers(),
                                   preferred_element_type=jnp.int32, **conv_kwargs)
    return (acc.astype(jnp.float32) * (s * w.scale.reshape(-1))).astype(dt)


# ----------------------------------------------------------------------------- calibration

_RECORDER: dict[str, list[np.ndarray]] | None = None


def _record(w: QTensor, x: jax.Array) -> None:
    if _RECORDER is not None:
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"quant.calibrate runs the model eagerly, but the input of "
                            f"{w.name!r} is traced: do not jit the model, and calibrate it "
                            f"built without jax.checkpoint / remat (the same params fit)")
        _RECORDER.setdefault(w.name, []).append(np.abs(np.asarray(x, np.float32)).ravel())


def calibrate(apply: Callable[..., Any], qparams: Any, batches: Iterable[Any],
              method: str = "max", percentile: float = 99.99) -> Any:
    """Activation scales for the integer kernels, from a few batches.

    Runs ``apply(qparams, batch)`` eagerly on each batch (e.g. ``lambda p, b:
    model.apply(p, b["x"])``), records ``|x|`` at the input of every quantized layer, and
    sets its ``act_scale`` to ``max / 127`` (``method="max"``) or the ``percentile``-th
    percentile / 127 (``"percentile"``: outliers are clipped, the rest gets finer steps).

    Returns:
      ``qparams`` with the ``act_scale`` of every ``QTensor`` whose layer ran set, so
      ``nn.dense`` and ``nn.conv`` run int8 x int8 -> int32. The others keep ``None`` and
      run on their dequantized weights, with a warning naming them: kernels without an
      integer path (``conv_transpose``, attention's projections, ``remat.repeat``'s
      stacked blocks) and layers the batches did not reach. With a calibrated scale a NaN
      input quantizes to 0, as in int8 engines (a dynamic scale gives NaN, as in float).

    Raises:
      ValueError: two quantized kernels share a name (parts of the params quantized in
        separate calls, whose key paths repeat): their inputs would share one scale. Or a
        layer's input held a NaN or inf in the batches (its scale would make every output
        NaN, or 0).
    """
    global _RECORDER
    if method not in ("max", "percentile"):
        raise ValueError(f"quant.calibrate: method must be 'max' or 'percentile', got "
                         f"{method!r}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"quant.calibrate: percentile must be in (0, 100], got {percentile}")
    plain = jax.tree.map(lambda x: dataclasses.replace(x, act_scale=None)
                         if isinstance(x, QTensor) else x, qparams,
                         is_leaf=lambda x: isinstance(x, QTensor))
    # inputs are recorded by the kernel's name (its key path when quantized): two kernels of
    # one name would share one scale
    names = [x.name for x in jax.tree.leaves(plain, is_leaf=lambda x: isinstance(x, QTensor))
             if isinstance(x, QTensor)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"quant.calibrate: several quantized kernels are named {twice} (their "
                         f"key paths in the tree each quantize call got), so their inputs "
                         f"would share one scale; quantize the whole params tree in one call")
    _RECORDER = {}
    try:
        seen = 0
        for batch in batches:
            apply(plain, batch)
            seen += 1
        recorded = _RECORDER
    finally:
        _RECORDER = None
    if not seen:
        raise ValueError("quant.calibrate: batches yielded nothing")

    skipped: list[str] = []

    def scaled(x: Any) -> Any:
        if not isinstance(x, QTensor):
            return x
        if x.name not in recorded:
            skipped.append(x.name)
            return x
        values = np.concatenate(recorded[x.name])
        if not np.isfinite(values).all():  # its scale would be NaN: every output NaN
            raise ValueError(f"quant.calibrate: the input of {x.name!r} holds "
                             f"{int((~np.isfinite(values)).sum())} non-finite value(s) "
                             f"(nan/inf) over the calibration batches; check the batches")
        amax = values.max() if method == "max" else np.percentile(values, percentile)
        return dataclasses.replace(x, act_scale=jnp.float32(max(float(amax), 1e-12) / 127))

    out = jax.tree.map(scaled, plain, is_leaf=lambda x: isinstance(x, QTensor))
    if skipped:
        warnings.warn(f"quant.calibrate: no integer-kernel input was recorded for "
                      f"{', '.join(map(repr, skipped))} (a kernel without an integer path, "
                      f"or a layer the batches did not reach): they keep act_scale=None and "
                      f"run on their dequantized weights", stacklevel=2)
    return out


# ----------------------------------------------------------------------------- QAT


@jax.custom_vjp
def _fake_quant(w: jax.Array, scale: jax.Array, qmax: int) -> jax.Array:
    return (jnp.clip(jnp.round(w / scale), -qmax, qmax) * scale).astype(w.dtype)


def _fake_quant_fwd(w: jax.Array, scale: jax.Array, qmax: int
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    # round(w / scale) reaches qmax + 1 (and is clipped) only past qmax + 1/2 steps
    return _fake_quant(w, scale, qmax), (jnp.abs(w) <= (qmax + 0.5) * scale, scale)


def _fake_quant_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array
                    ) -> tuple[jax.Array, jax.Array, None]:
    inside, scale = res  # straight through inside the range, zero where clipped
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale), None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(w: jax.Array, bits: int = 8, granularity: str = "per_channel",
               scale: jax.Array | None = None) -> jax.Array:
    """``w`` rounded to the ``bits``-bit grid and back (what :func:`quantize` then
    :func:`dequantize` give), with a straight-through gradient: the rounding's gradient is
    taken as 1 inside the representable range and 0 where a value is clipped.

    The scale is ``max|w| / qmax`` (per output channel by default), not differentiated;
    pass ``scale`` for a fixed one (activations: a calibrated scale)."""
    _check("quant.fake_quant", bits, granularity)
    if scale is None:
        scale = lax.stop_gradient(_scale(w, bits, granularity))
    return _fake_quant(w, scale, 2 ** (bits - 1) - 1)


def qat(model: Any, bits: int = 8, granularity: str = "per_channel",
        select: str | Callable[[str, Any], bool] | None = None,
        activation_bits: int | None = None) -> Any:
    """``model`` trained with quantized weights: its ``apply`` passes the selected params
    through :func:`fake_quant` (and, with ``activation_bits``, its input too, per tensor),
    so ``fit`` trains float params that survive :func:`quantize` with ``bits``. ``init``
    and the params are the model's own.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn, quant
      >>> model = quant.qat(nn.mlp([8, 2]), bits=4)
      >>> p = model.init(jax.random.key(0), jnp.zeros((1, 3)))
      >>> model.apply(p, jnp.ones((1, 3))).shape
      (1, 2)
    """
    _check("quant.qat", bits, granularity)
    if activation_bits is not None:
        _check("quant.qat", activation_bits, "per_tensor")
    chosen = key_path_selector(select, "quant.qat")

    def apply(params: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        faked = jax.tree_util.tree_map_with_path(
            lambda path, w: fake_quant(w, bits, granularity)
            if chosen(keystr(path), w) and jnp.issubdtype(w.dtype, jnp.floating) else w,
            params)
        if activation_bits is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating):
            x = fake_quant(x, activation_bits, "per_tensor")  # not token ids or masks
        return model.apply(faked, x, *args, **kwargs)

    return model._replace(apply=apply)
