"""README.md and docs/: the front door stays short and true, and every relative link resolves.

- README.md opens with the two set-up commands (`make farm`, `make test`), and both are Makefile
  targets; it stays under 150 lines (the rest lives in docs/).
- Every relative link in README.md and docs/*.md points at a file that exists, and a `#fragment`
  at a heading of that page (GitHub's anchor rules).
- Every path of the repository README.md names in backticks exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # `# comment` lines in code blocks
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_readme_opens_with_the_two_setup_commands():
    lines = README.read_text().splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines; move detail to docs/"
    first_block = README.read_text().split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make farm", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("farm", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(target)
    assert broken == []


def test_readme_names_only_files_that_exist():
    text = README.read_text()
    paths = set(re.findall(r"`((?:pipeline|serving|cluster|monitoring|deploy|tests|bench|docs)/[\w./-]*\w)`", text))
    assert len(paths) > 5
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []
