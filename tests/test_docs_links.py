"""Every relative link of the Markdown documents (README.md, BENCHMARKS.md, docs/, benchmarks/,
examples/) resolves inside the repository: the file exists and, for `file#anchor`, the file has a
heading with that GitHub anchor; a Markdown file named in their prose (not only as a link:
`docs/x.md`) exists in the repository. Also the README's first commands: its test command is the
one `.ci/run` runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ([ROOT / "README.md", ROOT / "BENCHMARKS.md"] + sorted((ROOT / "docs").glob("*.md"))
             + sorted((ROOT / "benchmarks").glob("*.md"))
             + sorted(p for p in (ROOT / "examples").rglob("*.md") if "generated" not in p.parts))

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+(\S+)", re.M)


def _unfenced(text):
    """The text outside fenced code blocks."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def _prose(text):
    """The text outside fenced code blocks and inline code spans (a link there is not a link)."""
    return re.sub(r"`[^`\n]*`", "", _unfenced(text))


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen, found = {}, set()
    for line in _unfenced(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _anchor(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path, root=ROOT):
    """[(target, why)] for every relative link of `path` that does not resolve inside `root`."""
    text = _prose(path.read_text(encoding="utf-8"))
    problems = []
    for target in LINK.findall(text) + REFERENCE.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if root.resolve() not in resolved.parents and resolved != root.resolve():
            problems.append((target, "points outside the repository"))
        elif not resolved.exists():
            problems.append((target, "no such file"))
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append((target, f"no heading with anchor #{anchor} in {resolved.name}"))
    return problems


MARKDOWN_NAME = re.compile(r"(?<![\w/.-])((?:\.\./|\./)?[\w.-]+(?:/[\w.-]+)*\.md)\b")


def missing_documents(path, root=ROOT):
    """Markdown files named in the prose of `path` (outside code blocks, whose OUT.md and FILE.md
    are placeholders) that exist neither beside it nor at the repository root."""
    text = _unfenced(path.read_text(encoding="utf-8"))
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return [name for name in MARKDOWN_NAME.findall(text)
            if not any(candidate.resolve().is_relative_to(root.resolve()) and candidate.exists()
                       for candidate in (path.parent / name, root / name))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    assert broken_links(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_markdown_file_named_exists(document):
    assert missing_documents(document) == []


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n")
    page = tmp_path / "README.md"
    page.write_text("# Title\n\n[ok](docs/other.md) [ok](docs/other.md#a-code-heading-yes) [ok](#title)\n"
                    "[web](https://example.com) `[code](missing.md)`\n\n```\n[fenced](missing.md)\n```\n"
                    "[gone](docs/missing.md) [anchor](docs/other.md#nope) [self](#nope) [out](../outside.md)\n")
    assert broken_links(page, root=tmp_path) == [
        ("docs/missing.md", "no such file"),
        ("docs/other.md#nope", "no heading with anchor #nope in other.md"),
        ("#nope", "no heading with anchor #nope in README.md"),
        ("../outside.md", "points outside the repository"),
    ]


def test_the_checker_finds_documents_that_do_not_exist(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("See other.md, `docs/other.md` and DESIGN.md section 2 or ../shared/NOTES.md.\n\n"
                    "    pfpc bench --markdown OUT.md\n")
    assert missing_documents(page, root=tmp_path) == ["DESIGN.md", "../shared/NOTES.md"]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    top = readme.split("\n## ", 1)[0]
    commands = re.findall(r"^    (python3 -m pytest.*)$", top, re.M)
    assert commands, "the README's top has no test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[0] in [line.strip() for line in ci.splitlines()], (commands[0], "not in .ci/run")
