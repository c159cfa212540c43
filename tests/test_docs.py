"""The documentation's links hold: every relative link and image in the repository's Markdown files points at
a file that exists, and every `#anchor` at a heading of its target (GitHub's slugs). README.md, the front
door, stays short. Pure Python, no network."""

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
SKIP_DIRS = {".venv", "venv", "node_modules", "__pycache__", "build", "dist", "test-artifacts"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1", re.S)
# [text](target) and ![alt](target); the text may hold one level of brackets ([![badge](img)](link)).
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HTML_ANCHOR = re.compile(r"""<[a-z][^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository, hidden folders and virtual environments left out."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")
        )
        found += [Path(folder) / f for f in sorted(files) if f.lower().endswith(".md")]
    return found


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            marker = match.group(1) if match else ""
            if marker[:1] == fence[0] and len(marker) >= len(fence) and not line.strip()[len(marker) :].strip():
                fence = None
        else:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation dropped (hyphens, underscores
    and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")  # HTML tags, code span markers
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file offers: its headings' slugs (repeats get -1, -2, ...) and explicit ids."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    previous = ""
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        heading = None
        atx = ATX_HEADING.match(line)
        if atx:
            heading = atx.group(2) or ""
        elif (
            SETEXT_UNDERLINE.match(line) and previous.strip() and not previous.lstrip().startswith(("-", "*", "|", ">"))
        ):
            heading = previous.strip()
        if heading is not None:
            base = slug(heading)
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(HTML_ANCHOR.findall(line))
        previous = "" if heading is not None else line
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image of a Markdown file, code left out."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for match in INLINE_LINK.finditer(prose):
            yield number, match.group(1).strip("<>")
        for match in REFERENCE_DEFINITION.finditer(prose):
            yield number, match.group(1).strip("<>")
        for target in HTML_LINK.findall(prose):
            yield number, target


def broken_links(path: Path) -> list[str]:
    """What is wrong with the relative links of one file, one message per link."""
    problems = []
    where = path.relative_to(ROOT)
    for number, target in links(path):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue  # external (http, https, mailto, ...) or empty
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?")[0])
        resolved = (ROOT / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
        resolved = resolved.resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{where}:{number}: link ({target}) points at {file_part}, which does not exist")
            continue
        if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
            offered = anchors(resolved)
            if unquote(anchor).lower() not in offered:
                near = sorted(a for a in offered if a.startswith(unquote(anchor).lower()[:6]))[:5]
                hint = f"; headings there with that start: {', '.join(near)}" if near else ""
                problems.append(
                    f"{where}:{number}: link ({target}): no heading of {resolved.relative_to(ROOT)} "
                    f"has the anchor #{anchor}{hint}"
                )
    return problems


def test_there_are_markdown_files() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert "README.md" in names
    assert not any(n.startswith(".venv/") for n in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, f"{len(problems)} broken link(s) in {path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move reference material to docs/"
    )


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("How it is built", "how-it-is-built"),
        (
            "What the pack buys (default model, 2-core CPU, `make eval`)",
            "what-the-pack-buys-default-model-2-core-cpu-make-eval",
        ),
        ("`serve_speed.py`: serving through Ray Serve", "serve_speedpy-serving-through-ray-serve"),
        ("Where one stream's time goes", "where-one-streams-time-goes"),
        ("A [linked](other.md) *heading*", "a-linked-heading"),
    ],
)
def test_slug_follows_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_checker_finds_broken_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Title\n\n## Same\n\n## Same\n\nText\n---\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#title) [dup](other.md#same-1) [setext](other.md#text) [self](#top)\n"
        "# Top\n"
        "[gone](missing.md) ![img](nope.png) [bad anchor](other.md#nothing) [web](https://example.com/x.md)\n"
        "`[in code](missing-too.md)`\n"
        "```\n[fenced](missing-three.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert problems[0].startswith("page.md:3: link (missing.md)")
    assert "nope.png" in problems[1]
    assert "#nothing" in problems[2] and "other.md" in problems[2]
