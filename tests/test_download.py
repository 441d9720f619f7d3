"""clip.download: registry facts and verified downloads from a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from clip.download import MODELS, download, expected_sha256


class _Files(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Files.files, _Files.hits = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def publish(base: str, body: bytes, served: bytes | None = None) -> str:
    sha = hashlib.sha256(body).hexdigest()
    _Files.files[f"/models/{sha}/M.pt"] = body if served is None else served
    return f"{base}/models/{sha}/M.pt"


def test_registry_hashes_are_url_segments() -> None:
    assert expected_sha256(MODELS["ViT-B/32"]) == (
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    )
    assert all(url.endswith(".pt") and url.startswith("https://") for url in MODELS.values())


def test_download_then_reuse(server: str, tmp_path: Path) -> None:
    body = b"weights" * 1000
    url = publish(server, body)
    path = download(url, str(tmp_path), progress=False)
    assert Path(path).read_bytes() == body and len(_Files.hits) == 1
    assert download(url, str(tmp_path), progress=False) == path
    assert len(_Files.hits) == 1  # the verified cache was reused without a request
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M.pt"]


def test_corrupt_cache_is_replaced(server: str, tmp_path: Path) -> None:
    body = b"good bytes" * 100
    url = publish(server, body)
    (tmp_path / "M.pt").write_bytes(b"bad")
    assert Path(download(url, str(tmp_path), progress=False)).read_bytes() == body


def test_wrong_bytes_raise_and_leave_nothing(server: str, tmp_path: Path) -> None:
    url = publish(server, b"expected", served=b"tampered")
    with pytest.raises(RuntimeError, match=hashlib.sha256(b"tampered").hexdigest()):
        download(url, str(tmp_path), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_by_name_downloads_verifies_and_builds(
    server: str, tmp_path: Path, tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clip

    url = publish(server, tiny_files["tiny-vit"]["archive"].read_bytes())
    monkeypatch.setitem(MODELS, "tiny-vit", url)
    model, preprocess = clip.load("tiny-vit", device="cpu", download_root=str(tmp_path))
    assert model.visual.input_resolution == 32 and preprocess.transforms[1].size == (32, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["M.pt"]
    assert "tiny-vit" in clip.available_models()
