"""data.prefetch: order kept, items on the device, errors raised at their item, early exit."""

import threading
import time

import jax
import numpy as np
import pytest

from funtrain import data


def test_items_arrive_in_order_on_the_device():
    out = list(data.prefetch(np.full(3, i, np.float32) for i in range(5)))
    assert [int(x[0]) for x in out] == list(range(5))
    assert all(isinstance(x, jax.Array) for x in out)


def test_an_error_while_producing_is_raised_at_that_item():
    def items():
        yield 1
        raise ValueError("bad batch 1")

    got = []
    with pytest.raises(ValueError, match="bad batch 1"):
        for x in data.prefetch(items(), transform=lambda x: x):
            got.append(x)
    assert got == [1]


def test_leaving_early_stops_the_thread():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    gen = data.prefetch(items(), size=2, transform=lambda x: x)
    assert next(gen) == 0
    gen.close()
    time.sleep(0.2)
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count < 10  # stopped, a few items ahead at most
    assert not any(t.name == "funtrain-prefetch" and t.is_alive()
                   for t in threading.enumerate())


def test_size_is_checked():
    with pytest.raises(ValueError, match="prefetch: size must be a positive int, got 0"):
        next(data.prefetch([1], size=0))
