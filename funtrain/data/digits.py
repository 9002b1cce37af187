"""The 8×8 handwritten digits that scikit-learn ships (1,797 images, 10 classes)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from funtrain.data.dataset import ArrayDataset

_INSTALL_HINT = ("funtrain.data.load_digits needs scikit-learn, which ships the digits data. "
                 "Install it with: pip install 'funtrain[data]'  (or: pip install scikit-learn)")


def _shipped_csv() -> Path | None:
    """The digits file inside the installed scikit-learn, found without importing it
    (``import sklearn.datasets`` takes ~1.5 s of CPU, the file ~20 ms to read); ``None``
    when scikit-learn is missing or keeps the file elsewhere."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):  # ValueError: a module without a spec
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            return path
    return None


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images ``(N, 64)`` float64 and labels ``(N,)`` int32, as scikit-learn's
    ``load_digits`` reads them: its CSV file, each row 64 pixels and the label."""
    path = _shipped_csv()
    if path is not None:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int32)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    raw = _sk_load_digits()
    return np.asarray(raw.data, np.float64), np.asarray(raw.target, np.int32)


def load_digits(*, test_fraction: float = 0.2, flatten: bool = True, seed: int = 0
                ) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the digits as standardized ``(train, test)`` datasets with keys ``x`` and ``y``.

    The split is fixed by ``seed`` (a numpy permutation), so every run and every
    machine sees the same examples. Pixels are standardized with the *train* mean and
    standard deviation (constant pixels get std 1).

    Args:
      test_fraction: share of the 1,797 images held out for testing.
      flatten: ``x`` as ``(N, 64)``; otherwise images ``(N, 8, 8, 1)`` (channels last).
      seed: seed of the split.

    Returns:
      ``(train, test)``: ``x`` float32, ``y`` int32 in ``[0, 10)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _raw_digits()
    perm = np.random.default_rng(seed).permutation(len(x))
    # at least one image each side: an empty train split would normalise by NaN
    n_test = min(max(int(round(len(x) * test_fraction)), 1), len(x) - 1)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x = ((x - mean) / std).astype(np.float32)
    if not flatten:
        x = x.reshape(-1, 8, 8, 1)
    return (ArrayDataset(x=x[train_idx], y=y[train_idx]),
            ArrayDataset(x=x[test_idx], y=y[test_idx]))
