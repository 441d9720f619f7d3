"""``CLIP.set_grad_checkpointing``: the same loss, gradients and BatchNorm statistics, fewer
activations kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch

import clip
from clip.config import CLIPConfig
from clip.model import CLIP

CONFIGS = {
    "vit": CLIPConfig(16, 32, 2, 64, 16, 77, 49408, 64, 1, 2, activation="gelu"),
    "resnet": CLIPConfig(16, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 2),
}


def step(model: CLIP, images: torch.Tensor, texts: torch.Tensor) -> tuple[float, list, list, int]:
    """One training loss and backward; what it computed, and the bytes autograd saved."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(images, texts)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(images)))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss.item(), grads, [b.clone() for b in model.buffers()], saved


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_checkpointing_gives_identical_loss_gradients_and_statistics(kind: str) -> None:
    config = CONFIGS[kind]
    torch.manual_seed(0)
    plain = CLIP.from_config(config).train()
    checked = copy.deepcopy(plain)
    assert checked.set_grad_checkpointing() is checked
    side = config.image_resolution
    images = torch.randn(4, 3, side, side)
    texts = clip.tokenize(["a cat", "two dogs", "a red car", "snow"])
    loss_a, grads_a, buffers_a, saved_a = step(plain, images, texts)
    loss_b, grads_b, buffers_b, saved_b = step(checked, images, texts)
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(buffers_a, buffers_b))  # BatchNorm ran once
    assert saved_b < saved_a / 2


def test_checkpointing_off_again_keeps_activations() -> None:
    model = CLIP.from_config(CONFIGS["vit"]).train()
    images, texts = torch.randn(2, 3, 32, 32), clip.tokenize(["a", "b"])
    saved_plain = step(model, images, texts)[3]
    model.set_grad_checkpointing(True).set_grad_checkpointing(False)
    assert step(model, images, texts)[3] == saved_plain


def test_checkpointed_blocks_still_call_their_hooks() -> None:
    model = CLIP.from_config(CONFIGS["vit"]).train().set_grad_checkpointing()
    seen: list[str] = []
    model.visual.transformer.resblocks[1].register_forward_hook(lambda *_: seen.append("image"))
    model.transformer.resblocks[0].register_forward_hook(lambda *_: seen.append("text"))
    logits, _ = model(torch.randn(2, 3, 32, 32), clip.tokenize(["a", "b"]))
    logits.sum().backward()
    assert "image" in seen and "text" in seen


def test_checkpointing_does_not_change_inference() -> None:
    model = CLIP.from_config(CONFIGS["resnet"]).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.encode_image(images)
        after = model.set_grad_checkpointing().encode_image(images)
    assert torch.equal(before, after)
