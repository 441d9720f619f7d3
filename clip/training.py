"""One fine-tuning step built from the pieces, and the pieces in one namespace.

The pieces live in their own modules and are re-exported here:

- :mod:`clip.loss`: :func:`contrastive_loss` (one process or across ranks),
  :class:`ContrastiveLoss`.
- :mod:`clip.optim`, all of it: :func:`param_groups`, :func:`make_optimizer` (AdamW),
  :func:`cosine_schedule` (:class:`CosineWithWarmup`), :func:`clamp_logit_scale`, and the
  fine-tuning defaults :data:`DEFAULT_LR` (1e-5), :data:`DEFAULT_WARMUP` (500),
  :data:`DEFAULT_WEIGHT_DECAY` (0.1), :data:`BETAS` (0.9, 0.98), :data:`EPS` (1e-6), with the
  literature they come from.
- :mod:`clip.precision`: :func:`prepare_for_training` → :class:`Precision` (fp32 master weights,
  autocast, GradScaler).
- :mod:`clip.freeze`: :func:`lock_image_tower`, :func:`lock_text_tower` (LiT).

A whole loop::

    model, _ = clip.load("ViT-B/32", device="cuda")   # fp16 layout on CUDA: upcast below
    precision = prepare_for_training(model, "bf16")    # before the optimiser
    optimizer = make_optimizer(model, lr=DEFAULT_LR)
    scheduler = cosine_schedule(optimizer, DEFAULT_WARMUP, total_steps=len(loader) * epochs)
    model.train()
    for epoch in range(epochs):
        for images, texts in loader:                   # preprocessed images, clip.tokenize ids
            loss = train_step(model, images, texts, optimizer, precision, scheduler)

Under DDP, wrap :class:`ContrastiveForward` (DDP only synchronises gradients of what runs
through its ``forward``, and ``CLIP.forward`` returns logits, not features)::

    ddp = DistributedDataParallel(ContrastiveForward(model), device_ids=[rank])
    loss = train_step(ddp, images, texts, optimizer, precision, scheduler)  # this rank's share

and the loss gathers every rank's features by itself.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor, nn

from clip import optim
from clip.freeze import lock_image_tower, lock_text_tower
from clip.loss import ContrastiveLoss, contrastive_loss
from clip.optim import (  # noqa: F401 (re-exported: __all__ takes clip.optim's whole)
    BETAS,
    DEFAULT_LR,
    DEFAULT_WARMUP,
    DEFAULT_WEIGHT_DECAY,
    EPS,
    MAX_LOGIT_SCALE,
    CosineWithWarmup,
    clamp_logit_scale,
    cosine_schedule,
    make_optimizer,
    param_groups,
)
from clip.precision import Precision, prepare_for_training

__all__ = [  # every name of clip.optim, then the other pieces and this module's own
    *optim.__all__,
    "ContrastiveForward",
    "ContrastiveLoss",
    "Precision",
    "batch_loss",
    "contrastive_loss",
    "lock_image_tower",
    "lock_text_tower",
    "normalized_features",
    "prepare_for_training",
    "train_step",
]


def normalized_features(
    model: nn.Module, images: Tensor, texts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """A CLIP's inputs to the loss: (image features [B, E], text features [B, E], logit scale
    []), features L2-normalised in fp32, ``logit_scale`` exponentiated.

    Args:
        model: a :class:`clip.model.CLIP`.
        images: preprocessed images [B, 3, R, R].
        texts: token ids [B, L].

    Returns:
        ``(image_features, text_features, model.logit_scale.exp())``.
    """
    clip_model: Any = model
    image_features = clip_model.encode_image(images).float()
    text_features = clip_model.encode_text(texts).float()
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return image_features, text_features, clip_model.logit_scale.exp()


class ContrastiveForward(nn.Module):
    """A CLIP whose ``forward`` is :func:`normalized_features`, for wrapping in DDP.

    Args:
        model: the CLIP model (held as ``self.model``: its state dict keys gain ``model.``;
            save ``wrapper.model``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, texts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """See :func:`normalized_features`."""
        return normalized_features(self.model, images, texts)


def _features(model: nn.Module, images: Tensor, texts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return normalized_features(model, images, texts)
    out = model(images, texts)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(
            f"train_step needs a CLIP model, or a module (DDP(ContrastiveForward(model))) whose "
            f"forward returns (image_features, text_features, logit_scale); "
            f"{type(model).__name__} returned {type(out).__name__}"
        )
    return out


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    raise ValueError(f"{type(model).__name__} has no parameters")


def train_step(
    model: nn.Module,
    images: Tensor,
    texts: Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    scheduler: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
) -> float:
    """One optimiser step of contrastive fine-tuning on a batch of matching pairs.

    Zeroes the gradients; runs the forward pass under ``precision.autocast()`` (image and text
    features, normalised in fp32); :func:`contrastive_loss` with ``logit_scale.exp()``
    (gathered across ranks under ``torch.distributed``); backward through
    ``precision.scaler``; optionally unscales and clips the gradients' global norm; steps the
    optimiser through the scaler (which skips a step whose fp16 gradients overflowed) and
    updates the scale; steps ``scheduler`` if the optimiser stepped; clamps ``logit_scale`` to
    [0, ln 100]; zeroes the gradients again (freeing them).

    It does not change train/eval mode: call ``model.train()`` once before the loop.

    Args:
        model: a :class:`clip.model.CLIP` (after :func:`prepare_for_training`), or under DDP a
            ``DistributedDataParallel(ContrastiveForward(model))``.
        images: preprocessed images [B, 3, R, R]; moved to the model's device.
        texts: token ids [B, L] (``clip.tokenize``), row i describing image i; moved too.
        optimizer: e.g. from :func:`make_optimizer`.
        precision: from :func:`prepare_for_training`.
        scheduler: a learning-rate scheduler stepped once per optimiser step (e.g.
            :func:`cosine_schedule`), or None.
        max_grad_norm: clip the gradients' global L2 norm to this (unscaled) value, or None.

    Returns:
        The batch's loss before the step (under DDP this rank's share: the mean over ranks is
        the global batch's loss).

    Raises:
        FloatingPointError: if the loss is not finite in fp32/bf16 (no loss scaler to skip the
            step); the weights are left untouched.
        TypeError: if ``model`` is neither a CLIP nor returns the loss's inputs.
    """
    device = _device(model)
    images = images.to(device, non_blocking=True)
    texts = texts.to(device, non_blocking=True)
    scaler = precision.scaler
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        image_features, text_features, logit_scale = _features(model, images, texts)
    loss = contrastive_loss(image_features, text_features, logit_scale)
    value = float(loss.detach())
    if not scaler.is_enabled() and not torch.isfinite(loss.detach()):
        raise FloatingPointError(
            f"the loss is {value} at this step (precision {precision.name}); the weights are "
            "untouched. Lower the learning rate, clip gradients (max_grad_norm) or check the "
            "inputs for NaN"
        )
    scaler.scale(loss).backward()
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    stepped = scale_before is None or scaler.get_scale() >= scale_before
    if scheduler is not None and stepped:
        scheduler.step()
    clamp_logit_scale(model)
    optimizer.zero_grad(set_to_none=True)
    return value


def batch_loss(
    model: nn.Module, images: Tensor, texts: Tensor, precision: Optional[Precision] = None
) -> float:
    """The contrastive loss of a batch without gradients (evaluation; one process's batch).

    Args:
        model: a CLIP model.
        images: preprocessed images [B, 3, R, R].
        texts: token ids [B, L], row i describing image i.
        precision: autocast as in training (default: none, the model's own dtype).

    Returns:
        The mean loss over the batch's pairs, as :func:`contrastive_loss` in one process.
    """
    device = _device(model)
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        image_features, text_features, logit_scale = _features(
            model, images.to(device), texts.to(device)
        )
        loss = contrastive_loss(image_features, text_features, logit_scale, gather=False)
    return float(loss)
