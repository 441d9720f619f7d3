"""Which network errors may heal, and how long to wait before trying again.

One policy for every network read in the package (model downloads, image URLs): errors that can
heal (timeouts, resets, HTTP 408/425/429/5xx, a DNS server that is busy) are retried with
exponential backoff, bounded in count and delay; errors that cannot (HTTP 4xx such as 403/404,
an unknown host name, a bad certificate, a missing local file) are raised at once.
"""

from __future__ import annotations

import email.utils
import http.client
import socket
import ssl
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

__all__ = ["RetryPolicy", "is_transient", "retry_after"]

T = TypeVar("T")

_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
# getaddrinfo errors that say the name does not exist, rather than that DNS is busy
_PERMANENT_GAI = frozenset(
    code
    for code in (getattr(socket, n, None) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_SERVICE"))
    if code is not None
)


def is_transient(error: BaseException) -> bool:
    """Whether retrying the request that raised ``error`` may succeed.

    Args:
        error: what a network read raised.

    Returns:
        An error's own boolean ``transient`` attribute when it has one (such as
        :class:`clip.data.fs.FetchError`); else True for timeouts, connection resets/refusals,
        truncated bodies, HTTP 408, 425, 429 and 500/502/503/504, and temporary DNS failures;
        False for other HTTP statuses (403, 404, ...), unknown host names, certificate errors,
        missing files and everything else.
    """
    flag = getattr(error, "transient", None)
    if isinstance(flag, bool):
        return flag
    if isinstance(error, urllib.error.HTTPError):
        return error.code in _TRANSIENT_HTTP
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        return isinstance(reason, BaseException) and is_transient(reason)
    if isinstance(error, socket.gaierror):
        return error.errno not in _PERMANENT_GAI
    if isinstance(error, ssl.SSLCertVerificationError):
        return False
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(
        error,
        (
            TimeoutError,
            socket.timeout,  # a read timeout on Python 3.9, where it is not yet a TimeoutError
            ConnectionError,
            http.client.HTTPException,
            ssl.SSLError,
            EOFError,
        ),
    )


def retry_after(error: BaseException, now: Optional[float] = None) -> Optional[float]:
    """Seconds a server asked us to wait (``Retry-After`` on a 429/503), or None.

    Args:
        error: what the request raised (its ``headers`` are read).
        now: the current time (seconds since the epoch) for a header that gives a date.

    Returns:
        The header's delay in seconds (at least 0), or None when there is none or it is
        unreadable.
    """
    headers = getattr(error, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP date
        when = email.utils.parsedate_to_datetime(str(value)).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient errors.

    Attributes:
        retries: attempts after the first (0: never retry).
        backoff_s: the first wait; each further wait doubles.
        backoff_max_s: the longest single wait (also caps a server's ``Retry-After``).
        timeout_s: seconds without a byte before a read is abandoned.
    """

    retries: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.backoff_max_s < 0 or self.timeout_s <= 0:
            raise ValueError(
                "RetryPolicy needs retries, backoff_s, backoff_max_s >= 0 and timeout_s > 0, got "
                f"{self.retries}, {self.backoff_s}, {self.backoff_max_s}, {self.timeout_s}"
            )

    def delay(self, failures: int, error: Optional[BaseException] = None) -> float:
        """The wait before the next attempt, after ``failures`` (≥ 1) failures in a row."""
        asked = retry_after(error) if error is not None else None
        wait = asked if asked is not None else self.backoff_s * 2 ** (failures - 1)
        return min(wait, self.backoff_max_s)

    def delays(self) -> Iterator[float]:
        """The waits between attempts, one per retry."""
        return (self.delay(k) for k in range(1, self.retries + 1))

    def call(
        self,
        fn: Callable[[], T],
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """``fn()``, retried on transient errors as this policy says.

        Args:
            fn: the attempt; it raises on failure.
            sleep: how to wait (a test passes a recorder).

        Returns:
            What the first successful attempt returned.

        Raises:
            The last error, once it is not transient or the retries are spent.
        """
        failures = 0
        while True:
            try:
                return fn()
            except Exception as e:
                failures += 1
                if failures > self.retries or not is_transient(e):
                    raise
                sleep(self.delay(failures, e))
