"""A stand-in for the Hugging Face hub on 127.0.0.1, answering what ``hf_hub_download`` asks.

huggingface_hub (read in its ``file_download`` and ``utils/_http`` modules) resolves a file with
``HEAD {endpoint}/{org}/{repo}/resolve/{revision}/{file}`` (the revision URL-quoted, redirects
followed only on the same origin) and reads from the answer:

- ``X-Repo-Commit``: the commit the revision points to (required; the snapshot folder's name);
- ``X-Linked-Etag``, else ``ETag``: the file's name in ``blobs/`` (an LFS file's SHA256, a git
  file's git blob SHA1);
- ``X-Linked-Size``, else ``Content-Length``: its size, checked after the download.

An LFS file (weights) answers ``302`` with a ``Location`` on another origin, the CDN, which
huggingface_hub then GETs directly; a git file (the config) answers ``200`` and is fetched with
a GET of the same URL. A missing file is ``404`` with ``X-Error-Code: EntryNotFound`` and the
commit, which huggingface_hub records under ``.no_exist/<commit>/``; a missing repo or revision
is ``RepoNotFound`` / ``RevisionNotFound``.

Here the hub and the CDN are two servers on 127.0.0.1 (two origins); every request to either is
recorded in ``server.hits``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from collections.abc import Callable, Iterator
from typing import Optional
from urllib.parse import unquote

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
Answer = Callable[[str], "tuple[int, dict[str, str], bytes]"]  # URL path -> status, headers, body
DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclasses.dataclass(frozen=True)
class Hit:
    server: str  # "hub" or "cdn"
    method: str
    path: str


def git_blob_sha1(data: bytes) -> str:
    """A git file's ETag on the hub: the SHA1 of git's blob object."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Serves repos (``repo_id`` -> file name -> bytes) at one commit on branch ``main``.

    Attributes:
        status: file name -> HTTP status the hub answers for it instead (e.g. 500).
        wrong_bytes: SHA256s whose CDN body has its first byte changed (same length).
        plain_404: answer a missing file with a bare 404, without ``X-Error-Code`` (a mirror).
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.status: dict[str, int] = {}
        self.wrong_bytes: set[str] = set()
        self.plain_404 = False
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}
        self._hub = self._serve(self._hub_answer, "hub")
        self._cdn = self._serve(self._cdn_answer, "cdn")
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], commit: str = DEFAULT_COMMIT) -> str:
        self.repos[repo_id] = dict(files)
        self.commits[repo_id] = commit
        for data in files.values():
            self._blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def requests(
        self, method: Optional[str] = None, name: Optional[str] = None, server: Optional[str] = None
    ) -> list[Hit]:
        """Recorded hits; only those with ``method``, path ending in ``name``, on ``server``."""
        with self._lock:
            hits = list(self.hits)
        return [
            h
            for h in hits
            if (method is None or h.method == method)
            and (name is None or h.path.endswith("/" + name))
            and (server is None or h.server == server)
        ]

    def gets_of(self, data: bytes) -> int:
        """How many times the CDN was asked for these bytes."""
        sha = hashlib.sha256(data).hexdigest()
        return len(self.requests("GET", sha, "cdn"))

    def __enter__(self) -> HubServer:
        for httpd in (self._hub, self._cdn):
            threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for httpd in (self._hub, self._cdn):
            httpd.shutdown()
            httpd.server_close()

    # ---- answers: (status, headers, body) -------------------------------------------------

    def _hub_answer(self, path: str) -> tuple[int, dict[str, str], bytes]:
        parts = path.split("?")[0].split("/")
        if len(parts) != 6 or parts[3] != "resolve":
            return 404, {}, b""
        repo_id, revision, name = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote(parts[5])
        if repo_id not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        commit = self.commits[repo_id]
        if revision not in ("main", commit):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b""
        found = {"X-Repo-Commit": commit}
        if name in self.status:
            return self.status[name], found, b""
        data = self.repos[repo_id].get(name)
        if data is None:
            return 404, found if self.plain_404 else {**found, "X-Error-Code": "EntryNotFound"}, b""
        if not name.endswith(LFS_SUFFIXES):
            return 200, {**found, "ETag": f'"{git_blob_sha1(data)}"'}, data
        sha = hashlib.sha256(data).hexdigest()
        return (
            302,
            {
                **found,
                "ETag": f'"{git_blob_sha1(sha.encode())}"',  # the LFS pointer's, never used
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "Location": f"{self.cdn_url}/lfs/{sha}",
            },
            b"",
        )

    def _cdn_answer(self, path: str) -> tuple[int, dict[str, str], bytes]:
        sha = path.split("?")[0].rsplit("/", 1)[-1]
        data = self._blobs.get(sha)
        if data is None:
            return 404, {}, b""
        if sha in self.wrong_bytes:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return 200, {"ETag": f'"{sha}"'}, data

    def _serve(self, answer: Answer, name: str) -> http.server.ThreadingHTTPServer:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._reply(with_body=False)

            def do_GET(self) -> None:
                self._reply(with_body=True)

            def _reply(self, with_body: bool) -> None:
                with server._lock:
                    server.hits.append(Hit(name, self.command, self.path))
                status, headers, body = answer(self.path)
                start = _range_start(self.headers.get("Range")) if status == 200 else 0
                if 0 < start < len(body):
                    status, body = 206, body[start:]
                    headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/*"
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # type: ignore[attr-defined]
        return httpd


def _range_start(header: Optional[str]) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-")[0] or 0)


def serve_online(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running :class:`HubServer` that huggingface_hub and ``clip.hub`` use, online and quiet,
    for the test; a fixture ``yield from``s it. huggingface_hub must be importable (the tests
    ``importorskip`` it) and is imported already: its constants are patched, not just the
    environment."""
    import huggingface_hub.constants as hf_constants

    with HubServer() as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.setenv("CLIP_QUIET", "1")
        for var in ("CLIP_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        # No user-agent look-ups of huggingface_hub's own (agent detection) at its endpoint.
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield s
