"""The image preprocessing CLIP was trained with, as a picklable torchvision pipeline."""

from __future__ import annotations

from dataclasses import dataclass
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
    "INTERPOLATIONS",
    "MEAN",
    "RESIZE_MODES",
    "STD",
    "ConvertToRGB",
    "Preprocess",
    "PreprocessConfig",
    "normalize_uint8",
    "transform",
    "transform_uint8",
]

# Per-channel statistics of CLIP's training images.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
# "shortest": resize the shorter side, center-crop (OpenAI). "squash": resize both sides to the
# square, ignoring the aspect ratio (DFN's ViT-H/14).
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are prepared for a model, beyond its input side: what the weights were trained
    with and tensor shapes cannot tell. The defaults are OpenAI's.

    Args:
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: resampling filter, one of :data:`INTERPOLATIONS`.
        resize_mode: one of :data:`RESIZE_MODES`.
    """

    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"preprocess {name} needs 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)
        if any(v <= 0 for v in self.std):
            raise ValueError(f"preprocess std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unsupported interpolation {self.interpolation!r}; "
                f"expected one of {sorted(INTERPOLATIONS)}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"unsupported resize_mode {self.resize_mode!r}; expected one of {RESIZE_MODES} "
                "(open_clip's 'longest' letterboxing is not supported)"
            )


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


_OPENAI = PreprocessConfig()


def transform(n_px: int, config: PreprocessConfig = _OPENAI) -> Preprocess:
    """CLIP's preprocessing for a square input of side ``n_px``.

    Resize (by default the shorter side to ``n_px``, bicubic, then center-crop to ``n_px`` x
    ``n_px``; with ``resize_mode="squash"`` both sides to ``n_px``), convert to RGB (after the
    crop, as OpenAI's package does), scale to [0, 1] and normalise with the config's mean and std
    (by default OpenAI's :data:`MEAN` and :data:`STD`).

    Args:
        n_px: output side in pixels (the model's ``visual.input_resolution``).
        config: what the weights were trained with (``model.config.preprocess``).

    Returns:
        A callable mapping a PIL image to a float tensor [3, n_px, n_px].
    """
    return Preprocess([*_geometry(n_px, config), ToTensor(), Normalize(config.mean, config.std)])


def _geometry(n_px: int, config: PreprocessConfig) -> list[Any]:
    """The resize, crop and RGB steps shared by :func:`transform` and :func:`transform_uint8`."""
    if not isinstance(n_px, int) or isinstance(n_px, bool) or n_px <= 0:
        raise ValueError(f"n_px must be a positive int, got {n_px!r}")
    if not isinstance(config, PreprocessConfig):
        raise TypeError(f"config must be a clip.preprocess.PreprocessConfig, got {config!r}")
    mode = INTERPOLATIONS[config.interpolation]
    size = n_px if config.resize_mode == "shortest" else (n_px, n_px)
    return [Resize(size, interpolation=mode), CenterCrop(n_px), ConvertToRGB()]


def transform_uint8(n_px: int, config: PreprocessConfig = _OPENAI) -> Preprocess:
    """:func:`transform` up to the crop: a PIL image → uint8 [3, n_px, n_px], a quarter the bytes.

    For moving images between processes; :func:`normalize_uint8` (with the same ``config``)
    finishes the job, and the two together give exactly what :func:`transform` gives.
    """
    return Preprocess([*_geometry(n_px, config), PILToTensor()])


def normalize_uint8(pixels: torch.Tensor, config: PreprocessConfig = _OPENAI) -> torch.Tensor:
    """uint8 [..., 3, R, R] from :func:`transform_uint8` → float32, as :func:`transform` ends.

    The same operations as ``ToTensor`` (scale by 1/255) then ``Normalize``, elementwise, so
    the result is bit-identical whatever the batch.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels from transform_uint8, got {pixels.dtype}")
    return Normalize(config.mean, config.std)(pixels.float().div(255))
