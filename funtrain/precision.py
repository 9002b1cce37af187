"""Mixed precision: dtype policies, casting, and loss scales that survive ``jax.jit``.

A :class:`Policy` names three dtypes: ``param_dtype`` (how params are stored, usually
float32 "master weights"), ``compute_dtype`` (what the forward and backward pass run in)
and ``output_dtype`` (what a model returns). :func:`get_policy` parses them from text such
as ``"params=float32,compute=bfloat16,output=float32"``.

A loss scale multiplies the loss before differentiation so that small float16 gradients do
not underflow, and divides the gradients afterwards. Loss scales are immutable pytrees whose
every field is an array leaf, so they pass through ``jax.jit``, ``lax.scan`` and tree
flatten/unflatten with nothing lost::

    scaled_loss, grads = jax.value_and_grad(lambda p: scale.scale(loss_fn(p)))(params)
    grads = scale.unscale(grads)
    finite = all_finite(grads)
    scale = scale.adjust(finite)           # and skip the update where ``finite`` is False

Only floating arrays are ever cast or scaled: integer and boolean arrays, typed PRNG keys,
Python scalars and ``None`` pass through unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from funtrain._tree import reduction_groups
from funtrain._typing import Array, PyTree

__all__ = [
    "Policy",
    "get_policy",
    "as_policy",
    "half_dtype",
    "cast_tree",
    "all_finite",
    "LossScale",
    "NoOpLossScale",
    "StaticLossScale",
    "DynamicLossScale",
]

_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)
_F16 = np.dtype(jnp.float16)
_F64 = np.dtype(jnp.float64)
_F32_MAX = float(jnp.finfo(jnp.float32).max)
_INT32_MAX = int(jnp.iinfo(jnp.int32).max)

# --------------------------------------------------------------------------- dtypes

_DTYPE_ALIASES = {
    "float32": _F32, "f32": _F32, "fp32": _F32, "full": _F32,
    "bfloat16": _BF16, "bf16": _BF16,
    "float16": _F16, "f16": _F16, "fp16": _F16,
    "float64": _F64, "f64": _F64, "fp64": _F64,
}
_ACCEPTED_DTYPES = ("float32 (f32, fp32, full), bfloat16 (bf16), float16 (f16, fp16), "
                    "float64 (f64, fp64), half (bfloat16 or float16, see half_dtype), or "
                    "another floating dtype's name such as float8_e4m3fn")
_KEYS = {"p": "param", "param": "param", "params": "param",
         "c": "compute", "compute": "compute",
         "o": "output", "output": "output"}
_ACCEPTED_KEYS = "p, param, params, c, compute, o, output"
_EXAMPLE = "'params=float32,compute=bfloat16,output=float32'"


def _cc_major(capability: Any) -> int | None:
    """The major version of a device's ``compute_capability`` ("8.6" -> 8), or None."""
    if capability is None:
        return None
    if isinstance(capability, (tuple, list)):
        capability = capability[0] if capability else None
    try:
        return int(str(capability).split(".")[0])
    except ValueError:
        return None


def half_dtype(backend: str | None = None) -> np.dtype:
    """The 16-bit float that runs fastest on ``backend``: what the policy name ``half`` means.

    The rule: ``bfloat16`` where bfloat16 matmuls are native, that is on TPU and on NVIDIA
    GPUs of compute capability 8.0 or newer (Ampere, Hopper, Blackwell), read from
    ``jax.devices(backend)[0].compute_capability``; ``float16`` everywhere else: older
    NVIDIA GPUs, GPUs that report no CUDA compute capability, a GPU backend with no device
    present, the CPU and unknown backends. float16 needs a loss scale to train
    (:class:`DynamicLossScale`); bfloat16 has float32's range and usually does not.

    Args:
      backend: ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"`` (any case), or
        ``None`` for ``jax.default_backend()``.

    Returns:
      ``np.dtype('bfloat16')`` or ``np.dtype('float16')``.

    Examples:
      >>> half_dtype("tpu"), half_dtype("cpu")
      (dtype(bfloat16), dtype('float16'))
    """
    if backend is None:
        backend = jax.default_backend()
    if not isinstance(backend, str):
        raise TypeError(f"half_dtype: backend must be a string such as 'gpu' or 'tpu', or "
                        f"None for the default backend, got {type(backend).__name__} "
                        f"({backend!r})")
    name = backend.strip().lower()
    if name == "tpu":
        return _BF16
    if name in ("gpu", "cuda", "rocm"):
        try:
            devices = jax.devices(name)
        except RuntimeError:  # no such backend on this machine
            return _F16
        major = _cc_major(getattr(devices[0], "compute_capability", None)) if devices else None
        if major is not None and major >= 8:
            return _BF16
    return _F16


def _parse_dtype(value: str, where: str, label: str) -> np.dtype:
    """A floating dtype from its name or alias; errors name ``label`` and list the accepted."""
    name = value.strip().lower()
    if name == "half":
        return half_dtype()
    if name in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[name]
    try:
        dtype = np.dtype(jnp.dtype(name))
    except (TypeError, ValueError):
        dtype = None
    # Only canonical names: numpy's "float" means float64 and "f4"/"<f4" are cryptic.
    if dtype is None or dtype.name != name:
        raise ValueError(f"{where}: unknown dtype {value.strip()!r} for {label} "
                         f"(accepted: {_ACCEPTED_DTYPES})")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: dtype {value.strip()!r} for {label} is not a floating "
                         f"dtype; a policy casts floating arrays only (accepted: "
                         f"{_ACCEPTED_DTYPES})")
    return dtype


def _as_float_dtype(value: Any, where: str, label: str) -> np.dtype:
    """A floating ``np.dtype`` from a name, an alias, a dtype or a scalar type."""
    if isinstance(value, str):
        return _parse_dtype(value, where, label)
    try:
        if value is None:  # np.dtype(None) is float64, whatever jax_enable_x64 says
            raise TypeError
        dtype = np.dtype(jnp.dtype(value))
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {label} must be a dtype or its name, got "
                        f"{type(value).__name__} ({value!r})") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: {label} must be a floating dtype, got {dtype.name} "
                         f"(accepted: {_ACCEPTED_DTYPES})")
    return dtype


# --------------------------------------------------------------------------- casting


def _is_float_array(x: Any) -> bool:
    return (isinstance(x, (jax.Array, np.ndarray, np.generic))
            and jnp.issubdtype(x.dtype, jnp.floating))


def _is_inexact(x: Any) -> bool:
    """A Python float, or an array of a floating or complex dtype."""
    return isinstance(x, float) or (isinstance(x, (jax.Array, np.ndarray, np.generic))
                                    and jnp.issubdtype(x.dtype, jnp.inexact))


def cast_tree(tree: PyTree, dtype: Any) -> PyTree:
    """Cast every floating array in ``tree`` to ``dtype``; everything else is unchanged.

    Integer and boolean arrays, typed PRNG keys, Python scalars and ``None`` pass through,
    and so do arrays that already have ``dtype`` (no copy). numpy arrays stay numpy arrays.
    """
    dtype = _as_float_dtype(dtype, "cast_tree", "dtype")

    def cast(x: Any) -> Any:
        if _is_float_array(x) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


# --------------------------------------------------------------------------- policy


class _PolicyFields(NamedTuple):
    param_dtype: np.dtype
    compute_dtype: np.dtype
    output_dtype: np.dtype


class Policy(_PolicyFields):
    """Three dtypes: how params are stored, what the model computes in, what it returns.

    Fields are always ``np.dtype`` objects; the constructor also takes names and aliases
    (``"bf16"``, ``"half"``) and scalar types (``jnp.bfloat16``). A missing
    ``compute_dtype`` is ``param_dtype`` and a missing ``output_dtype`` is
    ``compute_dtype``, as in :func:`get_policy`. ``str(policy)`` gives the text that
    :func:`get_policy` parses back to the same policy.

    A policy is static configuration: as a pytree it has no leaves, so it may ride along in
    the arguments of a jitted function (and it is hashable, for ``static_argnums``).

    Examples:
      >>> import jax.numpy as jnp
      >>> policy = Policy("float32", "bf16", "float32")
      >>> str(policy)
      'params=float32,compute=bfloat16,output=float32'
      >>> policy.cast_to_compute({"w": jnp.ones(2), "step": 3})["w"].dtype
      dtype(bfloat16)
    """

    __slots__ = ()

    def __new__(cls, param_dtype: Any = "float32", compute_dtype: Any = None,
                output_dtype: Any = None) -> Policy:
        p = _as_float_dtype(param_dtype, "Policy", "param_dtype")
        c = p if compute_dtype is None else _as_float_dtype(compute_dtype, "Policy",
                                                            "compute_dtype")
        o = c if output_dtype is None else _as_float_dtype(output_dtype, "Policy",
                                                           "output_dtype")
        return super().__new__(cls, p, c, o)

    @classmethod
    def _make(cls, iterable: Any) -> Policy:  # type: ignore[override]  # _replace validates
        return cls(*iterable)

    def cast_to_param(self, tree: PyTree) -> PyTree:
        """Cast the floating arrays of ``tree`` to ``param_dtype``."""
        return cast_tree(tree, self.param_dtype)

    def cast_to_compute(self, tree: PyTree) -> PyTree:
        """Cast the floating arrays of ``tree`` to ``compute_dtype``."""
        return cast_tree(tree, self.compute_dtype)

    def cast_to_output(self, tree: PyTree) -> PyTree:
        """Cast the floating arrays of ``tree`` to ``output_dtype``."""
        return cast_tree(tree, self.output_dtype)

    def with_param(self, dtype: Any) -> Policy:
        """This policy with ``param_dtype`` replaced (the others kept as they are)."""
        return Policy(dtype, self.compute_dtype, self.output_dtype)

    def with_compute(self, dtype: Any) -> Policy:
        """This policy with ``compute_dtype`` replaced (the others kept as they are)."""
        return Policy(self.param_dtype, dtype, self.output_dtype)

    def with_output(self, dtype: Any) -> Policy:
        """This policy with ``output_dtype`` replaced (the others kept as they are)."""
        return Policy(self.param_dtype, self.compute_dtype, dtype)

    def __str__(self) -> str:
        return (f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
                f"output={self.output_dtype.name}")

    def __repr__(self) -> str:
        return (f"Policy(param_dtype={self.param_dtype.name}, compute_dtype="
                f"{self.compute_dtype.name}, output_dtype={self.output_dtype.name})")


def _policy_flatten(p: Policy) -> tuple[tuple[()], tuple[Any, ...]]:
    return (), tuple(p)


jax.tree_util.register_pytree_node(Policy, _policy_flatten, lambda aux, _: Policy(*aux))


def get_policy(text: str) -> Policy:
    """Parse a policy from text such as ``"params=float32,compute=bfloat16,output=float32"``.

    The text is comma-separated ``key=value`` entries, or one bare dtype that sets all
    three (``"bf16"``, ``"half"``). Whitespace around keys, values and commas is ignored,
    and so is case.

    - keys: ``p``/``param``/``params``, ``c``/``compute``, ``o``/``output``; each at most once;
    - values: ``float32``/``f32``/``fp32``/``full``, ``bfloat16``/``bf16``,
      ``float16``/``f16``/``fp16``, ``float64``/``f64``/``fp64``, ``half`` (resolved now by
      :func:`half_dtype` for the default backend), or any floating dtype's numpy name
      (``float8_e4m3fn``). Integer, boolean and complex dtypes are refused.
    - missing keys (jmp's rule): params default to float32, compute to the params dtype,
      output to the compute dtype. So ``"c=bf16"`` is float32 params with bfloat16 compute
      *and* output; write ``"c=bf16,o=f32"`` for float32 outputs.

    float64 needs ``jax.config.update("jax_enable_x64", True)`` to take effect.

    Args:
      text: the policy text.

    Returns:
      a :class:`Policy`; ``str()`` of it parses back to the same policy.

    Examples:
      >>> print(get_policy("p=f32, c=bf16, o=f32"))
      params=float32,compute=bfloat16,output=float32
      >>> print(get_policy("c=f16"))
      params=float32,compute=float16,output=float16
    """
    where = "get_policy"
    if not isinstance(text, str):
        raise TypeError(f"{where}: text must be a string such as {_EXAMPLE}, got "
                        f"{type(text).__name__} ({text!r}); as_policy also takes a Policy "
                        f"or a dtype")
    if not text.strip():
        raise ValueError(f"{where}: empty policy string; expected key=value entries such as "
                         f"{_EXAMPLE}, or one dtype such as 'bf16' for all three")
    if "=" not in text and "," not in text:
        dtype = _parse_dtype(text, where, "a bare policy")
        return Policy(dtype, dtype, dtype)
    found: dict[str, tuple[str, np.dtype]] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"{where}: empty entry in {text!r}; entries are key=value pairs "
                             f"separated by single commas, e.g. {_EXAMPLE}")
        if "=" not in entry:
            raise ValueError(f"{where}: entry {entry!r} in {text!r} is not key=value (keys: "
                             f"{_ACCEPTED_KEYS}); a bare dtype must stand alone")
        key, value = (s.strip() for s in entry.split("=", 1))
        field = _KEYS.get(key.lower())
        if field is None:
            raise ValueError(f"{where}: unknown key {key!r} in {text!r} (accepted: "
                             f"{_ACCEPTED_KEYS})")
        if field in found:
            raise ValueError(f"{where}: {field!r} is given twice in {text!r} "
                             f"({found[field][0]!r} and {entry!r})")
        found[field] = (entry, _parse_dtype(value, where, repr(field)))
    param = found["param"][1] if "param" in found else _F32
    compute = found["compute"][1] if "compute" in found else param
    output = found["output"][1] if "output" in found else compute
    return Policy(param, compute, output)


def as_policy(policy: Any) -> Policy:
    """A :class:`Policy` from a Policy (returned as is), its text, or one dtype for all three.

    Examples:
      >>> import jax.numpy as jnp
      >>> as_policy("bf16") == as_policy(jnp.bfloat16) == Policy("bf16", "bf16", "bf16")
      True
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return get_policy(policy)
    if policy is None:
        raise TypeError(f"as_policy: expected a Policy, its text such as {_EXAMPLE}, or a "
                        f"dtype, got None")
    try:
        dtype = np.dtype(jnp.dtype(policy))
    except (TypeError, ValueError):
        raise TypeError(f"as_policy: expected a Policy, its text such as {_EXAMPLE}, or a "
                        f"dtype, got {type(policy).__name__} ({policy!r})") from None
    return Policy(dtype, dtype, dtype)


# --------------------------------------------------------------------------- finiteness


def all_finite(tree: PyTree) -> Array:
    """``True`` (a scalar bool array) when every floating value in ``tree`` is finite.

    Each floating leaf (arrays of any float dtype, and Python floats) is tested with
    ``isfinite`` in its own dtype, which is exact, then reduced with a logical AND; no
    sum is formed, so large but finite values never overflow into a false alarm. Other
    leaves are ignored; a tree without floating leaves is finite.

    Examples:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf], jnp.float16)}))
      False
    """
    floats = [jnp.asarray(x) for x in jax.tree.leaves(tree) if _is_inexact(x)]
    by_dtype: dict[Any, list[Any]] = {}
    for x in floats:  # joined per dtype: isfinite stays exact in each leaf's own dtype
        by_dtype.setdefault(x.dtype, []).append(x)
    # Not stacked: fused with the updates, the stacks changed the params' last bits.
    checks = [jnp.all(jnp.isfinite(g)) for group in by_dtype.values()
              for g in reduction_groups(group, stack=False)]
    if not checks:
        return jnp.array(True)
    return checks[0] if len(checks) == 1 else jnp.all(jnp.stack(checks))


# --------------------------------------------------------------------------- loss scales


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_positive(where: str, name: str, value: Any, *, above: float = 0.0) -> float | None:
    """Validate a finite scalar ``> above`` (after conversion to float32); None when traced."""
    if _is_traced(value):
        return None
    if isinstance(value, (bool, np.bool_)) or not (
            isinstance(value, (int, float, np.number))
            or (hasattr(value, "dtype") and (jnp.issubdtype(value.dtype, jnp.floating)
                                             or jnp.issubdtype(value.dtype, jnp.integer)))):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} "
                        f"({value!r})")
    if np.ndim(value) != 0:
        raise ValueError(f"{where}: {name} must be a scalar, got shape {np.shape(value)}")
    original = float(np.asarray(value, np.float64))
    with np.errstate(over="ignore"):  # 1e39 becomes inf in float32: reported below
        as_f32 = float(np.float32(original))
    if not (math.isfinite(as_f32) and as_f32 > above):
        bound = f"> {above:g}" if above else "> 0"
        if not math.isfinite(as_f32) and math.isfinite(original):
            extra = f" (it overflows float32, whose largest value is {_F32_MAX:.6g})"
        elif as_f32 != original:
            extra = f" ({as_f32:g} in float32)"
        else:
            extra = ""
        raise ValueError(f"{where}: {name} must be a finite number {bound}, got "
                         f"{original!r}{extra}")
    return as_f32


def _check_period(where: str, period: Any) -> None:
    if _is_traced(period):
        return
    integral = (isinstance(period, (int, np.integer)) or (
        hasattr(period, "dtype") and jnp.issubdtype(period.dtype, jnp.integer)))
    if isinstance(period, (bool, np.bool_)) or not integral:
        raise TypeError(f"{where}: period must be an integer >= 1 (the number of finite "
                        f"steps between increases), got {type(period).__name__} ({period!r})")
    if np.ndim(period) != 0:
        raise ValueError(f"{where}: period must be a scalar, got shape {np.shape(period)}")
    value = int(np.asarray(period))
    if not 1 <= value <= _INT32_MAX:
        raise ValueError(f"{where}: period must be an integer in [1, {_INT32_MAX}], got {value}")


def _check_finite_flag(where: str, grads_finite: Any) -> Array:
    flag = jnp.asarray(grads_finite)
    if flag.dtype != jnp.bool_:
        raise TypeError(f"{where}: grads_finite must be a boolean (e.g. all_finite(grads)), got "
                        f"dtype {flag.dtype}")
    if flag.ndim != 0:
        raise ValueError(f"{where}: grads_finite must be a scalar boolean (e.g. "
                         f"all_finite(grads)), got shape {tuple(flag.shape)}")
    return flag


def _show(x: Any) -> str:
    """A leaf for ``repr``: a plain number when concrete, else the leaf's own repr."""
    try:
        value = np.asarray(x)
    except Exception:  # tracers and sentinels
        return repr(x)
    if value.ndim == 0 and value.dtype.kind in "fiub":
        return repr(value.item())
    return repr(x)


def _apply_scale(tree: PyTree, loss_scale: Array, op: Any) -> PyTree:
    def leaf(x: Any) -> Any:
        if isinstance(x, float):
            x = jnp.asarray(x, jnp.float32)
        if not _is_inexact(x):
            return x
        wide = jnp.promote_types(x.dtype, jnp.float32)
        # a complex leaf is scaled by the real scale (real and imaginary parts alike)
        real = jnp.finfo(wide).dtype
        return op(jnp.asarray(x).astype(wide), loss_scale.astype(real)).astype(x.dtype)

    return jax.tree.map(leaf, tree)


class LossScale:
    """Base of the loss scales: ``loss_scale``, ``scale``, ``unscale`` and ``adjust``.

    The subclasses are ``chex.dataclass``es whose every field is an array leaf (key paths
    ``.loss_scale``, ``.counter`` ...). Unflattening skips ``__init__`` (chex builds the
    object field by field), so tracers and sentinel leaves pass through ``jit``, ``scan``
    and ``vmap`` unchecked; the checks run once, where the user builds the scale.
    """

    loss_scale: Array

    def scale(self, tree: PyTree) -> PyTree:
        """Multiply each floating leaf by ``loss_scale`` in float32 (at least) and cast it back
        to its own dtype. A Python float becomes a float32 array. Other leaves are unchanged.
        """
        return _apply_scale(tree, self.loss_scale, jnp.multiply)

    def unscale(self, tree: PyTree) -> PyTree:
        """Divide each floating leaf by ``loss_scale`` in float32 (at least) and cast it back
        to its own dtype. Other leaves are unchanged.
        """
        return _apply_scale(tree, self.loss_scale, jnp.divide)

    def adjust(self, grads_finite: Any) -> LossScale:
        """The loss scale for the next step, given whether this step's grads were finite."""
        _check_finite_flag(f"{type(self).__name__}.adjust", grads_finite)
        return self

    def replace(self, **fields: Any) -> Any:
        """A copy with some fields replaced, e.g. ``scale.replace(min_scale=jnp.float32(1))``.

        The names must be fields; the values are not checked (they may be traced), so keep
        each field's dtype and shape.
        """
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]  # subclasses are dataclasses
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__}.replace: no field {', '.join(unknown)}; "
                            f"the fields are {', '.join(names)}")
        new = copy.copy(self)  # chex's __getstate__/__setstate__: no __init__
        new.__dict__.update(fields)
        return new

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; adjust() returns a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={_show(getattr(self, f.name))}"
                          for f in dataclasses.fields(self))  # type: ignore[arg-type]  # subclasses are dataclasses
        return f"{type(self).__name__}({inner})"


def check_loss_scale(where: str, name: str, value: Any) -> None:
    """Raise unless ``value`` is one of the loss scales below (a bare number is not)."""
    if not isinstance(value, LossScale):
        raise TypeError(f"{where}: {name} must be a loss scale from funtrain.precision "
                        f"(StaticLossScale(2.0 ** 15), DynamicLossScale() or NoOpLossScale()), "
                        f"got {type(value).__name__} ({value!r})")


def _loss_scale_class(cls: Any) -> Any:
    """``chex.dataclass``: init=False, as the constructors take the user's arguments and check
    them; eq=False, as the fields are arrays; attributes, not a Mapping. chex's ``replace``
    and ``from_tuple`` would call that ``__init__`` with field names: ``replace`` is
    ``LossScale.replace`` and ``from_tuple`` is gone."""
    cls = chex.dataclass(init=False, repr=False, eq=False, mappable_dataclass=False)(cls)
    cls.replace = LossScale.replace
    del cls.from_tuple
    return cls


@_loss_scale_class
class NoOpLossScale(LossScale):
    """A loss scale of 1: ``scale`` and ``unscale`` return the tree unchanged.

    Use it where a loss scale is expected but none is wanted (float32 or bfloat16 training).
    It is a pytree with no leaves.
    """

    @property
    def loss_scale(self) -> Array:  # type: ignore[override]  # a constant, not a field
        """1, as a float32 array."""
        return jnp.ones((), jnp.float32)

    def scale(self, tree: PyTree) -> PyTree:
        """Return ``tree`` unchanged."""
        return tree

    def unscale(self, tree: PyTree) -> PyTree:
        """Return ``tree`` unchanged."""
        return tree


@_loss_scale_class
class StaticLossScale(LossScale):
    """A fixed loss scale; ``adjust`` returns it unchanged.

    Args:
      scale: a finite number > 0 (any float or int dtype; stored as a float32 array).

    Examples:
      >>> import jax.numpy as jnp
      >>> s = StaticLossScale(128.0)
      >>> float(s.unscale(s.scale(jnp.float16(0.5))))
      0.5
    """

    loss_scale: Array

    def __init__(self, scale: Any) -> None:
        _check_positive("StaticLossScale", "scale", scale)
        object.__setattr__(self, "loss_scale", jnp.asarray(scale).astype(jnp.float32))


@_loss_scale_class
class DynamicLossScale(LossScale):
    r"""A loss scale that grows while the grads stay finite and shrinks when they do not.

    With :math:`s` the scale, :math:`k` the count of finite steps since the last change,
    ``period`` :math:`P`, ``factor`` :math:`f` and ``min_scale`` :math:`m`, ``adjust`` does

    .. math::
        \text{finite:}\quad k \leftarrow k + 1;\ \text{if } k = P:\
            s \leftarrow \min(f s, \text{float32 max}),\ k \leftarrow 0 \qquad
        \text{non-finite:}\quad s \leftarrow \max(s / f, m),\ k \leftarrow 0

    so the scale is always finite, never NaN and never below ``min_scale``. The update uses
    ``jnp.where`` only, so it runs under ``jax.jit`` and ``lax.scan``.

    Every field is an array leaf (``loss_scale`` float32, ``counter`` int32, ``period``
    int32, ``factor`` float32, ``min_scale`` float32), so none is lost or reset when the
    scale passes through ``jit``, ``scan`` or a checkpoint, and changing a hyperparameter
    does not recompile. (jmp keeps ``min_loss_scale`` out of the pytree, so it falls back
    to its default after a jit boundary, and its ``adjust`` fails on a float16 scale.)

    Args:
      initial: the first scale, a finite number > 0; Python numbers and arrays of any dtype
        (float16 included) are converted to float32.
      period: finite steps between increases, an integer >= 1.
      factor: the growth and shrink factor, > 1.
      min_scale: the floor, in ``(0, initial]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> s = DynamicLossScale(initial=8.0, period=2, min_scale=4.0)
      >>> s = jax.jit(DynamicLossScale.adjust)(s, jnp.array(False))
      >>> s = jax.jit(DynamicLossScale.adjust)(s, jnp.array(False))
      >>> float(s.loss_scale), float(s.min_scale)
      (4.0, 4.0)
    """

    loss_scale: Array
    counter: Array
    period: Array
    factor: Array
    min_scale: Array

    def __init__(self, initial: Any = 2.0 ** 15, period: Any = 2000, factor: Any = 2,
                 min_scale: Any = 1.0) -> None:
        where = "DynamicLossScale"
        init32 = _check_positive(where, "initial", initial)
        _check_period(where, period)
        _check_positive(where, "factor", factor, above=1.0)
        min32 = _check_positive(where, "min_scale", min_scale)
        if init32 is not None and min32 is not None and min32 > init32:
            raise ValueError(f"{where}: min_scale must be <= initial, got min_scale="
                             f"{min32:g} and initial={init32:g}")
        fields = dict(loss_scale=jnp.asarray(initial).astype(jnp.float32),
                      counter=jnp.zeros((), jnp.int32),
                      period=jnp.asarray(period).astype(jnp.int32),
                      factor=jnp.asarray(factor).astype(jnp.float32),
                      min_scale=jnp.asarray(min_scale).astype(jnp.float32))
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def adjust(self, grads_finite: Any) -> DynamicLossScale:
        """The next loss scale: grow after ``period`` finite steps, shrink on a non-finite one.

        Args:
          grads_finite: a scalar bool (array), usually ``all_finite(grads)``.
        """
        finite = _check_finite_flag("DynamicLossScale.adjust", grads_finite)
        counter = self.counter + 1
        grow = finite & (counter >= self.period)
        grown = jnp.minimum(self.loss_scale * self.factor, _F32_MAX)  # inf -> float32 max
        shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_scale)
        new_scale = jnp.where(finite, jnp.where(grow, grown, self.loss_scale), shrunk)
        new_counter = jnp.where(finite & ~grow, counter, 0)
        return self.replace(loss_scale=new_scale.astype(jnp.float32),
                            counter=new_counter.astype(jnp.int32))
