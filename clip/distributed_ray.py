"""The Ray engine of :func:`clip.distributed.embed_dataset`: a Ray Data job.

Each pending shard is read and decoded by a CPU task that streams chunks of ``batch_size``
images; an actor pool (one model per actor, one GPU each when the cluster has GPUs, CPU actors
otherwise) embeds them; this process joins the chunks of each shard and writes its file. Ray
pickles the task and actor classes below by their module path, so they stay at module level.

Ray is an optional extra (``pip install 'clip-torch[ray]'``), imported only when a job runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from tqdm import tqdm

from clip import shards
from clip.data import fs
from clip.data.embed import encode_images
from clip.data.write import raw_bytes
from clip.distributed_job import Job, ModelSpec, finish_shard, load_model
from clip.shards import Shard, ShardAssembler

if TYPE_CHECKING:
    from clip.distributed import JobSummary

__all__ = ["RayOptions", "actor_plan", "run_ray"]


@dataclass(frozen=True)
class RayOptions:
    """What the Ray engine takes beyond the job: actors, their device, and what to show.

    Attributes:
        actors: model replicas (None: one per GPU, or one on a CPU-only cluster).
        device: ``"cuda"``, ``"cpu"``, or None for GPUs when the cluster has any.
        progress: show a tqdm bar of shards and images done (stderr).
        verbose: let Ray print its own logs and progress bars.
    """

    actors: Optional[int]
    device: Optional[str]
    progress: bool
    verbose: bool


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

    def __init__(self, job: Job) -> None:
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
        self.model = load_model(spec, self.device, download_root, precision)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        shape = json.loads(str(batch["shape"][0]))
        blob = bytearray(batch["pixels"][0])
        dtype = getattr(torch, str(batch["dtype"][0]))  # uint8 by default, float32 if custom
        pixels = torch.frombuffer(blob, dtype=dtype) if blob else torch.empty(0, dtype=dtype)
        embeddings = encode_images(self.model, pixels.reshape(shape), self.device).contiguous()
        out = {k: batch[k] for k in ("shard", "number", "last", "ids", "failed")}
        out["embedding"] = np.array([raw_bytes(embeddings)], dtype=object)
        return out


def _chunk_bytes(job: Job) -> int:
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


def actor_plan(
    ray: Any, actors: Optional[int], device: Optional[str] = None
) -> tuple[int, dict[str, float], int]:
    """(actors, their resources, torch threads each): a GPU each, or a share of the CPUs.

    Args:
        ray: the ``ray`` module, connected to the cluster.
        actors: the actors asked for (None: one per GPU, or one on a CPU-only cluster).
        device: ``"cuda"``, ``"cpu"``, or None for GPUs when the cluster has any.

    Returns:
        The number of actors, the resources each asks Ray for, and its torch threads.

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


def run_ray(
    job: Job,
    todo: list[Shard],
    address: Union[bool, str],
    options: RayOptions,
    summary: JobSummary,
) -> None:
    """Embed the ``todo`` shards on Ray and write them, counting in ``summary``.

    Args:
        job: the job's settings.
        todo: the pending shards.
        address: True for ``RAY_ADDRESS`` or the running cluster (else a local one), or a
            cluster address.
        options: actors, their device, and what to show.
        summary: the counts to update.
    """
    ray = _import_ray()
    started = _connect(ray, address, options.verbose)
    try:
        n, resources, threads = actor_plan(ray, options.actors, options.device)
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
    job: Job,
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
            finish_shard(job, done, by_name, summary)
            images += len(ids)
            if progress:
                rate = images / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{images} images, {rate:.1f} img/s", refresh=False)
                bar.update(done is not None)
    if assembler.open_shards:
        raise RuntimeError(f"the job ended with shards incomplete: {assembler.open_shards}")
