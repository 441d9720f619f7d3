"""clip.atomic (the one writer) and clip.retry (the one retry policy)."""

from __future__ import annotations

import os
import socket
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from clip import atomic
from clip.retry import RetryPolicy, is_transient, retry_after


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content that is longer")
    atomic.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.open_atomic(target) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_writes_reach_the_disk_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.atomic_write(tmp_path / "a", b"x")
    staged = tmp_path / "b.partial"
    staged.write_bytes(b"y")
    atomic.publish(staged, tmp_path / "b")
    assert events == ["fsync-file", "rename", "fsync-dir"] * 2
    assert (tmp_path / "b").read_bytes() == b"y" and not staged.exists()


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (urllib.error.HTTPError("u", 503, "busy", {}, None), True),  # type: ignore[arg-type]
        (urllib.error.HTTPError("u", 429, "slow down", {}, None), True),  # type: ignore[arg-type]
        (urllib.error.HTTPError("u", 404, "gone", {}, None), False),  # type: ignore[arg-type]
        (urllib.error.HTTPError("u", 403, "no", {}, None), False),  # type: ignore[arg-type]
        (urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "unknown")), False),
        (urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "try again")), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("reset"), True),
        (FileNotFoundError("x"), False),
    ],
)
def test_is_transient_tells_errors_that_heal(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_retry_after_is_read_and_bounded_by_the_policy() -> None:
    error = urllib.error.HTTPError("u", 429, "x", {"Retry-After": "100"}, None)  # type: ignore[arg-type]
    assert retry_after(error) == 100.0
    assert RetryPolicy(backoff_max_s=7.0).delay(1, error) == 7.0


def test_call_retries_transient_errors_a_bounded_number_of_times() -> None:
    waits: list[float] = []
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        raise TimeoutError("stalled")

    with pytest.raises(TimeoutError):
        RetryPolicy(retries=3, backoff_s=0.5).call(flaky, sleep=waits.append)
    assert len(attempts) == 4 and waits == [0.5, 1.0, 2.0]


def test_call_does_not_retry_a_permanent_error() -> None:
    attempts = []

    def missing() -> str:
        attempts.append(1)
        raise urllib.error.HTTPError("u", 404, "gone", {}, None)  # type: ignore[arg-type]

    with pytest.raises(urllib.error.HTTPError):
        RetryPolicy(retries=5).call(missing, sleep=lambda s: None)
    assert len(attempts) == 1


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s > 0"):
        RetryPolicy(timeout_s=0)
