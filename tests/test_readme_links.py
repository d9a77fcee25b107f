"""Links in README.md and docs/*.md point at things that exist: every relative link (and picture) at a file of the
repository, and every ``#section`` anchor at a heading of the target markdown file, by GitHub's anchor rule
(lowercase; punctuation other than hyphens and spaces dropped; spaces become hyphens; a repeated heading gets
``-1``, ``-2``...). Links inside code (fenced blocks, inline code) and web links are not checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
WEB = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    out = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        out += LINK.findall(INLINE_CODE.sub("", line))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every link of ``path`` whose file or ``#section`` does not exist, as 'target (why)'."""
    bad = []
    for target in links(path):
        if WEB.match(target):
            continue
        file_part, _, section = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif root.resolve() not in (dest, *dest.parents):
            bad.append(f"{target} (outside the repository)")
        elif section and dest.suffix == ".md" and section not in anchors(dest):
            bad.append(f"{target} (no heading with anchor #{section} in {dest.name})")
    return bad


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_sections_that_exist(path):
    assert links(path) or path.name != "README.md", "no links found in README.md: the link pattern broke?"
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} has broken links"


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md") if not WEB.match(t)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"docs pages the README does not link: {missing}"


def test_the_check_catches_a_broken_file_and_a_broken_section(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Step size: auto (the default)\n\n## Step size: auto (the default)\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n## Models: what goes where\n\n"
        "[ok](docs/guide.md#step-size-auto-the-default) [ok](docs/guide.md#step-size-auto-the-default-1)\n"
        "[ok](#models-what-goes-where) ![ok](docs/guide.md) [web](https://example.com/x.md#nothing)\n"
        "[gone](docs/missing.md) [no section](docs/guide.md#step-size) ![gone](docs/pic.png)\n"
        "[here](#models) `[code](docs/not-checked.md)`\n"
        "```\n[fenced](docs/not-checked.md)\n# not a heading\n```\n"
        "[fenced heading](#not-a-heading) [outside](../elsewhere.md)\n"
    )
    (tmp_path.parent / "elsewhere.md").touch()
    bad = broken_links(readme, root=tmp_path)
    assert bad == [
        "docs/missing.md (no such file)",
        "docs/guide.md#step-size (no heading with anchor #step-size in guide.md)",
        "docs/pic.png (no such file)",
        "#models (no heading with anchor #models in README.md)",
        "#not-a-heading (no heading with anchor #not-a-heading in README.md)",
        "../elsewhere.md (outside the repository)",
    ]


def test_anchor_rule():
    assert anchor("Guidance on Flux and SD3.5 (MM-DiT)") == "guidance-on-flux-and-sd35-mm-dit"
    assert anchor("§11 References") == "11-references"
    assert anchor("Models: what goes where") == "models-what-goes-where"
    assert anchor("Branches: edit, both, pix2pix-zero") == "branches-edit-both-pix2pix-zero"
    assert anchor("The model (`zerocon_core/toyworld/model.py`, `bench/toyworld_train.py`)") == (
        "the-model-zerocon_coretoyworldmodelpy-benchtoyworld_trainpy"
    )
