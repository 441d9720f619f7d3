"""Refusing bad inputs to CLIP's towers with a message that names the fix."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_device", "check_id_dtype", "check_image", "check_text"]


def check_id_dtype(dtype: torch.dtype, vocab_size: int) -> None:
    """Refuse an integer dtype too narrow for the vocabulary's ids (e.g. uint8 for 49408 ids):
    ids cast into it were already wrapped around, so no answer computed from them is right."""
    if torch.iinfo(dtype).max < vocab_size - 1:
        raise TypeError(
            f"text is {dtype}, which holds ids up to {torch.iinfo(dtype).max}, but this model's "
            f"vocabulary has {vocab_size} ids (the end-of-text id is {vocab_size - 1}): such ids "
            "were corrupted when they were cast. Keep clip.tokenize's output as it is (int32 or "
            "int64), or cast with .long() before narrowing"
        )


def check_device(x: Tensor, weight: Tensor, what: str) -> None:
    """Refuse ``x`` (named ``what`` in the message) when it is not on ``weight``'s device."""
    if x.device != weight.device:
        raise ValueError(
            f"{what} is on {x.device} but the model is on {weight.device}; "
            f"move it with {what}.to({str(weight.device)!r})"
        )


def check_image(image: Tensor, resolution: int, weight: Tensor) -> None:
    """Refuse anything but float images [B, 3, R, R] on ``weight``'s device.

    Args:
        image: the images to check.
        resolution: R, the image tower's input side.
        weight: a weight of the image tower (its device is the model's).

    Raises:
        TypeError: not a float tensor.
        ValueError: a wrong shape or device.
    """
    res = resolution
    expected = f"[B, 3, {res}, {res}]"
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor {expected}, got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (res, res):
        hint = " (add a batch dimension with image.unsqueeze(0))" if image.dim() == 3 else ""
        raise ValueError(
            f"image must have shape {expected}, got {list(image.shape)}{hint}; "
            "use the preprocess returned by clip.load to resize and normalise images"
        )
    if not image.is_floating_point():
        raise TypeError(
            f"image must be a float tensor, got {image.dtype}; "
            "use the preprocess returned by clip.load to convert and normalise images"
        )
    check_device(image, weight, "image")


def check_text(text: Tensor, vocab_size: int, context_length: int, weight: Tensor) -> Tensor:
    """Validate token ids [B, L] for a text tower.

    Args:
        text: the token ids to check.
        vocab_size: ids must be in ``[0, vocab_size)``.
        context_length: L must be in ``[1, context_length]``.
        weight: the token embedding (its device is the model's).

    Returns:
        ``text`` as int32/int64 (other integer dtypes cast).

    Raises:
        TypeError: not an integer tensor, or a dtype too narrow for the ids.
        ValueError: a wrong shape or device, or an id out of the vocabulary.
    """
    if not isinstance(text, Tensor):
        raise TypeError(f"text must be a torch.Tensor of token ids, got {type(text).__name__}")
    if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
        raise TypeError(f"text must hold integer token ids, got {text.dtype}; use clip.tokenize")
    check_id_dtype(text.dtype, vocab_size)
    if text.dim() != 2:
        raise ValueError(
            f"text must have shape [B, L] (L ≤ {context_length}), got {list(text.shape)}; "
            "for [B, N, L] prompt groups, flatten with text.flatten(0, 1), then reshape"
        )
    if text.shape[1] > context_length or text.shape[1] == 0:
        raise ValueError(
            f"text has {text.shape[1]} tokens per row; this model takes 1 to "
            f"{context_length}: tokenize with clip.tokenize(..., truncate=True)"
        )
    check_device(text, weight, "text")
    if text.dtype not in (torch.int32, torch.int64):
        text = text.long()  # what nn.Embedding takes
    if text.numel():
        low, high = (int(v) for v in torch.aminmax(text))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"token ids must be in [0, {vocab_size}), got range [{low}, {high}]; "
                "use clip.tokenize"
            )
    return text
