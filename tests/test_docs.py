"""The documentation site builds with warnings as errors: every docstring parses, every
cross-reference resolves, every page in the navigation exists."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow  # about 10 s
def test_docs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).exists():
        pytest.skip("mkdocs is not installed (it comes with the [docs] and [dev] extras)")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    api = tmp_path / "site" / "api"
    assert (api / "optim" / "index.html").read_text().count("doc-heading") > 50
    assert (tmp_path / "site" / "notebooks" / "01_quickstart" / "index.html").exists()
