"""What every shard of a :func:`clip.distributed.embed_dataset` job shares, on either engine.

The job's settings (:class:`Job`), loading its model (:func:`load_model`) and writing a shard
once all its chunks are embedded (:func:`finish_shard`); the engines are
:mod:`clip.distributed_ranks` and :mod:`clip.distributed_ray`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import nn

from clip import shards
from clip.data.embed import embedding_width, input_resolution, uint8_transform
from clip.shards import Shard

if TYPE_CHECKING:
    from clip.distributed import JobSummary

__all__ = ["Job", "ModelSpec", "Transform", "finish_shard", "load_model", "make_job"]

ModelSpec = Union[str, "os.PathLike[str]", Callable[[], nn.Module]]
Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class Job:
    """The settings every shard of a job shares (picklable: Ray sends it to its workers).

    Attributes:
        out_dir: the output folder.
        model: the model spec, loaded again by each Ray actor.
        download_root: where named models are downloaded.
        meta: the settings recorded in each shard's stats file.
        dtype: the dtype of the stored embeddings.
        preprocess: PIL image → tensor.
        batch_size: images per chunk and forward pass.
        draft_px: decode JPEGs reduced towards this size (``fast_decode``), else None.
        resolution: the model's input resolution.
        width: the embedding width.
        precision: the dtype the model computes in (None: the model's own).
    """

    out_dir: str
    model: ModelSpec
    download_root: Optional[str]
    meta: dict[str, Any]
    dtype: torch.dtype
    preprocess: Transform
    batch_size: int
    draft_px: Optional[int]
    resolution: int
    width: int
    precision: Optional[torch.dtype] = None


def load_model(
    spec: ModelSpec,
    device: str,
    download_root: Optional[str] = None,
    precision: Optional[torch.dtype] = None,
) -> nn.Module:
    """The model of ``spec`` on ``device``, in eval mode, computing in ``precision``.

    Args:
        spec: a model name, a checkpoint file or model folder, or a zero-argument callable
            returning a model.
        device: where the model goes.
        download_root: where named models are downloaded (see :func:`clip.load`).
        precision: the dtype a named or file model computes in (a callable sets its own).

    Returns:
        The model, in eval mode.
    """
    if callable(spec) and not isinstance(spec, (str, os.PathLike)):
        return spec().to(device).eval()
    from clip.clip import load

    model, _ = load(spec, device=device, download_root=download_root, dtype=precision)
    return model.eval()


def make_job(
    out_dir: str,
    spec: ModelSpec,
    download_root: Optional[str],
    meta: dict[str, Any],
    dtype: torch.dtype,
    preprocess: Optional[Transform],
    batch_size: int,
    fast_decode: bool,
    model: nn.Module,
    precision: Optional[torch.dtype] = None,
) -> Job:
    """The settings every shard shares; ``model`` tells the input resolution and width.

    Args:
        out_dir, spec, download_root, meta, dtype, batch_size: as in :class:`Job`.
        preprocess: PIL image → tensor; None for the model's own preprocessing, to uint8 (its
            config's resize; the actors or ranks normalise with their model's mean and std).
        fast_decode: decode large JPEGs reduced to the model's resolution.
        model: the loaded model.
        precision: the dtype the model computes in.

    Returns:
        The :class:`Job`.
    """
    resolution = input_resolution(model)
    return Job(
        out_dir,
        spec,
        download_root,
        meta,
        dtype,
        preprocess or uint8_transform(model, resolution),  # normalised by encode_images
        batch_size,
        resolution if fast_decode else None,
        resolution,
        embedding_width(model),
        precision,
    )


def finish_shard(
    job: Job, done: Optional[shards.FinishedShard], by_name: dict[str, Shard], summary: JobSummary
) -> None:
    """Write a whole shard (or merge the rerun of its failed rows) and count it in ``summary``.

    Args:
        job: the job's settings.
        done: the shard whose chunks are all embedded, or None (nothing to do yet).
        by_name: the job's pending shards by name.
        summary: the counts to update.
    """
    if done is None:
        return
    shard = by_name[done.name]
    if shard.only:
        shards.merge_shard(job.out_dir, shard, done, job.meta, job.dtype)
    else:
        shards.write_shard(job.out_dir, shard, done, job.meta, job.dtype)
        summary.written.append(done.name)
    summary.embedded += len(done.ids)
    summary.failed += len(done.failed)
