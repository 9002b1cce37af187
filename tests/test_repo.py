"""The README's two commands are what CI runs; funtrain never imports optax."""

from pathlib import Path

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

    import pytest

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [dev] extra)")
    proc = subprocess.run([ruff, "check", "funtrain", "tests", "bench",
                           "notebooks/make_notebooks.py"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
