"""The documentation holds together: every relative link in README.md and docs/*.md reaches a file (and a
heading, when it names one), every docs/ file the code cites exists, the README stays short, and nothing
cites a design or environment file that is not in the repository. No root, no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
CODE_SUFFIXES = {".py", ".c", ".h", ".sh", ".md", ".toml"}
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache"}
# Files outside the repository that comments once cited (spelled in two parts, so this file does not cite them).
GONE = ["DESIGN" + ".md", "ENVIRONMENT" + ".md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", md.read_text(), re.M)}


def links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)   # code blocks hold no links
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def repo_files():
    for p in ROOT.rglob("*"):
        if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts) and \
                (p.suffix in CODE_SUFFIXES or p.name in ("Vagrantfile", "run")):
            yield p


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = []
    for target in links(md):
        path, _, frag = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading #{frag} in {dest.relative_to(ROOT)}")
    assert not broken, f"{md.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"


def test_cited_docs_exist():
    missing = []
    for f in repo_files():
        for cited in set(re.findall(r"\bdocs/[\w./-]+\.(?:md|png|py)\b", f.read_text(errors="replace"))):
            if not (ROOT / cited).exists():
                missing.append(f"{f.relative_to(ROOT)} cites {cited}")
    assert not missing, "; ".join(missing)


def test_nothing_cites_files_outside_the_repository():
    found = [f"{f.relative_to(ROOT)} cites {name}" for f in repo_files()
             for name in GONE if name in f.read_text(errors="replace")]
    assert not found, "; ".join(found)
