"""clip.download against a local misbehaving HTTP server: verification, resume, retry, locks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from checkpoints import TINY
from conftest import sample_images, sample_text
from flaky_server import Fault, FlakyServer

import clip
from clip import download as dl
from clip import verified
from clip.download import MODELS, DownloadError, download, expected_sha256

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BACKOFF_S = dl._BACKOFF_S  # before the autouse fixture shortens it
DL_VARS = ("CLIP_DOWNLOAD_TIMEOUT", "CLIP_DOWNLOAD_RETRIES", "CLIP_DOWNLOAD_STALL_LIMIT")
MB = 1 << 20


@pytest.fixture(autouse=True)
def _fast_and_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "_BACKOFF_S", 0.01)
    for var in ("CLIP_OFFLINE", "CLIP_MODEL_BASE_URL", "CLIP_CACHE_DIR", "CLIP_QUIET", *DL_VARS):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as s:
        yield s


def publish(server: FlakyServer, body: bytes, name: str = "M.pt") -> str:
    sha = hashlib.sha256(body).hexdigest()
    server.files[f"/models/{sha}/{name}"] = body
    return f"{server.url}/models/{sha}/{name}"


def listing(root: Path) -> list[str]:
    """The files in ``root`` but the empty ``<file>.lock``, which filelock leaves in place."""
    return sorted(p.name for p in root.iterdir() if p.suffix != ".lock")


def body_of(size: int) -> bytes:
    return os.urandom(size)


# ---- registry and cache location --------------------------------------------------------------


def test_registry_hashes_are_url_segments() -> None:
    assert expected_sha256(MODELS["ViT-B/32"]) == (
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    )
    assert all(url.endswith(".pt") and url.startswith("https://") for url in MODELS.values())


def test_cache_dir_argument_then_env_then_home(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = publish(server, b"w" * 100)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "env"))
    assert download(url, progress=False) == str(tmp_path / "env" / "M.pt")
    assert download(url, str(tmp_path / "arg"), progress=False) == str(tmp_path / "arg" / "M.pt")
    monkeypatch.delenv("CLIP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.default_cache_dir() == str(tmp_path / "home" / ".cache" / "clip")


def test_openai_private_download_signature(server: FlakyServer, tmp_path: Path) -> None:
    from clip.clip import _download

    url = publish(server, b"compat" * 10)
    assert _download(url, str(tmp_path)) == str(tmp_path / "M.pt")


# ---- verification ---------------------------------------------------------------------------


def test_download_then_reuse_without_a_request(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(3 * MB + 5)
    url = publish(server, body)
    path = download(url, str(tmp_path), progress=False)
    assert Path(path).read_bytes() == body and len(server.hits) == 1
    assert download(url, str(tmp_path), progress=False) == path
    assert len(server.hits) == 1  # the verified cache was reused without a request
    assert listing(tmp_path) == ["M.pt", "M.pt.verified"]  # no partial left behind


def test_corrupt_cache_warns_and_is_replaced(server: FlakyServer, tmp_path: Path) -> None:
    body = b"good bytes" * 100
    url = publish(server, body)
    (tmp_path / "M.pt").write_bytes(b"bad")
    with pytest.warns(UserWarning, match="does not have SHA256.*downloading it again"):
        path = download(url, str(tmp_path), progress=False)
    assert Path(path).read_bytes() == body and listing(tmp_path) == ["M.pt", "M.pt.verified"]


def test_wrong_bytes_raise_with_both_hashes_and_leave_nothing(
    server: FlakyServer, tmp_path: Path
) -> None:
    url = publish(server, b"expected")
    server.faults = [Fault(body=b"tampered")]
    with pytest.raises(DownloadError) as info:
        download(url, str(tmp_path), progress=False)
    assert hashlib.sha256(b"tampered").hexdigest() in str(info.value)
    assert hashlib.sha256(b"expected").hexdigest() in str(info.value)
    assert listing(tmp_path) == []


def test_a_lying_short_content_length_is_caught_by_the_hash(
    server: FlakyServer, tmp_path: Path
) -> None:
    url = publish(server, body_of(10_000))
    server.faults = [Fault(content_length=5_000)]
    with pytest.raises(DownloadError, match="SHA256"):
        download(url, str(tmp_path), progress=False)
    assert listing(tmp_path) == []


# ---- the verified marker and clip models --verify ---------------------------------------------


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files that are hashed whole (not the download stream, which is hashed as it arrives)."""
    seen: list[str] = []
    real = verified.sha256_of
    for module in (verified, dl):  # where it lives, and the name clip.download re-exports
        monkeypatch.setattr(module, "sha256_of", lambda path: seen.append(path) or real(path))
    return seen


def test_a_verified_file_is_not_hashed_again(
    server: FlakyServer, tmp_path: Path, hashes: list[str]
) -> None:
    body = body_of(MB)
    url = publish(server, body)
    path = download(url, str(tmp_path), progress=False)
    assert download(url, str(tmp_path), progress=False) == path
    assert download(url, str(tmp_path), progress=False) == path
    assert hashes == [] and len(server.hits) == 1
    marker = json.loads((tmp_path / "M.pt.verified").read_text())
    st = os.stat(path)
    assert marker == {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": hashlib.sha256(body).hexdigest(),
    }


def test_a_touched_file_is_hashed_again_once(
    server: FlakyServer, tmp_path: Path, hashes: list[str]
) -> None:
    url = publish(server, body_of(MB))
    path = download(url, str(tmp_path), progress=False)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert download(url, str(tmp_path), progress=False) == path
    assert download(url, str(tmp_path), progress=False) == path
    assert hashes == [path] and len(server.hits) == 1


def test_a_modified_file_is_hashed_and_refused(
    server: FlakyServer, tmp_path: Path, hashes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = body_of(MB)
    url = publish(server, body)
    path = Path(download(url, str(tmp_path), progress=False))
    path.write_bytes(b"\0" + body[1:])  # same size, new modification time
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    refused = pytest.raises(DownloadError, match="CLIP_OFFLINE")
    with pytest.warns(UserWarning, match="does not have SHA256"), refused:
        download(url, str(tmp_path), progress=False)
    assert hashes and not (tmp_path / "M.pt.verified").exists()
    monkeypatch.delenv("CLIP_OFFLINE")
    with pytest.warns(UserWarning, match="downloading it again"):
        assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body


def flip_a_byte_in_place(path: Path) -> None:
    """Corrupt ``path`` the way a disk does: same size, same modification time."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_finds_a_flipped_byte_the_marker_cannot_see(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = body_of(MB)
    monkeypatch.setitem(MODELS, "tiny", publish(server, body, "tiny.pt"))
    monkeypatch.setitem(MODELS, "other", publish(server, b"other", "other.pt"))
    path = Path(download(MODELS["tiny"], str(tmp_path), progress=False))
    download(MODELS["other"], str(tmp_path), progress=False)
    flip_a_byte_in_place(path)
    assert download(MODELS["tiny"], str(tmp_path), progress=False) == str(path)  # the marker
    found = {entry.name: entry.status for entry in dl.verify_cache(str(tmp_path))}
    assert found["tiny"] == "corrupt" and found["other"] == "ok" and found["RN50"] == "missing"
    assert not (tmp_path / "tiny.pt.verified").exists()  # the next use hashes it again
    with pytest.warns(UserWarning, match="downloading it again"):
        assert Path(download(MODELS["tiny"], str(tmp_path), progress=False)).read_bytes() == body


def test_clip_models_verify_prints_a_table_and_fails_on_corruption(
    server: FlakyServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from clip.cli import main

    monkeypatch.setitem(MODELS, "tiny", publish(server, body_of(MB), "tiny.pt"))
    path = Path(download(MODELS["tiny"], str(tmp_path), progress=False))
    assert main(["models", "--verify", "--cache-dir", str(tmp_path)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["tiny"] == ["ok", str(path)] and rows["ViT-B/32"] == ["-"]
    flip_a_byte_in_place(path)
    assert main(["models", "--verify", "--cache-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["tiny"] == ["corrupt", str(path)] and "1 corrupt file(s)" in out


# ---- resume and retry -----------------------------------------------------------------------


def test_dropped_connection_resumes_with_range(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(3 * MB)
    url = publish(server, body)
    server.faults = [Fault(drop_at=2 * MB)]  # read() hands back whole 1 MiB chunks
    path = download(url, str(tmp_path), progress=False)
    assert Path(path).read_bytes() == body
    assert [h.range for h in server.hits] == [None, f"bytes={2 * MB}-"]
    assert listing(tmp_path) == ["M.pt", "M.pt.verified"]


def test_server_ignoring_range_restarts_from_zero(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(3 * MB)
    url = publish(server, body)
    server.faults = [Fault(drop_at=2 * MB), Fault(ignore_range=True)]
    assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body
    assert server.hits[1].range == f"bytes={2 * MB}-"  # asked, got 200 + the whole file


def test_too_long_content_length_then_complete(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(MB + 3)
    url = publish(server, body)
    server.faults = [Fault(content_length=len(body) + 1000)]  # claims more, then closes
    assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body
    assert server.hits[1].range == f"bytes={len(body)}-"  # answered 416: the file is whole


def test_missing_content_length_with_a_progress_bar(
    server: FlakyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = body_of(MB + 7)
    url = publish(server, body)
    server.faults = [Fault(content_length=None)]
    assert Path(download(url, str(tmp_path), progress=True)).read_bytes() == body
    bar = capsys.readouterr().err
    assert "M.pt" in bar and "B/s" in bar  # bytes and rate, without a total


def test_quiet_by_default_when_not_a_terminal(
    server: FlakyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    download(publish(server, b"x" * 1000), str(tmp_path))
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_unless_clip_quiet(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    url = publish(server, b"x" * 1000)
    for quiet, shown in (("", True), ("1", False)):
        monkeypatch.setenv("CLIP_QUIET", quiet)
        monkeypatch.setattr(sys, "stderr", Terminal())
        download(url, str(tmp_path / quiet), timeout=5)
        assert ("M.pt" in sys.stderr.getvalue()) is shown  # type: ignore[attr-defined]


def test_transient_http_errors_are_retried(server: FlakyServer, tmp_path: Path) -> None:
    body = b"after a while" * 50
    url = publish(server, body)
    server.faults = [Fault(status=503), Fault(status=502)]
    assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body
    assert len(server.hits) == 3


def test_not_found_fails_at_once(server: FlakyServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/models/{'0' * 64}/M.pt", str(tmp_path), progress=False)
    assert len(server.hits) == 1
    assert listing(tmp_path) == []


@pytest.mark.parametrize("status", [403, 404])
def test_refused_files_are_not_retried(server: FlakyServer, tmp_path: Path, status: int) -> None:
    url = publish(server, b"x" * 100)
    server.faults = [Fault(status=status)] * 3
    with pytest.raises(DownloadError, match=f"HTTP {status}.*not retried"):
        download(url, str(tmp_path), progress=False, retries=3)
    assert len(server.hits) == 1


def test_an_unknown_host_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def urlopen(request: urllib.request.Request, timeout: float) -> None:
        calls.append(request.full_url)
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DownloadError, match=r"Name or service not known \(not retried.*copy it to"):
        download(f"https://no.such.host.invalid/{'a' * 64}/M.pt", str(tmp_path), progress=False)
    assert len(calls) == 1


def test_retries_follow_the_packages_retry_policy(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = publish(server, b"x" * 100)
    server.faults = [Fault(status=503)]
    monkeypatch.setattr(dl, "is_transient", lambda e: False)  # clip.retry's verdict decides
    with pytest.raises(DownloadError, match="HTTP 503"):
        download(url, str(tmp_path), progress=False)
    assert len(server.hits) == 1


def test_a_stalled_server_gives_up_at_the_stall_limit(server: FlakyServer, tmp_path: Path) -> None:
    url = publish(server, body_of(2 * MB))
    server.faults = [Fault(stall_at=0)] * 100  # headers, then silence, every time
    with pytest.raises(DownloadError, match=r"without a new byte; last: timed out"):
        download(url, str(tmp_path), progress=False, timeout=0.2, retries=100, stall_limit=1.0)
    # 0.2 s per attempt (plus 10 ms waits) fits at most 5 attempts in 1 s: far from 101.
    assert 2 <= len(server.hits) <= 6


def test_the_stall_limit_from_the_environment(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = publish(server, body_of(2 * MB))
    server.faults = [Fault(stall_at=0)] * 100
    monkeypatch.setenv("CLIP_DOWNLOAD_TIMEOUT", "0.2")
    monkeypatch.setenv("CLIP_DOWNLOAD_RETRIES", "100")
    monkeypatch.setenv("CLIP_DOWNLOAD_STALL_LIMIT", "0.5")
    with pytest.raises(DownloadError, match="without a new byte"):
        download(url, str(tmp_path), progress=False)
    assert 2 <= len(server.hits) <= 4


def test_the_defaults_give_up_within_two_minutes_without_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    timeouts: list[float] = []

    def urlopen(request: urllib.request.Request, timeout: float) -> None:
        timeouts.append(timeout)
        now[0] += timeout  # a server that accepts the connection and never answers
        raise urllib.error.URLError(TimeoutError("timed out"))

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(dl, "_BACKOFF_S", DEFAULT_BACKOFF_S)  # the real waits, on a fake clock
    monkeypatch.setattr(dl, "_monotonic", lambda: now[0])
    monkeypatch.setattr(dl, "_sleep", sleep)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DownloadError, match="without a new byte"):
        download(f"https://stalled.example/{'a' * 64}/M.pt", str(tmp_path), progress=False)
    assert len(timeouts) > 1 and max(timeouts) <= 30  # it retries, with a short read timeout
    assert now[0] <= 120, f"gave up after {now[0]:.0f} s without progress"


def test_stalled_server_times_out_instead_of_hanging(server: FlakyServer, tmp_path: Path) -> None:
    url = publish(server, body_of(2 * MB))
    server.faults = [Fault(stall_at=0), Fault(stall_at=0)]  # headers, then silence
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out") as info:
        download(url, str(tmp_path), progress=False, timeout=0.3, retries=1)
    assert time.monotonic() - start < 20  # a hang guard: the server would stall until shutdown
    assert "2 attempts" in str(info.value) and not (tmp_path / "M.pt").exists()


def test_a_stall_mid_body_resumes_after_the_timeout(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(2 * MB)
    url = publish(server, body)
    server.faults = [Fault(stall_at=MB // 2)]
    assert Path(download(url, str(tmp_path), progress=False, timeout=0.3)).read_bytes() == body
    assert server.hits[1].range == f"bytes={MB // 2}-"  # the bytes before the stall were kept


def test_retries_count_only_attempts_without_progress(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(MB)
    url = publish(server, body)
    server.faults = [Fault(drop_at=100_000)] * 5  # each drop still brings 100 kB more
    assert Path(download(url, str(tmp_path), progress=False, retries=1)).read_bytes() == body
    assert len(server.hits) == 6


def test_timeout_and_retries_from_the_environment(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = publish(server, body_of(2 * MB))
    server.faults = [Fault(stall_at=0)] * 3
    monkeypatch.setenv("CLIP_DOWNLOAD_TIMEOUT", "0.2")
    monkeypatch.setenv("CLIP_DOWNLOAD_RETRIES", "2")
    with pytest.raises(DownloadError, match="3 attempts"):
        download(url, str(tmp_path), progress=False)


def test_a_garbage_partial_is_verified_and_replaced(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(3 * MB)
    url = publish(server, body)
    (tmp_path / "M.pt.partial").write_bytes(os.urandom(MB))  # not a prefix of the file
    assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body
    assert [h.range for h in server.hits] == [f"bytes={MB}-", None]  # resumed, failed, restarted


def test_a_complete_partial_is_promoted_after_verification(
    server: FlakyServer, tmp_path: Path
) -> None:
    body = body_of(MB)
    url = publish(server, body)
    (tmp_path / "M.pt.partial").write_bytes(body)  # killed between the last byte and the rename
    assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body
    assert listing(tmp_path) == ["M.pt", "M.pt.verified"]


# ---- offline and mirror ---------------------------------------------------------------------


def test_offline_mode_says_what_to_place_where(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = b"offline" * 10
    url = publish(server, body)
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        download(url, str(tmp_path), progress=False)
    message = str(info.value)
    for part in ("CLIP_OFFLINE", "'M.pt'", repr(str(tmp_path)), url, "SHA256", "copy it to"):
        assert part in message, part
    assert server.hits == []
    (tmp_path / "M.pt").write_bytes(body)  # placed by hand: used, still verified
    assert download(url, str(tmp_path), progress=False) == str(tmp_path / "M.pt")
    assert server.hits == []


def test_offline_load_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    message = r"'ViT-B-32\.pt' with SHA256 40d3657.* is not in .*ViT-B-32\.pt"
    with pytest.raises(DownloadError, match=message):
        clip.load("ViT-B/32", device="cpu", download_root=str(tmp_path))


def test_a_failed_network_says_how_to_place_the_file(tmp_path: Path) -> None:
    with FlakyServer() as gone:
        url = f"{gone.url}/models/{'a' * 64}/M.pt"
    with pytest.raises(DownloadError, match=r"could not be downloaded.*copy it to"):
        download(url, str(tmp_path), progress=False, retries=1)


def test_mirror_keeps_the_tail_and_the_checksum(
    server: FlakyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = b"mirrored" * 100
    sha = hashlib.sha256(body).hexdigest()
    server.files[f"/mirror/clip/{sha}/M.pt"] = body
    monkeypatch.setenv("CLIP_MODEL_BASE_URL", f"{server.url}/mirror/clip/")
    url = f"https://openaipublic.example.invalid/clip/models/{sha}/M.pt"
    assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body
    assert [h.path for h in server.hits] == [f"/mirror/clip/{sha}/M.pt"]
    server.files[f"/mirror/clip/{'b' * 64}/M.pt"] = body  # a mirror with the wrong file
    with pytest.raises(DownloadError, match="SHA256"):
        download(f"https://x.invalid/{'b' * 64}/M.pt", str(tmp_path / "2"), progress=False)


# ---- load by name, concurrency, killed processes ---------------------------------------------


@pytest.fixture
def tiny_release(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FlakyServer, str]]:
    """The tiny ViT archive registered as model "tiny-vit", served slowly enough to overlap."""
    with FlakyServer(chunk_delay=0.002) as s:
        url = publish(s, tiny_files["tiny-vit"]["archive"].read_bytes(), "tiny-vit.pt")
        monkeypatch.setitem(MODELS, "tiny-vit", url)
        yield s, url


def encoded(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_images(TINY["tiny-vit"]), sample_text())[0]


def test_load_by_name_downloads_verifies_and_builds(
    tiny_release: tuple[FlakyServer, str], tmp_path: Path
) -> None:
    model, preprocess = clip.load("tiny-vit", device="cpu", download_root=str(tmp_path))
    assert model.visual.input_resolution == 32 and preprocess.transforms[1].size == (32, 32)
    assert listing(tmp_path) == ["tiny-vit.pt", "tiny-vit.pt.verified"]
    assert "tiny-vit" in clip.available_models()


def test_eight_threads_download_once(tiny_release: tuple[FlakyServer, str], tmp_path: Path) -> None:
    server, _ = tiny_release
    barrier, results, errors = threading.Barrier(8), [], []

    def load() -> None:
        barrier.wait()
        try:
            results.append(clip.load("tiny-vit", device="cpu", download_root=str(tmp_path))[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 8
    assert len(server.hits) == 1
    first = encoded(results[0])
    assert all(torch.equal(encoded(m), first) for m in results[1:])


def run_python(code: str, **env: str) -> subprocess.Popen:
    code = textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_download_once(tiny_release: tuple[FlakyServer, str], tmp_path: Path) -> None:
    server, url = tiny_release
    torch.save((sample_images(TINY["tiny-vit"]), sample_text()), tmp_path / "inputs.pt")
    code = f"""
        import os, time, torch, clip
        from clip import download
        download.MODELS["tiny-vit"] = {url!r}
        open(os.environ["READY"], "w").close()
        while len(os.listdir({str(tmp_path / "ready")!r})) < 2:  # start both loads together
            time.sleep(0.01)
        model, _ = clip.load("tiny-vit", device="cpu", download_root={str(tmp_path / "cache")!r})
        images, texts = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(images, texts)[0], os.environ["READY"] + ".out")
    """
    (tmp_path / "ready").mkdir()
    procs = [run_python(code, READY=str(tmp_path / "ready" / str(i))) for i in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert len(server.hits) == 1
    assert listing(tmp_path / "cache") == ["tiny-vit.pt", "tiny-vit.pt.verified"]
    in_process, _ = clip.load("tiny-vit", device="cpu", download_root=str(tmp_path / "cache"))
    for i in range(2):
        assert torch.equal(torch.load(tmp_path / "ready" / f"{i}.out"), encoded(in_process))


def test_a_killed_download_leaves_nothing_trusted(server: FlakyServer, tmp_path: Path) -> None:
    body = body_of(3 * MB)
    url = publish(server, body)
    server.faults = [Fault(stall_at=2 * MB)]
    proc = run_python(
        f"""
        from clip import download as dl
        dl.download({url!r}, {str(tmp_path)!r}, progress=False)
        """
    )
    partial = tmp_path / "M.pt.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size >= MB):  # then it hangs at 2 MB
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "M.pt").exists()  # only a verified rename creates the final name
    kept = partial.stat().st_size
    path = download(url, str(tmp_path), progress=False)  # the dead process's lock is free
    assert Path(path).read_bytes() == body
    assert server.hits[-1].range == f"bytes={kept}-"
    assert listing(tmp_path) == ["M.pt", "M.pt.verified"]


# ---- memory ---------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_hashing_and_downloading_500_mb_in_constant_memory(tmp_path: Path) -> None:
    big, h = tmp_path / "big.bin", hashlib.sha256()
    block = os.urandom(MB)
    with open(big, "wb") as f:
        for i in range(500):
            chunk = i.to_bytes(8, "little") + block[8:]
            h.update(chunk)
            f.write(chunk)
    try:
        with FlakyServer() as server:
            server.files[f"/m/{h.hexdigest()}/big.bin"] = big
            proc = run_python(
                f"""
                import json
                from clip import download as dl

                def status(key):
                    for line in open("/proc/self/status"):
                        if line.startswith(key):
                            return int(line.split()[1]) * 1024

                base = status("VmRSS:")
                dl.sha256_of({str(big)!r})
                hashed = status("VmHWM:")
                dl.download("{server.url}/m/{h.hexdigest()}/big.bin", {str(tmp_path / "cache")!r},
                            progress=False)
                print(json.dumps({{"hash": hashed - base, "download": status("VmHWM:") - base}}))
                """
            )
            out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        growth = json.loads(out)
        print(f"peak RSS above baseline: {growth}")  # reported by the download helper's README
        assert growth["hash"] < 64 * MB and growth["download"] < 64 * MB, growth
        assert (tmp_path / "cache" / "big.bin").stat().st_size == 500 * MB
    finally:
        for leftover in (big, tmp_path / "cache" / "big.bin"):
            leftover.unlink(missing_ok=True)
