"""Background prefetch: the next items are prepared (and sent to the device) while the
device computes on the current one."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax

from funtrain._checks import check_int

T = TypeVar("T")

_DONE = object()


def prefetch(items: Iterable[T], size: int = 2,
             transform: Callable[[T], Any] | None = None) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``size`` items ahead of the consumer.

    Args:
      items: any iterable (a generator of numpy batches, a ``Loader`` epoch, ...).
      size: how many prepared items may wait in the queue.
      transform: applied in the background thread to each item; by default
        ``jax.device_put``, so batches reach the device while it computes.

    An exception raised while producing an item is raised by the consumer at that item.
    Closing the returned generator (or leaving a ``for`` loop early) stops the thread.

    Examples:
      >>> import numpy as np
      >>> [float(b.sum()) for b in prefetch(np.ones((2, 3)) for _ in range(2))]
      [6.0, 6.0]
    """
    check_int("prefetch", "size", size)
    transform = jax.device_put if transform is None else transform
    slots: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((transform(item), None)):
                    return
            put((_DONE, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((None, err))

    worker = threading.Thread(target=produce, name="funtrain-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=10)
