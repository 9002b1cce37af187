"""ArrayDataset construction/indexing and Loader batching, coverage and shuffling."""

import re

import jax
import numpy as np
import pytest

from funtrain.data import ArrayDataset, Loader


def make_ds(n=10):
    y = np.arange(n, dtype=np.int64)
    return ArrayDataset(x=np.stack([y * 10.0, y * 10.0 + 1], axis=1), y=y)


# ----------------------------------------------------------------------------- ArrayDataset


def test_mismatched_leading_dims_names_the_shapes():
    with pytest.raises(ValueError, match="must share their leading dimension") as info:
        ArrayDataset(x=np.zeros((10, 3)), y=np.zeros(9))
    assert "(10, 3)" in str(info.value) and "(9,)" in str(info.value)
    assert "'x'" in str(info.value) and "'y'" in str(info.value)


def test_no_arrays():
    for args in ((), ({},), (None,)):
        with pytest.raises(ValueError, match=re.escape("needs at least one array")):
            ArrayDataset(*args)


def test_scalar_array_rejected():
    with pytest.raises(ValueError, match=re.escape("needs a leading example axis; ['s'] are "
                                                   "scalars")):
        ArrayDataset(x=np.zeros(3), s=np.float32(1.0))


def test_mapping_and_keywords_merge_and_lists_become_arrays():
    ds = ArrayDataset({"x": [[1, 2], [3, 4], [5, 6]]}, y=[0, 1, 0])
    assert set(ds.arrays) == {"x", "y"}
    assert all(isinstance(v, np.ndarray) for v in ds.arrays.values())
    assert len(ds) == 3 and ds.arrays["x"].shape == (3, 2)
    # one name both ways: the keyword replaced the mapping's array without a word
    with pytest.raises(ValueError, match=r"\['x'\] given both in the mapping and as keywords"):
        ArrayDataset({"x": [1, 2]}, x=[3, 4])


def test_indexing():
    ds = make_ds()
    row = ds[3]
    assert row["y"] == 3 and row["x"].tolist() == [30.0, 31.0]
    assert ds[2:4]["y"].tolist() == [2, 3]
    assert ds[np.array([7, 1, 7])]["y"].tolist() == [7, 1, 7]
    assert ds[np.array([7, 1])]["x"][:, 0].tolist() == [70.0, 10.0]
    even = ds[ds.arrays["y"] % 2 == 0]
    assert even["y"].tolist() == [0, 2, 4, 6, 8] and even["x"].shape == (5, 2)


def test_len_and_repr():
    ds = ArrayDataset(x=np.zeros((10, 3), np.float32), y=np.zeros(10, np.int32))
    assert len(ds) == 10
    assert repr(ds) == "ArrayDataset(10 examples; x: float32[10, 3], y: int32[10])"


def test_zero_length_dataset_is_allowed():
    ds = ArrayDataset(x=np.zeros((0, 3)))
    assert len(ds) == 0


# ----------------------------------------------------------------------------- Loader


@pytest.mark.parametrize("n,bs,drop,expected", [
    (10, 4, False, [4, 4, 2]),
    (10, 4, True, [4, 4]),
    (10, 5, False, [5, 5]),
    (10, 5, True, [5, 5]),
    (10, 10, True, [10]),
    (10, 11, False, [10]),
    (10, 1, True, [1] * 10),
    (7, 3, True, [3, 3]),
])
def test_batch_counts(n, bs, drop, expected):
    for key in (None, jax.random.key(0)):
        loader = make_ds(n).batches(bs, key=key, drop_remainder=drop)
        sizes = [len(b["y"]) for b in loader.epoch(0)]
        assert sizes == expected
        assert len(loader) == len(expected)
        assert all(b["x"].shape == (s, 2) for b, s in zip(loader.epoch(1), sizes, strict=True))


@pytest.mark.parametrize("bs", [1, 3, 4, 10])
def test_every_example_exactly_once_per_epoch(bs):
    loader = Loader(make_ds(10), bs, key=jax.random.key(1))
    for epoch in range(3):
        seen = np.concatenate([b["y"] for b in loader.epoch(epoch)])
        assert sorted(seen.tolist()) == list(range(10))


def test_drop_remainder_serves_distinct_examples():
    loader = Loader(make_ds(10), 4, key=jax.random.key(1), drop_remainder=True)
    for epoch in range(3):
        seen = np.concatenate([b["y"] for b in loader.epoch(epoch)])
        assert len(seen) == 8 and len(set(seen.tolist())) == 8


def test_fields_stay_aligned_after_shuffle():
    loader = Loader(make_ds(20), 6, key=jax.random.key(2))
    for b in loader.epoch(5):
        np.testing.assert_array_equal(b["x"][:, 0], b["y"] * 10.0)
        np.testing.assert_array_equal(b["x"][:, 1], b["y"] * 10.0 + 1)


def test_shuffle_deterministic_per_key_and_epoch():
    ds = make_ds(50)
    a = Loader(ds, 8, key=jax.random.key(0))
    b = Loader(ds, 8, key=jax.random.key(0))
    for epoch in (0, 3):
        np.testing.assert_array_equal(a.order(epoch), b.order(epoch))
        for ba, bb in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
            np.testing.assert_array_equal(ba["y"], bb["y"])
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), np.arange(50))
    assert not np.array_equal(a.order(0), Loader(ds, 8, key=jax.random.key(1)).order(0))
    assert sorted(a.order(4).tolist()) == list(range(50))
    with pytest.raises(ValueError, match=r"Loader.epoch: epoch must be an int >= 0, got -1"):
        a.order(-1)


def test_check_batch_reads_float64_in_float64():
    """A finite float64 past float32's range is finite (it was cast to float32: inf)."""
    from funtrain import data

    data.check_batch({"x": np.array([1.0, 1e300])})
    with pytest.raises(ValueError, match=r"'x' has 1 non-finite value"):
        data.check_batch({"x": np.array([1.0, np.inf])})


def test_batches_follow_order():
    ds = make_ds(23)
    loader = Loader(ds, 5, key=jax.random.key(3))
    idx = loader.order(2)
    got = np.concatenate([b["y"] for b in loader.epoch(2)])
    np.testing.assert_array_equal(got, ds.arrays["y"][idx])


def test_iter_is_epoch_zero():
    loader = Loader(make_ds(12), 5, key=jax.random.key(4))
    for b0, bi in zip(loader.epoch(0), loader, strict=True):
        np.testing.assert_array_equal(b0["y"], bi["y"])


def test_no_key_keeps_dataset_order():
    loader = Loader(make_ds(10), 3)
    for epoch in (0, 1, 7):
        np.testing.assert_array_equal(loader.order(epoch), np.arange(10))
        assert [b["y"].tolist() for b in loader.epoch(epoch)] == [
            [0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_legacy_uint32_key_works():
    loader = Loader(make_ds(10), 4, key=jax.random.PRNGKey(0))
    seen = np.concatenate([b["y"] for b in loader])
    assert sorted(seen.tolist()) == list(range(10))
    # a loader is hashable and comparable (a dict key, functools.cache), whatever its key
    same_key = Loader(make_ds(10), 4, key=jax.random.PRNGKey(0))
    assert {loader: 1}[loader] == 1 and loader == loader and loader != same_key
    assert hash(Loader(make_ds(10), 4, key=jax.random.key(0))) is not None


def test_numpy_integer_batch_size_accepted():
    loader = Loader(make_ds(10), np.int64(4))
    assert len(loader) == 3


@pytest.mark.parametrize("bs", [0, -1, 2.5, 4.0, "4", None, True])
def test_bad_batch_size(bs):
    msg = re.escape(f"batch_size must be a positive int, got {bs!r}")
    with pytest.raises(ValueError, match=msg):
        Loader(make_ds(10), bs)


def test_empty_dataset_rejected():
    with pytest.raises(ValueError, match=re.escape("the dataset is empty (0 examples)")):
        Loader(ArrayDataset(x=np.zeros((0, 3))), 2)


def test_batch_larger_than_dataset_with_drop_remainder():
    msg = re.escape("batch_size=11 is larger than the dataset (10 examples) and "
                    "drop_remainder=True would yield no batch")
    with pytest.raises(ValueError, match=msg):
        Loader(make_ds(10), 11, drop_remainder=True)


def test_dataset_must_be_array_dataset():
    with pytest.raises(TypeError, match="dataset must be an ArrayDataset, got dict"):
        Loader({"x": np.zeros(3)}, 2)
