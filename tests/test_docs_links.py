"""Links into the docs resolve: markdown links and images in README.md and docs/, and the
``docs/...`` paths and section names that code, scripts and model cards cite.

Anchors follow GitHub's rule: the heading's text, lower-cased, without punctuation other than
``-`` and ``_``, spaces turned into ``-``; a repeated heading gets ``-1``, ``-2``...
Run ``python tests/test_docs_links.py`` to list every broken link.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")
# A path into docs/ cited outside the docs, e.g. "docs/benchmarks/service.md#service-load".
CITED_PATH = re.compile(r"docs/[\w./-]*\w(?:#[\w-]+)?")
# A section cited by name, e.g. "docs/benchmarks.md, 'Learned segmenter (held-out odd ids)'".
CITED_SECTION = re.compile(r"(docs/[\w./-]+\.md),? ['\"]([^'\"]+)['\"]")
CODE_DIRS = ("src", "benchmarks", "scripts", "tests")
CODE_SUFFIXES = {".py", ".sh", ".json", ".toml", ".js", ".html"}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's markdown text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").lower()
    kept = [
        ch
        for ch in text
        if ch in " -_" or unicodedata.category(ch)[0] in "LMN" or unicodedata.category(ch) == "Pc"
    ]
    return "".join(kept).replace(" ", "-")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def headings(path: Path) -> list[str]:
    return [m.group(2) for _, line in prose_lines(path) if (m := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    """Every anchor a link into ``path`` may name."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for text in headings(path):
        base = slug(text)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    for _, line in prose_lines(path):
        out.update(HTML_ANCHOR.findall(line))
    return out


def _check_target(target: Path, anchor: str, where: str) -> list[str]:
    if not target.exists():
        return [
            f"{where}: {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}"
            " does not exist"
        ]
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return [f"{where}: no heading for #{anchor} in {target.name}"]
    return []


def broken_links(md_file: Path) -> list[str]:
    """Relative links and images in ``md_file`` whose file or heading is missing."""
    problems = []
    for number, line in prose_lines(md_file):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if target.startswith(EXTERNAL):
                continue
            path, _, anchor = target.partition("#")
            resolved = (md_file.parent / path).resolve() if path else md_file
            problems += _check_target(resolved, anchor, f"{md_file.name}:{number} ({target})")
    return problems


def broken_citations(text_file: Path, root: Path = ROOT) -> list[str]:
    """``docs/...`` paths (with anchors) and ``docs/X.md, 'Section'`` names cited in a file."""
    problems = []
    text = text_file.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{text_file.name}:{number}"
        for match in CITED_PATH.finditer(line):
            if line[match.end() : match.end() + 2].lstrip("-") in ("$", "${", "{"):
                continue  # a templated name, such as docs/img/recall-$protocol.png
            cited = match.group()
            path, _, anchor = cited.partition("#")
            problems += _check_target(root / path, anchor, f"{where} ({cited})")
        for doc, name in CITED_SECTION.findall(line):
            if (root / doc).exists() and not _section_reachable(root / doc, name):
                problems.append(f"{where}: no section {name!r} in {doc} or the docs it links to")
    return problems


def _section_reachable(doc: Path, name: str) -> bool:
    """A heading starting with ``name`` in ``doc`` or in a markdown file ``doc`` links to."""
    linked = {doc}
    for _, line in prose_lines(doc):
        for target in LINK.findall(line):
            path = target.partition("#")[0]
            if path.endswith(".md") and not path.startswith(EXTERNAL):
                linked.add((doc.parent / path).resolve())
    return any(h.startswith(name) for f in linked if f.exists() for h in headings(f))


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def code_files(root: Path = ROOT) -> list[Path]:
    return [
        p
        for d in CODE_DIRS
        for p in sorted((root / d).rglob("*"))
        if p.is_file() and p.suffix in CODE_SUFFIXES and p.resolve() != Path(__file__).resolve()
    ]


def test_slug_follows_github() -> None:
    assert slug("Service load (issue #5)") == "service-load-issue-5"
    assert slug("ONNX Runtime thread spinning (query latency)") == (
        "onnx-runtime-thread-spinning-query-latency"
    )
    assert slug("Photo → catalog: `pose` ≥ 0.85, 1M × 512") == "photo--catalog-pose--085-1m--512"
    assert slug("[The catalog](x.md) on disk") == "the-catalog-on-disk"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Top\n\n## Part one\n\n## Part one\n\n```\n# not a heading\n```\n", encoding="utf-8"
    )
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#part-one) [ok2](docs/a.md#part-one-1) [web](https://x.org/y.md#z)\n"
        "[no file](docs/b.md) [no anchor](docs/a.md#part-two) ![img](docs/missing.png)\n"
        "[in code block](docs/a.md#not-a-heading) `[inline](docs/c.md)` [self](#top)\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 5, problems
    assert any("docs/b.md does not exist" in p for p in problems)
    assert any("#part-two" in p for p in problems)
    assert any("missing.png" in p for p in problems)
    assert any("#not-a-heading" in p for p in problems)
    assert any("#top" in p for p in problems)  # README.md has no heading "Top"


def test_checker_finds_broken_citations(tmp_path: Path) -> None:
    (tmp_path / "docs" / "area").mkdir(parents=True)
    (tmp_path / "docs" / "index.md").write_text("# Index\n\n[area](area/x.md)\n")
    (tmp_path / "docs" / "area" / "x.md").write_text("# X\n\n## Learned thing (odd ids)\n")
    code = tmp_path / "mod.py"
    code.write_text(
        "# see docs/index.md, 'Learned thing' and docs/area/x.md#learned-thing-odd-ids\n"
        "# see docs/index.md, 'Gone section' and docs/area/x.md#gone and docs/nothere.md\n"
        "# plot to docs/img/recall-$protocol.png\n",
        encoding="utf-8",
    )
    problems = broken_citations(code, root=tmp_path)
    assert len(problems) == 3, problems
    assert all(p.startswith("mod.py:2") for p in problems)


def test_links_in_readme_and_docs_resolve() -> None:
    problems = [p for f in markdown_files() for p in broken_links(f)]
    assert problems == []


def test_docs_cited_from_code_exist() -> None:
    problems = [p for f in code_files() for p in broken_citations(f)]
    assert problems == []


if __name__ == "__main__":
    found = [p for f in markdown_files() for p in broken_links(f)]
    found += [p for f in code_files() for p in broken_citations(f)]
    print("\n".join(found) or "no broken links")
    sys.exit(1 if found else 0)
