"""clip.load keeps about one copy of the weights in memory: nothing holds the file's tensors
while they are upcast, so each fp16 original is freed as soon as its fp32 copy exists.

Each kind of file goes through the real reader (the archive really is read by ``torch.jit.load``,
the state dicts by ``torch.load``). Peak RSS on a ViT-L/14-sized checkpoint is measured by
``benchmarks/run.py --only 5``.
"""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path

import pytest
import torch
from checkpoints import TINY, make_state_dict, write_openai_archive

import clip
import clip.clip
import clip.sources
from clip.model import CLIP


def write(kind: str, folder: Path) -> Path:
    """The tiny ViT's weights as one kind of file."""
    arch = TINY["tiny-vit"]
    path = folder / f"{kind}.pt"
    if kind == "archive":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            write_openai_archive(arch, make_state_dict(arch, layout="openai"), str(path))
    elif kind == "state-dict-fp16":
        torch.save(make_state_dict(arch, layout="openai"), path)
    elif kind == "state-dict-fp32":
        torch.save(make_state_dict(arch), path)
    else:
        clip.save(make_state_dict(arch), path)
    return path


@pytest.mark.parametrize(
    ("kind", "is_archive", "stored"),
    [
        ("archive", True, torch.float16),
        ("state-dict-fp16", False, torch.float16),
        ("state-dict-fp32", False, torch.float32),
        ("safetensors", False, torch.float32),
    ],
)
def test_load_drops_the_checkpoint_tensors_before_upcasting(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    kind: str,
    is_archive: bool,
    stored: torch.dtype,
) -> None:
    read: list[tuple[bool, set[torch.dtype]]] = []
    alive: list[weakref.ref] = []
    real_read = clip.sources.read_checkpoint

    def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], bool]:
        sd, archive = real_read(path)
        read.append((archive, {t.dtype for t in sd.values() if t.is_floating_point()}))
        alive.extend(weakref.ref(t) for t in sd.values())
        return sd, archive

    real_settle = clip.clip.settle_dtype
    still_referenced: list[int] = []

    def settle_dtype(model: CLIP, device: torch.device, dtype: object = None) -> CLIP:
        still_referenced.append(sum(ref() is not None for ref in alive))
        return real_settle(model, device, dtype)

    monkeypatch.setattr(clip.sources, "read_checkpoint", read_checkpoint)
    monkeypatch.setattr(clip.clip, "settle_dtype", settle_dtype)
    model, _ = clip.load(str(write(kind, tmp_path)), device="cpu")
    assert read[0][0] is is_archive and stored in read[0][1]  # the kind really was this one
    # Buffers (BatchNorm statistics) would be assigned as they are; a ViT's tensors are all
    # parameters, which wrap the storage in new objects, so none of the originals may survive.
    assert alive and still_referenced == [0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
