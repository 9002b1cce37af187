"""How ``fit`` feeds its step: the chunk plan, device-resident epochs, prefetched batches.

``fit`` runs its steps in *chunks*: ``K`` steps in one device call (a ``lax.scan`` over the
step; a chunk of one step has no loop), so Python dispatches once per ``K`` steps. The
plan of chunks depends only on the global step and the settings (never on timing), so a
resumed run executes exactly the chunks of an uninterrupted one and stays bitwise equal
to it.

Two feeds run the chunks:

- ``DeviceFeed`` (a ``Loader`` over an in-memory ``ArrayDataset``): the dataset moves to the
  device once per ``fit`` call and each epoch is served there in the ``Loader``'s order:
  small batches sliced from a copy permuted once per epoch, large ones gathered inside the
  scan. No batch crosses the host boundary.
- ``HostFeed`` (any other data): batches are read, checked, stacked ``K`` at a time and put
  on the device by a background thread while the device computes.

The compiled chunk functions are module-level ``jax.jit``s with the step as a static
argument, so a second ``fit`` call with the same step and shapes compiles nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from funtrain._typing import Batch
from funtrain.data.checks import check_batch
from funtrain.data.dataset import Loader
from funtrain.data.prefetch import prefetch
from funtrain.parallel import _check_process_split, batch_axes, shard_batch
from funtrain.train.step import canonical_sharding, scan_steps

StepFn = Callable[..., Any]

# ----------------------------------------------------------------------------- the plan


class Chunk(NamedTuple):
    """``size`` steps from global step ``first``: epoch ``epoch``, its batches
    ``batch, batch + 1, ...``; ``scanned`` when it runs as one scanned call of ``K`` steps;
    ``epoch_end`` when its last batch is the epoch's last."""

    first: int
    size: int
    epoch: int
    batch: int
    scanned: bool
    epoch_end: bool


def plan(first: int, end: int, steps_per_epoch: int, k: int, cuts: Iterable[int],
         full: int | None = None) -> Iterator[Chunk]:
    """The chunks from global step ``first`` to ``end``.

    A chunk ends at the epoch's end, at a multiple of ``k`` counted from the epoch's start,
    and at each multiple of every ``cut`` (checkpoint and evaluation steps), so those land
    exactly on chunk boundaries. Chunks of ``k`` steps are scanned; shorter ones run step by
    step (one compiled function per chunk length would cost a compile each). ``full``: the
    epoch's full batches when its last batch is smaller (``full_batches``); a chunk ends
    there too, so the smaller batch always runs on its own, never inside a scan.
    """
    cuts = [c for c in cuts if c]
    full = steps_per_epoch if full is None else full
    step = first
    while step < end:
        epoch, batch = divmod(step, steps_per_epoch)
        stop = min(end, (epoch + 1) * steps_per_epoch,
                   epoch * steps_per_epoch + (batch // k + 1) * k,
                   epoch * steps_per_epoch + (full if batch < full else steps_per_epoch),
                   *((step // c + 1) * c for c in cuts))
        size = stop - step
        yield Chunk(step, size, epoch, batch, size == k and k > 1,
                    stop == (epoch + 1) * steps_per_epoch)
        step = stop


def full_batches(data: Any) -> int | None:
    """The full batches of an epoch of a ``Loader`` whose last batch is smaller
    (``drop_remainder=False`` and a dataset the batch size does not divide), else ``None``."""
    if not isinstance(data, Loader) or data.drop_remainder or \
            len(data.dataset) % data.batch_size == 0:
        return None
    return len(data.dataset) // int(data.batch_size)


def auto_steps_per_call(steps_per_epoch: int | None, cuts: Iterable[int] = (),
                        target: int = 2048) -> int:
    """Steps per device call when the user gives none: the largest divisor of the epoch
    length (and of the checkpoint/eval intervals) up to ``target``, so every chunk is a full
    scan and only one function compiles; 32 with short remainders when that divisor is tiny.

    The per-call cost is far from negligible: a call takes the state the previous call is
    still computing, so it waits for it and the host's per-call work is not hidden. Hence a
    whole epoch per call by default, when it is short enough.
    """
    if steps_per_epoch is None:
        return 1
    g = math.gcd(steps_per_epoch, *[c for c in cuts if c])
    best = max(d for d in range(1, min(g, target) + 1) if g % d == 0)
    return best if best >= 16 or best == g else min(32, g)


def _primitives(jaxpr: Any) -> Iterator[str]:
    """The names of the primitives in ``jaxpr`` and in every jaxpr nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _primitives(sub)


def convolves_on_cpu(step: StepFn, state: Any, loader: Loader) -> bool:
    """Whether ``step`` runs on XLA:CPU and convolves (forward or backward).

    XLA:CPU runs a convolution inside a while loop (a ``lax.scan`` of steps) 1.5-15x slower
    than in a step called on its own (a ResNet-18 of width 16 on 8x8 digits: 83 ms a step
    against 17 ms; ``bench/fit.py``'s CNN: 27.9 ms against 1.9 ms), while an MLP's step
    runs 3x faster in the loop. So on CPU such a step runs one per call by default. Found
    by tracing the step once (jit caches the trace)."""
    first: Any = next(iter(jax.tree.leaves(state)), None)
    if not hasattr(first, "devices") or {d.platform for d in first.devices()} != {"cpu"}:
        return False
    batch = {k: jax.ShapeDtypeStruct((int(loader.batch_size),) + a.shape[1:], a.dtype)
             for k, a in loader.dataset.arrays.items()}
    return "conv_general_dilated" in _primitives(jax.make_jaxpr(step)(state, batch).jaxpr)


# ----------------------------------------------------------------------------- compiled runs


@functools.partial(jax.jit, static_argnames=("step", "size", "batch_size", "placed", "split"),
                   donate_argnames=("state", "arrays"))
def _steps_on_device(state: Any, arrays: Any, order: Any, batch: Any, *, step: StepFn,
                     size: int, batch_size: int, placed: tuple[Any, ...] | None = None,
                     split: NamedSharding | None = None) -> tuple[Any, Any, Any]:
    """``size`` steps on batches ``batch, batch + 1, ...`` of device ``arrays``: sliced
    from arrays already in the epoch's order, or gathered through ``order``.

    ``arrays`` is donated and handed back unchanged: a read-only argument would be copied
    into the scan's loop state on every call (the whole dataset, each time).

    On a mesh, ``placed`` holds the state's leaf shardings (kept, as the train step keeps
    them) and ``split`` the batch's: each device takes its rows of every batch from its
    own copy of the dataset, so no step moves data between devices."""

    def body(state: Any, i: Any) -> tuple[Any, Any]:
        start = (batch + i) * batch_size
        if order is None:
            batch_ = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, batch_size),
                                  arrays)
        else:
            rows = lax.dynamic_slice_in_dim(order, start, batch_size)
            batch_ = jax.tree.map(lambda a: a.at[rows].get(unique_indices=True,
                                                          mode="promise_in_bounds"), arrays)
        if split is not None:
            batch_ = jax.tree.map(lambda a: lax.with_sharding_constraint(a, split), batch_)
        return step(state, batch_)

    if size == 1:  # no while loop: XLA:CPU runs convolutions in one slowly (convolves_on_cpu)
        state, metrics = body(state, 0)
        metrics = jax.tree.map(lambda m: m[None], metrics)
    else:
        state, metrics = lax.scan(body, state, jnp.arange(size))
    if placed is not None:
        leaves, treedef = jax.tree.flatten(state)
        state = treedef.unflatten([lax.with_sharding_constraint(x, sh) for x, sh in
                                   zip(leaves, placed, strict=True)])
    return state, arrays, metrics


def _on_mesh(state: Any) -> Any:
    """The mesh of a state placed on one (``parallel.shard_state`` places every leaf, the
    step count included; one attribute read), else ``None``."""
    on = getattr(getattr(state, "step", None), "sharding", None)
    return on.mesh if isinstance(on, NamedSharding) and on.mesh.size > 1 else None


@jax.jit
def _permuted(arrays: Any, order: Any) -> Any:
    """The arrays in the epoch's ``order`` (from ``Loader.order``)."""
    return jax.tree.map(lambda a: a.at[order].get(unique_indices=True,
                                                 mode="promise_in_bounds"), arrays)


# ----------------------------------------------------------------------------- feeds


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


def _device_budget() -> int:
    """Bytes an in-memory dataset may take on the device (it is held twice: as given and in
    the epoch's order): a quarter of the device memory where JAX reports it, else 4 GiB."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats
        stats = {}
    return int(stats["bytes_limit"]) // 4 if "bytes_limit" in stats else 4 << 30


def fits_on_device(data: Any) -> bool:
    """Whether ``fit`` serves ``data`` from the device by default: a ``Loader`` over an
    in-memory dataset of numeric arrays that takes at most ``_device_budget()`` bytes
    twice (strings or objects stay on the host)."""
    if not isinstance(data, Loader) or data.process_count > 1:  # a process's part: host path
        return False
    arrays = data.dataset.arrays
    numeric = all(a.dtype.kind in "biuf" or a.dtype.name == "bfloat16"
                  for a in arrays.values())
    return numeric and 2 * _nbytes(arrays) <= _device_budget()


class DeviceFeed:
    """Chunks over a ``Loader``'s dataset held on the device (see the module docstring).

    Each epoch's order is served one of two ways. Small batches are sliced from a copy of
    the dataset gathered into the epoch's order once per epoch: a gather inside the scan
    has a fixed cost per step that dominates small steps. Batches of ``GATHER_BYTES`` or
    more are gathered through the order inside the scan: the whole-dataset gather would
    write the dataset out and read it back each epoch, where a batch's gather stays in
    cache for the step that uses it. Both measured in ``bench/fit.py``.
    """

    GATHER_BYTES = 64 << 10

    def __init__(self, loader: Loader, step: StepFn, k: int, cuts: tuple[int, ...]) -> None:
        self.loader, self.step, self.k, self.cuts = loader, step, k, cuts
        self.steps_per_epoch = len(loader)
        self.batch_size = int(loader.batch_size)
        n = len(loader.dataset)
        self.full_batches = n // self.batch_size
        self.tail = 0 if loader.drop_remainder else n % self.batch_size
        host = loader.dataset.arrays
        row_bytes = sum(a.itemsize * math.prod(a.shape[1:]) for a in host.values())
        self.gather = loader.key is not None and self.batch_size * row_bytes >= self.GATHER_BYTES
        # Chunks donate the arrays they serve from: device_put gives the feed its own
        # copies (it never aliases the host arrays).
        self.arrays = jax.device_put(host)
        self._epoch: tuple[int, Any, Any] | None = None  # (epoch, arrays, order)
        self.mesh: dict[str, Any] = {}  # on a mesh: the placed/split shardings of a chunk

    def _place(self, state: Any) -> dict[str, Any]:
        """On a mesh: the dataset copied to every device of it (once), and the chunk's
        shardings: the state's, and the batch split over ``data`` and ``fsdp``."""
        mesh = _on_mesh(state)
        if mesh is None:
            return {}
        if self.mesh.get("mesh") != mesh:
            axes, n = batch_axes(mesh)
            if self.batch_size % n:
                raise ValueError(f"fit: batch size {self.batch_size} must be divisible by "
                                 f"data * fsdp = {n} of the state's mesh "
                                 f"{dict(mesh.shape)}")
            self.arrays = jax.device_put(self.arrays, NamedSharding(mesh, PartitionSpec()))
            self._epoch = None
            # The state's shardings as first placed: each chunk keeps them. Spelled without
            # trailing Nones, as jit's outputs spell them: P('fsdp', None) from shard_state
            # and P('fsdp') after a chunk are one sharding, and one static argument, so a
            # second fit call compiles nothing.
            self.mesh = {"mesh": mesh, "split": NamedSharding(mesh, PartitionSpec(axes)),
                         "placed": tuple(canonical_sharding(x.sharding)
                                         for x in jax.tree.leaves(state))}
        return {"placed": self.mesh["placed"], "split": self.mesh["split"]}

    def check(self, num_classes: int | None) -> None:
        """The checked mode: the whole dataset is checked once, before it is used."""
        check_batch(self.loader.dataset.arrays, num_classes=num_classes,
                    where="fit: train_data")

    def _source(self, epoch: int) -> tuple[Any, Any]:
        """The epoch's (arrays, order): ``order`` is ``None`` when the arrays are in the
        epoch's order already (or the loader does not shuffle)."""
        if self._epoch is None or self._epoch[0] != epoch:
            if self.loader.key is None:
                self._epoch = (epoch, self.arrays, None)
            else:
                order = jnp.asarray(self.loader.order(epoch).astype(np.int32))
                self._epoch = ((epoch, self.arrays, order) if self.gather else
                               (epoch, _permuted(self.arrays, order), None))
        return self._epoch[1], self._epoch[2]

    def _keep(self, epoch: int, arrays: Any, order: Any) -> None:
        """Hold on to the arrays a chunk handed back (its input was donated)."""
        if self._epoch is not None and self._epoch[1] is self.arrays:
            self.arrays = arrays
        self._epoch = (epoch, arrays, order)

    def chunks(self, first: int, end: int | None, epochs: int = 1
               ) -> Iterator[tuple[Chunk, Any]]:
        """The chunks from step ``first`` to ``end`` (the epoch's arrays are the feed's)."""
        assert end is not None
        for chunk in plan(first, end, self.steps_per_epoch, self.k, self.cuts,
                          full_batches(self.loader)):
            yield chunk, chunk.epoch

    def run(self, state: Any, chunk: Chunk, epoch: int) -> tuple[Any, list[Any], bool]:
        """Run ``chunk``: the new state, its metrics and ``True`` (they are stacked)."""
        shardings = self._place(state)
        arrays, order = self._source(epoch)
        if chunk.scanned:
            state, arrays, metrics = _steps_on_device(
                state, arrays, order, np.int32(chunk.batch), step=self.step,
                size=chunk.size, batch_size=self.batch_size, **shardings)
            self._keep(epoch, arrays, order)
            return state, [metrics], True
        out = []
        for b in range(chunk.batch, chunk.batch + chunk.size):
            if b < self.full_batches:
                state, arrays, metrics = _steps_on_device(
                    state, arrays, order, np.int32(b), step=self.step, size=1,
                    batch_size=self.batch_size, **shardings)
                self._keep(epoch, arrays, order)
            else:  # the smaller last batch (drop_remainder=False): its own shapes
                start = b * self.batch_size
                tail = (jax.tree.map(lambda a, s=start: a[s:], arrays) if order is None
                        else jax.tree.map(lambda a, s=start: a[order[s:]], arrays))
                state, _, metrics = _steps_on_device(  # may not divide: not split
                    state, tail, None, np.int32(0), step=self.step, size=1,
                    batch_size=self.tail, placed=shardings.get("placed"))
            out.append(metrics)
        return state, out, True


def epoch_batches(data: Any, epoch: int, where: str = "fit") -> Iterator[Batch]:
    """The batches of ``epoch``: ``data.epoch(e)`` (a ``Loader``), ``data(e)`` (a callable),
    or ``iter(data)`` (a re-iterable such as a list)."""
    if hasattr(data, "epoch"):
        return iter(data.epoch(epoch))
    if callable(data):
        return iter(data(epoch))
    if isinstance(data, Iterable):
        return iter(data)
    raise TypeError(f"{where}: expected a Loader, a callable epoch -> batches, or an "
                    f"iterable of batches, got {type(data).__name__}")


def _same_shapes(batches: list[Batch]) -> bool:
    shapes = [jax.tree.map(np.shape, b) for b in batches]
    return all(s == shapes[0] for s in shapes[1:])


class HostFeed:
    """Chunks over batches read on the host, prepared ahead by a background thread.

    With a ``len()`` (batches per epoch) the plan is ``plan``'s; without one, every chunk is
    one step and an epoch ends when its iterator does.
    """

    def __init__(self, data: Any, step: StepFn, k: int, cuts: tuple[int, ...],
                 steps_per_epoch: int | None, state: Any = None) -> None:
        self.data, self.step, self.k, self.cuts = data, step, k, cuts
        self.steps_per_epoch = steps_per_epoch
        self.num_classes: int | None = None
        self.checked = False
        self.mesh = _on_mesh(state)
        _check_process_split(self.mesh, data, "fit")

    def _put(self, batch: Batch, stacked: bool = False) -> Batch:
        """A batch (or a stack of them) on the device. For a state on a mesh its rows are
        split over ``data`` and ``fsdp``, as ``parallel.shard_batch`` splits them; with
        several processes each gives its own rows of the global batch (a plain
        ``device_put`` would have each process train on its part as if it were all)."""
        if self.mesh is None:
            return jax.device_put(batch)
        axis = 1 if stacked else 0
        _, n = batch_axes(self.mesh)
        if jax.process_count() == 1 and any(np.shape(x)[axis] % n for x in jax.tree.leaves(
                batch) if np.ndim(x) > axis):
            return jax.device_put(batch)  # a smaller last batch: whole on each device
        return shard_batch(batch, self.mesh, axis=axis)

    def check(self, num_classes: int | None) -> None:
        """The checked mode: every batch is checked on the host before it is sent."""
        self.checked, self.num_classes = True, num_classes

    def _checked(self, batch: Batch, epoch: int, index: int) -> Batch:
        if self.checked:
            check_batch(batch, num_classes=self.num_classes,
                        where=f"fit: epoch {epoch} batch {index}")
        return batch

    def _planned(self, first: int, end: int) -> Iterator[tuple[Chunk, Any]]:
        """Runs in the prefetch thread: read, check and stack each chunk's batches."""
        assert self.steps_per_epoch is not None
        epoch, batches = None, iter(())
        for chunk in plan(first, end, self.steps_per_epoch, self.k, self.cuts,
                          full_batches(self.data)):
            if chunk.epoch != epoch:
                epoch = chunk.epoch
                batches = epoch_batches(self.data, epoch)
                for _ in range(chunk.batch):  # resuming: skip the batches seen before
                    next(batches, None)
            group: list[Any] = []
            for i in range(chunk.batch, chunk.batch + chunk.size):
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(f"fit: train_data yielded only {i} batches in epoch "
                                     f"{epoch}, but its len() is {self.steps_per_epoch}")
                group.append(self._checked(batch, epoch, i))
            if chunk.scanned and _same_shapes(group):
                yield chunk, self._put(jax.tree.map(lambda *xs: np.stack(xs), *group), True)
            else:
                yield chunk._replace(scanned=False), [self._put(b) for b in group]

    def _open(self, first: int, epochs: int) -> Iterator[tuple[Chunk, Any]]:
        """Runs in the prefetch thread: one step per chunk, epochs end with their data."""
        step = first
        for epoch in range(epochs):
            batches = epoch_batches(self.data, epoch)
            ahead = next(batches, None)
            if ahead is None:
                raise ValueError(f"fit: train_data yielded no batches in epoch {epoch}; a "
                                 f"generator is used up after one pass, so pass a Loader, a "
                                 f"list, or a callable epoch -> batches")
            index = 0
            while ahead is not None:
                batch, ahead = ahead, next(batches, None)
                batch = self._checked(batch, epoch, index)
                yield (Chunk(step, 1, epoch, index, False, ahead is None),
                       [self._put(batch)])
                step, index = step + 1, index + 1

    def chunks(self, first: int, end: int | None, epochs: int = 1
               ) -> Iterator[tuple[Chunk, Any]]:
        """The chunks from step ``first`` to ``end`` (or over ``epochs`` passes when the
        data has no length), each with its batches already on the device."""
        work = self._open(first, epochs) if end is None else self._planned(first, end)
        return prefetch(work, size=2, transform=lambda item: item)

    def run(self, state: Any, chunk: Chunk, batches: Any) -> tuple[Any, list[Any], bool]:
        """Run ``chunk``: the new state, its metrics, and whether they are stacked (a
        scanned chunk) or one dict per step."""
        if chunk.scanned:
            state, metrics = scan_steps(self.step)(state, batches)
            return state, [metrics], True
        out = []
        for batch in batches:
            state, metrics = self.step(state, batch)
            out.append(metrics)
        return state, out, False
