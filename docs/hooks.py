"""mkdocs hook: the guide, contributing notes, changelog and notebooks live at the top of
the repository; copy them into the docs folder before each build (the copies are
git-ignored), so the site and the repository never disagree."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def on_pre_build(config, **kwargs):
    shutil.copyfile(ROOT / "README.md", DOCS / "index.md")
    for name in ("CONTRIBUTING.md", "CHANGELOG.md"):
        shutil.copyfile(ROOT / name, DOCS / name)
    (DOCS / "notebooks").mkdir(exist_ok=True)
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copyfile(nb, DOCS / "notebooks" / nb.name)
