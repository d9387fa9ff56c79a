"""The built-in corpora, which need no download: Python's documentation topics (kind builtin_text) and the
standard library's own source files (kind builtin_code, read as one document per file by indexed.py)."""

from __future__ import annotations

import os
import sysconfig
from pydoc_data.topics import topics
from typing import List

from lemur_torch.data.sources.indexed import IndexedSource
from lemur_torch.data.sources.records import text_record

# folders of the standard library that are not its own code (installed packages, test suites)
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class BuiltinTextSource(IndexedSource):
    """Python's documentation topics (`pydoc_data.topics`), one document per topic, sorted by key."""

    kind = "builtin_text"

    def __init__(self, name, domain, weight, seed, shuffle):
        super().__init__(name, domain, weight, seed, shuffle)
        self.keys = sorted(topics)

    def __len__(self):
        return len(self.keys)

    def doc_key(self, i):
        return self.keys[i]

    def doc_weight(self, i):
        return len(topics[self.keys[i]])

    def item(self, i):
        key = self.keys[i]
        return f"pydoc_data.topics[{key!r}]", text_record(topics[key], "text")


def builtin_code_files() -> List[str]:
    """The standard library's own .py files (no site-packages, no test suites), sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in files if f.endswith(".py"))
    # empty files (bare __init__.py) are not documents; leaving them out keeps the smoke log clean
    return sorted(p for p in out if os.path.getsize(p) > 0)
