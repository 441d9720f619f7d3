"""clip.load keeps about one copy of the weights in memory: nothing holds the file's tensors
while they are upcast, so each fp16 original is freed as soon as its fp32 copy exists.

(Peak RSS on a ViT-L/14-sized checkpoint is measured by ``benchmarks/run.py``, workload 5.)
"""

from __future__ import annotations

import weakref

import pytest
import torch
from checkpoints import TINY, make_state_dict

import clip
import clip.clip
from clip.model import CLIP


@pytest.mark.parametrize("is_archive", [True, False])
def test_load_drops_the_checkpoint_tensors_before_upcasting(
    monkeypatch: pytest.MonkeyPatch, tmp_path, is_archive: bool
) -> None:
    alive: list[weakref.ref] = []

    def read_checkpoint(path: object) -> tuple[dict[str, torch.Tensor], bool]:
        sd = make_state_dict(TINY["tiny-vit"], layout="openai")
        alive.extend(weakref.ref(t) for t in sd.values())
        return sd, is_archive

    real_settle = clip.clip.settle_dtype
    still_referenced: list[int] = []

    def settle_dtype(model: CLIP, device: torch.device, dtype: object = None) -> CLIP:
        still_referenced.append(sum(ref() is not None for ref in alive))
        return real_settle(model, device, dtype)

    monkeypatch.setattr(clip.clip, "read_checkpoint", read_checkpoint)
    monkeypatch.setattr(clip.clip, "settle_dtype", settle_dtype)
    path = tmp_path / "weights.pt"
    path.write_bytes(b"read_checkpoint is replaced")
    model, _ = clip.load(str(path), device="cpu")
    # Buffers (BatchNorm statistics) would be assigned as they are; a ViT's tensors are all
    # parameters, which wrap the storage in new objects, so none of the originals may survive.
    assert still_referenced == [0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
