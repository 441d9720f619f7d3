"""CLIP's contrastive loss, in one process or across ``torch.distributed`` ranks.

:func:`contrastive_loss` is the symmetric InfoNCE loss of the CLIP paper: for a batch of B matching
(image, text) pairs, the mean of the image→text and text→image cross entropies of the scaled
cosine-similarity logits, the matching pair being the right class. In one process it equals
open_clip's ``ClipLoss()``.

Under an initialised process group of more than one rank, each rank passes its own features. They
are gathered from every rank with :func:`gather_with_grad` (gradients flow back to the rank that
made them) and each rank computes only its own rows against every rank's columns: image rows of
this rank × all texts, text rows × all images. Memory is O(local batch × global batch) per rank,
not O(global batch²). Batches may differ in size between ranks (a short last batch).

The per-rank loss is scaled so that averaging the gradients over ranks, as
``DistributedDataParallel`` does, gives exactly the gradient of the one-process loss on the
concatenated batch, and so that the mean over ranks of the returned values is that loss:

    loss_r = world_size / N · ½ (Σ_{i ∈ rank r} CE(image row i) + Σ_{i ∈ rank r} CE(text row i))

with N the global batch. With equal batches (N = world_size · n) this is the local mean, as in
open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``. Every rank must call the loss,
and its backward, the same number of times (they are collectives).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as dist

__all__ = ["NORM_TOLERANCE", "ContrastiveLoss", "contrastive_loss", "gather_with_grad"]

# Largest |‖f‖ - 1| accepted by the normalisation check: fp16/bf16 features normalised under
# autocast are within ~4e-3 of unit length; features someone forgot to normalise are far off.
NORM_TOLERANCE = 2e-2

LogitScale = Union[Tensor, float]


def _distributed(group: Optional[Any]) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: LogitScale,
    *,
    gather: Optional[bool] = None,
    group: Optional[Any] = None,
    check_normalized: bool = True,
) -> Tensor:
    """CLIP's symmetric contrastive loss: (CE(image→text) + CE(text→image)) / 2.

    Row i of ``image_features`` and row i of ``text_features`` are a matching pair; every other
    row of the other modality (on every rank, when distributed) is a negative. The logits are
    ``logit_scale * image_features @ text_features.T``, computed in fp32 (fp64 for fp64 inputs)
    whatever the input dtype and the autocast state (at a scale of 100, bf16 logits would be off
    by up to 0.5).

    Args:
        image_features: L2-normalised image embeddings [B, E].
        text_features: L2-normalised text embeddings [B, E], same B, E, device.
        logit_scale: the multiplier of the cosine similarities (the temperature's inverse), a
            float or a scalar tensor: ``model.logit_scale.exp()``, not ``model.logit_scale``.
        gather: compute the loss over every rank's batch (see the module docstring). Default:
            when a ``torch.distributed`` process group is initialised with more than one rank.
        group: the process group to gather over (default: the world).
        check_normalized: raise if a row's norm is not 1 (± :data:`NORM_TOLERANCE`). One cheap
            reduction, but it waits for the device; turn it off under ``torch.compile`` or once
            the training loop is known to be right. Non-finite rows are let through (an fp16
            overflow that ``GradScaler`` will skip).

    Returns:
        A scalar fp32 tensor (fp64 for fp64 features). In one process, the mean loss over the B
        pairs. Distributed, this rank's share: the mean over ranks is the loss on the
        concatenated batch, and averaged gradients are its gradients.

    Raises:
        ValueError: on features that are not [B, E] of equal shapes, on one device, not
            normalised; a logit scale that is not a scalar; an empty (global) batch, or an
            embedding size that differs between ranks; ``gather=True`` with no process group.
            Distributed, a problem on one rank raises on every rank.
        TypeError: on features that are not floating point tensors.
    """
    _check_types(image_features, text_features, logit_scale)
    problem = _find_problem(image_features, text_features, logit_scale, check_normalized)
    if gather is None:
        gather = _distributed(group)
    elif gather and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "contrastive_loss(gather=True) needs an initialised torch.distributed process group; "
            "call torch.distributed.init_process_group first, or leave gather=None"
        )
    if not gather:
        if problem:
            raise ValueError(problem)
        sizes = [image_features.shape[0]]
    else:
        # Every rank learns of a problem on any rank, so all raise together instead of the
        # others waiting forever in the gather.
        sizes = _gather_sizes(image_features, group, problem)
    if sum(sizes) == 0:
        raise ValueError("contrastive_loss needs at least one (image, text) pair, got 0")
    device_type = image_features.device.type
    autocast_off = (
        torch.autocast(device_type, enabled=False)
        if torch.is_autocast_enabled(device_type)
        else contextlib.nullcontext()
    )
    with autocast_off:
        images, texts = _at_least_fp32(image_features), _at_least_fp32(text_features)
        scale = _at_least_fp32(logit_scale) if isinstance(logit_scale, Tensor) else logit_scale
        if not gather:
            return _local_loss(images, texts, scale)
        return _gathered_loss(images, texts, scale, sizes, group)


def _at_least_fp32(t: Tensor) -> Tensor:
    """fp16/bf16 → fp32; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_types(image: Tensor, text: Tensor, logit_scale: LogitScale) -> None:
    for name, t in (("image_features", image), ("text_features", text)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    if not isinstance(logit_scale, (Tensor, float, int)) or isinstance(logit_scale, bool):
        raise TypeError(
            f"logit_scale must be a float or a scalar tensor, got {type(logit_scale).__name__}"
        )
    if image.device != text.device:
        raise ValueError(
            f"image_features are on {image.device} and text_features on {text.device}; "
            "move them to one device"
        )


def _find_problem(
    image: Tensor, text: Tensor, logit_scale: LogitScale, check_normalized: bool
) -> Optional[str]:
    """What is wrong with the features' values or shapes (None if nothing)."""
    for name, t in (("image_features", image), ("text_features", text)):
        if t.ndim != 2:
            return (
                f"{name} must be [batch, embed_dim], got shape {tuple(t.shape)}; pass "
                "model.encode_image/encode_text outputs, normalised"
            )
    if image.shape != text.shape:
        return (
            f"image_features {tuple(image.shape)} and text_features {tuple(text.shape)} must "
            "have the same shape: row i of each is the i-th matching (image, text) pair"
        )
    if isinstance(logit_scale, Tensor) and logit_scale.numel() != 1:
        return (
            f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}; "
            "pass model.logit_scale.exp()"
        )
    if check_normalized:
        for name, t in (("image_features", image), ("text_features", text)):
            problem = _norm_problem(t, name)
            if problem:
                return problem
    return None


def _norm_problem(features: Tensor, name: str) -> Optional[str]:
    with torch.no_grad():
        off = (features.float().norm(dim=1) - 1).abs()
        bad = off.isfinite() & (off > NORM_TOLERANCE)
        if not bool(bad.any()):
            return None
        row = int(bad.nonzero()[0, 0])
        return (
            f"{name} row {row} has norm {1 + float(off[row]):.4g}, not 1: the loss takes "
            "L2-normalised features (f = f / f.norm(dim=-1, keepdim=True)); pass "
            "check_normalized=False to skip this check"
        )


def _local_loss(images: Tensor, texts: Tensor, scale: LogitScale) -> Tensor:
    logits = scale * images @ texts.t()  # [B, B]
    labels = torch.arange(images.shape[0], device=images.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _gathered_loss(
    images: Tensor, texts: Tensor, scale: LogitScale, sizes: list[int], group: Optional[Any]
) -> Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    all_images = _GatherWithGrad.apply(images, sizes, group)  # [N, E]
    all_texts = _GatherWithGrad.apply(texts, sizes, group)
    offset = sum(sizes[:rank])
    labels = torch.arange(offset, offset + images.shape[0], device=images.device)
    image_rows = F.cross_entropy(scale * images @ all_texts.t(), labels, reduction="sum")
    text_rows = F.cross_entropy(scale * texts @ all_images.t(), labels, reduction="sum")
    return (image_rows + text_rows) * (world / (2 * sum(sizes)))


def _gather_shapes(
    tensor: Tensor, group: Optional[Any], problem: Optional[str]
) -> list[tuple[int, ...]]:
    """Every rank's shape of ``tensor`` (same ndim on every rank). If ``problem`` is set on any
    rank, every rank raises ValueError (with its own message, or naming the faulty rank)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([int(problem is not None), *tensor.shape], device=tensor.device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    gathered = [tuple(int(v) for v in row.tolist()) for row in rows]
    if problem is not None:
        raise ValueError(problem)
    faulty = [r for r, row in enumerate(gathered) if row[0]]
    if faulty:
        raise ValueError(f"rank(s) {faulty} passed invalid features (see their error)")
    return [row[1:] for row in gathered]


def _gather_sizes(features: Tensor, group: Optional[Any], problem: Optional[str]) -> list[int]:
    """Every rank's batch size; every rank raises alike if a rank's features are invalid or the
    embedding sizes differ."""
    if problem is None and features.ndim != 2:
        problem = f"features must be [batch, embed_dim], got {tuple(features.shape)}"
    if problem is not None:  # a shape of another ndim would not fit the others' gather
        features = features.new_empty(0, 0)
    shapes = _gather_shapes(features, group, problem)
    if len({s[1] for s in shapes}) > 1:
        raise ValueError(
            f"ranks pass features of embedding sizes {[s[1] for s in shapes]}; every rank must "
            "run the same model"
        )
    return [s[0] for s in shapes]


def gather_with_grad(tensor: Tensor, group: Optional[Any] = None) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, with gradients flowing back.

    Ranks may pass different lengths along dim 0 (the other dims must agree). The backward sums
    the gradient of the gathered tensor over ranks and gives each rank its own rows: the
    gradient of the sum of every rank's loss with respect to this rank's input. Every rank must
    call it (and run the backward) together.

    Args:
        tensor: [n_r, ...] on this rank, at least one dimension, the same ndim on every rank.
        group: the process group (default: the world).

    Returns:
        [Σ n_r, ...], rank 0's rows first. In one process (no group, or one rank) ``tensor``.

    Raises:
        ValueError: if the trailing dims differ between ranks, or ``tensor`` is 0-dimensional.
    """
    if tensor.ndim == 0:
        raise ValueError("gather_with_grad needs a tensor of at least one dimension, got a scalar")
    if not _distributed(group):
        return tensor
    shapes = _gather_shapes(tensor, group, None)
    if len({s[1:] for s in shapes}) > 1:
        raise ValueError(
            f"gather_with_grad: ranks pass tensors of shapes {shapes}; only dim 0 may differ"
        )
    return _GatherWithGrad.apply(tensor, [s[0] for s in shapes], group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather (padded to the longest rank, then trimmed) whose backward all-reduces (sums)
    the gathered gradient and returns this rank's slice. Works on gloo and NCCL alike."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], group: Optional[Any]) -> Tensor:
        rank = dist.get_rank(group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


class ContrastiveLoss(nn.Module):
    """:func:`contrastive_loss` as a module, its options fixed at construction.

    Args:
        gather: as for :func:`contrastive_loss` (default: gather when distributed).
        group: the process group to gather over (default: the world).
        check_normalized: as for :func:`contrastive_loss`.

    Example::

        loss_fn = ContrastiveLoss()
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    """

    def __init__(
        self,
        *,
        gather: Optional[bool] = None,
        group: Optional[Any] = None,
        check_normalized: bool = True,
    ) -> None:
        super().__init__()
        self.gather = gather
        self.group = group
        self.check_normalized = check_normalized

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: LogitScale
    ) -> Tensor:
        """See :func:`contrastive_loss`."""
        return contrastive_loss(
            image_features,
            text_features,
            logit_scale,
            gather=self.gather,
            group=self.group,
            check_normalized=self.check_normalized,
        )
