"""Where the data path reads and writes: local paths, http(s) URLs and fsspec URLs, one facade.

Every input the data path opens and every output it writes goes through these functions, so a
path can be local (``photos/a.jpg``), a web URL (``https://…``, read-only) or any fsspec URL
(``s3://``, ``gs://``, ``hf://``, ``memory://``). Local writes are atomic (:mod:`clip.atomic`).
Network reads follow one :class:`clip.retry.RetryPolicy`.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import io
import os
import urllib.request
from collections.abc import Iterator
from typing import IO, Optional

from clip.atomic import open_atomic
from clip.retry import RetryPolicy

__all__ = [
    "DEFAULT_POLICY",
    "exists",
    "glob",
    "is_url",
    "isdir",
    "isfile",
    "join",
    "normalize",
    "open_read",
    "open_write",
    "read_bytes",
    "size",
    "walk_files",
]

DEFAULT_POLICY = RetryPolicy()


def is_url(path: str) -> bool:
    """Whether ``path`` names something other than a local file (``scheme://…``)."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def normalize(path: str) -> str:
    """One spelling per file: absolute and normalised for local paths, unchanged for URLs."""
    return path if is_url(path) else os.path.abspath(os.path.normpath(_local(path)))


def join(folder: str, name: str) -> str:
    """``name`` inside ``folder`` (URLs joined with ``/``)."""
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else os.path.join(folder, name)


def exists(path: str) -> bool:
    """Whether ``path`` exists."""
    return os.path.exists(_local(path))


def isfile(path: str) -> bool:
    """Whether ``path`` is a file."""
    return os.path.isfile(_local(path))


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder."""
    return os.path.isdir(_local(path))


def size(path: str) -> int:
    """Bytes in the file ``path``."""
    return os.path.getsize(_local(path))


def glob(pattern: str) -> list[str]:
    """Sorted matches of ``pattern`` (``**`` recurses)."""
    return sorted(_glob.glob(_local(pattern), recursive=True))


def walk_files(folder: str) -> Iterator[str]:
    """Every file below ``folder``, recursively, in a stable sorted order."""
    for root, dirs, files in os.walk(_local(folder)):
        dirs.sort()
        yield from (os.path.join(root, f) for f in sorted(files))


def read_bytes(path: str, policy: Optional[RetryPolicy] = None) -> bytes:
    """The whole content of ``path``; network reads are retried as ``policy`` says.

    Raises:
        OSError (``urllib.error.HTTPError``, …): once the error is permanent or retries are spent.
    """
    policy = policy or DEFAULT_POLICY
    if path.startswith(("http://", "https://")):

        def fetch() -> bytes:
            with urllib.request.urlopen(path, timeout=policy.timeout_s) as response:
                data: bytes = response.read()
                return data

        return policy.call(fetch)
    with open(_local(path), "rb") as f:
        return f.read()


def open_read(path: str, policy: Optional[RetryPolicy] = None) -> IO[bytes]:
    """A binary file object for reading ``path`` (network content is read whole first)."""
    if is_url(path):
        return io.BytesIO(read_bytes(path, policy))
    return open(_local(path), "rb")


@contextlib.contextmanager
def open_write(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` whole when the block ends cleanly, or not at all."""
    local = _local(path)
    folder = os.path.dirname(os.path.abspath(local))
    os.makedirs(folder, exist_ok=True)
    with open_atomic(local) as f:
        yield f
