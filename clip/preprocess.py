"""The image preprocessing CLIP was trained with, as a picklable torchvision pipeline."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.transforms import (
    CenterCrop,
    Compose,
    InterpolationMode,
    Normalize,
    PILToTensor,
    Resize,
    ToTensor,
)

__all__ = [
    "MEAN",
    "STD",
    "ConvertToRGB",
    "Preprocess",
    "normalize_uint8",
    "transform",
    "transform_uint8",
]

# Per-channel statistics of CLIP's training images.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class ConvertToRGB:
    """Convert a PIL image to RGB (a class, not a lambda, so the pipeline pickles)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Preprocess(Compose):
    """A ``torchvision.transforms.Compose`` that refuses inputs other than PIL images clearly."""

    def __call__(self, image: Any) -> Any:
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"preprocess expects a PIL.Image.Image, got {type(image).__name__}; "
                "open files with PIL.Image.open(path) and arrays with PIL.Image.fromarray(array)"
            )
        return super().__call__(image)


def transform(n_px: int) -> Preprocess:
    """CLIP's preprocessing for a square input of side ``n_px``.

    Resize the shorter side to ``n_px`` (bicubic), center-crop to ``n_px`` x ``n_px``, convert to
    RGB (after the crop, as OpenAI's package does), scale to [0, 1] and normalise with
    :data:`MEAN` and :data:`STD`.

    Args:
        n_px: output side in pixels (the model's ``visual.input_resolution``).

    Returns:
        A callable mapping a PIL image to a float tensor [3, n_px, n_px].
    """
    if not isinstance(n_px, int) or n_px <= 0:
        raise ValueError(f"n_px must be a positive int, got {n_px!r}")
    return Preprocess(
        [
            Resize(n_px, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n_px),
            ConvertToRGB(),
            ToTensor(),
            Normalize(MEAN, STD),
        ]
    )


def transform_uint8(n_px: int) -> Preprocess:
    """:func:`transform` up to the crop: a PIL image → uint8 [3, n_px, n_px], a quarter the bytes.

    For moving images between processes; :func:`normalize_uint8` finishes the job, and the two
    together give exactly what :func:`transform` gives.
    """
    full = transform(n_px)
    return Preprocess([*full.transforms[:3], PILToTensor()])


def normalize_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, R, R] from :func:`transform_uint8` → float32, as :func:`transform` ends.

    The same operations as ``ToTensor`` (scale by 1/255) then ``Normalize``, elementwise, so
    the result is bit-identical whatever the batch.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels from transform_uint8, got {pixels.dtype}")
    return Normalize(MEAN, STD)(pixels.float().div(255))
