"""The project explains itself from inside the repository: every relative link in README.md and docs/*.md resolves
to a file in the repository (and an anchor to a heading of that file), no tracked file points to a document
outside it, and docs/architecture.md's layout lists every module of src/lemur_torch (and nothing else)."""

from __future__ import annotations

import glob
import os
import re
import subprocess

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
    reader follows `../../elsewhere/GUIDE.md` as readily as a link)."""
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
    (tmp_path / "GUIDE.md").write_text("# Guide\n")  # exists, but outside the repository
    (repo / "docs" / "a.md").write_text("# Serving the chat model\n")
    readme = repo / "README.md"
    readme.write_text(
        "[guide](../GUIDE.md) [gone](docs/nope.md) [ok](docs/a.md#serving-the-chat-model) "
        "[bad anchor](docs/a.md#nothing) `[code](not/a/link.md)` [web](https://x.org)\n"
    )
    checked, problems = link_problems(str(readme), str(repo))
    assert checked == 4
    assert [p.split(": ", 1)[1] for p in problems] == [
        "../GUIDE.md points outside the repository",
        "docs/nope.md does not exist",
        "docs/a.md#nothing: no heading #nothing",
    ]
    (repo / "docs" / "b.md").write_text("See `../../elsewhere/GUIDE.md` and `../README.md`.\n")
    assert outside_mentions(str(repo / "docs" / "b.md"), str(repo)) == [
        "docs/b.md: ../../elsewhere/GUIDE.md is outside the repository"
    ]


# -- no file points outside the repository ----------------------------------------------------------------------

# the team's background documents, which live beside the repository and are not part of it
OUTSIDE_DOCUMENTS = re.compile(
    r"(?:\.\./)+shared\b|\bshared/[\w./-]*\.md\b|\b(?:RECIPE|DESIGN|STYLE)\.md\b|(?<![\w/])notes/[\w.-]+\.md\b"
)


def tracked_files(root):
    """The repository's files: git's list where this is a checkout, else every file outside hidden folders."""
    proc = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout:
        return [os.path.join(root, p) for p in proc.stdout.split("\0") if p]
    return [
        os.path.join(d, f)
        for d, dirs, files in os.walk(root)
        if not dirs.__setitem__(slice(None), [x for x in dirs if not x.startswith(".")])
        for f in files
    ]


def pointers_outside(path, root):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError):  # binary files, links to nothing
        return []
    named = [f"{os.path.relpath(path, root)}: {m.group(0)}" for m in OUTSIDE_DOCUMENTS.finditer(text)]
    return named + outside_mentions(path, root)


def test_no_file_points_to_a_document_outside_the_repository():
    files = tracked_files(ROOT)
    assert len(files) > 100, len(files)
    # this file excepted: its checks' own examples are such pointers
    problems = [p for path in files if path != os.path.abspath(__file__) for p in pointers_outside(path, ROOT)]
    assert not problems, "\n".join(problems)


def test_outside_pointers_are_found(tmp_path):
    # the planted pointers are assembled, so that this file does not itself hold one for a grep to find
    planted = ["see shared/" + "RECIPE" + ".md", "(.." + "/shared/x)", "notes/plan.md", "STYLE.md"]
    for i, text in enumerate(planted):
        (tmp_path / f"f{i}.yaml").write_text(f"# {text}\n")
        assert pointers_outside(str(tmp_path / f"f{i}.yaml"), str(tmp_path)), text
    (tmp_path / "ok.yaml").write_text("# docs/recipe.md, /shared/runs/lemur70b, scripts/README.md\n")
    assert pointers_outside(str(tmp_path / "ok.yaml"), str(tmp_path)) == []


# -- the layout in docs/architecture.md -------------------------------------------------------------------------

DESCRIPTION_COLUMN = 24  # a line indented this far continues the description of the entry above it
PY_NAME = re.compile(r"(?<![\w/.])(\w+\.py)\b")


def layout_block(text):
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return FENCE.search(section).group(0).splitlines()[1:-1]


def layout_modules(lines, package="src/lemur_torch/"):
    """(modules, folders) the layout lists under `package`, relative to it. An entry is a name at the start of a
    line (its indentation nests it); a folder's description lists its modules by name (`x.py`)."""
    entries = []  # (indent, name, description)
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if indent >= DESCRIPTION_COLUMN and entries:
            entries[-1] = (entries[-1][0], entries[-1][1], entries[-1][2] + " " + line.strip())
        elif line.strip():
            name, _, description = line.strip().partition(" ")
            entries.append((indent, name, description))
    modules, folders, stack = set(), set(), []
    for indent, name, description in entries:
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + name
        if not path.startswith(package):
            if name.endswith("/"):
                stack.append((indent, path))
            continue
        rel = path[len(package) :]
        if name.endswith("/"):
            stack.append((indent, path))
            if rel:
                folders.add(rel)
                modules.update(rel + m for m in PY_NAME.findall(description))
        elif name.endswith(".py"):
            modules.add(rel)
    return modules, folders


def source_modules(root):
    """(modules, packages) of src/lemur_torch, relative to it; a package's __init__.py is the package."""
    pkg = os.path.join(root, "src", "lemur_torch")
    modules, packages = set(), set()
    for path in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, pkg).replace(os.sep, "/")
        if rel.endswith("/__init__.py"):
            packages.add(rel[: -len("__init__.py")])
        else:
            modules.add(rel)
    return modules, packages


def test_architecture_layout_lists_every_module():
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        listed, folders = layout_modules(layout_block(f.read()))
    modules, packages = source_modules(ROOT)
    assert len(modules) > 50, len(modules)
    assert sorted(modules - listed) == [], "modules missing from docs/architecture.md's layout"
    assert sorted(packages - folders) == [], "packages missing from docs/architecture.md's layout"
    assert sorted(listed - modules) == [] and sorted(folders - packages) == [], "listed, but not in src/lemur_torch"


def test_layout_parser_nests_folders_and_reads_their_module_lists():
    lines = [
        "conf/                   values",
        "src/lemur_torch/",
        "  train.py              entry point; mentions tests/fakes.py",
        "  data/                 schema.py (typed), check.py,",
        "                        loader.py",
        "    sources/            base.py, file.py",
        "  model.py              the model",
        "tests/                  fakes.py",
    ]
    assert layout_modules(lines) == (
        {
            "train.py",
            "data/schema.py",
            "data/check.py",
            "data/loader.py",
            "data/sources/base.py",
            "data/sources/file.py",
            "model.py",
        },
        {"data/", "data/sources/"},
    )
