"""In-memory datasets and a batching loader with deterministic, key-driven shuffling."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from funtrain._checks import check_int
from funtrain._typing import PRNGKey

Batch = dict[str, np.ndarray]


class ArrayDataset:
    """Named arrays that share their leading (example) dimension, held on the host.

    Examples:
      >>> import numpy as np
      >>> ds = ArrayDataset(x=np.zeros((10, 3)), y=np.arange(10))
      >>> len(ds), ds[2:4]["y"].tolist()
      (10, [2, 3])
    """

    def __init__(self, arrays: Mapping[str, Any] | None = None, /, **named: Any):
        twice = sorted(set(arrays or {}) & set(named))
        if twice:  # the keyword silently replaced the mapping's array
            raise ValueError(f"ArrayDataset: {twice} given both in the mapping and as "
                             f"keywords; give each array once")
        merged = dict(arrays or {}, **named)
        if not merged:
            raise ValueError("ArrayDataset: needs at least one array, e.g. "
                             "ArrayDataset(x=inputs, y=labels)")
        self.arrays: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in merged.items()}
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        scalars = [k for k, n in lengths.items() if n is None]
        if scalars:
            raise ValueError(f"ArrayDataset: every array needs a leading example axis; "
                             f"{scalars} are scalars")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"ArrayDataset: arrays must share their leading dimension, got "
                             f"{ {k: v.shape for k, v in self.arrays.items()} }")

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def __getitem__(self, index: Any) -> Batch:
        return {k: v[index] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self.arrays.items())
        return f"ArrayDataset({len(self)} examples; {fields})"

    def batches(self, batch_size: int, *, key: PRNGKey | None = None,
                drop_remainder: bool = False) -> Loader:
        """A ``Loader`` over this dataset (see ``Loader``)."""
        return Loader(self, batch_size, key=key, drop_remainder=drop_remainder)


@dataclass(frozen=True, eq=False)  # a key field: == and hash by identity
class Loader:
    """Iterates a dataset in batches, epoch after epoch.

    Args:
      dataset: an ``ArrayDataset``.
      batch_size: examples per batch (> 0).
      key: shuffle with this PRNG key: epoch ``e``'s order is a numpy permutation seeded
        by the key's data and ``e`` (no compilation, the same on every run and backend), so
        resuming at an epoch is exact. ``None`` keeps the dataset order.
      drop_remainder: drop the last, smaller batch (keeps every batch the same
        shape, which avoids a second compilation of a jitted step).
      process_index, process_count: in a multi-process run (``parallel.initialize``), this
        process reads only its own part of every global batch: rows ``[i * b / n, (i + 1)
        * b / n)`` of each batch of ``batch_size`` ``b`` (the global size; every process
        draws the same order). Needs ``drop_remainder=True`` and ``b`` divisible by ``n``.

    Examples:
      >>> import jax, numpy as np
      >>> loader = ArrayDataset(x=np.arange(10)).batches(4, key=jax.random.key(0))
      >>> [len(b["x"]) for b in loader.epoch(0)]
      [4, 4, 2]
    """

    dataset: ArrayDataset
    batch_size: int
    key: PRNGKey | None = None
    drop_remainder: bool = False
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, ArrayDataset):
            raise TypeError(f"Loader: dataset must be an ArrayDataset, got "
                            f"{type(self.dataset).__name__}")
        key = self.key
        typed = jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)
        # a raw uint32[2] PRNGKey (np.shape's stub rejects the Optional)
        raw = getattr(key, "dtype", None) == np.uint32 and np.shape(key) == (2,)  # type: ignore[arg-type]
        if key is not None and not (typed and np.shape(key) == () or raw):
            got = (f"{type(key).__name__} {key!r}" if np.ndim(key) == 0 else
                   f"an array of shape {np.shape(key)} and dtype {getattr(key, 'dtype', '?')}")
            raise TypeError(f"Loader: key must be a PRNG key such as jax.random.key(0) (or "
                            f"None for no shuffling), got {got}")
        n = len(self.dataset)
        bs = self.batch_size
        check_int("Loader", "batch_size", bs)
        if n == 0:
            raise ValueError("Loader: the dataset is empty (0 examples)")
        check_int("Loader", "process_count", self.process_count)
        check_int("Loader", "process_index", self.process_index, low=0,
                  high=self.process_count - 1)
        if self.process_count > 1 and (bs % self.process_count or not self.drop_remainder):
            raise ValueError(f"Loader: with process_count={self.process_count}, batch_size "
                             f"(the global batch, {bs}) must divide by it and "
                             f"drop_remainder must be True, so every process gets equal parts")
        if self.drop_remainder and bs > n:
            raise ValueError(f"Loader: batch_size={bs} is larger than the dataset ({n} "
                             f"examples) and drop_remainder=True would yield no batch")

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

    def order(self, epoch: int = 0) -> np.ndarray:
        """The example indices of ``epoch``, in the order they are served."""
        check_int("Loader.epoch", "epoch", epoch, low=0)
        n = len(self.dataset)
        if self.key is None:
            return np.arange(n)
        key = self.key
        if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        seed = [int(v) for v in np.asarray(key).ravel()] + [int(epoch)]
        return np.random.default_rng(seed).permutation(n)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """Yield the batches of epoch ``epoch`` (numpy arrays, on the host)."""
        idx = self.order(epoch)
        local = self.batch_size // self.process_count
        for b in range(len(self)):
            start = b * self.batch_size + self.process_index * local
            yield self.dataset[idx[start:start + local]]

    def __iter__(self) -> Iterator[Batch]:
        """Epoch 0's batches. Loop over ``loader.epoch(e)`` to get a new order each epoch."""
        return self.epoch(0)
