"""The model registry, the local cache and verified, resumable, locked downloads.

A released model is named by its URL, and the URL's second-to-last path segment is the SHA256 of
the file: every download is checked against it, and nothing that fails the check is ever returned.

Bytes arrive in ``<file>.partial`` beside the final file, are hashed as they stream in (constant
memory), fsync'ed, verified, and only then renamed to ``<file>``: the final name exists only for
verified bytes. A partial left by an interrupted download is resumed with an HTTP Range request
and verified like any other. One process (and one thread) at a time downloads a given file; the
others wait on ``<file>.lock`` (a :mod:`filelock` lock) and then use the verified file.

A verified file gets a marker beside it, ``<file>.verified`` (its size, ``mtime_ns`` and SHA256),
so later loads hash it again only when its size or modification time changed.
:func:`verify_cache` (``clip models --verify``) re-hashes every cached file regardless.

Network errors follow :mod:`clip.retry`: those that may heal (timeouts, resets, HTTP 429/5xx) are
retried with backoff; those that cannot (HTTP 403/404, an unknown host) fail at once. A download
gives up after ``$CLIP_DOWNLOAD_STALL_LIMIT`` seconds (default 120) without a new byte, however
many retries are left.

Environment variables (arguments win over them):

- ``CLIP_CACHE_DIR``: cache directory (default ``~/.cache/clip``).
- ``CLIP_OFFLINE=1``: never touch the network; a missing file is an error saying how to place it.
- ``CLIP_MODEL_BASE_URL``: a mirror; it replaces everything before ``<sha256>/<file>`` in the URL.
- ``CLIP_QUIET=1``: no progress bar.
- ``CLIP_DOWNLOAD_TIMEOUT``: seconds without a byte before a read is abandoned (default 20).
- ``CLIP_DOWNLOAD_RETRIES``: retries in a row that bring no new bytes before giving up (default 5).
- ``CLIP_DOWNLOAD_STALL_LIMIT``: seconds without a new byte, across attempts and the waits
  between them, before giving up (default 120).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from typing import IO, Optional

import filelock
from tqdm import tqdm

from clip import verified
from clip.atomic import publish
from clip.retry import RetryPolicy, is_transient
from clip.verified import sha256_of

__all__ = [
    "MODELS",
    "CachedFile",
    "DownloadError",
    "available_models",
    "default_cache_dir",
    "download",
    "expected_sha256",
    "sha256_of",
    "verify_cache",
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
_TIMEOUT_S = 20.0  # per read; pip uses 15, huggingface_hub 10
_RETRIES = 5
_STALL_LIMIT_S = 120.0  # without a new byte, whatever retries are left
_BACKOFF_S = 1.0  # first wait between attempts; doubles each time
_BACKOFF_MAX_S = 30.0

# The clock and the wait of the retry loop (a test replaces both to run minutes in no time).
_monotonic = time.monotonic
_sleep = time.sleep


class DownloadError(RuntimeError):
    """A model file that could not be obtained with the right SHA256."""


class _ClosedEarly(ConnectionError):
    """The server closed the connection before the announced end of the body (may heal)."""


def available_models() -> list[str]:
    """Names of the released models, in OpenAI's order."""
    return list(MODELS)


def default_cache_dir() -> str:
    """Where downloads go: ``$CLIP_CACHE_DIR`` if set, else ``~/.cache/clip``."""
    return os.path.expanduser(os.environ.get("CLIP_CACHE_DIR") or "~/.cache/clip")


def expected_sha256(url: str) -> str:
    """The SHA256 a released file must have: its URL's second-to-last path segment."""
    return url.rstrip("/").split("/")[-2]


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
    *,
    stall_limit: Optional[float] = None,
) -> str:
    """Return a verified local copy of ``url`` under ``root``, downloading it if needed.

    A cached file is reused without any request if its SHA256 matches: hashed once, then trusted
    through its ``<file>.verified`` marker while its size and modification time are unchanged. A
    cached file with the wrong hash is reported with a warning and replaced. Downloads resume
    interrupted partial files, retry the errors :func:`clip.retry.is_transient` calls transient
    with exponential backoff, and are serialised across threads and processes by a lock file,
    so concurrent callers download once.

    Args:
        url: a registry URL (SHA256 as its second-to-last path segment). The host part is replaced
            by ``$CLIP_MODEL_BASE_URL`` when that is set.
        root: cache directory (default :func:`default_cache_dir`).
        progress: show a tqdm bar; default: only when stderr is a terminal and ``$CLIP_QUIET`` is
            not set.
        timeout: seconds without receiving a byte before an attempt is abandoned (default
            ``$CLIP_DOWNLOAD_TIMEOUT`` or 20).
        retries: attempts after the first on transient errors, counting only attempts that
            brought no new bytes (default ``$CLIP_DOWNLOAD_RETRIES`` or 5).
        stall_limit: seconds without a new byte, attempts and waits included, after which the
            download gives up even with retries left (default ``$CLIP_DOWNLOAD_STALL_LIMIT`` or
            120).

    Returns:
        Path of the verified file.

    Raises:
        DownloadError: offline (``$CLIP_OFFLINE``) with no verified copy, the network failed on
            every attempt or for too long, the server refused the file (e.g. HTTP 403/404, not
            retried), the host name is unknown (not retried), or the received bytes have the
            wrong SHA256 (no file is left at the final path in that case).
        ValueError: a negative ``retries``, or a ``timeout``/``stall_limit`` that is not positive.
    """
    root = os.path.expanduser(os.fspath(root)) if root else default_cache_dir()
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, os.path.basename(url.rstrip("/")))
    expected = expected_sha256(url)
    if verified.trusted(target, expected):
        return target
    with _locked(target + ".lock"):
        if os.path.isfile(target):  # another process may have just finished it
            if verified.trusted(target, expected):
                return target
            warnings.warn(
                f"{target} does not have SHA256 {expected} (corrupt or from another release); "
                "downloading it again",
                stacklevel=2,
            )
        if _env_flag("CLIP_OFFLINE"):
            raise DownloadError(_not_here(target, _mirrored(url), "$CLIP_OFFLINE is set"))
        options = _options(timeout, retries, stall_limit, _show_progress(progress))
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
    policy: RetryPolicy  # retries (attempts after the first), backoff, per-read timeout
    stall_limit: float  # seconds without a new byte before giving up
    progress: bool


def _options(
    timeout: Optional[float], retries: Optional[int], stall_limit: Optional[float], progress: bool
) -> _Options:
    """The arguments, else the environment, else the defaults; checked."""
    if timeout is None:
        timeout = _env_number("CLIP_DOWNLOAD_TIMEOUT", _TIMEOUT_S)
    if retries is None:
        retries = int(_env_number("CLIP_DOWNLOAD_RETRIES", _RETRIES))
    if stall_limit is None:
        stall_limit = _env_number("CLIP_DOWNLOAD_STALL_LIMIT", _STALL_LIMIT_S)
    if retries < 0 or timeout <= 0 or stall_limit <= 0:
        raise ValueError(
            "need retries >= 0, timeout > 0 and stall_limit > 0, got "
            f"{retries}, {timeout} and {stall_limit}"
        )
    policy = RetryPolicy(retries, _BACKOFF_S, _BACKOFF_MAX_S, timeout)
    return _Options(policy, stall_limit, progress)


# ---- re-verifying the cache ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachedFile:
    """What :func:`verify_cache` found for one released model.

    Attributes:
        name: the model's name, e.g. ``"ViT-B/32"``.
        path: where its file is (or would be) in the cache.
        status: ``"ok"`` (SHA256 matches), ``"corrupt"`` (it does not) or ``"missing"``.
    """

    name: str
    path: str
    status: str


def verify_cache(root: Optional[str] = None) -> list[CachedFile]:
    """Re-hash every released model file in the cache, whatever its marker says.

    A file with the right SHA256 gets a fresh marker; a corrupt one loses its marker, so the next
    :func:`clip.load` of it hashes it, warns, and downloads it again.

    Args:
        root: cache directory (default :func:`default_cache_dir`).

    Returns:
        One entry per released model, in :data:`MODELS` order.
    """
    root = os.path.expanduser(os.fspath(root)) if root else default_cache_dir()
    found = []
    for name, url in MODELS.items():
        path = os.path.join(root, os.path.basename(url.rstrip("/")))
        status = "missing"
        if os.path.isfile(path):
            stamp, expected = verified.stamp(path), expected_sha256(url)
            if verified.sha256_of(path) == expected:
                verified.write_marker(path, stamp, expected)
                status = "ok"
            else:
                verified.drop_marker(path)
                status = "corrupt"
        found.append(CachedFile(name, path, status))
    return found


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
    verified.drop_marker(target)  # a stale marker must not vouch for the new file
    publish(partial, target)
    verified.write_marker(target, verified.stamp(target), expected)


def _fill(url: str, target: str, options: _Options) -> str:
    """Complete ``target``'s partial file (resuming, retrying); return the SHA256 of its bytes."""
    policy = options.policy
    with open(target + ".partial", "ab+") as out, _bar(url, options.progress) as bar:
        failures = 0  # consecutive attempts that brought no new bytes
        last_byte = _monotonic()  # when the file last grew (or the download started)
        while True:
            before = out.seek(0, os.SEEK_END)
            left = options.stall_limit - (_monotonic() - last_byte)
            try:  # (at least 0.1 s: a late wake-up must not turn into a zero timeout)
                _attempt(url, out, bar, max(0.1, min(policy.timeout_s, left)))
                break
            except Exception as e:
                grew = out.seek(0, os.SEEK_END) > before
                if grew:
                    last_byte = _monotonic()
                if not is_transient(e):
                    raise DownloadError(_permanent(url, target, e)) from e
                failures = 1 if grew else failures + 1
                wait = policy.delay(failures, e)
                stalled = _monotonic() - last_byte
                if failures > policy.retries or stalled + wait >= options.stall_limit:
                    why = (
                        f"{url} could not be downloaded ({failures} attempts, {stalled:.0f} s "
                        f"without a new byte; last: {_reason(e)})"
                    )
                    raise DownloadError(_not_here(target, url, why)) from e
                logger.warning(
                    "download of %s interrupted (%s); retrying in %.1fs", url, _reason(e), wait
                )
                _sleep(wait)
        out.flush()
        os.fsync(out.fileno())
        out.seek(0)
        return verified.sha256_of_stream(out)


def _reason(e: BaseException) -> str:
    """What went wrong, without urllib's ``<urlopen error ...>`` wrapping."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    reason = getattr(e, "reason", e)
    return str(reason) or type(reason).__name__


def _permanent(url: str, target: str, e: BaseException) -> str:
    """The message for an error that retrying cannot fix (it was not retried)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"{url} answered {_reason(e)} (not retried: the server refuses this file)"
    why = f"{url} could not be downloaded: {_reason(e)} (not retried: retrying cannot fix it)"
    return _not_here(target, url, why)


def _bar(url: str, progress: bool) -> tqdm:
    return tqdm(
        desc=os.path.basename(url),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        leave=False,
    )


def _attempt(url: str, out: IO[bytes], bar: tqdm, timeout: float) -> None:
    """Append the rest of ``url`` to ``out`` (or rewrite it if the server ignores Range).

    Raises what urllib raises (classified by :func:`clip.retry.is_transient`), or
    :class:`_ClosedEarly` if the body ends before its announced length.
    """
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
        raise
    if end is not None and out.tell() < end:
        raise _ClosedEarly(f"connection closed after {out.tell()} of {end} bytes")


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


# ---- locking --------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold ``path`` exclusively against other threads and processes (released if one dies)."""
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.info("waiting for another process to finish downloading (%s)", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
