import os
import shutil
import tempfile

import jax
import pytest

# XLA's CPU compiler, set for speed of compiling: the suite builds ~4,000 small programs
# and spends most of its time compiling them. The legacy elemental emitters and LLVM at -O1
# compile train steps in about half the time of the defaults (fusion emitters, -O2), and
# one LLVM module per program (split count 1; the default splits it into parts compiled
# in parallel, which costs more CPU than it saves while both cores run tests) takes another
# 6-15% off. They run these tests' small shapes as fast, and the arithmetic is IEEE either
# way (no fast math). Subprocesses (CLI runs, notebooks, the SPMD script) inherit the flags.
# FUNTRAIN_TEST_DEFAULT_XLA=1 runs the suite with XLA's defaults instead (it passes there
# too).
_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"
                 " --xla_cpu_parallel_codegen_split_count=1")
if not os.environ.get("FUNTRAIN_TEST_DEFAULT_XLA") and _FAST_COMPILE not in \
        os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# One compilation cache for the session, shared by the xdist workers and the subprocesses
# (CLI runs, notebooks, the SPMD script) through the environment: a program that several
# processes build compiles once. Only XLA's output is cached, keyed by the program, the
# flags and the versions, so results are those of a fresh compile. The controller makes
# the folder before the workers start (they inherit the variable) and removes it after.
# Every program is cached, however quick to build: the same small and eager programs recur
# in both workers, and a hit (about 18 ms) costs less than even a one-op compile (20-40 ms).
_OWN_CACHE = "FUNTRAIN_TEST_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["FUNTRAIN_TEST_CACHE"] = tempfile.mkdtemp(prefix="funtrain-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["FUNTRAIN_TEST_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["FUNTRAIN_TEST_CACHE"], ignore_errors=True)


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, slow tests first: the workers start the long ones early and fill
    in with the short ones, instead of one worker finishing a long test alone at the end.
    In one process (``-n 0 -x``) the order stays the files' order."""
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
