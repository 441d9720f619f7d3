"""Retrieval and classification metrics on normalised features: recall@k and top-k.

Recall@k (the COCO/Flickr30k protocol): caption ``t`` belongs to image ``image_of[t]``; an image
may have several captions. Text→image recall@k is the fraction of captions whose image is among
the k images most similar to them; image→text recall@k the fraction of images with at least one
of their captions among the k captions most similar to them. Candidates are ranked by cosine
similarity, ties by index (the lower index first), so results do not depend on the sort.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = ["RECALL_KS", "recall_at_k", "topk_correct"]

RECALL_KS = (1, 5, 10)


def topk_correct(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Whether each row's label is among its ``k`` highest scores: bool [N].

    Args:
        scores: [N, C].
        labels: [N] class indices.
        k: how many of the best classes count (at most C).
    """
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [N, k]
    return (top == labels[:, None]).any(dim=1)


def _positions(scores: Tensor, best: Tensor, first: Tensor) -> Tensor:
    """Per row, how many candidates rank above the candidate ``first`` of score ``best``:
    those with a higher score, and those with the same score and a lower index."""
    index = torch.arange(scores.shape[1])[None, :]
    above = scores > best[:, None]
    tied = (scores == best[:, None]) & (index < first[:, None])
    return (above | tied).sum(dim=1)  # [rows]


def recall_at_k(
    image_features: Tensor,
    text_features: Tensor,
    image_of: Union[Tensor, Sequence[int]],
    ks: Iterable[int] = RECALL_KS,
    chunk: int = 1024,
) -> tuple[dict[int, float], dict[int, float]]:
    """Image→text and text→image recall@k (see the module docstring of :mod:`clip.metrics`).

    Args:
        image_features: [I, D], unit rows.
        text_features: [T, D], unit rows.
        image_of: [T], the index of each caption's image; every image needs a caption.
        ks: the k's.
        chunk: rows of the similarity matrix computed at once.

    Returns:
        ``(image_to_text, text_to_image)``, each ``{k: recall}`` with recall in [0, 1].

    Raises:
        ValueError: if the shapes disagree or an image has no caption.
    """
    image_of = torch.as_tensor(image_of, dtype=torch.long)
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if image_of.shape != (n_texts,) or n_images == 0:
        raise ValueError(
            f"need [T] image indices for {n_texts} captions and ≥ 1 image, got "
            f"{tuple(image_of.shape)} for {n_images} images"
        )
    if int(torch.bincount(image_of, minlength=n_images).min()) == 0:
        raise ValueError("every image needs at least one caption")
    images, texts = image_features.float(), text_features.float()
    text_ranks = []  # text→image: where each caption's image ranks
    for start in range(0, n_texts, chunk):
        scores = texts[start : start + chunk] @ images.t()  # [t, I]
        own = image_of[start : start + chunk]
        best = scores.gather(1, own[:, None])[:, 0]
        text_ranks.append(_positions(scores, best, own))
    image_ranks = []  # image→text: where each image's best-ranked caption ranks
    for start in range(0, n_images, chunk):
        scores = images[start : start + chunk] @ texts.t()  # [i, T]
        mine = image_of[None, :] == torch.arange(start, start + scores.shape[0])[:, None]
        masked = scores.masked_fill(~mine, float("-inf"))
        best = masked.max(dim=1).values
        first = (mine & (scores == best[:, None])).int().argmax(dim=1)  # lowest index of the best
        image_ranks.append(_positions(scores, best, first))
    t2i, i2t = torch.cat(text_ranks), torch.cat(image_ranks)
    ks = list(ks)
    return (
        {k: int((i2t < k).sum()) / n_images for k in ks},
        {k: int((t2i < k).sum()) / n_texts for k in ks},
    )
