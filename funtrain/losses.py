"""Losses and metrics.

Every loss returns the per-example values reduced by ``reduction``:

- ``"mean"`` (default): the mean over the examples that ``mask`` keeps (0.0 if none);
- ``"sum"``: the sum over kept examples;
- ``"none"``: the per-example values, with masked-out entries set to 0.

``mask`` is a boolean or 0/1 array broadcastable to the per-example loss shape.
All losses compute in float32 at least (log-sum-exp for the softmax), so huge
logits and half-precision inputs stay finite.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from funtrain._checks import check_int
from funtrain._typing import Array

__all__ = ["softmax_cross_entropy", "binary_cross_entropy", "mse", "l1", "huber", "accuracy",
           "top_k_accuracy", "invalid_labels", "reduce"]

_REDUCTIONS = ("mean", "sum", "none")


def _f32(x: Any) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def reduce(values: Array, reduction: str = "mean", mask: Array | None = None,
           where: str = "reduce") -> Array:
    """Reduce per-example ``values`` by ``reduction``, keeping only ``mask``ed entries."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        mask = jnp.asarray(mask)
        try:
            mask = jnp.broadcast_to(mask, values.shape)
        except ValueError:
            raise ValueError(f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"the per-example loss shape {tuple(values.shape)}") from None
        mask = mask.astype(bool)
        values = jnp.where(mask, values, 0.0)
    if reduction == "none":
        return values
    total = jnp.sum(values)
    if reduction == "sum":
        return total
    # counted in float32 at least: float16 cannot count past 65504, bfloat16 past 256
    acc = jnp.promote_types(values.dtype, jnp.float32)
    count = jnp.sum(mask, dtype=acc) if mask is not None else jnp.asarray(values.size, acc)
    mean = jnp.where(count > 0, total.astype(acc) / jnp.maximum(count, 1), 0.0)
    return mean.astype(values.dtype) if jnp.issubdtype(values.dtype, jnp.floating) else mean


def _check_same_shape(where: str, predictions: Array, targets: Array) -> None:
    if tuple(predictions.shape) != tuple(targets.shape):
        raise ValueError(f"{where}: predictions have shape {tuple(predictions.shape)} but "
                         f"targets have shape {tuple(targets.shape)}; they must match")


def _class_targets(where: str, logits: Array, labels: Array) -> tuple[Array, bool]:
    """Return labels (integer ones at least int32) and whether they are class indices."""
    labels = jnp.asarray(labels)
    # integer labels of the logits' own shape are one-hot (as check_batch takes them); class
    # ids never have the class axis, so the two cannot be confused
    one_hot = tuple(labels.shape) == tuple(logits.shape)
    if jnp.issubdtype(labels.dtype, jnp.integer) and not one_hot:
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"{where}: integer labels must have shape {tuple(logits.shape[:-1])} "
                             f"(logits' shape without the class axis), got "
                             f"{tuple(labels.shape)}")
        # compared with C in their own dtype, uint8 labels of 256 classes wrap C to 0
        if jnp.iinfo(labels.dtype).bits < 32:
            labels = labels.astype(jnp.int32)
        return labels, True
    if tuple(labels.shape) != tuple(logits.shape):
        raise ValueError(f"{where}: one-hot/probability labels must have the logits' shape "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}; integer class "
                         f"labels need an integer dtype")
    return labels, False


def softmax_cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0,
                          reduction: str = "mean", mask: Array | None = None) -> Array:
    r"""Cross-entropy between ``softmax(logits)`` and the labels, over the last axis.

    .. math:: \ell = -\sum_c q_c \log \mathrm{softmax}(z)_c, \qquad
              q = (1 - \varepsilon)\,y + \varepsilon / C

    Args:
      logits: ``(..., C)`` unnormalised scores.
      labels: integer class ids of shape ``(...)``, or one-hot/probabilities ``(..., C)``
        (float, or integer one-hot: a row that is not 0s and a single 1 gives NaN, as
        an integer class id out of range does).
        An integer label outside ``[0, C)`` gives a NaN loss for its example (unless
        ``mask`` leaves it out), never a silently wrapped class.
      label_smoothing: ``ε`` in ``[0, 1)``; mixes the target with the uniform distribution,
        as PyTorch's ``CrossEntropyLoss(label_smoothing=ε)``.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      mask: which examples count.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(softmax_cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1])))  # log 2
      0.6931471...
    """
    where = "softmax_cross_entropy"
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = _f32(logits)
    labels, is_index = _class_targets(where, logits, labels)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    if is_index:
        # A label outside [0, C) gives NaN (never a wrapped or clipped class), so a bad
        # label cannot train silently; a masked-out one costs nothing.
        valid = (labels >= 0) & (labels < num_classes)
        safe = jnp.where(valid, labels, 0)
        nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
        if label_smoothing:
            smooth = -jnp.mean(log_p, axis=-1)
            nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
        nll = jnp.where(valid, nll, jnp.nan)
    else:
        q = _f32(labels)
        if label_smoothing:
            q = (1.0 - label_smoothing) * q + label_smoothing / num_classes
        # 0 * log(0) is 0: a class with no target mass adds nothing even where log_p is -inf;
        # elsewhere d/dq = -log p, as torch (a where around q * log_p zeroed it at q = 0)
        nll = -jnp.sum(q * jnp.where((q == 0) & jnp.isneginf(log_p), 0.0, log_p), axis=-1)
        if jnp.issubdtype(labels.dtype, jnp.integer):  # as for class ids: a row that is
            nll = jnp.where(_one_hot_rows(labels), nll, jnp.nan)  # not one-hot gives NaN
    return reduce(nll, reduction, mask, where)


def _one_hot_rows(labels: Array) -> Array:
    """Which rows of integer one-hot labels are one-hot: 0s and a single 1."""
    return jnp.all((labels == 0) | (labels == 1), axis=-1) & (jnp.sum(labels, axis=-1) == 1)


def binary_cross_entropy(logits: Array, labels: Array, *, reduction: str = "mean",
                         mask: Array | None = None) -> Array:
    r"""Elementwise sigmoid cross-entropy from logits (PyTorch's ``BCEWithLogitsLoss``).

    .. math:: \ell = \log(1 + e^{z}) - z y

    (``logaddexp(0, z)``: stable, and its gradient is :math:`\sigma(z) - y` at :math:`z = 0`
    too, where ``max(z, 0)`` and ``|z|`` would give :math:`-y`).
    """
    where = "binary_cross_entropy"
    logits = _f32(logits)
    labels = _f32(labels)
    _check_same_shape(where, logits, labels)
    loss = jnp.logaddexp(0.0, logits) - logits * labels
    return reduce(loss, reduction, mask, where)


def mse(predictions: Array, targets: Array, *, reduction: str = "mean",
        mask: Array | None = None) -> Array:
    """Squared error ``(p - t)**2``, elementwise."""
    p, t = _f32(predictions), _f32(targets)
    _check_same_shape("mse", p, t)
    return reduce(jnp.square(p - t), reduction, mask, "mse")


def l1(predictions: Array, targets: Array, *, reduction: str = "mean",
       mask: Array | None = None) -> Array:
    """Absolute error ``|p - t|``, elementwise; its gradient at ``p == t`` is 0, as in
    PyTorch (``jnp.abs``'s is 1)."""
    p, t = _f32(predictions), _f32(targets)
    _check_same_shape("l1", p, t)
    d = p - t
    return reduce(jnp.sign(d) * d, reduction, mask, "l1")


def huber(predictions: Array, targets: Array, *, delta: float = 1.0, reduction: str = "mean",
          mask: Array | None = None) -> Array:
    r"""Huber loss (PyTorch's ``HuberLoss``), elementwise.

    .. math:: \ell = \begin{cases} \tfrac12 r^2 & |r| \le \delta \\
              \delta(|r| - \tfrac12\delta) & \text{otherwise} \end{cases}, \quad r = p - t
    """
    if not delta > 0:  # also rejects nan
        raise ValueError(f"huber: delta must be > 0, got {delta}")
    p, t = _f32(predictions), _f32(targets)
    _check_same_shape("huber", p, t)
    r = jnp.abs(p - t)
    quad = jnp.minimum(r, delta)
    loss = 0.5 * quad * quad + delta * (r - quad)
    return reduce(loss, reduction, mask, "huber")


def invalid_labels(logits: Array, labels: Array) -> Array:
    """How many integer labels lie outside ``[0, C)``, ``C = logits.shape[-1]``, or how
    many rows of integer one-hot labels are not one-hot (an int32; 0 for float one-hot or
    probability labels). ``softmax_cross_entropy`` is NaN for them."""
    labels, is_index = _class_targets("invalid_labels", jnp.asarray(logits), labels)
    if not is_index:
        if jnp.issubdtype(labels.dtype, jnp.integer):
            return jnp.sum(~_one_hot_rows(labels), dtype=jnp.int32)
        return jnp.zeros((), jnp.int32)
    bad = (labels < 0) | (labels >= jnp.shape(logits)[-1])
    return jnp.sum(bad, dtype=jnp.int32)


def accuracy(logits: Array, labels: Array, *, mask: Array | None = None) -> Array:
    """Fraction of examples whose top-scoring class is the label (int ids or one-hot)."""
    return top_k_accuracy(logits, labels, k=1, mask=mask)


def top_k_accuracy(logits: Array, labels: Array, *, k: int = 5,
                   mask: Array | None = None) -> Array:
    """Fraction of examples whose label is among the ``k`` highest-scoring classes.

    Ties are broken in favour of the lower class index, as ``jax.lax.top_k`` does.
    """
    where = "top_k_accuracy"
    logits = jnp.asarray(logits)
    check_int(where, "k", k, high=logits.shape[-1])  # at most the number of classes
    labels, is_index = _class_targets(where, logits, labels)
    if not is_index:
        labels = jnp.argmax(labels, axis=-1)
    if k == 1:  # argmax compiles to one small reduction where top_k is a sort
        top = jnp.argmax(logits, axis=-1)[..., None]
    else:
        _, top = jax.lax.top_k(logits, int(k))
    hit = jnp.any(top == labels[..., None], axis=-1).astype(jnp.float32)
    return reduce(hit, "mean", mask, where)
