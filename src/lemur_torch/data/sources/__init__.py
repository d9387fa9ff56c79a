"""Document readers: what a document is, where it lives, and which part of it each lane reads.

A source is a sequence of *records* per epoch (a JSON line, a parquet row, a file, an HF example), each with a
location used in bad-input reports (`file:line`, `file (byte N)` where a share starts mid-file, `file#row`). A
record is either a document's text or a `Bad` (malformed JSON, missing text field, empty text, undecodable
bytes).

`Source.records(epoch, lane, lanes, pos)` yields `(location, record, next_pos)` for lane `lane` of `lanes`,
from position `pos` (None: the start of the lane's share of that epoch). A position is a few integers that the
reader seeks to: resuming at 90% of a corpus costs what resuming at 0% costs.

The modules, by concern:
- records.py   records, `Bad` and the skip reasons;
- base.py      the `Source` interface, the per-epoch order and the held-out slice rules ("Held-out slices");
- indexed.py   one-document-per-file sources, lane l reading documents l, l+L, ... of a permutation;
- builtin.py   the built-in corpora (the standard library's code, Python's documentation topics);
- listing.py   a source's files, sizes, formats and parquet row groups, resolved once at start;
- shares.py    the files laid end to end and cut into the lanes' shares and the held-out tail;
- file.py      the file source (JSON lines, .gz, JSON arrays, parquet; local or fsspec URLs);
- readers.py   one reader per file format, picked from a table;
- factory.py   from a source's config to its reader (`build_source`).
"""

from lemur_torch.data.sources.base import Source
from lemur_torch.data.sources.builtin import builtin_code_files
from lemur_torch.data.sources.factory import build_source, holdout_fraction, source_identity
from lemur_torch.data.sources.file import FileSource
from lemur_torch.data.sources.indexed import IndexedSource
from lemur_torch.data.sources.listing import FileInfo, Listing, resolve_listing
from lemur_torch.data.sources.records import REASONS, Bad
from lemur_torch.data.sources.shares import split_shares

__all__ = [
    "REASONS",
    "Bad",
    "FileInfo",
    "FileSource",
    "IndexedSource",
    "Listing",
    "Source",
    "build_source",
    "builtin_code_files",
    "holdout_fraction",
    "resolve_listing",
    "source_identity",
    "split_shares",
]
