"""Conversation sources: the pretraining readers (data/sources/) with a conversation per record, and a built-in set.

`jsonl` and `hf` read exactly as for pretraining (files, lanes' shares, resume positions, bad-line reports with
file:line); only `Source.record` differs: a JSON object / parquet row becomes a `Conversation` (chat.py) in the
configured format, or a `Bad` naming what is wrong. A JSON *array* file (e.g. the ShareGPT dumps) reads as
kind hf with path json and data_files (whole, by every lane that shares it: convert big ones to JSON lines).

`builtin_chat` needs no download; it is made from material that ships with Python:
- `pydoc_topics`: the language reference topics of `pydoc_data.topics` (Python's `help()` pages) as question and
  answer: "Explain <title> in Python." -> the first paragraphs, then "Go on." -> the rest;
- `stdlib_functions`: public functions with docstrings from a fixed list of pure-Python stdlib modules, as
  "write this function" turns: the signature and docstring -> the function's source in a code block.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from functools import lru_cache
from pydoc_data.topics import topics
from typing import List, Tuple

from lemur_torch.data.chat import FORMATS, Conversation, to_conversation
from lemur_torch.data.schema import source_config
from lemur_torch.data.sources.base import Source
from lemur_torch.data.sources.factory import source_identity
from lemur_torch.data.sources.file import FileSource
from lemur_torch.data.sources.indexed import IndexedSource
from lemur_torch.data.sources.listing import resolve_listing
from lemur_torch.data.storage import Storage
from lemur_torch.errors import DataConfigError


class ChatFileSource(FileSource):
    """JSON lines / JSON array / parquet records as conversations (kinds jsonl and hf)."""

    chat_format, fields = "auto", {}

    def record(self, obj):
        return to_conversation(obj, self.chat_format, self.fields)

    def columns(self):
        return None  # every column: the format decides which fields make the conversation

    def fingerprint(self):
        return {**super().fingerprint(), "chat_format": self.chat_format, "fields": dict(self.fields)}


# modules that exist in every supported Python (3.10+) and are plain Python; missing ones are skipped
STDLIB_MODULES = (
    "base64",
    "bisect",
    "calendar",
    "colorsys",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "email/utils",
    "filecmp",
    "fnmatch",
    "fractions",
    "functools",
    "genericpath",
    "gettext",
    "glob",
    "heapq",
    "html/__init__",
    "ipaddress",
    "json/__init__",
    "keyword",
    "locale",
    "mimetypes",
    "ntpath",
    "platform",
    "posixpath",
    "pprint",
    "quopri",
    "random",
    "reprlib",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "tokenize",
    "traceback",
    "urllib/parse",
    "uuid",
)
SYSTEM_PROMPT_CODE = "You are a careful Python programmer. Answer with code only."


def _title_and_body(text: str) -> Tuple[str, str]:
    lines = text.strip().split("\n")
    if len(lines) > 2 and lines[1] and set(lines[1]) <= set("*=-"):
        return lines[0].strip(), "\n".join(lines[2:]).strip()
    return "", text.strip()


@lru_cache(maxsize=1)
def pydoc_conversations() -> Tuple[Tuple[str, List[Tuple[str, str]]], ...]:
    out = []
    for key in sorted(topics):
        title, body = _title_and_body(topics[key])
        paragraphs = [p for p in body.split("\n\n") if p.strip()]
        if not paragraphs:
            continue
        first = "\n\n".join(paragraphs[:2])
        turns = [("user", f"Explain {title or key} in Python."), ("assistant", first)]
        if len(paragraphs) > 2:
            turns += [("user", "Go on."), ("assistant", "\n\n".join(paragraphs[2:]))]
        out.append((f"pydoc_data.topics[{key!r}]", [(r, c.strip()) for r, c in turns]))
    return tuple(out)


@lru_cache(maxsize=1)
def stdlib_function_conversations() -> Tuple[Tuple[str, List[Tuple[str, str]]], ...]:
    std = sysconfig.get_paths()["stdlib"]
    out = []
    for mod in STDLIB_MODULES:
        path = os.path.join(std, mod + ".py")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            src = f.read()
        lines = src.split("\n")
        module = mod.replace("/__init__", "").replace("/", ".")
        for node in ast.parse(src).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            code = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            ask = f"Write the function `{node.name}({ast.unparse(node.args)})` of Python's `{module}` module:\n\n{doc}"
            turns = [("system", SYSTEM_PROMPT_CODE), ("user", ask), ("assistant", f"```python\n{code}\n```")]
            out.append((f"{path}:{node.lineno}", turns))
    return tuple(out)


BUILTIN_SETS = {"pydoc_topics": pydoc_conversations, "stdlib_functions": stdlib_function_conversations}


class BuiltinChatSource(IndexedSource):
    """One of BUILTIN_SETS, one conversation per record, permuted per epoch like the other built-in sources."""

    kind = "builtin_chat"

    def __init__(self, name, domain, weight, seed, shuffle, which: str):
        super().__init__(name, domain, weight, seed, shuffle)
        if which not in BUILTIN_SETS:
            raise DataConfigError(
                f"source {name!r}: kind builtin_chat needs path one of {sorted(BUILTIN_SETS)}, got {which!r}"
            )
        self.which = which
        self.items = BUILTIN_SETS[which]()

    def __len__(self):
        return len(self.items)

    def doc_key(self, i):
        loc = self.items[i][0]  # a stdlib path (machine-specific prefix dropped) or a pydoc topic
        std = sysconfig.get_paths()["stdlib"] + os.sep
        return loc[len(std) :] if loc.startswith(std) else loc

    def doc_weight(self, i):
        return sum(len(c) for _, c in self.items[i][1])

    def item(self, i):
        loc, turns = self.items[i]
        return loc, Conversation(list(turns))


def build_chat_source(name: str, cfg, seed: int, listing=None, storage=None) -> Source:
    """A conversation source from its SourceConfig (data.format=chat); config problems raise DataConfigError."""
    cfg = source_config(cfg)
    kind = cfg.kind
    weight = float(cfg.weight)
    if not weight > 0:
        raise DataConfigError(f"source {name!r}: weight must be positive, got {cfg.weight}")
    fmt = cfg.chat_format
    if fmt not in FORMATS:
        raise DataConfigError(f"source {name!r}: chat_format {fmt!r}; use one of {', '.join(FORMATS)}")
    shuffle = bool(cfg.shuffle)
    if kind == "builtin_chat":
        return BuiltinChatSource(name, cfg.domain, weight, seed, shuffle, cfg.path)
    if kind not in ("jsonl", "hf"):
        raise DataConfigError(
            f"source {name!r}: kind {kind!r} does not hold conversations; with data.format=chat use "
            "builtin_chat, jsonl or hf"
        )
    if cfg.kind == "hf" and not cfg.path:
        raise DataConfigError(f"source {name!r}: kind hf needs path (a dataset id or local folder)")
    storage = storage or Storage()
    if listing is None:
        listing = resolve_listing(name, cfg, None, storage)
    src = ChatFileSource(
        name, cfg.domain, weight, seed, shuffle, kind, listing, cfg.text_field, storage, source_identity(cfg)
    )
    src.chat_format, src.fields = fmt, dict(cfg.fields or {})
    return src
