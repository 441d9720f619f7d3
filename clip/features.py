"""What CLIP's feature methods return and how to read it: per-token text features, heatmaps.

:class:`TextTokens` is the result of :meth:`clip.model.CLIP.encode_text_tokens`;
:func:`attention_heatmap` turns :meth:`clip.model.CLIP.image_attention` weights into a map over
the image grid. Both are importable from :mod:`clip.model` too.

Shape legend: B batch, L sequence length, D width, E embed dim, H heads, G grid side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TextTokens", "attention_heatmap"]


class TextTokens(NamedTuple):
    """Per-token text features and the end-of-text position of each row."""

    tokens: Tensor
    """[B, L, D] after ``ln_final`` (or [B, L, E] projected)."""
    eot: Tensor
    """[B] int64: index of each row's end-of-text token (its largest id)."""


def attention_heatmap(attentions: Sequence[Tensor], size: Optional[int] = None) -> Tensor:
    """Class-token attention over the image grid, averaged over layers and heads.

    Args:
        attentions: weights from :meth:`CLIP.image_attention`, each [B, H, 1+G*G, 1+G*G];
            pass the last layers' (e.g. ``layers=[-1]``) for the usual picture.
        size: if given, bilinearly upsample to [B, size, size] (e.g. the input resolution).

    Returns:
        [B, G, G] float32, each map summing to 1 (token 0's weights on the patches,
        renormalised), or [B, size, size] upsampled from it.

    Raises:
        ValueError: if ``attentions`` is empty, of mixed shapes, or not over a square grid.
    """
    if len(attentions) == 0:
        raise ValueError("attentions is empty; pass model.image_attention(image, layers=[-1])")
    shape = attentions[0].shape
    if any(a.shape != shape for a in attentions) or len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(
            f"expected attention weights of one shape [B, H, T, T], got "
            f"{[list(a.shape) for a in attentions]}"
        )
    grid = math.isqrt(shape[-1] - 1)
    if grid * grid != shape[-1] - 1:
        raise ValueError(f"{shape[-1]} tokens are not a class token plus a square grid")
    cls = torch.stack([a.float() for a in attentions])[..., 0, 1:].mean(dim=(0, 2))  # [B, G*G]
    heat = (cls / cls.sum(dim=-1, keepdim=True)).view(-1, grid, grid)  # [B, G, G]
    if size is None:
        return heat
    return F.interpolate(heat[:, None], size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ]
