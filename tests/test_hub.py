"""clip.hub against a stand-in hub on 127.0.0.1 (tests/hub_server.py): no network."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (the hub extra)")

import huggingface_hub.constants as hf_constants
import huggingface_hub.file_download as hf_file_download
from hub_server import DEFAULT_COMMIT, HubServer, serve_online

from clip import hub, verified
from clip.download import DownloadError

CONFIG = json.dumps({"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {}}).encode()
WEIGHTS = bytes(range(256)) * 40  # stands for open_clip_model.safetensors
BIN = bytes(reversed(range(256))) * 30  # stands for open_clip_pytorch_model.bin
SAFETENSORS, PICKLE = hub.WEIGHTS_NAMES
REPO = "org/model"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    yield from serve_online(monkeypatch)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


def snapshot(cache: Path, repo: str = REPO, commit: str = DEFAULT_COMMIT) -> Path:
    return cache / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def blob(cache: Path, data: bytes, repo: str = REPO) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    return cache / ("models--" + repo.replace("/", "--")) / "blobs" / sha


def corrupt(path: Path) -> None:
    """Change a byte and move the modification time on, as any later write does."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_download_puts_config_and_weights_in_one_snapshot_folder(
    server: HubServer, cache: Path
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS, PICKLE: BIN})
    assert server.url != hf_constants.ENDPOINT  # $HF_ENDPOINT is read at the call
    folder = hub.download_folder(REPO, cache_dir=cache)
    assert folder == str(snapshot(cache))
    assert (Path(folder) / hub.CONFIG_NAME).read_bytes() == CONFIG
    assert (Path(folder) / SAFETENSORS).read_bytes() == WEIGHTS
    assert not (Path(folder) / PICKLE).exists()
    assert server.requests(name=PICKLE) == []
    assert server.gets_of(WEIGHTS) == 1


def test_fetch_names_the_files_and_commit(server: HubServer, cache: Path) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    found = hub.fetch(REPO, cache_dir=str(cache))
    assert found.commit == DEFAULT_COMMIT
    assert found.config == str(snapshot(cache) / hub.CONFIG_NAME)
    assert found.weights == str(snapshot(cache) / SAFETENSORS)


def test_second_call_neither_downloads_nor_hashes_the_weights(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    first = hub.download_folder(REPO, cache_dir=cache)
    hashed: list[str] = []
    real = verified.sha256_of
    monkeypatch.setattr(verified, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert hub.download_folder(REPO, cache_dir=cache) == first
    assert server.gets_of(WEIGHTS) == 1
    assert len(server.requests("GET", hub.CONFIG_NAME)) == 1
    assert hashed == []


def test_second_call_at_a_commit_makes_no_request(server: HubServer, cache: Path) -> None:
    commit = server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    first = hub.download_folder(f"hf-hub:{REPO}@{commit}", cache_dir=cache)
    server.hits.clear()
    assert hub.download_folder(REPO, revision=commit, cache_dir=cache) == first
    assert server.hits == []


@pytest.mark.parametrize("var", ["CLIP_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_uses_the_populated_cache_without_a_request(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    first = hub.fetch(REPO, cache_dir=cache)
    server.hits.clear()
    monkeypatch.setenv(var, "1")
    assert hub.fetch(REPO, cache_dir=cache) == first
    assert server.hits == []


@pytest.mark.parametrize("var", ["CLIP_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_with_an_empty_cache_names_the_repo_file_and_fix(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    monkeypatch.setenv(var, "1")
    pattern = rf"offline \(\${var} is set\).*{hub.CONFIG_NAME}.*'{REPO}'.*unset \${var}"
    with pytest.raises(DownloadError, match=pattern):
        hub.download_folder(REPO, cache_dir=cache)
    assert server.hits == []


def test_offline_without_the_weights_names_them(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    hub.download_folder(REPO, cache_dir=cache, weights=["missing.safetensors", SAFETENSORS])
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    with pytest.raises(DownloadError, match=rf"offline.*{PICKLE}.*not in the hub cache"):
        hub.download_folder(REPO, cache_dir=cache, weights=PICKLE)


@pytest.mark.parametrize("plain_404", [False, True], ids=["EntryNotFound", "bare-404"])
def test_missing_safetensors_falls_back_to_the_pickle(
    server: HubServer, cache: Path, plain_404: bool
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, PICKLE: BIN})
    server.plain_404 = plain_404
    found = hub.fetch(REPO, cache_dir=cache)
    assert found.weights == str(snapshot(cache) / PICKLE)
    assert Path(found.weights).read_bytes() == BIN


def test_fallback_is_remembered_offline_and_at_a_commit(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, PICKLE: BIN})
    first = hub.fetch(REPO, cache_dir=cache)
    server.hits.clear()
    assert hub.fetch(REPO, revision=commit, cache_dir=cache) == first
    assert server.hits == []  # the 404 of the safetensors at this commit is in the cache
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    assert hub.fetch(REPO, cache_dir=cache) == first


def test_server_error_on_the_safetensors_does_not_fall_back(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS, PICKLE: BIN})
    server.status[SAFETENSORS] = 500
    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub's retry backoff
    with pytest.raises(DownloadError, match=rf"could not get {SAFETENSORS}.*500"):
        hub.download_folder(REPO, cache_dir=cache)
    assert server.requests(name=PICKLE) == []


def test_bytes_that_do_not_match_the_hub_sha256_are_refused(server: HubServer, cache: Path) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    server.wrong_bytes.add(hashlib.sha256(WEIGHTS).hexdigest())
    with (
        pytest.warns(UserWarning, match="downloading it again"),
        pytest.raises(DownloadError, match=rf"{SAFETENSORS}.*SHA256.*deleted.*wrong bytes"),
    ):
        hub.download_folder(REPO, cache_dir=cache)
    assert server.gets_of(WEIGHTS) == 2
    assert not blob(cache, WEIGHTS).exists()
    assert not os.path.lexists(snapshot(cache) / SAFETENSORS)


@pytest.mark.parametrize("damage", ["changed byte", "truncated"])
def test_cached_blob_damaged_on_disk_is_downloaded_again(
    server: HubServer, cache: Path, damage: str
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    folder = hub.download_folder(REPO, cache_dir=cache)
    if damage == "truncated":
        os.truncate(blob(cache, WEIGHTS), 100)
    else:
        corrupt(blob(cache, WEIGHTS))
    with pytest.warns(UserWarning, match=rf"{SAFETENSORS}.*SHA256.*deleted; downloading it again"):
        assert hub.download_folder(REPO, cache_dir=cache) == folder
    assert (Path(folder) / SAFETENSORS).read_bytes() == WEIGHTS
    assert server.gets_of(WEIGHTS) == 2


def test_cached_blob_damaged_offline_is_deleted_and_named(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    hub.download_folder(REPO, cache_dir=cache)
    corrupt(blob(cache, WEIGHTS))
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    server.hits.clear()
    with pytest.raises(DownloadError, match=r"SHA256.*deleted.*unset \$CLIP_OFFLINE") as e:
        hub.download_folder(REPO, cache_dir=cache)
    assert str(blob(cache, WEIGHTS)) in str(e.value)
    assert not blob(cache, WEIGHTS).exists()
    assert server.hits == []


def test_cache_without_symlinks_is_verified_too(
    server: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows without developer mode: huggingface_hub moves the blob into the snapshot.
    monkeypatch.setattr(hf_file_download, "are_symlinks_supported", lambda *a, **k: False)
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    weights = Path(hub.fetch(REPO, cache_dir=cache).weights)
    assert not weights.is_symlink()
    assert verified.recorded_sha256(str(weights)) == hashlib.sha256(WEIGHTS).hexdigest()
    corrupt(weights)
    with pytest.warns(UserWarning, match="downloading it again"):
        assert hub.fetch(REPO, cache_dir=cache).weights == str(weights)
    assert weights.read_bytes() == WEIGHTS
    assert server.gets_of(WEIGHTS) == 2


def test_repo_without_config_is_refused_before_downloading_weights(
    server: HubServer, cache: Path
) -> None:
    server.add_repo(REPO, {SAFETENSORS: WEIGHTS})
    with pytest.raises(DownloadError, match=rf"'{REPO}' has no {hub.CONFIG_NAME}.*pass config="):
        hub.download_folder(REPO, cache_dir=cache)
    assert server.gets_of(WEIGHTS) == 0
    found = hub.fetch(REPO, cache_dir=cache, config_required=False)
    assert found.config is None
    assert Path(found.weights).read_bytes() == WEIGHTS


def test_repo_without_any_of_the_weights_names_them(server: HubServer, cache: Path) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, "model.safetensors": WEIGHTS})
    with pytest.raises(DownloadError, match=rf"none of {SAFETENSORS}, {PICKLE}.*weights="):
        hub.download_folder(REPO, cache_dir=cache)


def test_weights_given_as_one_string_is_one_name(server: HubServer, cache: Path) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS, PICKLE: BIN})
    found = hub.fetch(REPO, cache_dir=cache, weights=PICKLE)
    assert Path(found.weights).read_bytes() == BIN
    assert server.requests(name=SAFETENSORS) == []


@pytest.mark.parametrize("weights", [[], ["sub/model.safetensors"], [""], ["..\\x.bin"]])
def test_bad_weights_names_are_refused(weights: list[str]) -> None:
    with pytest.raises(ValueError, match="weights must"):
        hub.download_folder(REPO, weights=weights)


def test_unknown_repo_says_not_found_or_private(server: HubServer, cache: Path) -> None:
    with pytest.raises(DownloadError, match=r"'org/nothing' was not found.*private or gated"):
        hub.download_folder("org/nothing", cache_dir=cache)


def test_unknown_revision_is_named(server: HubServer, cache: Path) -> None:
    server.add_repo(REPO, {hub.CONFIG_NAME: CONFIG, SAFETENSORS: WEIGHTS})
    with pytest.raises(DownloadError, match=r"has no revision 'v9'"):
        hub.download_folder(f"hf-hub:{REPO}@v9", cache_dir=cache)


def test_two_different_revisions_are_refused() -> None:
    with pytest.raises(ValueError, match="two revisions"):
        hub.download_folder(f"hf-hub:{REPO}@v1", revision="v2")


def test_missing_huggingface_hub_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'clip-torch\[hub\]'"):
        hub.download_folder(REPO)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
            ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None),
        ),
        ("hf-hub:apple/DFN5B-CLIP-ViT-H-14-378@main", ("apple/DFN5B-CLIP-ViT-H-14-378", "main")),
        ("hf-hub:org/m_1.0@refs/pr/3", ("org/m_1.0", "refs/pr/3")),
        (f"hf-hub:org/m@{DEFAULT_COMMIT}", ("org/m", DEFAULT_COMMIT)),
    ],
)
def test_hub_names_parse(name: str, expected: tuple) -> None:
    assert hub.parse_hub_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "laion/CLIP-ViT-B-32",  # no prefix
        "HF-HUB:org/repo",
        "hf-hub:",
        "hf-hub:repo",
        "hf-hub:org/",
        "hf-hub:/repo",
        "hf-hub:org/sub/repo",
        "hf-hub:org/re po",
        "hf-hub:org/-repo",
        "hf-hub:org/re--po",
        "hf-hub:org/repo.git",
        "hf-hub:org/repo@",
        "hf-hub:org/repo@ main",
        "hf-hub: org/repo",
    ],
)
def test_bad_hub_names_are_refused_with_the_form(name: str) -> None:
    with pytest.raises(ValueError, match=r"hf-hub:ORG/REPO"):
        hub.parse_hub_name(name)
