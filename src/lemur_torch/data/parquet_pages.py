"""Read a range of rows of one parquet row group, fetching only the data pages that hold them.

pyarrow reads a row group's column chunk whole: it has no page skipping (apache/arrow#29598, #45284). When
several lanes share a row group (fewer row groups than lanes), each would then read the whole chunk, and the
bytes read would grow with the lane count. So for a flat top-level column (the text column of a pretraining
source) this module:
1. reads the file's footer once (one ranged read of the tail) and parses it with a small Thrift compact-protocol
   codec (the parquet footer and page headers are Thrift structs; only generic decoding and encoding are needed);
2. walks the chunk's page headers (a small ranged read each; the page bodies are skipped) to learn each data
   page's offset, size and row count - once per row group and reader;
3. reads the dictionary page (if any) and the contiguous data pages that cover the rows, and hands pyarrow a
   one-row-group, one-column parquet file made of those pages byte for byte plus a footer rewritten for them.
pyarrow decodes that file exactly as it would the original pages. Anything else (nested columns, several
columns as chat sources read, a whole row group) goes through pyarrow's own reader.
"""

from __future__ import annotations

import io
import struct
import threading
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Tuple

from lemur_torch.errors import DataReadError

# Thrift compact protocol type ids
STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    12,
)
DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
HEADER_WINDOW = 64  # bytes per read while walking page headers (a header without statistics is ~30)


class _Short(Exception):
    """The buffer ended inside a struct (read more bytes and parse again)."""


class Reader:
    """Thrift compact decoding of a buffer, or (fetch) of a file read lazily in small windows, where binary
    values are skipped unread (`skip_binary`): a page header's statistics can hold kilobytes of min/max text."""

    def __init__(self, buf: bytes, pos: int = 0, fetch=None, skip_binary: bool = False):
        self.buf, self.pos, self.fetch, self.skip_binary = buf, pos, fetch, skip_binary
        self.base = 0  # file offset of buf[0] (fetch mode)

    def byte(self) -> int:
        i = self.pos - self.base
        if not 0 <= i < len(self.buf):
            if self.fetch is None:
                raise _Short()
            self.buf, self.base = self.fetch(self.pos), self.pos
            i = 0
            if not self.buf:
                raise _Short()
        self.pos += 1
        return self.buf[i]

    def varint(self) -> int:
        out, shift = 0, 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, ttype: int):
        if ttype in (TRUE, FALSE):  # a bool inside a list is a byte; as a field, its value is in the type
            return self.byte() == 1
        if ttype == BYTE:
            return self.byte()
        if ttype in (I16, I32, I64):
            return self.zigzag()
        if ttype == DOUBLE:
            if self.pos + 8 > len(self.buf):
                raise _Short()
            self.pos += 8
            return self.buf[self.pos - 8 : self.pos]
        if ttype == BINARY:
            n = self.varint()
            if self.skip_binary:
                self.pos += n
                return None
            if self.pos + n > len(self.buf):
                raise _Short()
            self.pos += n
            return self.buf[self.pos - n : self.pos]
        if ttype in (LIST, SET):
            head = self.byte()
            n, etype = head >> 4, head & 0x0F
            if n == 15:
                n = self.varint()
            return (etype, [self.value(etype) for _ in range(n)])
        if ttype == MAP:
            n = self.varint()
            kv = self.byte() if n else 0
            return (kv, [(self.value(kv >> 4), self.value(kv & 0x0F)) for _ in range(n)])
        if ttype == STRUCT:
            return self.struct()
        raise ValueError(f"unknown thrift compact type {ttype}")

    def struct(self) -> Dict[int, Tuple[int, object]]:
        """{field id: (type, value)}."""
        out, last = {}, 0
        while True:
            head = self.byte()
            if head == STOP:
                return out
            ttype, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            if ttype in (TRUE, FALSE):
                out[fid] = (ttype, ttype == TRUE)
            else:
                out[fid] = (ttype, self.value(ttype))
            last = fid


class Writer:
    def __init__(self):
        self.out = bytearray()

    def varint(self, n: int) -> None:
        while True:
            if n < 0x80:
                self.out.append(n)
                return
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7

    def zigzag(self, n: int) -> None:
        self.varint((n << 1) ^ (n >> 63))

    def value(self, ttype: int, v) -> None:
        if ttype in (TRUE, FALSE):
            self.out.append(1 if v else 2)
        elif ttype == BYTE:
            self.out.append(v & 0xFF)
        elif ttype in (I16, I32, I64):
            self.zigzag(v)
        elif ttype in (DOUBLE,):
            self.out += v
        elif ttype == BINARY:
            self.varint(len(v))
            self.out += v
        elif ttype in (LIST, SET):
            etype, items = v
            if len(items) < 15:
                self.out.append((len(items) << 4) | etype)
            else:
                self.out.append(0xF0 | etype)
                self.varint(len(items))
            for item in items:
                self.value(etype, item)
        elif ttype == MAP:
            kv, items = v
            self.varint(len(items))
            if items:
                self.out.append(kv)
            for k, val in items:
                self.value(kv >> 4, k)
                self.value(kv & 0x0F, val)
        elif ttype == STRUCT:
            self.struct(v)
        else:
            raise ValueError(f"unknown thrift compact type {ttype}")

    def struct(self, fields: Dict[int, Tuple[int, object]]) -> None:
        last = 0
        for fid in sorted(fields):
            ttype, v = fields[fid]
            head_type = (TRUE if v else FALSE) if ttype in (TRUE, FALSE) else ttype
            if 0 < fid - last <= 15:
                self.out.append(((fid - last) << 4) | head_type)
            else:
                self.out.append(head_type)
                self.zigzag(fid)
            if ttype not in (TRUE, FALSE):
                self.value(ttype, v)
            last = fid
        self.out.append(STOP)


class Page(NamedTuple):
    offset: int
    length: int  # header + body
    type: int
    rows: int
    header: int
    uncompressed: int
    encoding: Optional[int]


DICT_ENCODINGS = (2, 8)  # PLAIN_DICTIONARY, RLE_DICTIONARY: the page holds indices into the dictionary page


def _get(s, fid, default=None):
    return s[fid][1] if fid in s else default


# per reader process: footers and page tables, so that the lanes a reader owns read each file's footer once and
# walk each shared row group's page headers once
_LOCK = threading.Lock()
_FOOTERS: "OrderedDict[tuple, tuple]" = OrderedDict()
_PAGES: "OrderedDict[tuple, tuple]" = OrderedDict()


def _remember(cache: OrderedDict, key, value, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


class ParquetHandle:
    """One parquet file of a reader: its footer (read and parsed once per process), the page tables of the row
    groups its lanes share, and a pyarrow ParquetFile for whole-row-group reads (built on the same footer)."""

    def __init__(self, storage, path: str, size: int):
        self.storage, self.path, self.size = storage, path, size
        with _LOCK:
            cached = _FOOTERS.get((path, size))
        if cached is None:
            tail = storage.read(path, max(0, size - 8), size)  # its length, then exactly the footer
            if len(tail) < 8 or tail[-4:] != b"PAR1":
                raise DataReadError(f"{path}: not a parquet file (no PAR1 footer)")
            n = struct.unpack("<I", tail[-8:-4])[0]
            footer = storage.read(path, size - n - 8, size - 8)
            cached = (footer, Reader(footer).struct())
            with _LOCK:
                _remember(_FOOTERS, (path, size), cached, 64)
        self.footer_bytes, self.meta = cached
        self._pf = None

    def pyarrow_file(self):
        if self._pf is None:
            import pyarrow.parquet as pq  # lazy: a few hundred ms to import, and only parquet sources need it

            meta = pq.read_metadata(
                io.BytesIO(b"PAR1" + self.footer_bytes + struct.pack("<I", len(self.footer_bytes)) + b"PAR1")
            )
            # pre_buffer off: reads happen in the calling thread, where they are counted (storage.io_counters)
            self._pf = pq.ParquetFile(self.storage.open(self.path, self.size), metadata=meta, pre_buffer=False)
        return self._pf

    # -- schema ----------------------------------------------------------------------------------------
    def flat_leaf(self, column: str) -> Optional[Tuple[int, int]]:
        """(leaf index, schema element index) of a top-level, non-repeated leaf column; None otherwise."""
        schema = _get(self.meta, 2)[1]
        stack, leaf = [], 0
        for i, el in enumerate(schema):
            children = _get(el, 5)
            depth = len(stack)
            if i > 0:
                stack[-1] -= 1
            if children:  # a group (the root, or a nested struct/list)
                stack.append(children)
            else:
                name = _get(el, 4, b"").decode()
                if depth == 1 and name == column and _get(el, 3, 0) != 2:  # 2 = REPEATED
                    return leaf, i
                leaf += 1
            while stack and stack[-1] == 0:
                stack.pop()
        return None

    # -- pages -----------------------------------------------------------------------------------------
    def page_table(self, group: int, leaf: int, until_row: int) -> List["Page"]:
        """The pages of a column chunk from its start to the one holding row `until_row - 1`, from their headers
        (the bodies are not read); the walk goes on from where it stopped when a later row is asked for."""
        key = (self.path, self.size, group, leaf)
        with _LOCK:  # the lanes of a reader share its walks; a walk is extended under the lock (no duplicate pages)
            if key not in _PAGES:
                cmeta = self._column_meta(group, leaf)
                start = _get(cmeta, 11) or _get(cmeta, 9)  # the dictionary page comes first, if there is one
                _remember(_PAGES, key, ([], start, start + _get(cmeta, 7), 0), 4096)
            return self._walk(key, until_row)

    def _walk(self, key, until_row: int) -> List["Page"]:
        pages, off, end, rows_seen = _PAGES[key]
        while off < end and rows_seen < until_row:
            header, hlen = self._header(off, end)
            ptype, body = _get(header, 1), _get(header, 3)
            rows, encoding = 0, None
            if ptype == DATA_PAGE:
                rows, encoding = _get(_get(header, 5), 1), _get(_get(header, 5), 2)
            elif ptype == DATA_PAGE_V2:
                rows, encoding = _get(_get(header, 8), 3), _get(_get(header, 8), 4)
            pages.append(Page(off, hlen + body, ptype, rows, hlen, _get(header, 2), encoding))
            off += hlen + body
            rows_seen += rows
        _PAGES[key] = (pages, off, end, rows_seen)
        return pages

    def _header(self, off: int, end: int):
        r = Reader(
            b"",
            off,
            fetch=lambda pos: self.storage.read(self.path, pos, min(end, pos + HEADER_WINDOW)),
            skip_binary=True,
        )
        r.base = off
        try:
            return r.struct(), r.pos - off
        except _Short:
            raise DataReadError(f"{self.path}: truncated parquet page header at byte {off}") from None

    def _column_meta(self, group: int, leaf: int):
        rg = _get(self.meta, 4)[1][group]
        return _get(_get(rg, 1)[1][leaf], 3)

    def read_page_rows(self, group: int, leaf: int, elem: int, r0: int, r1: int):
        """Rows [r0, r1) of the row group's column, from the data pages that hold them (a pyarrow Table)."""
        import pyarrow.parquet as pq  # lazy: a few hundred ms to import, and only parquet sources need it

        pages = self.page_table(group, leaf, r1)
        first, chosen, row = None, [], 0
        for p in pages:
            if p.type in (DATA_PAGE, DATA_PAGE_V2):
                if row < r1 and row + p.rows > r0:
                    first = row if first is None else first
                    chosen.append(p)
                row += p.rows
        # the dictionary only where a chosen page indexes it: a writer falls back to plain pages once its
        # dictionary is full (pyarrow: 1 MB), and lanes reading those pages never need it
        needs_dict = any(p.encoding in DICT_ENCODINGS for p in chosen)
        dictionary = [p for p in pages if p.type == DICTIONARY_PAGE] if needs_dict else []
        body = b"".join(self.storage.read(self.path, p.offset, p.offset + p.length) for p in dictionary)
        dict_len = len(body)
        body += self.storage.read(
            self.path, chosen[0].offset, chosen[-1].offset + chosen[-1].length
        )  # contiguous: one read
        nrows = sum(p.rows for p in chosen)
        cmeta = dict(self._column_meta(group, leaf))
        for fid in (8, 10, 11, 12, 13, 14, 15, 16, 17):  # key-value metadata, index/dict page, statistics, bloom, sizes
            cmeta.pop(fid, None)
        cmeta[5] = (I64, nrows)
        cmeta[6] = (I64, sum(p.header + p.uncompressed for p in dictionary + chosen))
        cmeta[7] = (I64, len(body))
        cmeta[9] = (I64, 4 + dict_len)
        if dictionary:
            cmeta[11] = (I64, 4)
        schema = _get(self.meta, 2)
        root = dict(schema[1][0])
        root[5] = (I32, 1)
        footer = {
            1: self.meta[1],
            2: (LIST, (STRUCT, [root, schema[1][elem]])),
            3: (I64, nrows),
            4: (
                LIST,
                (
                    STRUCT,
                    [{1: (LIST, (STRUCT, [{2: (I64, 4), 3: (STRUCT, cmeta)}])), 2: (I64, len(body)), 3: (I64, nrows)}],
                ),
            ),
        }
        if 6 in self.meta:
            footer[6] = self.meta[6]  # created_by: pyarrow applies writer-specific fixes by it
        w = Writer()
        w.struct(footer)
        blob = b"PAR1" + body + bytes(w.out) + struct.pack("<I", len(w.out)) + b"PAR1"
        table = pq.ParquetFile(io.BytesIO(blob)).read_row_group(0)
        return table.slice(r0 - first, r1 - r0)


def read_rows(
    storage,
    path: str,
    size: int,
    handle: Optional[ParquetHandle],
    group: int,
    r0: int,
    r1: int,
    columns: Optional[List[str]],
):
    """(handle, rows [r0, r1) of row group `group` as a pyarrow Table of `columns` (None: all))."""
    handle = handle or ParquetHandle(storage, path, size)
    rg_rows = _get(_get(handle.meta, 4)[1][group], 3)
    if columns is not None and len(columns) == 1 and (r0 > 0 or r1 < rg_rows):
        where = handle.flat_leaf(columns[0])
        if where is not None:
            return handle, handle.read_page_rows(group, where[0], where[1], r0, r1)
    table = handle.pyarrow_file().read_row_group(group, columns=columns)
    return handle, table.slice(r0, r1 - r0) if (r0 > 0 or r1 < table.num_rows) else table
