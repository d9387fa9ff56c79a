"""The format readers of file sources: one function per file format, picked from `READERS` by the listing's
format, each reading one segment of one file (shares.py) from a position.

A reader yields (location, record, next position's reader offset, its line number or 0) per record:
- uncompressed JSON lines: a byte range; a line belongs to the range it starts in (as Hadoop/Spark input
  splits): a reader starting mid-file skips to the first line start at or after the cut, and reads past its end
  only to finish its last line; the offset is the next line's byte offset;
- parquet: row ranges, by row group; inside a row group shared by lanes only the data pages that hold the
  lane's rows are read (parquet_pages.py); the offset is the next row;
- `.gz` files and JSON array files cannot be split: a segment is the whole file, shared by `stride` lanes that
  read it each and keep every stride-th record; the offset is the decompressed byte offset (a resume re-inflates
  up to there) or the next array index.
"""

from __future__ import annotations

import bisect
import gzip
import io
import json
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Tuple, Union

from lemur_torch.data.parquet_pages import read_rows
from lemur_torch.data.sources.listing import GZ, JSON_ARRAY, JSONL, PARQUET, FileInfo
from lemur_torch.data.sources.records import EMPTY, MALFORMED_JSON, UNDECODABLE, Bad
from lemur_torch.data.sources.shares import Segment
from lemur_torch.data.storage import Storage
from lemur_torch.errors import DataReadError

# bytes per ranged read of a JSON-lines share: big enough that a request's latency is amortised, small enough
# that a share's last read overshoots little; past the share's end, reads are short (only the last line remains)
READ_BLOCK = 1 << 20
TAIL_BLOCK = 1 << 12

Read = Iterator[Tuple[str, object, Optional[int], int]]  # (location, record, next offset, next line or 0)


class RecordSource(Protocol):
    """What a reader needs of the source it reads for (FileSource and its chat variant)."""

    storage: Storage
    read_block: int  # bytes per ranged read of JSON lines

    def record(self, obj: dict) -> object: ...  # a JSON object or parquet row -> its record

    def columns(self) -> Optional[List[str]]: ...  # the parquet columns a record needs (None: all)


def read_jsonl(src: RecordSource, f: FileInfo, seg: Segment, cur: Optional[int], line: int) -> Read:
    """Lines starting in [seg.lo, seg.hi) from offset `cur` (None: the segment's start)."""
    if cur is None:
        cur, line = seg.lo, (1 if seg.lo == 0 else 0)
        align = seg.lo > 0
    else:
        align = False
    for off, raw in lines(src.storage, f.path, f.size, cur, seg.hi, align, src.read_block):
        nxt = off + len(raw)
        loc = f"{f.path}:{line}" if line else f"{f.path} (byte {off})"
        yield loc, parse_line(raw, src.record), nxt, (line + 1 if line else 0)
        line = line + 1 if line else 0


def read_gz(src: RecordSource, f: FileInfo, seg: Segment, cur: Optional[int], line: int) -> Read:
    """Every stride-th line of a whole gzipped file (decompressed offsets: a resume re-inflates up to there)."""
    raw = io.BufferedReader(src.storage.open(f.path, f.size), READ_BLOCK)
    with gzip.GzipFile(fileobj=raw) as gz:
        cur, line = (0, 1) if cur is None else (cur, line)
        if cur:
            try:
                gz.seek(cur)
            except (OSError, EOFError) as exc:
                raise DataReadError(f"{f.path}: {exc}") from None
        while True:
            try:
                data = gz.readline()
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                if isinstance(exc, DataReadError):
                    raise
                raise DataReadError(f"{f.path}: corrupt gzip data near line {line}: {exc}") from None
            if not data:
                return
            cur += len(data)
            if (line - 1) % seg.stride == seg.rank:
                yield f"{f.path}:{line}", parse_line(data, src.record), cur, line + 1
            line += 1


def read_json_array(src: RecordSource, f: FileInfo, seg: Segment, cur: Optional[int], line: int) -> Read:
    """Every stride-th object of a JSON array file, read whole."""
    raw = src.storage.read(f.path, 0, f.size)
    try:
        items = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataReadError(f"{f.path}: not a JSON array: {exc}") from None
    if not isinstance(items, list):
        raise DataReadError(f"{f.path}: not a JSON array of objects")
    for i in range(cur or seg.rank, len(items), seg.stride):
        obj = items[i]
        rec = (
            src.record(obj)
            if isinstance(obj, dict)
            else Bad(MALFORMED_JSON, f"a JSON {type(obj).__name__}, not an object")
        )
        yield f"{f.path}[{i}]", rec, i + seg.stride, 0


def read_parquet(src: RecordSource, f: FileInfo, seg: Segment, cur: Optional[int], line: int) -> Read:
    """Rows [seg.lo, seg.hi) from row `cur` (None: seg.lo), row group by row group."""
    row = seg.lo if cur is None else cur
    starts = [0]
    for rows, _ in f.groups:
        starts.append(starts[-1] + rows)
    pf = None
    g = max(0, bisect.bisect_right(starts, row) - 1)
    while row < seg.hi and g < len(f.groups):
        hi = min(seg.hi, starts[g + 1])
        if row < hi:
            pf, table = read_rows(src.storage, f.path, f.size, pf, g, row - starts[g], hi - starts[g], src.columns())
            for i, obj in enumerate(table.to_pylist()):
                yield f"{f.path}#{row + i}", src.record(obj), row + i + 1, 0
            row = hi
        g += 1


READERS: Dict[str, Callable[[RecordSource, FileInfo, Segment, Optional[int], int], Read]] = {
    JSONL: read_jsonl,
    GZ: read_gz,
    JSON_ARRAY: read_json_array,
    PARQUET: read_parquet,
}


def parse_line(raw: bytes, record: Callable[[dict], object]) -> Union[object, Bad]:
    """One JSON line -> `record` of its object, or the Bad that says what is wrong with the line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Bad(UNDECODABLE, f"undecodable utf-8 bytes at column {exc.start + 1}")
    if not line.strip():
        return Bad(EMPTY, "blank line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return Bad(MALFORMED_JSON, f"malformed JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(obj, dict):
        return Bad(MALFORMED_JSON, f"a JSON {type(obj).__name__}, not an object")
    return record(obj)


def lines(storage: Storage, path: str, size: int, start: int, stop: int, align: bool, block: int = READ_BLOCK):
    """(offset, bytes) of the lines of a file that start in [start, stop), read in ranged blocks. `start` is a
    line start, or (align) any offset: then lines start after the first newline at or after start - 1."""
    pos = start - 1 if align else start  # next byte to read
    pending, pend_off = b"", pos  # an unfinished line and its offset
    dropping = align
    while True:
        if not dropping and pend_off >= stop:
            return
        want = block if pos < stop else TAIL_BLOCK  # past the share's end: just finish its last line
        data = storage.read(path, pos, min(size, pos + min(want, max(stop - pos, TAIL_BLOCK))))
        if not data:
            if pending and not dropping and pend_off < stop:
                yield pend_off, pending
            return
        pos += len(data)
        buf, buf_off = pending + data, pend_off
        i = 0
        if dropping:
            nl = buf.find(b"\n")
            if nl < 0:
                pending, pend_off = b"", pos
                continue
            i, dropping = nl + 1, False
        while True:
            nl = buf.find(b"\n", i)
            if nl < 0:
                break
            if buf_off + i >= stop:
                return
            yield buf_off + i, buf[i : nl + 1]
            i = nl + 1
        pending, pend_off = buf[i:], buf_off + i
