"""load_digits: shapes, dtypes, fixed split, standardization, and the missing-sklearn hint."""

import re
import sys

import numpy as np
import pytest

from funtrain.data import ArrayDataset, load_digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def xy(ds):
    return ds.arrays["x"], ds.arrays["y"]


def test_shapes_and_dtypes(digits):
    train, test = digits
    assert isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset)
    assert len(train) == 1438 and len(test) == 359
    for ds in digits:
        x, y = xy(ds)
        assert x.shape == (len(ds), 64) and x.dtype == np.float32
        assert y.shape == (len(ds),) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() <= 9
        assert np.all(np.isfinite(x))
    assert set(xy(train)[1].tolist()) == set(range(10))


def test_unflattened(digits):
    train, test = load_digits(flatten=False)
    assert train.arrays["x"].shape == (1438, 8, 8, 1) and test.arrays["x"].shape == (359, 8, 8, 1)
    assert train.arrays["x"].dtype == np.float32
    np.testing.assert_array_equal(train.arrays["x"].reshape(1438, 64), xy(digits[0])[0])
    np.testing.assert_array_equal(test.arrays["y"], xy(digits[1])[1])


def test_split_is_fixed(digits):
    train2, test2 = load_digits()
    for a, b in zip(digits, (train2, test2), strict=True):
        for k in ("x", "y"):
            np.testing.assert_array_equal(a.arrays[k], b.arrays[k])


def test_split_is_a_disjoint_partition(digits):
    """The 1,797 raw images have no duplicates, so distinct rows mean distinct examples."""
    rows = [np.c_[x, y] for x, y in map(xy, digits)]
    train_rows = {r.tobytes() for r in rows[0]}
    test_rows = {r.tobytes() for r in rows[1]}
    assert len(train_rows) == 1438 and len(test_rows) == 359
    assert not train_rows & test_rows


def test_other_seed_other_split(digits):
    _, test = load_digits(seed=1)
    assert not np.array_equal(test.arrays["y"], xy(digits[1])[1])


def test_train_standardized(digits):
    x_train, _ = xy(digits[0])
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
    std = x_train.std(axis=0)
    constant = std < 1e-6  # pixels that are always 0 in the train split stay at 0
    assert constant.any() and (~constant).sum() > 50
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-4)
    assert not np.any(x_train[:, constant])


def test_split_covers_every_sklearn_example(digits):
    """Per-class counts of train + test equal those of sklearn's full data set."""
    from sklearn.datasets import load_digits as sk_load_digits

    counts = np.bincount(sk_load_digits().target, minlength=10)
    y_train, y_test = xy(digits[0])[1], xy(digits[1])[1]
    np.testing.assert_array_equal(
        np.bincount(y_train, minlength=10) + np.bincount(y_test, minlength=10), counts)


def test_test_split_uses_train_statistics(digits):
    """The test split is standardized with the train mean/std, so it is close to, not exactly,
    zero-mean."""
    x_test = xy(digits[1])[0]
    assert np.abs(x_test.mean(axis=0)).max() < 0.5
    assert np.abs(x_test.mean(axis=0)).max() > 1e-4


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction(frac):
    with pytest.raises(ValueError, match=re.escape(f"test_fraction must be in (0, 1), got {frac}")):
        load_digits(test_fraction=frac)


def test_custom_test_fraction():
    train, test = load_digits(test_fraction=0.5)
    assert len(train) + len(test) == 1797 and abs(len(test) - 898.5) <= 0.5
    for frac, n_test in ((1e-4, 1), (0.9999, 1796)):  # rounding never empties a split
        train, test = load_digits(test_fraction=frac)
        assert len(test) == n_test and np.isfinite(test.arrays["x"]).all()


def test_the_shipped_file_reads_as_sklearn_loads_it(monkeypatch):
    """load_digits reads scikit-learn's CSV file without importing scikit-learn; the
    images and labels are bitwise those of sklearn's loader, which is also the fallback
    when the file is not where it is looked for."""
    from sklearn.datasets import load_digits as sk_load_digits

    from funtrain.data import digits as module

    assert module._shipped_csv() is not None
    sk = sk_load_digits()
    x, y = module._raw_digits()
    assert x.dtype == np.float64 and y.dtype == np.int32
    np.testing.assert_array_equal(x, sk.data)
    np.testing.assert_array_equal(y, sk.target)
    fast = load_digits(flatten=False)
    monkeypatch.setattr(module, "_shipped_csv", lambda: None)
    for a, b in zip(fast, load_digits(flatten=False), strict=True):
        for k in ("x", "y"):
            np.testing.assert_array_equal(a.arrays[k], b.arrays[k])


@pytest.mark.parametrize("blocked", [("sklearn", "sklearn.datasets"), ("sklearn.datasets",)])
def test_missing_sklearn_hint(monkeypatch, blocked):
    """No scikit-learn; or one whose file is not found and whose loader fails to import."""
    from funtrain.data import digits as module

    if blocked == ("sklearn.datasets",):
        monkeypatch.setattr(module, "_shipped_csv", lambda: None)
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=re.escape("pip install 'funtrain[data]'")) as info:
        load_digits()
    assert "scikit-learn" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
