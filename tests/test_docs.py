"""The README and docs/: every relative link resolves, the README stays short, and no text
cites a document the repository does not contain.

Links are checked the way GitHub renders them: a path relative to the file that holds the
link, and for ``file.md#anchor`` a heading of that file whose GitHub slug is the anchor.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

# [text](target) or [text](target "title"); images ![alt](src) match too.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
# "seed 001 §2.3" and the like: the seed documents are not part of this repository.
SEED_CITATION = re.compile(r"\bseed\s+00\d", re.IGNORECASE)


def doc_files() -> list[Path]:
    """The README and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks: code is not rendered as links or
    headings."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: Markdown markup and punctuation dropped (letters,
    digits, spaces, ``-`` and ``_`` kept), lower case, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    headings = (HEADING.match(line) for _, line in prose_lines(path.read_text(encoding="utf-8")))
    for match in filter(None, headings):
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """One line per relative link of ``path`` that does not resolve (empty: all resolve)."""
    problems = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:, ...
                continue
            file_part, _, anchor = unquote(target).partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
            if not linked.exists():
                problems.append(f"{where}: {target}: no file {linked}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{where}: {target}: no heading #{anchor} in {linked.name}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path):
    assert broken_links(path) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Real models\n\n## Export (`sa2va/export.py`)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#export-sa2vaexportpy) [ok](#page) [web](https://example.org)\n"
        "[gone](DESIGN.md) [bad anchor](other.md#memory-planner)\n"
        "```\n[in code](not-checked.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "DESIGN.md: no file" in problems[0]
    assert "no heading #memory-planner in other.md" in problems[1]


def test_github_slugs():
    assert github_slug("Ablation sweeps, W&B logging and the comparison report") == (
        "ablation-sweeps-wb-logging-and-the-comparison-report"
    )
    assert github_slug("Tested here (CPU, tiny models) vs. needs a GPU") == (
        "tested-here-cpu-tiny-models-vs-needs-a-gpu"
    )


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md: {lines} lines (at most {README_MAX_LINES})"


def test_the_benchmark_table_has_one_block_to_rewrite():
    """``sa2va.bench bench.doc=docs/benchmarks.md`` replaces the text between the markers;
    without exactly one pair it would append a second table instead."""
    from sa2va.benchmarks.report import DOC_BEGIN, DOC_END

    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert text.count(DOC_BEGIN) == 1 and text.count(DOC_END) == 1
    assert text.index(DOC_BEGIN) < text.index(DOC_END)


def test_nothing_cites_a_seed_document():
    """State the fact itself: the seed documents are not in this repository."""
    markdown = [*doc_files(), *sorted((ROOT / "tests").rglob("*.md"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in markdown
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if SEED_CITATION.search(line)
    ]
    found += [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "conf").rglob("*.yaml"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "#" in line and SEED_CITATION.search(line.split("#", 1)[1])
    ]
    assert found == []
