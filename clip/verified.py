"""The verified-marker beside a cached file: hash a file once, trust it while it is unchanged.

``<file>.verified`` holds the file's size, ``mtime_ns`` and SHA256 as they were when it was last
hashed (JSON, written with :func:`clip.atomic.atomic_write`). While the size and modification
time still match, the file is trusted without reading it; any change to either makes it be
hashed again. A change that keeps both (a bit flipped on disk) is found only by hashing
unconditionally, as :func:`clip.download.verify_cache` (``clip models --verify``) does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import IO, Optional

from clip.atomic import atomic_write

__all__ = [
    "SUFFIX",
    "drop_marker",
    "recorded_sha256",
    "sha256_of",
    "sha256_of_stream",
    "stamp",
    "trusted",
    "write_marker",
]

logger = logging.getLogger(__name__)

SUFFIX = ".verified"
_CHUNK = 1 << 20


def sha256_of(path: str) -> str:
    """SHA256 hex digest of a file, read in constant memory."""
    with open(path, "rb") as f:
        return sha256_of_stream(f)


def sha256_of_stream(f: IO[bytes]) -> str:
    """SHA256 hex digest of what is left to read in ``f``, read in constant memory."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def stamp(path: str) -> dict[str, int]:
    """What the marker compares: the file's size and modification time in nanoseconds.

    Args:
        path: an existing file.

    Returns:
        ``{"size": ..., "mtime_ns": ...}``.
    """
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def trusted(path: str, expected: str) -> bool:
    """Whether ``path`` exists with SHA256 ``expected``, hashing it only if its marker is stale.

    Args:
        path: the file.
        expected: its SHA256, hex.

    Returns:
        True if the marker vouches for the file as it is now, or hashing finds ``expected`` (the
        marker is then rewritten). False if the file is missing or has another SHA256 (its
        marker is then removed).
    """
    try:
        now = stamp(path)  # taken before hashing: a change while hashing makes the marker stale
    except FileNotFoundError:
        return False
    if _read_marker(path) == {**now, "sha256": expected}:
        return True
    if sha256_of(path) != expected:
        drop_marker(path)
        return False
    write_marker(path, now, expected)
    return True


def write_marker(path: str, when: dict[str, int], sha256: str) -> None:
    """Record that ``path``, with :func:`stamp` ``when``, has SHA256 ``sha256``.

    A cache that cannot be written (read-only) is not an error: the file is then hashed on
    every use, and this is logged.

    Args:
        path: the file the marker is for.
        when: its :func:`stamp` at the time it was hashed.
        sha256: the hash found.
    """
    data = json.dumps({**when, "sha256": sha256}, sort_keys=True).encode()
    try:
        atomic_write(path + SUFFIX, data)
    except OSError as e:
        logger.info("cannot write %s%s (%s); the file will be hashed on every use", path, SUFFIX, e)


def drop_marker(path: str) -> None:
    """Remove ``path``'s marker, if any, so the file is hashed on its next use.

    Args:
        path: the file the marker is for.
    """
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + SUFFIX)


def recorded_sha256(path: str) -> Optional[str]:
    """The SHA256 that ``path``'s marker records, whether or not the file has changed since.

    For callers that have no other source for the expected hash (a hub file cached without its
    content-addressed name, read offline): :func:`trusted` against this value rehashes the file
    if its size or modification time changed, so a file altered after it was verified is caught.

    Args:
        path: the file the marker is for.

    Returns:
        The recorded hex digest, or None if there is no readable marker.
    """
    sha = (_read_marker(path) or {}).get("sha256")
    return sha if isinstance(sha, str) else None


def _read_marker(path: str) -> Optional[dict]:
    try:
        with open(path + SUFFIX, "rb") as f:
            marker = json.loads(f.read(4096))
    except (OSError, ValueError):  # missing, unreadable or not JSON: the file is hashed
        return None
    return marker if isinstance(marker, dict) else None
