"""The model registry, the local cache and verified downloads.

A released model is named by its URL, and the URL's second-to-last path segment is the SHA256 of
the file: every download is checked against it, and nothing that fails the check is ever returned.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from typing import Optional

from tqdm import tqdm

__all__ = ["MODELS", "available_models", "default_cache_dir", "download", "expected_sha256"]

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


def available_models() -> list[str]:
    """Names of the released models, in OpenAI's order."""
    return list(MODELS)


def default_cache_dir() -> str:
    """Where downloads go: ``$CLIP_CACHE_DIR`` if set, else ``~/.cache/clip``."""
    return os.environ.get("CLIP_CACHE_DIR") or os.path.expanduser("~/.cache/clip")


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


def download(url: str, root: Optional[str] = None, progress: bool = True) -> str:
    """Return a verified local copy of ``url`` under ``root``, downloading it if needed.

    A cached file is reused only if its SHA256 matches; the download is written to a temporary
    file beside the target, hashed while streaming, and renamed into place only once verified.

    Args:
        url: a registry URL (SHA256 as its second-to-last path segment).
        root: cache directory (default :func:`default_cache_dir`).
        progress: show a tqdm bar.

    Returns:
        Path of the verified file.

    Raises:
        RuntimeError: if the downloaded bytes do not match the expected SHA256.
    """
    root = root or default_cache_dir()
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, os.path.basename(url))
    expected = expected_sha256(url)
    if os.path.isfile(target) and sha256_of(target) == expected:
        return target
    got = _fetch_to(url, target, progress)
    if got != expected:
        raise RuntimeError(
            f"SHA256 of {url} is {got}, expected {expected}; the file was discarded. "
            "Retry; if it persists, the server or a proxy is serving wrong bytes"
        )
    return target


def _fetch_to(url: str, target: str, progress: bool) -> str:
    """Stream ``url`` into ``target`` atomically; return the SHA256 of what was received."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".partial-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as src:
            total = int(src.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() == expected_sha256(url):
            os.replace(tmp, target)
        return h.hexdigest()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
