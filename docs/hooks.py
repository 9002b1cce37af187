"""mkdocs hook: the guide, contributing notes, changelog and notebooks live at the top of
the repository; copy them into the docs folder before each build (the copies are
git-ignored), so the site and the repository never disagree."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def on_pre_build(config, **kwargs):
    # links into docs/ from the top of the repository lose that prefix on the site
    for src, dst in (("README.md", "index.md"), ("CONTRIBUTING.md", "CONTRIBUTING.md"),
                     ("CHANGELOG.md", "CHANGELOG.md")):
        text = (ROOT / src).read_text().replace("](docs/", "](")
        (DOCS / dst).write_text(text)
    (DOCS / "notebooks").mkdir(exist_ok=True)
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copyfile(nb, DOCS / "notebooks" / nb.name)


def on_page_markdown(markdown, page, config, files, **kwargs):
    # docs/design.md links ../CONTRIBUTING.md (right on GitHub); on the site it is a sibling
    return markdown.replace("](../CONTRIBUTING.md)", "](CONTRIBUTING.md)")
