"""Every ``>>>`` example in funtrain's docstrings runs and prints what it shows: they are
documentation, and one (``remat.repeat``'s) failed for as long as it existed. The modules
whose tests run their examples already are left to those tests."""

import doctest
import importlib
import pkgutil

import pytest

import funtrain

ELSEWHERE = {"funtrain.optim.schedules", "funtrain.nn.recurrent", "funtrain.nn.summary",
             "funtrain.__main__"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(funtrain.__path__, "funtrain.")
                 if m.name not in ELSEWHERE)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
