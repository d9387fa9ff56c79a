"""Test doubles for storage: a byte-counting local filesystem (fsspec protocol `counting://`) and an HTTP server
on 127.0.0.1 that serves files with Range requests and can inject failures (503/429, connection resets, 404)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
from fsspec.implementations.local import LocalFileSystem


class CountingFS(LocalFileSystem):
    """The local filesystem under `counting://`, counting the bytes every ranged read returns."""

    protocol = ("counting",)
    root_marker = "/"
    read_bytes = 0
    reads = 0
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("counting://"):
            path = path[len("counting://") :]
        return super()._strip_protocol(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        with CountingFS._lock:
            CountingFS.read_bytes += len(data)
            CountingFS.reads += 1
        return data

    @classmethod
    def reset(cls):
        cls.read_bytes = cls.reads = 0


fsspec.register_implementation("counting", CountingFS, clobber=True)


class FaultPlan:
    """Which requests fail: the first `transient` GETs cycle through 503, 429 and a connection reset; after
    `fail_after` successful GETs every GET answers `permanent_status`."""

    def __init__(self, transient: int = 0, fail_after=None, permanent_status: int = 403, start_after: int = 0):
        self.transient, self.fail_after, self.permanent_status = transient, fail_after, permanent_status
        self.start_after = start_after  # GETs served before the transient failures begin
        self.gets = self.failed = self.ok = 0
        self.lock = threading.Lock()

    def decide(self):
        with self.lock:
            self.gets += 1
            if self.gets > self.start_after and self.failed < self.transient:
                self.failed += 1
                return ("503", "429", "reset")[(self.failed - 1) % 3]
            if self.fail_after is not None and self.ok >= self.fail_after:
                return "permanent"
            self.ok += 1
            return None


def serve(root: str, plan: FaultPlan = None):
    """Start a server for the files under `root`; returns (server, base URL). server.shutdown() stops it."""
    plan = plan or FaultPlan()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _file(self):
            path = os.path.join(root, self.path.split("?")[0].lstrip("/"))
            return path if os.path.isfile(path) else None

        def do_HEAD(self):
            path = self._file()
            if path is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self):
            path = self._file()
            if path is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            fault = plan.decide()
            if fault == "reset":  # RST instead of a response
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None:
                status = plan.permanent_status if fault == "permanent" else int(fault)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = os.path.getsize(path)
            rng = self.headers.get("Range")
            start, end = 0, size - 1
            if rng:
                a, b = rng.split("=")[1].split("-")
                start, end = int(a), min(size - 1, int(b) if b else size - 1)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(max(0, end - start + 1))
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class FlakyFS(CountingFS):
    """`flaky://`: the local filesystem, except that the read a lane makes to find its first line when its share
    starts at the middle of a file (offset size//2 - 1) fails for good."""

    protocol = ("flaky",)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://") :]
        return LocalFileSystem._strip_protocol(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        if start is not None and start == os.path.getsize(self._strip_protocol(path)) // 2 - 1:
            raise PermissionError(13, "Permission denied", path)
        return super().cat_file(path, start=start, end=end, **kwargs)


fsspec.register_implementation("flaky", FlakyFS, clobber=True)
