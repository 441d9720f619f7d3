"""clip.data.fs: local, http(s) and fsspec paths behind one set of functions.

http(s) reads run against a local server on 127.0.0.1 that answers with scripted faults and
counts requests; fsspec is exercised with its in-process ``memory://`` file system.
"""

from __future__ import annotations

import email.utils
import importlib
import io
import json
import pickle
import sys
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flaky_server import Fault, FlakyServer
from PIL import Image

from clip import distributed
from clip.cli import main
from clip.data import fs
from clip.retry import RetryPolicy, retry_after

FAST = RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05, timeout_s=2.0)


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as s:
        s.files["/a.jpg"] = b"the bytes of a"
        yield s


# ---- http(s): retries ----------------------------------------------------------------------


def test_http_503_once_then_200_is_read(server: FlakyServer) -> None:
    server.faults = [Fault(status=503)]
    assert fs.read_bytes(f"{server.url}/a.jpg", FAST) == b"the bytes of a"
    assert len(server.gets("/a.jpg")) == 2


def test_http_429_waits_as_retry_after_says(server: FlakyServer) -> None:
    server.faults = [Fault(status=429, headers={"Retry-After": "1"})]
    policy = RetryPolicy(retries=1, backoff_s=0.0, backoff_max_s=5.0, timeout_s=2.0)
    with fs.open_read(f"{server.url}/a.jpg", policy) as f:
        assert f.read() == b"the bytes of a"
    first, second = server.gets("/a.jpg")
    assert second.at - first.at >= 0.9  # without Retry-After the backoff would be 0 s


def test_retry_after_is_capped_by_the_policy() -> None:
    headers = {"Retry-After": "3600"}
    error = urllib.error.HTTPError("http://x", 429, "Too Many", headers, None)  # type: ignore[arg-type]
    assert RetryPolicy(backoff_max_s=2.0).delay(1, error) == 2.0


def test_retry_after_as_an_http_date() -> None:
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    error = urllib.error.HTTPError("http://x", 503, "Busy", {"Retry-After": date}, None)  # type: ignore[arg-type]
    assert retry_after(error, now=1_000_000.0) == 30.0


def test_http_404_is_requested_once_and_permanent(server: FlakyServer) -> None:
    with pytest.raises(fs.FetchError) as caught:
        fs.read_bytes(f"{server.url}/gone.jpg", FAST)
    assert len(server.gets("/gone.jpg")) == 1
    assert not caught.value.transient and caught.value.attempts == 1
    assert str(caught.value) == f"permanent: HTTP 404 Not Found: {server.url}/gone.jpg"


@pytest.mark.parametrize("fault", [Fault(drop_at=0), Fault(stall_at=0)], ids=["reset", "stall"])
def test_reset_and_timeout_are_retried(server: FlakyServer, fault: Fault) -> None:
    server.faults = [fault]
    policy = RetryPolicy(retries=1, backoff_s=0.01, timeout_s=0.5)
    assert fs.read_bytes(f"{server.url}/a.jpg", policy) == b"the bytes of a"
    assert len(server.gets("/a.jpg")) == 2


def test_retries_are_bounded_and_reported_transient(server: FlakyServer) -> None:
    server.faults = [Fault(status=503)] * 10
    policy = RetryPolicy(retries=2, backoff_s=0.01, timeout_s=2.0)
    with pytest.raises(fs.FetchError) as caught:
        fs.read_bytes(f"{server.url}/a.jpg", policy)
    assert len(server.gets("/a.jpg")) == 3
    assert caught.value.transient and caught.value.attempts == 3
    assert str(caught.value).startswith("transient: HTTP 503 Service Unavailable (after 3 ")
    assert fs.failure_reason(caught.value) == str(caught.value)


def test_default_policy_applies_when_none_is_given(server: FlakyServer) -> None:
    server.faults = [Fault(status=503)]
    before = fs.set_default_policy(RetryPolicy(retries=0))
    try:
        with pytest.raises(fs.FetchError):
            fs.read_bytes(f"{server.url}/a.jpg")
    finally:
        fs.set_default_policy(before)
    assert len(server.gets("/a.jpg")) == 1
    assert fs.default_policy() is before


def test_fetch_error_survives_pickling() -> None:
    error = fs.FetchError("transient: HTTP 503 Busy: http://x", "http://x", True, 4)
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.url, again.transient, again.attempts) == (
        str(error),
        "http://x",
        True,
        4,
    )


def test_failure_reason_classifies_other_errors() -> None:
    assert fs.failure_reason(TimeoutError("timed out")) == "transient: TimeoutError: timed out"
    assert fs.failure_reason(ValueError("bad")).startswith("permanent: ValueError")


def test_http_urls_exist_by_head_and_cannot_be_listed_or_written(server: FlakyServer) -> None:
    assert fs.exists(f"{server.url}/a.jpg") and fs.isfile(f"{server.url}/a.jpg")
    assert not fs.exists(f"{server.url}/gone.jpg") and not fs.isdir(f"{server.url}/a.jpg")
    assert fs.size(f"{server.url}/a.jpg") == len(b"the bytes of a")
    assert fs.glob(f"{server.url}/a.jpg") == [f"{server.url}/a.jpg"]
    with pytest.raises(ValueError, match="cannot be globbed"):
        fs.glob(f"{server.url}/*.jpg")
    with pytest.raises(ValueError, match="read-only"), fs.open_write(f"{server.url}/b.jpg"):
        pass
    assert server.gets() == []  # HEAD requests only


# ---- URL lists in a sharded job --------------------------------------------------------------


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _url_table(folder: Path, server: FlakyServer) -> tuple[Path, list[str]]:
    server.files["/flaky.jpg"] = _jpeg(1)
    server.files["/ok.jpg"] = _jpeg(2)
    urls = [f"{server.url}/{name}" for name in ("flaky.jpg", "gone.jpg", "ok.jpg")]
    folder.mkdir()
    pq.write_table(pa.table({"url": urls}), folder / "urls.parquet")
    return folder / "urls.parquet", urls


def test_a_url_that_answers_503_once_is_embedded(
    server: FlakyServer, vit_file: str, tmp_path: Path
) -> None:
    table, urls = _url_table(tmp_path / "in", server)
    server.faults = [Fault(status=503)]  # the first request: flaky.jpg (one image per batch)
    before = fs.set_default_policy(FAST)
    try:
        summary = distributed.embed_dataset(
            [str(table)], str(tmp_path / "out"), model=vit_file, batch_size=1, workers=0
        )
    finally:
        fs.set_default_policy(before)
    assert summary.embedded == 2 and summary.failed == 1
    stats = json.loads((tmp_path / "out" / "urls-00000.stats.json").read_text())
    ((failure),) = stats["failures"]
    assert failure["id"] == urls[1] and "permanent: HTTP 404" in failure["reason"]
    assert len(server.gets("/flaky.jpg")) == 2 and len(server.gets("/gone.jpg")) == 1


def test_cli_retries_and_timeout_build_the_policy(
    server: FlakyServer, vit_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table, urls = _url_table(tmp_path / "in", server)
    argv = ["embed", str(table), "--model", vit_file, "--batch-size", "1", "--workers", "0"]
    server.faults = [Fault(status=503)]
    assert main([*argv, "--out", str(tmp_path / "none"), "--retries", "0", "--timeout", "5"]) == 0
    stats = json.loads((tmp_path / "none" / "urls-00000.stats.json").read_text())
    reasons = {f["id"]: f["reason"] for f in stats["failures"]}
    assert "transient: HTTP 503" in reasons[urls[0]] and len(server.gets("/flaky.jpg")) == 1
    server.faults = [Fault(status=503)]
    assert main([*argv, "--out", str(tmp_path / "one"), "--retries", "1"]) == 0
    assert "2 images embedded, 1 unreadable" in capsys.readouterr().err
    assert fs.default_policy() is fs.DEFAULT_POLICY  # the command restored the default


# ---- fsspec: memory:// ----------------------------------------------------------------------


@pytest.fixture
def mem() -> Iterator[str]:
    """A fresh folder on fsspec's in-memory file system, removed afterwards."""
    import fsspec

    root = f"memory://clip-test-{uuid.uuid4().hex}"
    yield root
    memory = fsspec.filesystem("memory")
    if memory.exists(root):
        memory.rm(root, recursive=True)


def test_memory_read_write_glob_walk_exists_isdir(mem: str) -> None:
    fs.write_bytes(f"{mem}/a/x.jpg", b"x")
    with fs.open_write(f"{mem}/a/b/y.jpg") as f:
        f.write(b"yy")
    fs.write_bytes(f"{mem}/notes.txt", b"n")
    root = fs.normalize(mem)
    assert root == "memory:///" + mem.removeprefix("memory://")
    assert fs.read_bytes(f"{mem}/a/x.jpg") == b"x"
    with fs.open_read(f"{mem}/a/b/y.jpg") as f:
        assert f.read() == b"yy"
    assert fs.size(f"{mem}/a/b/y.jpg") == 2
    assert fs.glob(f"{mem}/**/*.jpg") == [f"{root}/a/b/y.jpg", f"{root}/a/x.jpg"]
    assert list(fs.walk_files(mem)) == [f"{root}/a/b/y.jpg", f"{root}/a/x.jpg", f"{root}/notes.txt"]
    assert fs.exists(f"{mem}/a") and fs.isdir(f"{mem}/a") and not fs.isfile(f"{mem}/a")
    assert fs.isfile(f"{mem}/a/x.jpg") and not fs.isdir(f"{mem}/a/x.jpg")
    assert not fs.exists(f"{mem}/nothing") and fs.glob(f"{mem}/*.png") == []
    assert fs.normalize(f"{root}/a/x.jpg") == fs.normalize(f"{mem}/a/x.jpg")
    assert fs.join(mem, "a") == f"{mem}/a"
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(f"{mem}/nothing")


def test_memory_write_that_raises_keeps_the_old_object(mem: str) -> None:
    fs.write_bytes(f"{mem}/out.parquet", b"old")
    with pytest.raises(RuntimeError), fs.open_write(f"{mem}/out.parquet") as f:
        f.write(b"half of the new")
        assert fs.read_bytes(f"{mem}/out.parquet") == b"old"  # nothing visible while writing
        raise RuntimeError("killed mid-write")
    assert fs.read_bytes(f"{mem}/out.parquet") == b"old"
    with pytest.raises(RuntimeError), fs.open_write(f"{mem}/new.parquet") as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert not fs.exists(f"{mem}/new.parquet")


@pytest.mark.parametrize(
    "url, package",
    [
        ("s3://bucket/x.parquet", "s3fs"),
        ("gs://bucket/x.parquet", "gcsfs"),
        ("hf://datasets/me/data/x.parquet", "huggingface_hub"),
        ("az://container/x.parquet", "adlfs"),
    ],
)
def test_missing_driver_names_the_package(
    url: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    monkeypatch.delitem(registry._registry, url.split(":")[0], raising=False)  # nor imported
    for call in (fs.read_bytes, fs.exists, fs.normalize):
        with pytest.raises(
            ImportError, match=f"needs the {package} package: pip install {package}"
        ):
            call(url)


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ImportError, match="no file system for nosuch://"):
        fs.read_bytes("nosuch://x/y.jpg")
