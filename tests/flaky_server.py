"""A local HTTP file server on 127.0.0.1 that misbehaves on request, for download tests.

Each request takes the next :class:`Fault` from ``server.faults`` (none left: behave well), so a
test scripts a sequence such as "drop the connection halfway, then ignore Range, then serve".
Every request is recorded in ``server.hits`` with its Range header.
"""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

_CHUNK = 64 * 1024


@dataclasses.dataclass
class Fault:
    """How to misbehave on one request; the defaults behave well."""

    drop_at: Optional[int] = None  # close the connection after this many body bytes
    stall_at: Optional[int] = None  # send this many body bytes, then hang until shutdown
    ignore_range: bool = False  # answer 200 with the whole file even when asked for a range
    content_length: Union[int, str, None] = "true"  # a lie, None to omit it, "true" for the truth
    status: int = 0  # answer with this error status instead (e.g. 503)
    body: Optional[bytes] = None  # serve these bytes instead of the file's
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # sent with an error status


@dataclasses.dataclass
class Hit:
    path: str
    range: Optional[str]
    at: float = dataclasses.field(default_factory=time.monotonic)  # when it arrived


class FlakyServer:
    """Serves ``files`` (URL path -> bytes, or a Path streamed from disk) with scripted faults."""

    def __init__(self, chunk_delay: float = 0.0) -> None:
        self.files: dict[str, Union[bytes, Path]] = {}
        self.faults: list[Fault] = []
        self.hits: list[Hit] = []
        self.chunk_delay = chunk_delay  # seconds between chunks, to make downloads overlap
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # type: ignore[attr-defined]
        self.httpd.handle_error = lambda *args: None  # type: ignore[method-assign]  # resets
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FlakyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()  # let stalled handlers finish
        self.httpd.shutdown()
        self.httpd.server_close()

    def gets(self, path: Optional[str] = None) -> list[Hit]:
        return [h for h in self.hits if path is None or h.path == path]

    def _next_fault(self, hit: Hit) -> Fault:
        with self.lock:
            self.hits.append(hit)
            return self.faults.pop(0) if self.faults else Fault()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fault = server._next_fault(Hit(self.path, self.headers.get("Range")))
                source = server.files.get(self.path)
                if fault.status or source is None:
                    self.send_response(fault.status or 404)
                    for name, value in fault.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = source.stat().st_size if isinstance(source, Path) else len(source)
                start = _range_start(self.headers.get("Range"))
                if start and not fault.ignore_range:
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    start = 0
                    self.send_response(200)
                length = size - start if fault.content_length == "true" else fault.content_length
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                self._body(source, start, fault)

            def do_HEAD(self) -> None:  # not recorded, takes no fault
                source = server.files.get(self.path)
                length = 0
                if source is not None:
                    length = source.stat().st_size if isinstance(source, Path) else len(source)
                self.send_response(404 if source is None else 200)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _body(self, source: Union[bytes, Path], start: int, fault: Fault) -> None:
                sent = 0
                for chunk in _chunks(source, start, fault.body):
                    limit = fault.drop_at if fault.drop_at is not None else fault.stall_at
                    if limit is not None and sent + len(chunk) >= limit:
                        self.wfile.write(chunk[: limit - sent])
                        self.wfile.flush()
                        if fault.stall_at is not None:
                            server.released.wait()
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if server.chunk_delay:
                        time.sleep(server.chunk_delay)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _range_start(header: Optional[str]) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-")[0])


def _chunks(
    source: Union[bytes, Path], start: int, replacement: Optional[bytes]
) -> Iterator[bytes]:
    if replacement is not None:
        source = replacement
    if isinstance(source, bytes):
        for i in range(start, len(source), _CHUNK):
            yield source[i : i + _CHUNK]
        return
    with open(source, "rb") as f:
        f.seek(start)
        yield from iter(lambda: f.read(1 << 20), b"")
