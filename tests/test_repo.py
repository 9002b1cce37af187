"""The README's two commands are what CI runs; funtrain never imports optax."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "funtrain demo" in cmds[0]
    assert "pytest" in cmds[1]
    assert (ROOT / "README.md").read_text().index("```bash") < 20


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_no_optax_in_the_package():
    """funtrain never imports optax (the word appears only to name optax's conventions)."""
    import re

    pattern = re.compile(r"^\s*(import optax|from optax)|importlib.*optax|__import__\(.optax",
                         re.M)
    offenders = [str(p) for p in (ROOT / "funtrain").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_funtrain_imports_without_optax(tmp_path):
    """Import every module with optax made unimportable."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['optax'] = None\n"
            "import funtrain, funtrain.cli\n"
            "from funtrain import nn, optim, losses, train, data, interop\n"
            "assert 'optax' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ruff_is_clean():
    import shutil
    import subprocess
    import sys


    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [dev] extra)")
    proc = subprocess.run([ruff, "check", "funtrain", "tests", "bench",
                           "notebooks/make_notebooks.py"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_version_lives_in_one_place():
    """pyproject reads funtrain/_version.py; the installed metadata, the package and the CLI
    agree; CHANGELOG has an Unreleased section and the first release."""
    import importlib.metadata
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import funtrain
    from funtrain import cli

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "funtrain._version.__version__"}
    assert importlib.metadata.version("funtrain") == funtrain.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and "## [0.1.0] - " in changelog
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main(["--version"])
    assert out.getvalue().strip() == f"funtrain {funtrain.__version__}"


def test_a_compile_the_cache_serves_is_still_counted():
    """The suite shares a compilation cache (conftest). The tests that assert a call
    "compiles nothing" count backend_compile_duration events: JAX records one for a
    compile the cache serves too, so a needless recompile still fails them."""
    import jax
    import jax.numpy as jnp

    events: list[str] = []

    def on_duration(name, secs, **kw):
        events.append(name)

    def on_event(name, **kw):
        events.append(name)

    f = lambda x: jnp.sin(x) * 3.0 + 1.0  # noqa: E731
    x = jnp.arange(7.0)
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        jax.jit(f).lower(x).compile()
        jax.clear_caches()  # the in-memory caches only: this compile reads the disk cache
        events.clear()
        jax.jit(f).lower(x).compile()
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
    assert "/jax/compilation_cache/cache_hits" in events
    assert "/jax/core/compile/backend_compile_duration" in events
