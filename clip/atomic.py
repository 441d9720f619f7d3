"""The one atomic writer: every file this package writes appears whole or not at all.

Bytes go to a temporary file beside the target, are flushed and fsync'ed, renamed over the
target (``os.replace``, atomic on POSIX and Windows), and the folder is fsync'ed so the rename
itself survives a power loss. A writer that fails or is killed leaves the old file (or nothing)
and at most a hidden ``.NAME.PID.tmp`` file, never a half-written target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Union

__all__ = ["atomic_write", "fsync_dir", "open_atomic", "publish"]

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(folder: PathLike) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened).

    Args:
        folder: the folder whose entries changed.
    """
    try:
        fd = os.open(os.fspath(folder) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staged: PathLike, path: PathLike) -> None:
    """Give a finished file its final name durably: fsync it, rename it over ``path``, fsync the
    folder. For files another writer produced (a download's ``.partial``, an exporter's output);
    ``staged`` must be on the same file system as ``path``.

    Args:
        staged: the complete file, under a temporary name.
        path: its final name; replaced if it exists.
    """
    with open(staged, "rb") as f:
        os.fsync(f.fileno())
    os.replace(staged, path)
    fsync_dir(os.path.dirname(os.path.abspath(os.fspath(path))))


@contextlib.contextmanager
def open_atomic(path: PathLike) -> Iterator[IO[bytes]]:
    """Open a binary file that replaces ``path`` only when the ``with`` block ends cleanly.

    Args:
        path: the file to create or replace; its folder must exist.

    Yields:
        A writable binary file. On an exception inside the block the temporary file is removed
        and ``path`` is left as it was.
    """
    target = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`open_atomic`).

    Args:
        path: the file to create or replace.
        data: its whole new content.
    """
    with open_atomic(path) as f:
        f.write(data)
