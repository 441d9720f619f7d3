"""Embed collections too big for one process: on a Ray cluster, or as torchrun-style ranks.

:func:`embed_dataset` cuts the inputs into shards (:mod:`clip.shards`), skips those already
written, and embeds the rest with the same decode, preprocess and ``encode_image`` code as
:func:`clip.pipeline.embed_images`, so for the same images and batches the numbers are the
same. Two engines, one entry point:

* ``ray=True`` (or a cluster address): a Ray Data job. Each pending shard is read and decoded by
  a CPU task that streams chunks of ``batch_size`` images; an actor pool (one model per actor,
  one GPU each when the cluster has GPUs, CPU actors otherwise) embeds them; this process joins
  the chunks of each shard and writes its file. A task whose worker dies is rerun and a dead
  actor restarted by Ray; chunks that arrive twice are kept once.
* ``ray=False``: this process handles the shards ``i`` with ``i % world_size == rank``, with
  ``rank`` and ``world_size`` from ``torchrun``'s ``RANK`` / ``WORLD_SIZE`` (one rank if unset)
  and the GPU from ``LOCAL_RANK``; decoding runs in DataLoader workers.

The engines are :mod:`clip.distributed_ranks` and :mod:`clip.distributed_ray`; what they share
is in :mod:`clip.distributed_job`. Ray is an optional extra: ``pip install 'clip-torch[ray]'``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from clip.data.discover import PathLike, as_list
from clip.data.embed import default_device
from clip.data.plan import use_plan
from clip.data.resume import model_digest, pending, precision_of, retry_shard, weights_digest
from clip.distributed_job import ModelSpec, Transform, load_model, make_job
from clip.distributed_ranks import run_ranks
from clip.distributed_ray import RayOptions, run_ray
from clip.download import MODELS
from clip.registry import is_registered

__all__ = ["JobSummary", "embed_dataset"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class JobSummary:
    """What :func:`embed_dataset` did.

    Attributes:
        shards: shards this process was responsible for (all of them with Ray).
        written: names of the shards written by this run.
        skipped: names of the shards already finished by an earlier run.
        embedded: images embedded by this run.
        failed: images that could not be read or decoded (listed in each shard's stats file).
        seconds: wall time of the run.
        rank, world_size: this process's share: shards ``rank::world_size`` (0, 1 with Ray).
        retried: with ``retry_failed``, the finished shards whose failed rows were rerun.
    """

    shards: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    embedded: int = 0
    failed: int = 0
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    retried: list[str] = field(default_factory=list)


def embed_dataset(
    inputs: Union[PathLike, Iterable[PathLike]],
    out_dir: PathLike,
    *,
    model: ModelSpec = "ViT-B/32",
    ray: Union[bool, str] = False,
    batch_size: int = 64,
    shard_size: int = 10_000,
    dtype: Union[str, torch.dtype] = torch.float32,
    precision: Optional[Union[str, torch.dtype]] = None,
    column: Optional[str] = None,
    preprocess: Optional[Transform] = None,
    fast_decode: bool = False,
    actors: Optional[int] = None,
    workers: Optional[int] = None,
    device: Optional[str] = None,
    download_root: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    retry_failed: bool = False,
    plan_wait_s: float = 600.0,
    progress: bool = False,
    verbose: bool = False,
) -> JobSummary:
    """Embed images into one Parquet file per input shard under ``out_dir``, resumably.

    Each shard gives ``<name>.parquet`` (``id``: the image's absolute path, URL, Parquet value or
    tar key; ``embedding``: L2-normalised, ``dtype``) and ``<name>.stats.json`` (counts,
    failures, the settings). The first run records the plan in ``plan.json``; a rerun skips the
    shards already written with the same plan, model and precisions, and refuses other ones.

    Args:
        inputs: image files, folders, globs, file lists (``.txt``), Parquet files with a
            path/URL column, webdataset-style ``.tar`` files (see :mod:`clip.data.plan`); a
            single ``str`` or ``Path`` is one input.
        out_dir: output folder, on a file system this process can write.
        model: anything :func:`clip.load` takes (a name from :func:`clip.available_models`, a
            checkpoint file, a model folder...), or a picklable zero-argument callable returning
            a model (called once per actor or rank). Images are preprocessed as the model's
            config says (mean, std, resize mode).
        ray: False for ranks (see the module docstring); True to run on Ray (connecting to
            ``RAY_ADDRESS`` or the running cluster, else starting a local one); or a cluster
            address such as ``"ray://head:10001"``.
        batch_size: images per forward pass; shards are decoded in chunks of this size.
        shard_size: images (or Parquet rows) per shard for files, lists and Parquet inputs.
        dtype: ``float32`` or ``float16`` for the stored embeddings.
        precision: the dtype the model computes in (``float32``, ``float16``, ``bfloat16``).
            Default: ``float16`` for ranks on CUDA (as :func:`clip.load`), else ``float32``
            (Ray jobs too). Recorded; a rerun in another precision is refused. Not for a
            callable ``model`` (its own dtype is recorded).
        column: the Parquet column of paths or URLs (default ``path``, else ``url``).
        preprocess: PIL image → tensor; default the model's own preprocessing.
        fast_decode: decode large JPEGs reduced (faster; not bit-exact, see
            :func:`clip.pipeline.embed_images`).
        actors: Ray only: model replicas (default: one per GPU, or one on a CPU-only cluster).
            More than the cluster can place is refused up front instead of waiting forever.
        workers: ranks only: DataLoader processes decoding shards (default 2; 0: in this
            process).
        device: where the model runs. Ranks: any device (default ``cuda:LOCAL_RANK`` if CUDA,
            else cpu). Ray: ``"cuda"`` (one GPU per actor), ``"cpu"``, or None for GPUs when
            the cluster has any.
        download_root: where named models are downloaded (see :func:`clip.load`).
        rank, world_size: ranks only: override ``RANK`` / ``WORLD_SIZE``.
        retry_failed: also rerun the failed rows of finished shards, merging those that now
            succeed into the shard's output.
        plan_wait_s: ranks other than 0: how long to wait for rank 0's ``plan.json``.
        progress: show a tqdm bar of shards and images done, with rate and ETA (stderr).
        verbose: Ray only: let Ray print its own logs and progress bars (default: errors
            only; Ray's log files keep everything).

    Returns:
        A :class:`JobSummary`.

    Raises:
        ValueError: on bad sizes, an unknown dtype, a rank outside the world, an option the
            chosen engine does not use (``actors``/``verbose`` without Ray; ``workers``,
            ``rank``, ``world_size`` with Ray), more actors than the Ray cluster can place,
            inputs that cannot be read, or an output folder holding another plan, model or
            precision.
        ImportError: for ``ray`` without the ``ray`` extra installed.
    """
    start = time.perf_counter()
    _refuse_unused(ray, actors, workers, device, rank, world_size, verbose)
    spec = _absolute(model)  # Ray workers may run in another directory
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    dtype = _dtype(dtype, _DTYPES, "dtype")
    inputs, out_dir = as_list(inputs), os.fspath(out_dir)
    rank, world_size = (0, 1) if ray is not False else _rank_and_world(rank, world_size)
    local_device = device or default_device()  # ranks only; Ray actors choose by `device`
    digest, compute, loaded = _identity(spec, precision, ray, local_device, download_root)
    meta = {
        "model": _model_name(model),
        "model_digest": digest,
        "precision": str(compute).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "decode": "custom" if preprocess else "fast" if fast_decode else "exact",
    }
    checked = {k: v for k, v in meta.items() if k != "model"}
    planned = use_plan(out_dir, inputs, shard_size, column, checked, rank, plan_wait_s)
    mine = planned[rank::world_size]
    todo, done = pending(out_dir, mine, checked)
    skipped = [s.name for s in mine if s.name in done]
    summary = JobSummary(len(mine), skipped=skipped, rank=rank, world_size=world_size)
    if retry_failed:
        by_name = {s.name: s for s in mine}
        retry = [retry_shard(by_name[n], stats) for n, stats in done.items() if stats["failed"]]
        todo += [s for s in retry if s is not None]
        summary.retried = [s.name for s in retry if s is not None]
    settings = (out_dir, spec, download_root, meta, dtype, preprocess, batch_size, fast_decode)
    if todo and ray is not False:
        local = loaded or load_model(spec, "cpu", download_root, torch.float32)  # R and D
        job = make_job(*settings, local, compute)
        run_ray(job, todo, ray, RayOptions(actors, device, progress, verbose), summary)
    elif todo:
        local = loaded or load_model(spec, local_device, download_root, compute)
        job = make_job(*settings, local, compute)
        workers = 2 if workers is None else workers
        run_ranks(job, todo, local, local_device, workers, summary, progress)
    summary.seconds = time.perf_counter() - start
    return summary


def _identity(
    spec: ModelSpec,
    precision: Optional[Union[str, torch.dtype]],
    ray: Union[bool, str],
    device: str,
    download_root: Optional[str],
) -> tuple[str, torch.dtype, Optional[nn.Module]]:
    """(model digest, compute dtype, the model if it had to be loaded to tell them)."""
    if callable(spec) and not isinstance(spec, (str, os.PathLike)):
        if precision is not None:
            raise ValueError("precision= is for named or file models; a callable sets its own")
        loaded = load_model(spec, "cpu" if ray is not False else device, download_root)
        return (
            weights_digest(loaded),
            _dtype(precision_of(loaded), _PRECISIONS, "precision"),
            loaded,
        )
    if precision is not None:
        compute = _dtype(precision, _PRECISIONS, "precision")
    else:
        on_cuda = ray is False and torch.device(device).type == "cuda"
        compute = torch.float16 if on_cuda else torch.float32
    digest = model_digest(spec)
    if digest is None:  # a model folder or a hub name: only its weights can tell
        loaded = load_model(spec, device if ray is False else "cpu", download_root, compute)
        return weights_digest(loaded), compute, loaded
    return digest, compute, None


def _absolute(spec: ModelSpec) -> ModelSpec:
    """A relative path to a local checkpoint file or model folder made absolute; other specs
    (names, ``hf-hub:`` repositories, callables) as they are."""
    if callable(spec) or (isinstance(spec, str) and (spec in MODELS or is_registered(spec))):
        return spec
    path = os.path.expanduser(os.fspath(spec))
    return os.path.abspath(path) if os.path.exists(path) else spec


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def _dtype(
    value: Union[str, torch.dtype], allowed: dict[str, torch.dtype], what: str
) -> torch.dtype:
    chosen = allowed.get(value) if isinstance(value, str) else value
    if chosen not in allowed.values():
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    assert isinstance(chosen, torch.dtype)
    return chosen


def _model_name(spec: ModelSpec) -> str:
    if callable(spec) and not isinstance(spec, (str, os.PathLike)):
        return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"
    return os.fspath(spec)


def _refuse_unused(
    ray: Union[bool, str],
    actors: Optional[int],
    workers: Optional[int],
    device: Optional[str],
    rank: Optional[int],
    world_size: Optional[int],
    verbose: bool,
) -> None:
    """Refuse the options the chosen engine would silently ignore."""
    if ray is False:
        for name, given in (("actors", actors is not None), ("verbose", verbose)):
            if given:
                raise ValueError(
                    f"{name}= is an option of the Ray engine, and this job runs without Ray "
                    "(torchrun ranks): pass ray=True or drop it"
                )
        return
    for name, value in (("workers", workers), ("rank", rank), ("world_size", world_size)):
        if value is not None:
            raise ValueError(
                f"{name}= is an option of torchrun ranks; the Ray engine does not use it (Ray "
                "tasks decode and Ray spreads the shards): drop it, or run without ray="
            )
    if device not in (None, "cpu", "cuda"):
        raise ValueError(
            f"on Ray, device must be 'cuda' (a GPU per actor, chosen by Ray), 'cpu' or None, "
            f"got {device!r}"
        )
