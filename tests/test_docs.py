"""The project explains itself from inside the repository: every relative link in README.md and docs/*.md resolves
to a file in the repository (and an anchor to a heading of that file)."""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINKS = [
    re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"),  # [text](target "title")
    re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M),  # [ref]: target
    re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']"""),  # html
]


def documents():
    return [os.path.join(ROOT, "README.md")] + sorted(
        glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    )


def links(path):
    with open(path, encoding="utf-8") as f:
        text = CODE.sub("", FENCE.sub("", f.read()))
    return [m.group(1) for pattern in LINKS for m in pattern.finditer(text)]


def anchors(path):
    """GitHub's heading ids: lowercase, punctuation dropped, spaces to hyphens."""
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_architecture_doc_exists_and_readme_points_to_it():
    assert os.path.exists(os.path.join(ROOT, "docs", "architecture.md"))
    assert "docs/architecture.md" in links(os.path.join(ROOT, "README.md"))


def link_problems(doc, root):
    """(number of relative links checked, what is wrong with them) for one markdown file of the tree at root."""
    checked, problems = 0, []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = os.path.realpath(os.path.join(os.path.dirname(doc), file_part)) if file_part else doc
        where = f"{os.path.relpath(doc, root)}: {target}"
        checked += 1
        if os.path.commonpath([resolved, os.path.realpath(root)]) != os.path.realpath(root):
            problems.append(f"{where} points outside the repository")
        elif not os.path.exists(resolved):
            problems.append(f"{where} does not exist")
        elif fragment and resolved.endswith(".md") and fragment not in anchors(resolved):
            problems.append(f"{where}: no heading #{fragment}")
    return checked, problems


def outside_mentions(doc, root):
    """Relative paths written anywhere in the text, code spans included, that lead out of the repository (a
    reader follows `../shared/DESIGN.md` as readily as a link)."""
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    out = []
    for path in re.findall(r"(?<![\w/.])((?:\.\./)+[\w./-]+)", text):
        resolved = os.path.realpath(os.path.join(os.path.dirname(doc), path))
        if os.path.commonpath([resolved, os.path.realpath(root)]) != os.path.realpath(root):
            out.append(f"{os.path.relpath(doc, root)}: {path} is outside the repository")
    return out


def test_every_relative_link_resolves_inside_the_repository():
    checked, problems = 0, []
    for doc in documents():
        n, p = link_problems(doc, ROOT)
        checked, problems = checked + n, problems + p + outside_mentions(doc, ROOT)
    assert checked >= 20, checked  # the walk found the links (README, architecture.md, cluster.md)
    assert not problems, "\n".join(problems)


def test_link_checker_reports_outside_missing_and_bad_anchor(tmp_path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (tmp_path / "DESIGN.md").write_text("# Design\n")  # exists, but outside the repository
    (repo / "docs" / "a.md").write_text("# Serving the chat model\n")
    readme = repo / "README.md"
    readme.write_text(
        "[design](../DESIGN.md) [gone](docs/nope.md) [ok](docs/a.md#serving-the-chat-model) "
        "[bad anchor](docs/a.md#nothing) `[code](not/a/link.md)` [web](https://x.org)\n"
    )
    checked, problems = link_problems(str(readme), str(repo))
    assert checked == 4
    assert [p.split(": ", 1)[1] for p in problems] == [
        "../DESIGN.md points outside the repository",
        "docs/nope.md does not exist",
        "docs/a.md#nothing: no heading #nothing",
    ]
    (repo / "docs" / "b.md").write_text("See `../../shared/DESIGN.md` and `../README.md`.\n")
    assert outside_mentions(str(repo / "docs" / "b.md"), str(repo)) == [
        "docs/b.md: ../../shared/DESIGN.md is outside the repository"
    ]
