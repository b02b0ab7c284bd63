"""The documentation's links and the benchmark page's sources: docs/benchmarks.md links the tables the bench
scripts save under bench/results/*.md instead of copying them (a run overwrites those files, so a copy goes
stale); every relative link in README.md and docs/*.md names a file that exists; and every `file.md#anchor`
or `#anchor` link names an anchor that a heading of its target produces (GitHub's rule), so README.md and the
docs keep landing on the sections they cite when a page is rewritten.

Pure text checks: nothing is built or run.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
MIN_COPIED = 41  # a line of a results file this long or longer must not appear verbatim in the page

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def unfenced_lines(path: Path) -> list[tuple[int, str]]:
    """The file's lines outside fenced code blocks, numbered from 1."""
    lines: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The file's lines outside fenced code blocks, numbered from 1, with inline code spans removed."""
    return [(number, INLINE_CODE.sub("", line)) for number, line in unfenced_lines(path)]


def links(path: Path) -> list[tuple[int, str]]:
    """Every link target of a Markdown file (inline links, images and reference definitions), with its line."""
    found: list[tuple[int, str]] = []
    for number, line in prose_lines(path):
        found.extend((number, target) for target in INLINE_LINK.findall(line))
        reference = REFERENCE_LINK.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def relative_links(path: Path) -> list[tuple[int, str, Path, str]]:
    """(line, link, the file it names, its fragment) for each link that is neither a URL nor a pure `#anchor`."""
    result: list[tuple[int, str, Path, str]] = []
    for number, target in links(path):
        if SCHEME.match(target) or target.startswith("#"):
            continue
        file_part, _, fragment = target.partition("#")
        base = ROOT if file_part.startswith("/") else path.parent
        result.append((number, target, (base / unquote(file_part.lstrip("/"))).resolve(), fragment))
    return result


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link markup reduced to its text, lowercased, everything but letters, digits,
    spaces, hyphens and underscores dropped (backticks included), spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file's headings (a repeated one gets -1, -2, ...) and HTML anchors produce."""
    produced: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in unfenced_lines(path):  # headings keep their code spans: their text is in the anchor
        produced.update(name.lower() for name in HTML_ANCHOR.findall(INLINE_CODE.sub("", line)))
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        produced.add(base if count == 0 else f"{base}-{count}")
    return produced


def shown(path: Path) -> str:
    """A path relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def test_benchmarks_page_links_results_instead_of_copying_them() -> None:
    page = {line for line in BENCHMARKS.read_text(encoding="utf-8").splitlines() if len(line) >= MIN_COPIED}
    results = sorted(RESULTS.glob("*.md"))
    assert results, f"no results tables under {RESULTS}"
    copies = [
        f"{result.relative_to(ROOT)}: {line!r}"
        for result in results
        for line in result.read_text(encoding="utf-8").splitlines()
        if len(line) >= MIN_COPIED and line in page
    ]
    assert not copies, (
        f"{BENCHMARKS.relative_to(ROOT)} copies {len(copies)} line(s) of the bench results (a run overwrites them: "
        "link the file and cite its headline figures instead):\n" + "\n".join(copies)
    )


def test_relative_links_name_existing_files() -> None:
    broken = [
        f"{path.relative_to(ROOT)}:{number}: {target} (no {shown(target_path)})"
        for path in markdown_files()
        for number, target, target_path, _ in relative_links(path)
        if not target_path.exists()
    ]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_anchor_links_name_headings_of_their_target() -> None:
    broken: list[str] = []
    for path in markdown_files():
        targets = [
            (number, target, target_path, fragment)
            for number, target, target_path, fragment in relative_links(path)
            if fragment
        ]
        targets += [(number, target, path, target[1:]) for number, target in links(path) if target.startswith("#")]
        for number, target, target_path, fragment in targets:
            if target_path.suffix.lower() != ".md" or not target_path.is_file():
                continue  # a missing file is the other test's; a fragment of a code file is a line, not a heading
            available = anchors(target_path)
            if unquote(fragment).lower() not in available:
                broken.append(
                    f"{path.relative_to(ROOT)}:{number}: {target} "
                    f"(anchors of {target_path.name}: {', '.join(sorted(available))})"
                )
    assert not broken, "links to anchors that no heading produces:\n" + "\n".join(broken)
