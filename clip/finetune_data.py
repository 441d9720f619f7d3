"""The data side of ``clip finetune``: captions to tokens, each epoch's batches, validation.

- Captions are tokenized once, before training, with the model's context length. Captions that
  do not fit are cut to the context (their last token becoming the end token), as open_clip's
  training does, and a warning says how many (web captions are often long; refusing them would
  make every such dataset need a flag).
- Each epoch's order is a permutation drawn from a ``torch.Generator`` seeded with ``(seed,
  epoch)`` alone, so it is the same in every run, after a resume and on every rank. Batches are
  full: the pairs left over after the last whole global batch are not used in that epoch (a
  different remainder is left over in the next one). A global batch is ``batch_size ×
  world_size`` consecutive pairs of the order; rank r takes the r-th contiguous ``batch_size``
  of them, so the ranks' batches concatenated in rank order are the one-process batch of
  ``batch_size × world_size``.
- Validation embeds each distinct image once and every caption, and reports the contrastive
  loss in batches of the training batch size (so it reads like the training loss) and the
  retrieval recall@1/5/10 of :mod:`clip.metrics`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from clip.data.extract import image_features
from clip.data.pairs import Pairs, PairsDataset
from clip.loss import contrastive_loss
from clip.metrics import RECALL_KS, recall_at_k
from clip.pipeline import embed_texts
from clip.preprocess import PreprocessConfig, normalize_uint8, transform_uint8
from clip.tokenizer import EOT_ID, tokenize

__all__ = [
    "EpochBatches",
    "batches",
    "epoch_order",
    "evaluate_pairs",
    "pairs_digest",
    "steps_per_epoch",
    "to_model_inputs",
    "tokenize_captions",
    "training_dataset",
]


def tokenize_captions(captions: list[str], context_length: int) -> Tensor:
    """Token ids [N, context_length] (int32) of every caption, long ones cut with a warning.

    Args:
        captions: the captions, one per pair.
        context_length: the model's context length.

    Returns:
        What ``clip.tokenize(captions, context_length, truncate=True)`` returns.

    Warns:
        UserWarning: naming how many captions were cut, and the first of them.
    """
    # One position more than the context tells which captions do not fit: their row is full.
    wide = tokenize(captions, context_length + 1, truncate=True)
    cut = wide[:, context_length] != 0
    tokens = wide[:, :context_length].clone()
    tokens[cut, context_length - 1] = EOT_ID
    if bool(cut.any()):
        first = int(cut.nonzero()[0, 0])
        shown = captions[first] if len(captions[first]) <= 80 else captions[first][:80] + "…"
        warnings.warn(
            f"{int(cut.sum())} of {len(captions)} captions are longer than the model's "
            f"{context_length} tokens and are cut to fit (e.g. caption {first}: {shown!r})",
            UserWarning,
            stacklevel=2,
        )
    return tokens


def pairs_digest(pairs: Pairs) -> str:
    """``sha256:<hex>`` of every pair's image reference and caption, in order: whether a rerun
    reads the same training set (image bytes are not read)."""
    h = hashlib.sha256()
    for image, caption in zip(pairs.image_of, pairs.captions):
        h.update(f"{pairs.images[image]}\0{caption}\0".encode("utf-8", "surrogatepass"))
    return f"sha256:{h.hexdigest()}"


def steps_per_epoch(pairs: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps in one epoch: whole global batches of ``batch_size × world_size``."""
    return pairs // (batch_size * world_size)


def epoch_order(pairs: int, seed: int, epoch: int) -> Tensor:
    """The epoch's permutation of ``range(pairs)``: a function of ``(seed, epoch)`` only."""
    digest = hashlib.sha256(f"clip-finetune:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(pairs, generator=generator)


class EpochBatches:
    """This rank's batches of one epoch, from step ``start`` on: a DataLoader batch sampler.

    Args:
        pairs: pairs in the training set.
        batch_size: pairs per batch on this rank.
        seed, epoch: what the order is drawn from (:func:`epoch_order`).
        rank, world_size: this process's share of each global batch.
        start: the first step of the epoch to yield (steps before it were done already).
    """

    def __init__(
        self,
        pairs: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        self.order = epoch_order(pairs, seed, epoch)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.steps = steps_per_epoch(pairs, batch_size, world_size)
        self.start = start

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        width = self.batch_size * self.world_size
        for step in range(self.start, self.steps):
            first = step * width + self.rank * self.batch_size
            yield self.order[first : first + self.batch_size].tolist()


def batches(
    dataset: PairsDataset, sampler: EpochBatches, workers: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader of ``(uint8 pixels [B, 3, R, R], captions, pair indices [B])``."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def training_dataset(pairs: Pairs, resolution: int, config: PreprocessConfig) -> PairsDataset:
    """The pairs decoded to uint8 with the model's preprocessing geometry."""
    return PairsDataset(pairs, transform_uint8(resolution, config))


def to_model_inputs(
    pixels: Tensor,
    indices: Tensor,
    tokens: Tensor,
    config: PreprocessConfig,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """A batch's normalised images and token ids, on ``device``.

    ``indices`` name the pairs returned (a replacement's index for an undecodable image), so the
    tokens are those of the captions that go with the images.
    """
    images = normalize_uint8(pixels.to(device, non_blocking=True), config)
    texts = tokens[indices].to(device, non_blocking=True)
    return images, texts


def evaluate_pairs(
    model: torch.nn.Module,
    pairs: Pairs,
    batch_size: int,
    workers: int = 0,
    device: Optional[torch.device] = None,
) -> dict[str, Any]:
    """Validation numbers of a CLIP model on image–caption pairs (see the module docstring).

    Images that cannot be decoded are left out with their captions.

    Args:
        model: the CLIP model (put in eval mode here; the caller restores train mode).
        pairs: the validation pairs.
        batch_size: pairs per batch of the loss (and per forward pass).
        workers: image decoding processes.
        device: where the model runs; default its parameters' device.

    Returns:
        ``{"val_pairs", "val_loss", "image_to_text_R@k"..., "text_to_image_R@k"...,
        "val_failed"}``.

    Raises:
        ValueError: if no validation image can be decoded.
    """
    model.eval()
    found = image_features(
        model, pairs.images, batch_size=batch_size, num_workers=workers, device=device
    )
    if not found.kept:
        reason = f" (e.g. {pairs.images[found.failed[0][0]]}: {found.failed[0][1]})"
        raise ValueError(
            f"none of the {len(pairs.images)} validation images could be decoded"
            f"{reason if found.failed else ''}"
        )
    new_index = {old: new for new, old in enumerate(found.kept)}
    rows = [t for t, image in enumerate(pairs.image_of) if image in new_index]
    image_of = [new_index[pairs.image_of[t]] for t in rows]
    texts = embed_texts(
        model,
        [pairs.captions[t] for t in rows],
        batch_size=batch_size,
        device=device,
        truncate=True,
    )
    images = found.features[image_of]  # one row per pair
    logit_scale: Tensor = model.logit_scale  # type: ignore[assignment]
    scale = float(logit_scale.detach().exp())
    size = min(batch_size, len(rows))
    losses = [
        float(contrastive_loss(images[s : s + size], texts[s : s + size], scale, gather=False))
        for s in range(0, len(rows) - size + 1, size)
    ]
    i2t, t2i = recall_at_k(found.features, texts, image_of, RECALL_KS)
    result: dict[str, Any] = {"val_pairs": len(rows), "val_loss": sum(losses) / len(losses)}
    result.update({f"image_to_text_R@{k}": v for k, v in i2t.items()})
    result.update({f"text_to_image_R@{k}": v for k, v in t2i.items()})
    result["val_failed"] = len(found.failed)
    return result
