"""Float64 numpy reference implementations of funtrain's losses, written from the formulas.

Everything here is computed in float64 with plain numpy, independent of JAX, so the tests
can compare funtrain's float32 results against it.
"""

from __future__ import annotations

import numpy as np

REDUCTIONS = ("mean", "sum", "none")


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def reduce(values, reduction: str = "mean", mask=None) -> np.ndarray:
    """Reduce per-example ``values``: mean over kept entries (0.0 if none), sum, or none.

    With ``reduction="none"`` the masked-out entries are set to 0.
    """
    values = _f64(values)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}")
    keep = np.ones(values.shape, bool) if mask is None else np.broadcast_to(
        np.asarray(mask).astype(bool), values.shape)
    kept = np.where(keep, values, 0.0)
    if reduction == "none":
        return kept
    if reduction == "sum":
        return np.float64(kept.sum())
    n = int(keep.sum())
    return np.float64(kept.sum() / n) if n else np.float64(0.0)


def log_softmax(logits) -> np.ndarray:
    """``z - logsumexp(z)`` over the last axis, with the max shifted out first."""
    z = _f64(logits)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits) -> np.ndarray:
    return np.exp(log_softmax(logits))


def one_hot(labels, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    return (labels[..., None] == np.arange(num_classes)).astype(np.float64)


def smoothed_targets(labels, num_classes: int, label_smoothing: float = 0.0) -> np.ndarray:
    """PyTorch-style target ``q = (1 - eps) * y + eps / C`` from int ids or (soft) one-hot."""
    labels = np.asarray(labels)
    y = (one_hot(labels, num_classes) if np.issubdtype(labels.dtype, np.integer)
         else _f64(labels))
    return (1.0 - label_smoothing) * y + label_smoothing / num_classes


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0,
                          reduction: str = "mean", mask=None) -> np.ndarray:
    """``-sum_c q_c log softmax(z)_c`` per example; terms with ``q_c = 0`` contribute 0."""
    log_p = log_softmax(logits)
    q = smoothed_targets(labels, log_p.shape[-1], label_smoothing)
    terms = np.where(q == 0, 0.0, q * log_p)
    return reduce(-terms.sum(axis=-1), reduction, mask)


def binary_cross_entropy(logits, labels, reduction: str = "mean", mask=None) -> np.ndarray:
    """``-(y log s(z) + (1 - y) log(1 - s(z)))`` with ``-log s(z) = log(1 + e^-z)``."""
    z, y = _f64(logits), _f64(labels)
    nll_pos = np.logaddexp(0.0, -z)  # -log sigmoid(z)
    nll_neg = np.logaddexp(0.0, z)   # -log (1 - sigmoid(z))
    return reduce(y * nll_pos + (1.0 - y) * nll_neg, reduction, mask)


def mse(predictions, targets, reduction: str = "mean", mask=None) -> np.ndarray:
    return reduce((_f64(predictions) - _f64(targets)) ** 2, reduction, mask)


def l1(predictions, targets, reduction: str = "mean", mask=None) -> np.ndarray:
    return reduce(np.abs(_f64(predictions) - _f64(targets)), reduction, mask)


def huber(predictions, targets, delta: float = 1.0, reduction: str = "mean",
          mask=None) -> np.ndarray:
    """PyTorch ``HuberLoss``: ``0.5 r^2`` if ``|r| <= delta`` else ``delta (|r| - delta / 2)``."""
    r = np.abs(_f64(predictions) - _f64(targets))
    loss = np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))
    return reduce(loss, reduction, mask)


def top_k_hits(logits, labels, k: int) -> np.ndarray:
    """1.0 where the label is among the ``k`` highest scores (ties: lower index first)."""
    z = _f64(logits)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = labels.argmax(axis=-1)
    ranked = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    return (ranked == labels[..., None]).any(axis=-1).astype(np.float64)


def top_k_accuracy(logits, labels, k: int = 5, mask=None) -> np.ndarray:
    return reduce(top_k_hits(logits, labels, k), "mean", mask)


def accuracy(logits, labels, mask=None) -> np.ndarray:
    return top_k_accuracy(logits, labels, k=1, mask=mask)
