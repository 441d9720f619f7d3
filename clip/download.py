"""The model registry, the local cache and verified, resumable, locked downloads.

A released model is named by its URL, and the URL's second-to-last path segment is the SHA256 of
the file: every download is checked against it, and nothing that fails the check is ever returned.

Bytes arrive in ``<file>.partial`` beside the final file, are hashed as they stream in (constant
memory), fsync'ed, verified, and only then renamed to ``<file>``: the final name exists only for
verified bytes. A partial left by an interrupted download is resumed with an HTTP Range request
and verified like any other. One process (and one thread) at a time downloads a given file; the
others wait on ``<file>.lock`` and then use the verified file.

Environment variables (arguments win over them):

- ``CLIP_CACHE_DIR``: cache directory (default ``~/.cache/clip``).
- ``CLIP_OFFLINE=1``: never touch the network; a missing file is an error saying how to place it.
- ``CLIP_MODEL_BASE_URL``: a mirror; it replaces everything before ``<sha256>/<file>`` in the URL.
- ``CLIP_QUIET=1``: no progress bar.
- ``CLIP_DOWNLOAD_TIMEOUT``: seconds without a byte before a read is abandoned (default 60).
- ``CLIP_DOWNLOAD_RETRIES``: retries in a row that bring no new bytes before giving up (default 5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from typing import IO, Optional

from tqdm import tqdm

__all__ = [
    "MODELS",
    "DownloadError",
    "available_models",
    "default_cache_dir",
    "download",
    "expected_sha256",
    "sha256_of",
]

logger = logging.getLogger(__name__)

_BASE = "https://openaipublic.azureedge.net/clip/models"

# name -> (SHA256, file name) of OpenAI's released TorchScript archives, in OpenAI's order.
_RELEASES: dict[str, tuple[str, str]] = {
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": ("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": (
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        "ViT-L-14-336px.pt",
    ),
}

# name -> URL; the SHA256 is the URL's second-to-last path segment.
MODELS: dict[str, str] = {name: f"{_BASE}/{sha}/{file}" for name, (sha, file) in _RELEASES.items()}

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_RETRIES = 5
_BACKOFF_S = 1.0  # first wait between attempts; doubles each time
_BACKOFF_MAX_S = 30.0


class DownloadError(RuntimeError):
    """A model file that could not be obtained with the right SHA256."""


class _Transient(Exception):
    """An attempt that failed in a way worth retrying (the partial file is kept)."""


def available_models() -> list[str]:
    """Names of the released models, in OpenAI's order."""
    return list(MODELS)


def default_cache_dir() -> str:
    """Where downloads go: ``$CLIP_CACHE_DIR`` if set, else ``~/.cache/clip``."""
    return os.path.expanduser(os.environ.get("CLIP_CACHE_DIR") or "~/.cache/clip")


def expected_sha256(url: str) -> str:
    """The SHA256 a released file must have: its URL's second-to-last path segment."""
    return url.rstrip("/").split("/")[-2]


def sha256_of(path: str) -> str:
    """SHA256 hex digest of a file, read in constant memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"${name} must be a number of seconds/attempts, got {raw!r}") from None


def _mirrored(url: str) -> str:
    """``url`` with everything before ``<sha256>/<file>`` replaced by ``$CLIP_MODEL_BASE_URL``."""
    base = os.environ.get("CLIP_MODEL_BASE_URL", "").strip()
    if not base:
        return url
    sha, file = url.rstrip("/").split("/")[-2:]
    return f"{base.rstrip('/')}/{sha}/{file}"


def download(
    url: str,
    root: Optional[str] = None,
    progress: Optional[bool] = None,
    timeout: Optional[float] = None,
    retries: Optional[int] = None,
) -> str:
    """Return a verified local copy of ``url`` under ``root``, downloading it if needed.

    A cached file is reused, without any request, only if its SHA256 matches; a cached file with
    the wrong hash is reported with a warning and replaced. Downloads resume interrupted partial
    files, retry transient failures with exponential backoff, and are serialised across threads
    and processes by a lock file, so concurrent callers download once.

    Args:
        url: a registry URL (SHA256 as its second-to-last path segment). The host part is replaced
            by ``$CLIP_MODEL_BASE_URL`` when that is set.
        root: cache directory (default :func:`default_cache_dir`).
        progress: show a tqdm bar; default: only when stderr is a terminal and ``$CLIP_QUIET`` is
            not set.
        timeout: seconds without receiving a byte before an attempt is abandoned (default
            ``$CLIP_DOWNLOAD_TIMEOUT`` or 60).
        retries: attempts after the first on transient errors, counting only attempts that
            brought no new bytes (default ``$CLIP_DOWNLOAD_RETRIES`` or 5).

    Returns:
        Path of the verified file.

    Raises:
        DownloadError: offline (``$CLIP_OFFLINE``) with no verified copy, the network failed on
            every attempt, the server refused the file, or the received bytes have the wrong
            SHA256 (no file is left at the final path in that case).
    """
    root = os.path.expanduser(os.fspath(root)) if root else default_cache_dir()
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, os.path.basename(url.rstrip("/")))
    expected = expected_sha256(url)
    if os.path.isfile(target) and sha256_of(target) == expected:
        return target
    with _locked(target + ".lock"):
        if os.path.isfile(target):  # another process may have just finished it
            if sha256_of(target) == expected:
                return target
            warnings.warn(
                f"{target} does not have SHA256 {expected} (corrupt or from another release); "
                "downloading it again",
                stacklevel=2,
            )
        if _env_flag("CLIP_OFFLINE"):
            raise DownloadError(_not_here(target, _mirrored(url), "$CLIP_OFFLINE is set"))
        if timeout is None:
            timeout = _env_number("CLIP_DOWNLOAD_TIMEOUT", _TIMEOUT_S)
        if retries is None:
            retries = int(_env_number("CLIP_DOWNLOAD_RETRIES", _RETRIES))
        if retries < 0 or timeout <= 0:
            raise ValueError(f"need retries >= 0 and timeout > 0, got {retries} and {timeout}")
        options = _Options(timeout, retries, _show_progress(progress))
        _fetch_verified(_mirrored(url), target, expected, options)
    return target


def _show_progress(progress: Optional[bool]) -> bool:
    if progress is not None:
        return progress
    return not _env_flag("CLIP_QUIET") and sys.stderr is not None and sys.stderr.isatty()


def _not_here(target: str, url: str, why: str) -> str:
    name, sha = os.path.basename(target), expected_sha256(url)
    return (
        f"{why}, and the model file {name!r} with SHA256 {sha} is not in "
        f"{os.path.dirname(target)!r}. "
        f"To use it offline, download {url} on a machine with network access and copy it to "
        f"{target!r} (its SHA256 is checked, so it must be the exact released file); or set "
        "$CLIP_MODEL_BASE_URL to a mirror that serves <sha256>/<file name>"
    )


@dataclasses.dataclass(frozen=True)
class _Options:
    timeout: float  # seconds without a byte
    retries: int  # attempts after the first
    progress: bool


# ---- one verified download ------------------------------------------------------------------


def _fetch_verified(url: str, target: str, expected: str, options: _Options) -> None:
    """Fill ``target + '.partial'`` from ``url``, verify it, and rename it to ``target``."""
    partial = target + ".partial"
    resumed = os.path.isfile(partial) and os.path.getsize(partial) > 0
    try:
        got = _fill(url, target, options)
        if got != expected and resumed:  # the old partial may hold someone else's bytes
            logger.info("resumed download of %s failed verification; starting over", url)
            os.remove(partial)
            got = _fill(url, target, options)
    finally:  # keep a partial worth resuming, but not an empty one
        if os.path.isfile(partial) and os.path.getsize(partial) == 0:
            os.remove(partial)
    if got != expected:
        os.remove(partial)
        raise DownloadError(
            f"SHA256 of {url} is {got}, expected {expected}; the file was discarded. "
            "Retry; if it persists, the server or a proxy is serving wrong bytes"
        )
    os.replace(partial, target)
    _fsync_dir(os.path.dirname(target))


def _fill(url: str, target: str, options: _Options) -> str:
    """Complete ``target``'s partial file (resuming, retrying); return the SHA256 of its bytes."""
    with open(target + ".partial", "ab+") as out, _bar(url, options.progress) as bar:
        failures = 0  # consecutive attempts that brought no new bytes
        while True:
            before = out.seek(0, os.SEEK_END)
            try:
                _attempt(url, out, bar, options.timeout)
                break
            except _Transient as e:
                failures = 1 if out.tell() > before else failures + 1
                if failures > options.retries:
                    why = f"{url} could not be downloaded ({failures} attempts; last: {e})"
                    raise DownloadError(_not_here(target, url, why)) from e
                wait = min(_BACKOFF_S * 2 ** (failures - 1), _BACKOFF_MAX_S)
                logger.warning("download of %s interrupted (%s); retrying in %.1fs", url, e, wait)
                time.sleep(wait)
        out.flush()
        os.fsync(out.fileno())
        out.seek(0)
        return _hash_stream(out)


def _bar(url: str, progress: bool) -> tqdm:
    return tqdm(
        desc=os.path.basename(url),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        leave=False,
    )


def _hash_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def _attempt(url: str, out: IO[bytes], bar: tqdm, timeout: float) -> None:
    """Append the rest of ``url`` to ``out`` (or rewrite it if the server ignores Range)."""
    offset = out.seek(0, os.SEEK_END)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            offset = _position(response, out, offset)
            total = response.headers.get("Content-Length")
            end = offset + int(total) if total is not None else None
            bar.reset(total=end)
            bar.update(offset)
            _stream(response, out, bar)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # partial is already whole (or longer): verify decides
            return
        if e.code in (408, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:  # URLError, resets, timeouts
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLCertVerificationError):  # retrying will not help
            raise DownloadError(f"{url}: {reason}") from e
        raise _Transient(str(reason) or type(e).__name__) from e
    if end is not None and out.tell() < end:
        raise _Transient(f"connection closed after {out.tell()} of {end} bytes")


def _position(response: http.client.HTTPResponse, out: IO[bytes], offset: int) -> int:
    """Where the body starts in the file: ``offset`` for a 206 answer, 0 if Range was ignored."""
    if offset and response.status == 206:
        start = response.headers.get("Content-Range", "").replace("bytes ", "").split("-")[0]
        if start.strip() == str(offset):
            return offset
    out.seek(0)
    out.truncate()
    return 0


def _stream(response: http.client.HTTPResponse, out: IO[bytes], bar: tqdm) -> None:
    for chunk in iter(lambda: response.read1(_CHUNK), b""):  # what has arrived, up to 1 MiB
        out.write(chunk)
        bar.update(len(chunk))


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- locking --------------------------------------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold ``path`` exclusively against other threads of this process and other processes."""
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(os.path.abspath(path), threading.Lock())
    with thread_lock:
        fd = _lock_file(path)
        try:
            yield
        finally:
            _unlock_file(path, fd)


def _lock_file(path: str) -> int:
    """Open and lock ``path``; the OS releases the lock if this process dies."""
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            if not waited:
                logger.info("waiting for another process to finish downloading (%s)", path)
                waited = True
            _block_lock(fd)
        try:  # the holder before us may have removed the file we locked: lock the new one
            if os.name != "posix" or os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


if os.name == "posix":
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _block_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock_file(path: str, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still locked, so no waiter can lock a file we then delete
        os.close(fd)  # releases the flock

else:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True

    def _block_lock(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(0.1)

    def _unlock_file(path: str, fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        os.close(fd)  # an open file cannot be removed on Windows; the lock file stays
