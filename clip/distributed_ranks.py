"""The rank engine of :func:`clip.distributed.embed_dataset`: this process's share of the shards.

Decoding runs in DataLoader workers (worker ``w`` of ``W`` decodes shards ``w::W``); this process
embeds the chunks and writes each shard once all its chunks are embedded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from clip import shards
from clip.data.embed import encode_images
from clip.distributed_job import Job, finish_shard
from clip.shards import Chunk, Shard, ShardAssembler

if TYPE_CHECKING:
    from clip.distributed import JobSummary

__all__ = ["run_ranks"]


class _ShardStream(IterableDataset):
    """Chunks of the given shards; DataLoader worker ``w`` of ``W`` decodes shards ``w::W``."""

    def __init__(self, todo: list[Shard], job: Job) -> None:
        self.todo, self.job = todo, job

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        mine = self.todo if info is None else self.todo[info.id :: info.num_workers]
        for shard in mine:
            yield from shards.iter_chunks(
                shard, self.job.preprocess, self.job.batch_size, self.job.draft_px
            )


def run_ranks(
    job: Job,
    todo: list[Shard],
    model: nn.Module,
    device: str,
    workers: int,
    summary: JobSummary,
    progress: bool,
) -> None:
    """Embed the ``todo`` shards with ``model`` on ``device``, write them, count in ``summary``.

    Args:
        job: the job's settings.
        todo: this rank's pending shards.
        model: the loaded model.
        device: where ``model`` runs.
        workers: DataLoader processes decoding shards (0: in this process).
        summary: the counts to update.
        progress: show a tqdm bar of shards done (stderr).
    """
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
            embeddings = encode_images(model, chunk.pixels, device)
            done = assembler.add(
                chunk.shard, chunk.number, chunk.last, chunk.ids, embeddings, chunk.failed
            )
            finish_shard(job, done, by_name, summary)
            bar.update(done is not None)
