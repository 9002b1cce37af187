"""Host-side checks of a batch, run before any compilation: shapes, finiteness, label range."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funtrain._tree import leaf_paths


def check_leading_dims(batch: Any, where: str = "batch") -> None:
    """All arrays of a batch must share their leading (example) dimension.

    Scalars (0-d leaves, e.g. a per-batch flag or weight) are not per-example and are skipped.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in leaf_paths(batch).items() if np.ndim(v) > 0}
    if len({s[0] for s in shapes.values()}) > 1:
        raise ValueError(f"{where}: the arrays' leading dimensions differ (they must all be the "
                         f"batch size): " + ", ".join(f"{k} {s}" for k, s in shapes.items()))


def check_batch(batch: Any, *, num_classes: int | None = None, labels: str = "y",
                where: str = "batch") -> None:
    """Check a batch on the host: shared leading dimension, finite floats, labels in range.

    Args:
      batch: a pytree of arrays (usually a dict).
      num_classes: if given, integer ``batch[labels]`` must lie in ``[0, num_classes)``;
        one-hot or probability labels must have ``num_classes`` entries on the last
        axis, each >= 0, summing to 1 per example. A batch may also be a tuple
        ``(inputs, labels)``.
      labels: the key of the labels.
      where: how to name the batch in messages.

    Raises:
      ValueError: naming the key path and the problem.
    """
    check_leading_dims(batch, where)
    for path, value in leaf_paths(batch).items():
        arr = np.asarray(jax.device_get(value))
        # jnp.issubdtype knows ml_dtypes' floats too (bfloat16, float8_*), numpy's does not
        if jnp.issubdtype(arr.dtype, jnp.inexact):
            # numpy's own floats as they are (a float64 1e300 is finite); ml_dtypes' in float32
            native = np.iscomplexobj(arr) or arr.dtype.type.__module__ == "numpy"
            bad = ~np.isfinite(arr if native else arr.astype(np.float32))
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"{where}: '{path}' has {int(bad.sum())} non-finite value(s) "
                                 f"(nan/inf), the first at index {first}")
    if num_classes is not None:
        if isinstance(batch, tuple) and len(batch) == 2:  # (inputs, labels)
            labels, y = "[1]", batch[1]
        elif isinstance(batch, dict) and labels in batch:
            y = batch[labels]
        else:
            raise ValueError(f"{where}: no labels under key {labels!r} to check against "
                             f"num_classes={num_classes}")
        y = np.asarray(jax.device_get(y))
        if not np.issubdtype(y.dtype, np.integer):
            _check_distributions(y, num_classes, labels, where)
        elif y.size:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                worst = lo if lo < 0 else hi
                raise ValueError(f"{where}: labels out of range: '{labels}' contains {worst}, "
                                 f"expected values in [0, {num_classes})")


def _check_distributions(y: np.ndarray, num_classes: int, labels: str, where: str) -> None:
    """One-hot or probability labels: ``(..., num_classes)``, non-negative, rows sum to 1."""
    if y.ndim == 0 or y.shape[-1] != num_classes:
        raise ValueError(f"{where}: labels '{labels}' are not integers, so they must be "
                         f"one-hot or probabilities of shape (..., {num_classes}), got shape "
                         f"{y.shape}")
    y = y.astype(np.float64)
    if (y < 0).any():
        first = tuple(int(i) for i in np.argwhere(y < 0)[0])
        raise ValueError(f"{where}: labels '{labels}' have a negative probability "
                         f"{y[first]:.6g} at index {first}")
    sums = y.sum(axis=-1)
    off = np.abs(sums - 1.0) > 1e-2  # room for bfloat16 and smoothed labels
    if off.any():
        first = tuple(int(i) for i in np.argwhere(off)[0])
        raise ValueError(f"{where}: labels '{labels}' at example {first} sum to "
                         f"{sums[first]:.6g}, expected one-hot or probabilities summing to 1")
