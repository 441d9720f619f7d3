"""``clip.load`` of registry names and ``hf-hub:`` repositories, end to end, against the stand-in
hub on 127.0.0.1: what the registry knows wins over what a hub config leaves out."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")
from hub_server import HubServer, serve_online

import clip
import clip.registry
from clip.config import CLIPConfig
from clip.layers import QuickGELU
from clip.model import CLIP
from clip.preprocess import PreprocessConfig

REPO = "laion/tiny-clip"
TINY = CLIPConfig(16, 32, 2, 64, 16, 77, 49408, 64, 1, 2)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    yield from serve_online(monkeypatch)


def publish(server: HubServer, tmp_path: Path, config: CLIPConfig, edit=None) -> CLIP:
    """Serve a random model of ``config`` as REPO; ``edit`` may change its config document."""
    torch.manual_seed(0)
    model = CLIP.from_config(config).eval()
    folder = tmp_path / "published"
    clip.save(model, folder)
    doc = json.loads((folder / "open_clip_config.json").read_text())
    doc.pop("clip_torch")  # as open_clip writes it: no save id
    if edit is not None:
        edit(doc)
    files = {
        "open_clip_config.json": json.dumps(doc).encode(),
        "open_clip_model.safetensors": (folder / "open_clip_model.safetensors").read_bytes(),
    }
    server.add_repo(REPO, files)
    return model


@pytest.fixture
def tiny_entry(monkeypatch: pytest.MonkeyPatch) -> clip.registry.PretrainedWeights:
    """ViT-B-32/laion400m_e32 (QuickGELU), shrunk to TINY and served from REPO."""
    real = clip.registry.get("ViT-B-32/laion400m_e32")
    entry = dataclasses.replace(
        real,
        hub_repo=REPO,
        config=TINY.replace(preprocess=PreprocessConfig(mean=(0.5,) * 3, std=(0.5,) * 3)),
    )
    real_get = clip.registry.get
    monkeypatch.setattr(
        clip.registry, "get", lambda name: entry if name == real.name else real_get(name)
    )
    return entry


def test_registry_activation_wins_over_a_hub_config_without_quick_gelu(
    server: HubServer, tmp_path: Path, tiny_entry: clip.registry.PretrainedWeights
) -> None:
    assert tiny_entry.config.activation == "quick_gelu"
    published = publish(
        server, tmp_path, tiny_entry.config, edit=lambda d: d["model_cfg"].pop("quick_gelu")
    )
    model, preprocess = clip.load(tiny_entry.name, device="cpu", download_root=tmp_path / "c")
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert model.config == tiny_entry.config
    assert preprocess.transforms[-1].mean == (0.5, 0.5, 0.5)
    text = clip.tokenize(["a photo of a cat"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(text), published.encode_text(text))


def test_hf_hub_name_loads_the_repo_config(server: HubServer, tmp_path: Path) -> None:
    config = TINY.replace(activation="gelu", vision_head_width=32)
    published = publish(server, tmp_path, config)
    model, _ = clip.load("hf-hub:" + REPO, device="cpu", download_root=tmp_path / "c")
    assert model.config == config
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), published.encode_image(image))


def test_hf_hub_repo_without_config_takes_config_argument(
    server: HubServer, tmp_path: Path
) -> None:
    config = TINY.replace(activation="gelu")
    publish(server, tmp_path, config)
    server.add_repo(
        "org/weights-only",
        {
            "open_clip_model.safetensors": (
                tmp_path / "published/open_clip_model.safetensors"
            ).read_bytes()
        },
    )
    cache = tmp_path / "c"
    with pytest.raises(clip.download.DownloadError, match=r"open_clip_config\.json"):
        clip.load("hf-hub:org/weights-only", device="cpu", download_root=cache)
    model, _ = clip.load(
        "hf-hub:org/weights-only", device="cpu", download_root=cache, config=config
    )
    assert model.config.activation == "gelu"


def test_registry_name_offline_uses_the_cache(
    server: HubServer,
    tmp_path: Path,
    tiny_entry: clip.registry.PretrainedWeights,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish(server, tmp_path, tiny_entry.config)
    cache = tmp_path / "c"
    clip.load(tiny_entry.name, device="cpu", download_root=cache)
    before = len(server.hits)
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    model, _ = clip.load(tiny_entry.name, device="cpu", download_root=cache)
    assert len(server.hits) == before
    assert model.config == tiny_entry.config


def test_jit_traces_a_hub_model(server: HubServer, tmp_path: Path) -> None:
    config = TINY.replace(activation="gelu")
    published = publish(server, tmp_path, config)
    traced, _ = clip.load("hf-hub:" + REPO, device="cpu", jit=True, download_root=tmp_path / "c")
    assert isinstance(traced, torch.jit.ScriptModule)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced.encode_image(image), published.encode_image(image))
