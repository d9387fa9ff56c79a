"""Where the data's bytes come from: local paths and fsspec URLs (`s3://`, `gs://`, `hf://datasets/...`,
`https://`), read as byte ranges with retries.

Every read of a source's file goes through `Storage.read(path, start, end)`: one ranged request
(`fsspec` `cat_file`), so a reader fetches only the bytes of its own share, never a whole object, and a resume
seeks. Local paths take the same route (fsspec's local filesystem), so what is measured and tested locally is
the code that runs against a bucket.

Errors: a transient one (connection reset or refused, a timeout, HTTP 408/425/429/5xx) is retried with
exponential backoff and jitter (`data.io_retries`, `data.io_backoff_s`) and counted; anything else, or a
transient error that outlasts the retries, is permanent and raised as `DataReadError` naming the file. The
caller adds the source's name (see data/sources/): before training it becomes a one-line DataConfigError, mid-run
the loader stops every rank at the same micro-batch (loader.py).
"""

from __future__ import annotations

import errno
import io
import random
import threading
import time
from typing import Callable, Optional, Tuple

from lemur_torch.errors import DataReadError

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# exception class names (anywhere in the MRO) of transport failures in the clients fsspec uses (aiohttp, httpx,
# requests/urllib3, botocore); matched by name so that none of them has to be installed
TRANSIENT_NAMES = frozenset(
    {
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientConnectorError",
        "ClientOSError",
        "TransportError",
        "TimeoutException",
        "FSTimeoutError",
        "IncompleteRead",
        "ProtocolError",
        "ChunkedEncodingError",
        "ReadTimeout",
        "ConnectTimeout",
        "ReadTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
    }
)
TRANSIENT_ERRNO = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)


def http_status(exc: BaseException) -> Optional[int]:
    for value in (
        getattr(exc, "status", None),
        getattr(exc, "status_code", None),
        getattr(getattr(exc, "response", None), "status_code", None),
    ):
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNO:
        return True
    return any(cls.__name__ in TRANSIENT_NAMES for cls in type(exc).__mro__)


def describe(exc: BaseException) -> str:
    """One line: what went wrong, without the traceback."""
    status = http_status(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, FileNotFoundError):
        return "not found" + (f" (HTTP {status})" if status else "")
    head = f"HTTP {status}" if status else type(exc).__name__
    return f"{head}: {text[:200]}" if text else head


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def fs_and_path(url: str):
    import fsspec.core  # lazy: hundreds of ms to import, and only remote paths need it

    return fsspec.core.url_to_fs(url)


_COUNTS = threading.local()  # per thread: a packer reads its chunk in one thread and takes the difference


def io_counters() -> Tuple[int, int]:
    """(bytes read, reads retried) by the calling thread so far."""
    return getattr(_COUNTS, "bytes", 0), getattr(_COUNTS, "retries", 0)


def _count(nbytes: int = 0, retries: int = 0) -> None:
    _COUNTS.bytes = getattr(_COUNTS, "bytes", 0) + nbytes
    _COUNTS.retries = getattr(_COUNTS, "retries", 0) + retries


class Storage:
    """Ranged reads with retries (`retries` attempts after the first, backoff doubling from `backoff_s`)."""

    def __init__(self, retries: int = 8, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        self.retries, self.backoff_s, self.max_backoff_s = int(retries), float(backoff_s), float(max_backoff_s)

    def call(self, what: str, fn: Callable):
        """fn() with retries on transient errors; a permanent error (or retries exhausted) -> DataReadError."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below; every client raises its own types
                if not is_transient(exc) or attempt == self.retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise DataReadError(f"{what}: {describe(exc)}{tries}") from None
                _count(retries=1)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.max_backoff_s)

    def read(self, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file (fewer at its end)."""
        if end <= start:
            return b""

        def fetch():
            fs, p = fs_and_path(path)
            return fs.cat_file(p, start=start, end=end)

        data = self.call(path, fetch)
        _count(nbytes=len(data))
        return data

    def open(self, path: str, size: int) -> "RangedFile":
        return RangedFile(self, path, size)


class RangedFile(io.RawIOBase):
    """A seekable read-only file over `Storage.read`: for gzip and pyarrow, which want a file object."""

    def __init__(self, storage: Storage, path: str, size: int):
        self.storage, self.path, self.size, self.pos = storage, path, int(size), 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        data = self.storage.read(self.path, self.pos, end)
        self.pos += len(data)
        return data

    def readall(self):
        return self.read(-1)
