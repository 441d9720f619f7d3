"""Normalised image features of a list of images, through the data path, with workers.

The one helper every evaluation embeds its images with: image files, URLs or tar members
(:class:`clip.data.pairs.TarMember`) are decoded by the data path's decoder in DataLoader worker
processes, to uint8 with the model's own preprocessing geometry (``model.config.preprocess``;
OpenAI's for a model without a config), normalised in the batch on the model's device with the
same config's mean and std, embedded by :func:`clip.data.embed.encode_images` and L2-normalised.
Images that cannot be read or decoded are reported, never fatal.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, TypedDict, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip.checkpoint import config_of
from clip.data.embed import decode_workers, empty, encode_images, input_resolution, model_device
from clip.data.pairs import ImageRef, ImageRefs, TarMember
from clip.preprocess import PreprocessConfig, normalize_uint8, transform_uint8

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ExtractKeywords",
    "ExtractOptions",
    "ImageFeatures",
    "extract_options",
    "image_features",
    "preprocess_config",
]

Device = Union[str, torch.device]


@dataclass(frozen=True)
class ExtractOptions:
    """How images are decoded and embedded: the options every feature extraction shares.

    Attributes:
        batch_size: images (and, in evaluations, texts) per forward pass.
        num_workers: DataLoader processes decoding images (0: in this process); at most one
            per batch, and none when all the images fit in one batch.
        device: where batches go; None: the model's device.
        progress: show tqdm bars.
    """

    batch_size: int = 64
    num_workers: int = 0
    device: Optional[Device] = None
    progress: bool = False


class ExtractKeywords(TypedDict, total=False):
    """The fields of :class:`ExtractOptions`, as the keyword arguments that override them."""

    batch_size: int
    num_workers: int
    device: Optional[Device]
    progress: bool


def extract_options(
    options: Optional[ExtractOptions] = None, **keywords: Unpack[ExtractKeywords]
) -> ExtractOptions:
    """``options`` with the fields given as keywords replaced.

    Args:
        options: the options to start from; default :class:`ExtractOptions` ().
        keywords: fields of :class:`ExtractOptions` to override.

    Returns:
        The options to use.

    Raises:
        TypeError: a keyword that is not a field of :class:`ExtractOptions`.
    """
    return dataclasses.replace(options or ExtractOptions(), **keywords)


@dataclass
class ImageFeatures:
    """What :func:`image_features` returns.

    Attributes:
        features: float32 [n, D] on the CPU, unit rows, for the images in ``kept``.
        kept: indices (into the images given) of the images embedded, in order.
        failed: ``(index, reason)`` for each image that could not be read or decoded.
    """

    features: Tensor
    kept: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)


def preprocess_config(model: torch.nn.Module) -> PreprocessConfig:
    """The model's ``config.preprocess`` (also wrapped or traced); OpenAI's if it has none."""
    config = config_of(model)
    return PreprocessConfig() if config is None else config.preprocess


def image_features(
    model: torch.nn.Module,
    images: Union[ImageRef, os.PathLike[str], Sequence[Union[ImageRef, os.PathLike[str]]]],
    *,
    options: Optional[ExtractOptions] = None,
    **keywords: Unpack[ExtractKeywords],
) -> ImageFeatures:
    """Normalised image features of files, URLs or tar members, through the data path.

    Args:
        model: a CLIP model, on its device.
        images: image paths (``str`` or ``Path``) or URLs, or :class:`clip.data.pairs.TarMember`
            s; a single one is one image.
        options: batch size, decoding workers, device (default the model's) and progress bar;
            default :class:`ExtractOptions` ().
        keywords: fields of :class:`ExtractOptions` (``batch_size=``, ``num_workers=``,
            ``device=``, ``progress=``), overriding ``options``.

    Returns:
        :class:`ImageFeatures`.

    Raises:
        ValueError: if ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    opts = extract_options(options, **keywords)
    batch_size, num_workers = opts.batch_size, opts.num_workers
    if batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"need batch_size ≥ 1 and num_workers ≥ 0, got {batch_size}, {num_workers}"
        )
    if isinstance(images, (str, os.PathLike, TarMember)):
        images = [images]  # one image, never a sequence of characters
    refs: list[ImageRef] = [os.fspath(i) if isinstance(i, os.PathLike) else i for i in images]
    config = preprocess_config(model)
    device = torch.device(opts.device) if opts.device is not None else model_device(model)
    loader = DataLoader(
        ImageRefs(refs, transform_uint8(input_resolution(model), config)),
        batch_size=batch_size,
        num_workers=decode_workers(num_workers, len(refs), batch_size),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    out = ImageFeatures(empty(model))
    chunks = [out.features]
    with tqdm(total=len(refs), unit="img", disable=not opts.progress, dynamic_ncols=True) as bar:
        for indices, pixels, failed in loader:
            if pixels is not None:
                # normalised here with the model's mean and std, then embedded as given
                floats = normalize_uint8(pixels.to(device, non_blocking=True), config)
                chunks.append(encode_images(model, floats, device))  # [n, D]
                out.kept.extend(indices)
            out.failed.extend(failed)
            bar.update(len(indices) + len(failed))
    out.features = torch.cat(chunks)
    return out


def _collate(
    items: list[tuple[int, Optional[Tensor], Optional[str]]],
) -> tuple[list[int], Optional[Tensor], list[tuple[int, str]]]:
    """Stack a batch's decoded images [n, 3, R, R]; keep the failures aside."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason or "unknown error") for i, x, reason in items if x is None]
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, bad
