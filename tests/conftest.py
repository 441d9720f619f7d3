"""Shared fixtures: tiny random checkpoints in OpenAI's exact formats, written once per session."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import TINY, Arch, make_state_dict, write_openai_archive

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """For each tiny arch: a plain fp32 state dict, a mixed-precision one, and an archive."""
    root = tmp_path_factory.mktemp("checkpoints")
    files: dict[str, dict[str, Path]] = {}
    for name, arch in TINY.items():
        paths = {
            "state_dict": root / f"{name}-sd.pt",
            "state_dict_fp16": root / f"{name}-sd16.pt",
            "archive": root / f"{name}-jit.pt",
        }
        torch.save(make_state_dict(arch), paths["state_dict"])
        torch.save(make_state_dict(arch, layout="openai"), paths["state_dict_fp16"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            write_openai_archive(
                arch, make_state_dict(arch, layout="openai"), str(paths["archive"])
            )
        files[name] = paths
    return files


@pytest.fixture(params=sorted(TINY))
def arch_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def arch(arch_name: str) -> Arch:
    return TINY[arch_name]


def sample_text(n: int = 3, length: int = 77) -> torch.Tensor:
    """Token rows shaped like clip.tokenize output: SOT, a few ids, EOT (the row max), padding."""
    rows = torch.zeros(n, length, dtype=torch.int)
    for i in range(n):
        body = torch.arange(300 + 17 * i, 300 + 17 * i + 3 + 4 * i)
        rows[i, 0] = 49406
        rows[i, 1 : 1 + len(body)] = body
        rows[i, 1 + len(body)] = 49407
    return rows


def sample_images(arch: Arch, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = arch.image_resolution
    return torch.randn(n, 3, r, r, generator=g)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` relative to the largest magnitude in ``expected`` (fp32 contract)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    worst = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert worst <= rel * scale, f"max abs diff {worst:.3g} > {rel:g} x max |expected| {scale:.3g}"


def model_outputs(model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor) -> dict:
    """The four outputs the parity tests compare: both encoders and both logits of ``forward``."""
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, ids)
        return {
            "encode_image": model.encode_image(images),
            "encode_text": model.encode_text(ids),
            "logits_per_image": logits_per_image,
            "logits_per_text": logits_per_text,
        }


@pytest.fixture(scope="session")
def vit_file(tiny_files: dict[str, dict[str, Path]]) -> str:
    """The tiny ViT as a plain fp32 state-dict file."""
    return str(tiny_files["tiny-vit"]["state_dict"])


@pytest.fixture(scope="session")
def vit_model(vit_file: str) -> torch.nn.Module:
    """The tiny ViT, loaded on the CPU (shared: tests must not modify it)."""
    import clip

    model, _ = clip.load(vit_file, device="cpu")
    return model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests (``pytest.mark.usefixtures("one_thread")``): tiny
    models gain nothing from threads, and lose much when other processes hold the cores
    (threads wait for each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What ``os.fsync`` is called on during the test, in order (paths, via /proc/self/fd)."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced
