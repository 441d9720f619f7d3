"""Files to normalised embeddings on one machine: the layer under ``clip embed`` and ``classify``.

Images are decoded and preprocessed in :class:`torch.utils.data.DataLoader` workers while the model
runs on the previous batch; unreadable or corrupt files are skipped and reported, never fatal. The
default path is bit-identical to ``preprocess(Image.open(p))`` stacked per batch, then
``model.encode_image``, then L2 normalisation. :func:`iter_image_batches` yields per-batch results
so callers (the command line, a cluster job) can stream, checkpoint or stop early.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip.data import fs
from clip.data.decode import ImageFiles, load_image
from clip.data.discover import IMAGE_EXTENSIONS, as_list, discover
from clip.data.embed import (
    decode_workers,
    embedding_width,
    empty,
    encode_images,
    encode_texts,
    input_resolution,
    model_device,
    uint8_transform,
)
from clip.data.write import load_embeddings, rows_file, save_embeddings

__all__ = [
    "IMAGE_EXTENSIONS",
    "EmbeddedImages",
    "ImageBatch",
    "embed_images",
    "embed_texts",
    "embedding_width",
    "find_images",
    "input_resolution",
    "iter_image_batches",
    "load_embeddings",
    "load_image",
    "rows_file",
    "save_embeddings",
]

Transform = Callable[[Image.Image], torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class EmbeddedImages:
    """What :func:`embed_images` returns.

    Attributes:
        embeddings: float32 [N, D], each row L2-normalised, in the order of ``paths``.
        paths: the inputs that were embedded, in input order.
        failed: ``(path, reason)`` for each input that could not be read or decoded.
    """

    embeddings: torch.Tensor
    paths: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class ImageBatch(NamedTuple):
    """One batch from :func:`iter_image_batches`: like :class:`EmbeddedImages`, for a slice."""

    embeddings: torch.Tensor  # [n, D] float32, normalised
    paths: list[str]
    failed: list[tuple[str, str]]


def find_images(inputs: Union[PathLike, Iterable[PathLike]]) -> list[str]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of image paths.

    A file named explicitly is kept whatever its extension (if it is not an image, embedding it
    reports it as failed); files found in folders or by a glob are kept if their extension is in
    :data:`IMAGE_EXTENSIONS` (any case), and other files there are skipped, except ``.tar`` and
    ``.parquet`` files, which hold many images and are refused (embed them with
    :func:`clip.distributed.embed_dataset`).

    Args:
        inputs: one path, folder or glob pattern (``**`` recurses), or several.

    Returns:
        Sorted absolute paths, each file once however it was spelled.

    Raises:
        FileNotFoundError: if an input does not exist, or a pattern matches nothing.
        ValueError: for ``.tar`` or ``.parquet`` inputs.
    """
    found = discover(inputs)
    shards = found.tars + found.parquets
    if shards:
        raise ValueError(
            f"{shards[0]} holds many images and is read shard by shard: embed it with "
            "clip.distributed.embed_dataset (clip embed --out FOLDER)"
        )
    named = {fs.normalize(n) for n in as_list(inputs)}
    return sorted([*found.images, *(p for p in found.lists if p in named)])


def iter_image_batches(
    model: torch.nn.Module,
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    preprocess: Optional[Transform] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    fast_decode: bool = False,
    progress: bool = False,
) -> Iterator[ImageBatch]:
    """Like :func:`embed_images`, but yield each batch's result as soon as it is ready.

    Batches come in input order; stopping the iteration early stops the workers.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"need batch_size ≥ 1 and num_workers ≥ 0, got {batch_size} and {num_workers}"
        )
    paths = as_list(paths)
    device = torch.device(device) if device is not None else model_device(model)
    res = input_resolution(model) if preprocess is None or fast_decode else 0
    # uint8 crops by default: the workers send a quarter of the bytes, and encode_images
    # normalises the batch with the model's mean and std (bit-identical to the float transform)
    preprocess = preprocess or uint8_transform(model, res)
    loader = DataLoader(
        ImageFiles(paths, preprocess, res if fast_decode else None),
        batch_size=batch_size,
        num_workers=decode_workers(num_workers, len(paths), batch_size),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    with tqdm(total=len(paths), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for indices, images, bad in loader:
            embeddings = empty(model) if images is None else encode_images(model, images, device)
            bar.update(len(indices) + len(bad))
            failed = [(paths[i], reason) for i, reason in bad]
            yield ImageBatch(embeddings, [paths[i] for i in indices], failed)


def _collate(
    items: list[tuple[int, Optional[torch.Tensor], Optional[str]]],
) -> tuple[list[int], Optional[torch.Tensor], list[tuple[int, str]]]:
    """Stack the decoded images of a batch [n, 3, R, R]; keep failures aside."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None and reason is not None]
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, bad


def embed_images(
    model: torch.nn.Module,
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    preprocess: Optional[Transform] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    fast_decode: bool = False,
    progress: bool = False,
) -> EmbeddedImages:
    """Embed image files into L2-normalised float32 vectors, skipping files that cannot be read.

    Decoding and preprocessing run in ``num_workers`` DataLoader worker processes, overlapping the
    model; on CUDA batches go through pinned memory with non-blocking copies. The default path
    gives exactly ``model.encode_image(torch.stack([preprocess(Image.open(p)) for p in batch]))``
    normalised, for consecutive batches of ``batch_size`` readable files.

    Args:
        model: a CLIP model (eager or traced), already on its device.
        paths: image files (or URLs), embedded in this order (see :func:`find_images`); a single
            ``str`` or ``Path`` is one image.
        preprocess: PIL image → [3, R, R] tensor; default the model's own preprocessing
            (``model.config.preprocess``: mean, std, resize mode; OpenAI's for a model without
            a config) at ``model.visual.input_resolution``.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes (0: decode in this process); at most one per
            batch, and none when all the images fit in one batch.
        device: where images go; default the device of the model's parameters.
        fast_decode: decode large JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) that still covers
            the model input after the resize. Much faster on photos far larger than
            the model input; NOT bit-exact (pixels differ slightly from a full decode + bicubic
            resize). Files other than JPEG, and JPEGs under twice the input size, are unaffected.
        progress: show a tqdm progress bar (stderr).

    Returns:
        :class:`EmbeddedImages` with ``embeddings`` [N, D], ``paths`` and ``failed``.

    Raises:
        ValueError: if ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    batches = list(
        iter_image_batches(
            model,
            paths,
            preprocess=preprocess,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            fast_decode=fast_decode,
            progress=progress,
        )
    )
    return EmbeddedImages(
        torch.cat([empty(model), *(b.embeddings for b in batches)]),
        [p for b in batches for p in b.paths],
        [f for b in batches for f in b.failed],
    )


def embed_texts(
    model: torch.nn.Module,
    texts: Union[str, Sequence[str]],
    *,
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
    truncate: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Embed texts into L2-normalised float32 vectors, in order.

    Args:
        model: a CLIP model, already on its device.
        texts: the texts; a single ``str`` is one text (as for :func:`clip.tokenize`).
        batch_size: texts per forward pass.
        device: where tokens go; default the device of the model's parameters.
        truncate: cut texts longer than the context instead of raising.
        progress: show a tqdm progress bar (stderr).

    Returns:
        float32 [N, D], each row of unit norm.

    Raises:
        RuntimeError: if a text is longer than the context and ``truncate`` is False.
        TypeError: if a text is not a ``str``.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a str or a sequence of str")
    out: list[torch.Tensor] = []
    with tqdm(total=len(texts), unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            out.append(encode_texts(model, chunk, device, truncate))  # [n, D]
            bar.update(len(chunk))
    return torch.cat([empty(model), *out])
