"""Where the data path reads and writes: local paths, http(s) URLs and fsspec URLs, one facade.

Every input the data path opens and every output it writes goes through these functions, so a
path can be local (``photos/a.jpg``, ``file:///…``), a web URL (``https://…``, read-only) or any
fsspec URL (``s3://``, ``gs://``, ``hf://``, ``az://``, ``memory://``, …):

* local paths use :mod:`os` directly (fast), and writes are atomic (:mod:`clip.atomic`);
* http(s) URLs are read with :mod:`urllib` under one :class:`clip.retry.RetryPolicy` (the one
  given, else :func:`default_policy`): transient errors (timeouts, resets, HTTP 408/425/429/5xx)
  are retried with bounded backoff, honouring a bounded ``Retry-After``; permanent ones (404,
  403, …) are tried once. A read that fails for good raises :class:`FetchError`, whose message
  starts with ``transient:`` (retries spent) or ``permanent:``;
* other URLs go through :mod:`fsspec` (imported on first use). A protocol whose driver is not
  installed raises an :class:`ImportError` naming the package to install (``s3fs``, ``gcsfs``,
  ``huggingface_hub``, ``adlfs``). Writes are staged in a local temporary file and uploaded in
  one piece when the ``with`` block ends cleanly, so an object store shows the old object or
  the whole new one, never a partial one; a block that raises uploads nothing.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import io
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO, Any, Callable, Optional, TypeVar

from clip.atomic import open_atomic
from clip.retry import RetryPolicy, is_transient

__all__ = [
    "DEFAULT_POLICY",
    "FetchError",
    "default_policy",
    "exists",
    "failure_reason",
    "glob",
    "is_url",
    "isdir",
    "isfile",
    "join",
    "normalize",
    "open_read",
    "open_write",
    "read_bytes",
    "set_default_policy",
    "size",
    "walk_files",
    "write_bytes",
]

T = TypeVar("T")

DEFAULT_POLICY = RetryPolicy()
_policy = DEFAULT_POLICY

# fsspec protocol -> the pip package that provides its driver
DRIVERS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "hf": "huggingface_hub",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
    "oci": "ocifs",
}
_GLOB_MAGIC = ("*", "?", "[")
_AGENT = "clip-torch (+https://github.com/clip-torch/clip-torch)"


class FetchError(OSError):
    """A network read that failed for good.

    Its message starts with ``transient:`` when the error could heal but the retries ran out
    (a rerun may succeed), or ``permanent:`` when retrying cannot help (HTTP 404, 403, …).

    Attributes:
        url: what was read.
        transient: True when the last error was transient and the retries were spent.
        attempts: requests made, the first included.
    """

    def __init__(self, message: str, url: str = "", transient: bool = False, attempts: int = 1):
        super().__init__(message)
        self.url, self.transient, self.attempts = url, transient, attempts

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries with its fields
        return type(self), (str(self), self.url, self.transient, self.attempts)


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        return _describe(reason) if isinstance(reason, BaseException) else str(reason)
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _fetch_error(url: str, error: BaseException, attempts: int) -> FetchError:
    transient = is_transient(error)
    kind = "transient" if transient else "permanent"
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    return FetchError(f"{kind}: {_describe(error)}{tries}: {url}", url, transient, attempts)


def failure_reason(error: BaseException) -> str:
    """One line saying why an input failed, starting with ``transient:`` or ``permanent:``.

    Args:
        error: what reading or decoding the input raised.

    Returns:
        ``str(error)`` for a :class:`FetchError`; otherwise ``"transient: Type: message"`` when
        :func:`clip.retry.is_transient` says the error may heal, else ``"permanent: …"``.
    """
    if isinstance(error, FetchError):
        return str(error)
    return f"{'transient' if is_transient(error) else 'permanent'}: {_describe(error)}"


def default_policy() -> RetryPolicy:
    """The retry policy of network reads given no policy (see :func:`set_default_policy`)."""
    return _policy


def set_default_policy(policy: Optional[RetryPolicy]) -> RetryPolicy:
    """Make ``policy`` the one network reads in this process use when given none.

    Args:
        policy: the new default; None restores :data:`DEFAULT_POLICY`.

    Returns:
        The previous default, to restore it later.
    """
    global _policy
    previous, _policy = _policy, policy or DEFAULT_POLICY
    return previous


# ---- which kind of path ----------------------------------------------------------------------


def is_url(path: str) -> bool:
    """Whether ``path`` names something other than a local file (``scheme://…``)."""
    return "://" in path and not path.startswith("file://")


def _is_web(path: str) -> bool:
    return path[:8].lower().startswith(("http://", "https://"))


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _remote(path: str) -> tuple[Any, str]:
    """(fsspec file system, path in it) for an fsspec URL; an ImportError names a missing driver."""
    protocol = path.split("://", 1)[0].split("::")[-1].lower()
    try:
        from fsspec.core import url_to_fs
    except ImportError as e:
        raise ImportError(f"reading {protocol}:// paths needs fsspec: pip install fsspec") from e
    try:
        return url_to_fs(path)
    except (ImportError, ValueError) as e:
        package = DRIVERS.get(protocol)
        if package is not None:
            raise ImportError(
                f"{path}: the {protocol}:// file system needs the {package} package: "
                f"pip install {package}"
            ) from e
        if isinstance(e, ValueError) and "protocol" not in str(e).lower():
            raise
        raise ImportError(
            f"{path}: no file system for {protocol}:// ({e}); install the fsspec driver "
            "that provides it"
        ) from e


def _web_only(path: str, what: str) -> ValueError:
    return ValueError(
        f"http(s) URLs cannot be {what} ({path}); list the URLs in a file or a Parquet column"
    )


# ---- names -------------------------------------------------------------------------------


def normalize(path: str) -> str:
    """One spelling per file: absolute and normalised for local paths, ``protocol://`` plus the
    file system's own path for fsspec URLs, unchanged for http(s) URLs."""
    if not is_url(path):
        return os.path.abspath(os.path.normpath(_local(path)))
    if _is_web(path) or "::" in path:
        return path
    fs, inner = _remote(path)
    return str(fs.unstrip_protocol(inner))


def join(folder: str, name: str) -> str:
    """``name`` inside ``folder`` (URLs joined with ``/``)."""
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else os.path.join(folder, name)


# ---- questions -------------------------------------------------------------------------------


def _head(url: str, policy: RetryPolicy) -> Optional[int]:
    """-1 if ``url`` answers but gives no size, its size, or None if it does not exist."""

    def ask() -> int:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": _AGENT})
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            return int(response.headers.get("Content-Length") or -1)

    try:
        return _retrying(url, ask, policy)
    except FetchError as e:
        code = getattr(e.__cause__, "code", None)
        if code in (404, 410):
            return None
        if code in (405, 501):  # HEAD not allowed: the URL answers, so it is there
            return -1
        raise


def exists(path: str) -> bool:
    """Whether ``path`` exists (an http(s) URL: whether a HEAD request finds it)."""
    if not is_url(path):
        return os.path.exists(_local(path))
    if _is_web(path):
        return _head(path, _policy) is not None
    fs, inner = _remote(path)
    return bool(fs.exists(inner))


def isfile(path: str) -> bool:
    """Whether ``path`` is a file (an http(s) URL: whether it exists)."""
    if not is_url(path):
        return os.path.isfile(_local(path))
    if _is_web(path):
        return exists(path)
    fs, inner = _remote(path)
    return bool(fs.isfile(inner))


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder (never, for an http(s) URL)."""
    if not is_url(path):
        return os.path.isdir(_local(path))
    if _is_web(path):
        return False
    fs, inner = _remote(path)
    return bool(fs.isdir(inner))


def size(path: str) -> int:
    """Bytes in the file ``path``.

    Raises:
        FileNotFoundError: when there is no such file.
    """
    if not is_url(path):
        return os.path.getsize(_local(path))
    if _is_web(path):
        found = _head(path, _policy)
        if found is None:
            raise FileNotFoundError(f"no such URL: {path}")
        return found if found >= 0 else len(read_bytes(path))
    fs, inner = _remote(path)
    return int(fs.size(inner))


def glob(pattern: str) -> list[str]:
    """Sorted matches of ``pattern`` (``**`` recurses), spelled as :func:`normalize` does for
    URLs.

    Raises:
        ValueError: for an http(s) pattern with wildcards (web servers cannot be listed).
    """
    if not is_url(pattern):
        return sorted(_glob.glob(_local(pattern), recursive=True))
    if _is_web(pattern):
        if any(c in pattern for c in _GLOB_MAGIC):
            raise _web_only(pattern, "globbed")
        return [pattern] if exists(pattern) else []
    fs, inner = _remote(pattern)
    found = fs.glob(inner, detail=True)  # one listing; no request per match to tell files apart
    return sorted(fs.unstrip_protocol(p) for p, info in found.items() if info["type"] == "file")


def walk_files(folder: str) -> Iterator[str]:
    """Every file below ``folder``, recursively, in a stable sorted order.

    Raises:
        ValueError: for an http(s) URL (web servers cannot be listed).
    """
    if not is_url(folder):
        for root, dirs, files in os.walk(_local(folder)):
            dirs.sort()
            yield from (os.path.join(root, f) for f in sorted(files))
        return
    if _is_web(folder):
        raise _web_only(folder, "listed")
    fs, inner = _remote(folder)
    yield from (fs.unstrip_protocol(p) for p in sorted(fs.find(inner)))


# ---- reading ---------------------------------------------------------------------------------


def _retrying(url: str, attempt: Callable[[], T], policy: RetryPolicy) -> T:
    """``attempt()`` under ``policy``; a failure for good becomes a :class:`FetchError`."""
    attempts = 0

    def counted() -> T:
        nonlocal attempts
        attempts += 1
        return attempt()

    try:
        return policy.call(counted)
    except Exception as e:
        raise _fetch_error(url, e, attempts) from e


def read_bytes(path: str, policy: Optional[RetryPolicy] = None) -> bytes:
    """The whole content of ``path``; network reads are retried as ``policy`` says.

    Args:
        path: a local path, http(s) URL or fsspec URL.
        policy: how to retry network reads (default: :func:`default_policy`).

    Returns:
        The file's bytes.

    Raises:
        FetchError: an http(s) read that failed for good (``.transient`` tells which way).
        OSError: a local or fsspec read that failed (e.g. FileNotFoundError).
        ImportError: the fsspec driver for the URL's protocol is not installed.
    """
    policy = policy or _policy
    if _is_web(path):

        def fetch() -> bytes:
            request = urllib.request.Request(path, headers={"User-Agent": _AGENT})
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                data: bytes = response.read()
                return data

        return _retrying(path, fetch, policy)
    if is_url(path):
        fs, inner = _remote(path)
        return bytes(policy.call(lambda: fs.cat_file(inner)))
    with open(_local(path), "rb") as f:
        return f.read()


def open_read(path: str, policy: Optional[RetryPolicy] = None) -> IO[bytes]:
    """A binary file object for reading ``path``.

    An http(s) URL is read whole first (with retries); an fsspec URL is streamed (its driver
    retries as it is configured to).

    Args:
        path: a local path, http(s) URL or fsspec URL.
        policy: how to retry network reads (default: :func:`default_policy`).

    Returns:
        A readable binary file; close it (or use it in a ``with`` block).
    """
    if _is_web(path):
        return io.BytesIO(read_bytes(path, policy))
    if is_url(path):
        fs, inner = _remote(path)
        opened: IO[bytes] = (policy or _policy).call(lambda: fs.open(inner, "rb"))
        return opened
    return open(_local(path), "rb")


# ---- writing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def open_write(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` whole when the block ends cleanly, or not at all.

    Local paths: a temporary file beside the target, fsync'ed and renamed over it (missing
    folders are created). fsspec URLs: a local temporary file uploaded in one ``put`` after the
    block; object stores publish an object only once its upload completes. Either way a block
    that raises leaves the old file (or no file) in place.

    Args:
        path: a local path or fsspec URL (not http(s): web URLs are read-only).

    Yields:
        A writable binary file.

    Raises:
        ValueError: for an http(s) URL.
    """
    if not is_url(path):
        local = _local(path)
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        with open_atomic(local) as f:
            yield f
        return
    if _is_web(path):
        raise ValueError(f"http(s) URLs are read-only, cannot write {path}; write to a folder")
    fs, inner = _remote(path)
    fd, staged = tempfile.mkstemp(prefix=".clip-upload.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        fs.put_file(staged, inner)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staged)


def write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole (see :func:`open_write`).

    Args:
        path: a local path or fsspec URL.
        data: the file's new content.
    """
    with open_write(path) as f:
        f.write(data)
