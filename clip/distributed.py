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

Ray is an optional extra: ``pip install 'clip-torch[ray]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from clip import shards
from clip.data import fs
from clip.data.discover import PathLike, as_list
from clip.data.embed import default_device, embedding_width, encode_images, input_resolution
from clip.data.plan import use_plan
from clip.data.resume import model_digest, pending, precision_of, retry_shard, weights_digest
from clip.data.write import raw_bytes
from clip.preprocess import transform_uint8
from clip.shards import Chunk, Shard, ShardAssembler

__all__ = ["JobSummary", "embed_dataset"]

ModelSpec = Union[str, "os.PathLike[str]", Callable[[], nn.Module]]
Transform = Callable[[Any], torch.Tensor]

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


@dataclass(frozen=True)
class _Job:
    """The settings every shard of a job shares."""

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
        model: a name from :func:`clip.available_models`, a checkpoint file, or a picklable
            zero-argument callable returning a model (called once per actor or rank).
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
        preprocess: PIL image → tensor; default the model's standard transform.
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
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    dtype = _dtype(dtype, _DTYPES, "dtype")
    inputs, out_dir = as_list(inputs), os.fspath(out_dir)
    rank, world_size = (0, 1) if ray is not False else _rank_and_world(rank, world_size)
    local_device = device or default_device()  # ranks only; Ray actors choose by `device`
    digest, compute, loaded = _identity(model, precision, ray, local_device, download_root)
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
    settings = (out_dir, model, download_root, meta, dtype, preprocess, batch_size, fast_decode)
    if todo and ray is not False:
        local = loaded or _load_model(model, "cpu", download_root, torch.float32)  # R and D
        job = _job(*settings, local, compute)
        _run_ray(job, todo, ray, _RayOptions(actors, device, progress, verbose), summary)
    elif todo:
        local = loaded or _load_model(model, local_device, download_root, compute)
        job = _job(*settings, local, compute)
        workers = 2 if workers is None else workers
        _run_local(job, todo, local, local_device, workers, summary, progress)
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
        loaded = _load_model(spec, "cpu" if ray is not False else device, download_root)
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
        loaded = _load_model(spec, device if ray is False else "cpu", download_root, compute)
        return weights_digest(loaded), compute, loaded
    return digest, compute, None


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def _load_model(
    spec: ModelSpec,
    device: str,
    download_root: Optional[str] = None,
    precision: Optional[torch.dtype] = None,
) -> nn.Module:
    """The model of ``spec`` on ``device``, in eval mode, computing in ``precision``."""
    if callable(spec) and not isinstance(spec, (str, os.PathLike)):
        return spec().to(device).eval()
    from clip.clip import load

    model, _ = load(spec, device=device, download_root=download_root, dtype=precision)
    return model.eval()


def _dtype(
    value: Union[str, torch.dtype], allowed: dict[str, torch.dtype], what: str
) -> torch.dtype:
    chosen = allowed.get(value) if isinstance(value, str) else value
    if chosen not in allowed.values():
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    assert isinstance(chosen, torch.dtype)
    return chosen


def _job(
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
) -> _Job:
    """The settings every shard shares; ``model`` tells the input resolution and width."""
    resolution = input_resolution(model)
    return _Job(
        out_dir,
        spec,
        download_root,
        meta,
        dtype,
        preprocess or transform_uint8(resolution),  # normalised by encode_images
        batch_size,
        resolution if fast_decode else None,
        resolution,
        embedding_width(model),
        precision,
    )


def _model_name(spec: ModelSpec) -> str:
    if callable(spec) and not isinstance(spec, (str, os.PathLike)):
        return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"
    return os.fspath(spec)


_embed = encode_images  # the one embed step, also run by the Ray actors


def _finish(
    job: _Job, done: Optional[shards.FinishedShard], by_name: dict[str, Shard], summary: JobSummary
) -> None:
    """Write a whole shard (or merge the rerun of its failed rows) and count it."""
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


# ---- ranks (no Ray) -------------------------------------------------------------------------


class _ShardStream(IterableDataset):
    """Chunks of the given shards; DataLoader worker ``w`` of ``W`` decodes shards ``w::W``."""

    def __init__(self, todo: list[Shard], job: _Job) -> None:
        self.todo, self.job = todo, job

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        mine = self.todo if info is None else self.todo[info.id :: info.num_workers]
        for shard in mine:
            yield from shards.iter_chunks(
                shard, self.job.preprocess, self.job.batch_size, self.job.draft_px
            )


def _run_local(
    job: _Job,
    todo: list[Shard],
    model: nn.Module,
    device: str,
    workers: int,
    summary: JobSummary,
    progress: bool,
) -> None:
    loader = DataLoader(
        _ShardStream(todo, job),
        batch_size=None,
        num_workers=min(workers, len(todo)),
        pin_memory=torch.device(device).type == "cuda",
    )
    assembler = ShardAssembler(job.width)
    by_name = {s.name: s for s in todo}
    with tqdm(total=len(todo), unit="shard", disable=not progress) as bar:
        for chunk in loader:
            embeddings = _embed(model, chunk.pixels, device)
            done = assembler.add(
                chunk.shard, chunk.number, chunk.last, chunk.ids, embeddings, chunk.failed
            )
            _finish(job, done, by_name, summary)
            bar.update(done is not None)


# ---- Ray ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RayOptions:
    """What the Ray engine takes beyond the job: actors, their device, and what to show."""

    actors: Optional[int]
    device: Optional[str]
    progress: bool
    verbose: bool


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


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(
            "running on Ray needs the ray extra: pip install 'clip-torch[ray]'"
        ) from e
    return ray


class _DecodeShards:
    """Ray Data task: a batch of one shard row → a stream of decoded chunks (bytes + shape)."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.policy = fs.default_policy()  # the driver's URL retry policy, for the workers

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import numpy as np

        fs.set_default_policy(self.policy)
        for text in batch["shard"]:
            shard = Shard.from_json(str(text))
            for c in shards.iter_chunks(
                shard, self.job.preprocess, self.job.batch_size, self.job.draft_px
            ):
                pixels = c.pixels.contiguous()
                yield {
                    "shard": np.array([c.shard]),
                    "number": np.array([c.number]),
                    "last": np.array([c.last]),
                    "ids": np.array([json.dumps(c.ids)]),
                    "failed": np.array([json.dumps(c.failed)]),
                    "shape": np.array([json.dumps(list(pixels.shape))]),
                    "dtype": np.array([str(pixels.dtype).removeprefix("torch.")]),
                    "pixels": np.array([raw_bytes(pixels)], dtype=object),
                }


class _EmbedActor:
    """Ray Data actor: one model; decoded chunks → embedded chunks (float32 bytes)."""

    def __init__(
        self,
        spec: ModelSpec,
        download_root: Optional[str],
        threads: int,
        gpu: bool,
        precision: Optional[torch.dtype] = None,
    ) -> None:
        if not gpu:
            torch.set_num_threads(threads)
        self.device = "cuda" if gpu else "cpu"
        self.model = _load_model(spec, self.device, download_root, precision)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        shape = json.loads(str(batch["shape"][0]))
        blob = bytearray(batch["pixels"][0])
        dtype = getattr(torch, str(batch["dtype"][0]))  # uint8 by default, float32 if custom
        pixels = torch.frombuffer(blob, dtype=dtype) if blob else torch.empty(0, dtype=dtype)
        embeddings = _embed(self.model, pixels.reshape(shape), self.device).contiguous()
        out = {k: batch[k] for k in ("shard", "number", "last", "ids", "failed")}
        out["embedding"] = np.array([raw_bytes(embeddings)], dtype=object)
        return out


def _chunk_bytes(job: _Job) -> int:
    """Memory a decode task holds: a worker with torch loaded, a few chunks of pixels."""
    return 768 * 2**20 + 4 * job.batch_size * 3 * job.resolution**2 * 4


def _connect(ray: Any, address: Union[bool, str], verbose: bool) -> bool:
    """Join a cluster (or start a local one); True if this call started Ray.

    Unless ``verbose``, Ray's Python loggers show only errors and workers' output stays in
    Ray's log files. (Ray's C++ core still prints one ``E … core_worker.cc`` line per actor
    it starts, about constructor arguments in the object store, ray-project/ray#53727: harmless
    here, as the arguments live as long as the job.)
    """
    if ray.is_initialized():
        return False
    ray.init(
        address=address if isinstance(address, str) and address else None,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "ERROR",
    )
    return True


@contextlib.contextmanager
def _ray_data_output(ray: Any, verbose: bool) -> Iterator[None]:
    """Unless ``verbose``: no Ray Data progress bars, INFO lines or warnings on the terminal
    while the job runs (its warnings are about its own progress bars and scheduling, which this
    job reports itself). Ray Data's log file keeps everything."""
    if verbose:
        yield
        return
    context = ray.data.DataContext.get_current()
    names = [n for n in ("enable_progress_bars", "print_on_execution_start") if hasattr(context, n)]
    saved = {n: getattr(context, n) for n in names}
    consoles = [
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    levels = [h.level for h in consoles]
    for n in names:
        setattr(context, n, False)
    for h in consoles:
        h.setLevel(max(h.level, logging.ERROR))
    try:
        yield
    finally:
        for h, level in zip(consoles, levels):
            h.setLevel(level)
        for n, value in saved.items():
            setattr(context, n, value)


def _actor_plan(
    ray: Any, actors: Optional[int], device: Optional[str] = None
) -> tuple[int, dict[str, float], int]:
    """(actors, their resources, torch threads each): a GPU each, or a share of the CPUs.

    Raises:
        ValueError: when the cluster cannot place the actors asked for (Ray would wait for
            them forever), or ``device="cuda"`` on a cluster without GPUs.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    if device == "cuda" or (device is None and gpus):
        n = actors or max(gpus, 1)
        if n > gpus:
            raise ValueError(
                f"asked for {n} GPU actors but the Ray cluster has {gpus} GPUs "
                f"({gpus} GPU, {cpus:g} CPU): ask for at most {gpus} actors"
                + (", or device='cpu'" if not gpus else "")
            )
        return n, {"num_gpus": 1, "num_cpus": 1}, 1
    n = actors or 1
    share = max(0.25, (cpus - 1) / n)  # leave one CPU to the decode tasks
    if n * share + 1 > cpus:
        most = max(0, int(4 * (cpus - 1)))
        raise ValueError(
            f"asked for {n} CPU actors but the Ray cluster has {cpus:g} CPUs: each actor needs "
            f"at least 0.25 CPU and decoding 1, so it can place at most {most}"
        )
    return n, {"num_cpus": share}, max(1, int(share))


def _run_ray(
    job: _Job,
    todo: list[Shard],
    address: Union[bool, str],
    options: _RayOptions,
    summary: JobSummary,
) -> None:
    ray = _import_ray()
    started = _connect(ray, address, options.verbose)
    try:
        n, resources, threads = _actor_plan(ray, options.actors, options.device)
        gpu = "num_gpus" in resources
        with _ray_data_output(ray, options.verbose):
            rows = [{"shard": s.to_json()} for s in todo]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            # Decode tasks reserve memory for the chunks they hold; as the actors ask for other
            # resources, Ray Data does not fuse the two, so decoding stays in its own CPU tasks.
            ds = ds.map_batches(
                _DecodeShards(job), batch_size=1, num_cpus=1, memory=_chunk_bytes(job)
            )
            ds = ds.map_batches(
                _EmbedActor,
                fn_constructor_args=(job.model, job.download_root, threads, gpu, job.precision),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=n),
                **resources,
            )
            _collect(job, ds.iter_rows(), todo, summary, options.progress)
    finally:
        if started:
            ray.shutdown()


def _collect(
    job: _Job,
    rows: Any,
    todo: list[Shard],
    summary: JobSummary,
    progress: bool,
) -> None:
    """Join streamed chunk rows into shards and write each one as it completes.

    With ``progress``, one tqdm bar on stderr: shards done of those to do (with ETA), and the
    images embedded so far with their rate.
    """
    assembler = ShardAssembler(job.width)
    by_name = {s.name: s for s in todo}
    start, images = time.perf_counter(), 0
    with tqdm(total=len(todo), unit="shard", desc="embedding", disable=not progress) as bar:
        for row in rows:
            blob = bytearray(row["embedding"])
            flat = torch.frombuffer(blob, dtype=torch.float32) if blob else torch.empty(0)
            ids = json.loads(row["ids"])
            failed = [tuple(f) for f in json.loads(row["failed"])]
            done = assembler.add(
                str(row["shard"]), int(row["number"]), bool(row["last"]), ids, flat, failed
            )
            _finish(job, done, by_name, summary)
            images += len(ids)
            if progress:
                rate = images / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{images} images, {rate:.1f} img/s", refresh=False)
                bar.update(done is not None)
    if assembler.open_shards:
        raise RuntimeError(f"the job ended with shards incomplete: {assembler.open_shards}")
