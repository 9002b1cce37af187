"""The 8×8 handwritten digits that scikit-learn ships (1,797 images, 10 classes)."""

from __future__ import annotations

import numpy as np

from funtrain.data.dataset import ArrayDataset

_INSTALL_HINT = ("funtrain.data.load_digits needs scikit-learn, which ships the digits data. "
                 "Install it with: pip install 'funtrain[data]'  (or: pip install scikit-learn)")


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
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    raw = _sk_load_digits()
    x = np.asarray(raw.data, np.float64)
    y = np.asarray(raw.target, np.int32)
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
