"""CLIP's feature methods, and what they return: per-token features, per-block outputs and
attention weights of both towers, and heat maps.

:class:`FeatureMethods` holds the methods (:meth:`~FeatureMethods.encode_image_tokens`,
:meth:`~FeatureMethods.encode_image_layers`, :meth:`~FeatureMethods.image_attention` and their
text counterparts); :class:`clip.model.CLIP` inherits them, so they are called as
``model.encode_image_tokens(...)`` and patched, as research code does, on ``clip.model.CLIP``.
:class:`TextTokens` is the result of ``encode_text_tokens``; :func:`attention_heatmap` turns
``image_attention`` weights into a map over the image grid. All are importable from
:mod:`clip.model` too.

Shape legend: B batch, L sequence length, D width, E embed dim, H heads, G grid side, R image
resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from clip.vision import VisionTransformer

if TYPE_CHECKING:
    from torch import nn

    from clip.layers import Transformer
    from clip.vision import ModifiedResNet

__all__ = ["FeatureMethods", "TextTokens", "attention_heatmap"]


class TextTokens(NamedTuple):
    """Per-token text features and the end-of-text position of each row."""

    tokens: Tensor
    """[B, L, D] after ``ln_final`` (or [B, L, E] projected)."""
    eot: Tensor
    """[B] int64: index of each row's end-of-text token (its largest id)."""


class FeatureMethods:
    """What each tower computes on the way to its embedding: every token, chosen blocks'
    outputs, and per-head attention weights (a mixin of :class:`clip.model.CLIP`).

    The host class provides the towers (``visual``, ``transformer``, ``text_projection``), the
    compute ``dtype``, and the core steps these methods share with ``encode_image`` and
    ``encode_text``: input checks, the text embedding and the text tower up to ``ln_final``.
    """

    if TYPE_CHECKING:
        visual: Union[ModifiedResNet, VisionTransformer]
        transformer: Transformer
        text_projection: nn.Parameter

        @property
        def dtype(self) -> torch.dtype: ...

        def _check_image(self, image: Tensor) -> None: ...

        def _check_text(self, text: Tensor) -> Tensor: ...

        def _embed_text(self, text: Tensor) -> Tensor: ...

        def _text_tokens(self, text: Tensor, trim: bool) -> TextTokens: ...

    # ---- image ------------------------------------------------------------------------------

    def encode_image_tokens(self, image: Tensor, *, project: bool = False) -> Tensor:
        """Every token of the image tower, on the path ``encode_image`` pools from.

        ViT: all tokens after ``ln_post`` [B, 1+G*G, D] (class token first, then the G x G
        patches row by row); with ``project=True`` multiplied by ``visual.proj`` → [B, 1+G*G, E],
        whose token 0 is ``encode_image(image)``. Nothing is L2-normalised.

        ResNet: the sequence the attention pool attends over [B, 1+h*w, C] (the feature map's
        mean token, then the h x h spatial features row by row, positional embedding added; no
        normalisation); with ``project=True`` the attention pool run with every token as a query
        (then ``c_proj``) → [B, 1+h*w, E], whose token 0 is ``encode_image(image)``. The feature
        map itself is ``model.visual.forward_features(image)``.

        Args:
            image: [B, 3, R, R], as for ``encode_image``.
            project: map the tokens into the joint embedding space.

        Returns:
            Tokens [B, 1+G*G, D or E] (G = R / patch for ViTs, R / 32 for ResNets).
        """
        self._check_image(image)
        image = image.to(self.dtype)
        visual = self.visual
        if isinstance(visual, VisionTransformer):
            tokens = visual.forward_features(image)
            return visual.project(tokens) if project else tokens
        features = visual.forward_features(image)
        return (
            visual.attnpool.forward_tokens(features)
            if project
            else visual.attnpool.tokens(features)
        )

    def encode_image_layers(
        self, image: Tensor, layers: Optional[Sequence[int]] = None
    ) -> list[Tensor]:
        """Outputs of chosen blocks of the image tower (nothing after the last one is run).

        ViT: transformer blocks (``visual.transformer.resblocks``), each output [B, 1+G*G, D],
        before ``ln_post``. ResNet: the four stages ``layer1``..``layer4`` (indices 0..3), each
        a feature map [B, C_i, h_i, w_i].

        Args:
            image: [B, 3, R, R], as for ``encode_image``.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One tensor per index, in the order asked.

        Raises:
            ValueError: if an index is out of range (the message gives the valid range).
        """
        self._check_image(image)
        return self.visual.forward_layers(image.to(self.dtype), layers)

    def image_attention(
        self, image: Tensor, layers: Optional[Sequence[int]] = None
    ) -> list[Tensor]:
        """Per-head attention weights of the image tower, computed only when called.

        ViT: each chosen block's softmax(QK^T / sqrt(d)) [B, H, T, T], T = 1+G*G, token 0 the
        class token. ResNet: the attention pool is the only layer (``layers`` 0 or -1); its
        weights with every token as a query [B, H, T, T], T = 1+h*w, row 0 the pooling query.
        Weights are float32 and each row sums to 1. Turn them into a heat map with
        :func:`attention_heatmap`.

        Args:
            image: [B, 3, R, R], as for ``encode_image``.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One [B, H, T, T] tensor per index, in the order asked.

        Raises:
            ValueError: if an index is out of range.
        """
        self._check_image(image)
        return self.visual.attention_maps(image.to(self.dtype), layers)

    # ---- text -------------------------------------------------------------------------------

    def encode_text_tokens(self, text: Tensor, *, project: bool = False) -> TextTokens:
        """Every token of the text tower, on the path ``encode_text`` pools from.

        Runs all L columns given (no trimming), so every position has a feature; positions after
        a row's end-of-text token see only that row's padding and the tokens before it.

        Args:
            text: [B, L] token ids, as for ``encode_text``.
            project: multiply by ``text_projection`` → [B, L, E]; then
                ``tokens[arange(B), eot]`` is ``encode_text(text)``. Nothing is L2-normalised.

        Returns:
            ``TextTokens(tokens, eot)``: features after ``ln_final`` [B, L, D] (or [B, L, E]),
            and the end-of-text position of each row [B] (the argmax of the ids), the token
            ``encode_text`` pools.
        """
        text = self._check_text(text)
        tokens, eot = self._text_tokens(text, trim=False)
        return TextTokens(tokens @ self.text_projection if project else tokens, eot)

    def encode_text_layers(
        self, text: Tensor, layers: Optional[Sequence[int]] = None
    ) -> list[Tensor]:
        """Outputs of chosen text transformer blocks, each [B, L, D] (before ``ln_final``).

        Args:
            text: [B, L] token ids, as for ``encode_text``.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One [B, L, D] tensor per index, in the order asked.

        Raises:
            ValueError: if an index is out of range.
        """
        text = self._check_text(text)
        x = self._embed_text(text).transpose(0, 1)  # [L, B, D]
        return [y.transpose(0, 1) for y in self.transformer.forward_layers(x, layers)]

    def text_attention(self, text: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Per-head causal attention weights of chosen text blocks, computed only when called.

        Args:
            text: [B, L] token ids, as for ``encode_text``.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One [B, H, L, L] float32 tensor per index; rows sum to 1, zero above the diagonal.

        Raises:
            ValueError: if an index is out of range.
        """
        text = self._check_text(text)
        x = self._embed_text(text).transpose(0, 1)  # [L, B, D]
        return self.transformer.attention_maps(x, layers)


def attention_heatmap(attentions: Sequence[Tensor], size: Optional[int] = None) -> Tensor:
    """Class-token attention over the image grid, averaged over layers and heads.

    Args:
        attentions: weights from ``model.image_attention``, each [B, H, 1+G*G, 1+G*G];
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
