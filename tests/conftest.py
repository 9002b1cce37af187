import jax
import pytest


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, slow tests first: the workers start the long ones early and fill
    in with the short ones, instead of one worker finishing a long test alone at the end.
    In one process (``-n 0 -x``) the order stays the files' order."""
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
