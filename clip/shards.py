"""Sharded embedding jobs: inputs cut into shards, one output file per shard, resumable.

The engine-independent half of :mod:`clip.distributed`, built from :mod:`clip.data`. A
:class:`Shard` (planned by :func:`plan_shards`, see :mod:`clip.data.plan`) is a unit of work with
a stable name; its result is ``OUT/<name>.parquet`` (columns ``id`` and ``embedding``) and
``OUT/<name>.stats.json``. Both are written atomically, stats first; a shard is finished when
its stats match the job and its Parquet footer holds the row count they record, so a rerun
skips finished shards and redoes damaged ones. Unreadable images are counted in the stats and
never stop a shard. Nothing here imports Ray.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch

from clip.data import fs
from clip.data.decode import decode_many, iter_items
from clip.data.discover import SHARD_FILE_EXTENSIONS
from clip.data.plan import Shard, plan_shards
from clip.data.resume import pending, stats_file
from clip.data.write import read_json, read_parquet, write_json, write_parquet

__all__ = [
    "SHARD_FILE_EXTENSIONS",
    "Chunk",
    "FinishedShard",
    "Shard",
    "ShardAssembler",
    "finished",
    "iter_chunks",
    "iter_items",
    "merge_shard",
    "plan_shards",
    "read_shard",
    "write_shard",
]

Transform = Callable[[Any], torch.Tensor]


class Chunk(NamedTuple):
    """Up to ``batch_size`` decoded images of one shard, in shard order."""

    shard: str
    number: int  # 0, 1, ... within the shard
    last: bool  # the shard's final chunk
    ids: list[str]
    pixels: torch.Tensor  # [n, 3, R, R] (uint8 by default), the readable images of this chunk
    failed: list[tuple[str, str]]  # (id, reason)


class FinishedShard(NamedTuple):
    """Every chunk of a shard, embedded and joined in order."""

    name: str
    ids: list[str]
    embeddings: torch.Tensor  # [N, D]
    failed: list[tuple[str, str]]


# ---- reading and decoding -------------------------------------------------------------------


def iter_chunks(
    shard: Shard,
    preprocess: Transform,
    batch_size: int,
    draft_px: Optional[int] = None,
) -> Iterator[Chunk]:
    """Decode ``shard`` into chunks of ``batch_size`` images (the last flagged ``last``).

    A shard that cannot be read at all (a truncated tar) ends early, with the reason listed
    under the shard's own source in ``failed``; it does not raise.
    """
    pending_chunk: Optional[Chunk] = None
    index = 0
    for ids, openers, broken in _batches(shard, batch_size):
        good, pixels, failed = decode_many(ids, openers, preprocess, draft_px)
        chunk = Chunk(shard.name, index, False, good, pixels, failed + broken)
        if pending_chunk is not None:
            yield pending_chunk
        pending_chunk, index = chunk, index + 1
    if pending_chunk is None:
        pending_chunk = Chunk(shard.name, 0, True, [], torch.empty(0), [])
    yield pending_chunk._replace(last=True)


def _batches(shard: Shard, size: int) -> Iterator[tuple[list[str], list, list[tuple[str, str]]]]:
    ids: list[str] = []
    openers: list = []
    try:
        for key, opener in iter_items(shard):
            ids.append(key)
            openers.append(opener)
            if len(ids) == size:
                yield ids, openers, []
                ids, openers = [], []
    except (OSError, tarfile.TarError, ValueError) as e:
        yield ids, openers, [(shard.source or shard.name, f"{type(e).__name__}: {e} (rest unread)")]
        return
    if ids:
        yield ids, openers, []


# ---- assembling and writing -----------------------------------------------------------------


@dataclass
class _Parts:
    chunks: dict[int, tuple[list[str], torch.Tensor, list[tuple[str, str]]]] = field(
        default_factory=dict
    )
    last: Optional[int] = None


class ShardAssembler:
    """Collects embedded chunks, arriving in any order and possibly twice, into whole shards."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._parts: dict[str, _Parts] = {}
        self._done: set[str] = set()  # a late retried chunk must not reopen a written shard

    def add(
        self,
        shard: str,
        index: int,
        last: bool,
        ids: list[str],
        embeddings: torch.Tensor,
        failed: list[tuple[str, str]],
    ) -> Optional[FinishedShard]:
        """Keep one chunk (a retried chunk replaces its copy); return the shard once whole.

        A shard is returned once; chunks arriving for it afterwards are ignored.
        """
        if shard in self._done:
            return None
        parts = self._parts.setdefault(shard, _Parts())
        parts.chunks[index] = (ids, embeddings.reshape(len(ids), self.width), failed)
        if last:
            parts.last = index
        if parts.last is None or len(parts.chunks) != parts.last + 1:
            return None
        del self._parts[shard]
        self._done.add(shard)
        ordered = [parts.chunks[i] for i in range(parts.last + 1)]
        return FinishedShard(
            shard,
            [k for ids_, _, _ in ordered for k in ids_],
            torch.cat([torch.empty(0, self.width), *(e for _, e, _ in ordered)]),
            [f for _, _, failed_ in ordered for f in failed_],
        )

    @property
    def open_shards(self) -> list[str]:
        """Shards with some chunks in, not yet whole."""
        return sorted(self._parts)


def _parquet(out_dir: str, name: str) -> str:
    return fs.join(out_dir, f"{name}.parquet")


def finished(out_dir: str, shard: Shard, meta: dict[str, Any]) -> bool:
    """Whether ``shard``'s output is whole and from the same inputs and settings.

    A missing, 0-byte or corrupt Parquet file, or one whose row count differs from its stats,
    is not finished (the last two with a warning). For many shards use
    :func:`clip.data.resume.pending`, which lists the folder once.

    Raises:
        ValueError: if the output was written from other inputs, another model or another
            dtype (mixing them would silently give inconsistent embeddings).
    """
    return not pending(out_dir, [shard], meta)[0]


def write_shard(
    out_dir: str, shard: Shard, result: FinishedShard, meta: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """Write ``<name>.stats.json`` then ``<name>.parquet``, each atomically; return the stats.

    Args:
        out_dir: the output folder (created if missing).
        shard: the shard.
        result: its embeddings.
        meta: settings recorded in the stats (model digest, precision, dtype) and checked on
            reruns.
        dtype: ``torch.float32`` or ``torch.float16`` for the embedding column.
    """
    stats = {
        "shard": shard.name,
        "fingerprint": shard.fingerprint(),
        **meta,
        "embedded": len(result.ids),
        "failed": len(result.failed),
        "failures": [{"id": k, "reason": r} for k, r in result.failed],
    }
    write_json(stats_file(out_dir, shard.name), stats)
    data = result.embeddings.detach().to("cpu", dtype).contiguous()
    write_parquet(_parquet(out_dir, shard.name), result.ids, data, "id")
    return stats


def merge_shard(
    out_dir: str, shard: Shard, retried: FinishedShard, meta: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """Add the rows of a rerun of failed items (``shard.only``) to a finished shard's output.

    Rows that now succeed are appended; failures that were not retried, or failed again, stay
    in the stats. Written as :func:`write_shard` writes (stats first, each atomically).

    Returns:
        The new stats.
    """
    ids, embeddings = read_shard(_parquet(out_dir, shard.name))
    old = read_json(stats_file(out_dir, shard.name))
    retried_ids = set(shard.only)
    kept = [(f["id"], f["reason"]) for f in old.get("failures", []) if f["id"] not in retried_ids]
    seen = set(ids)
    new = [(k, i) for i, k in enumerate(retried.ids) if k not in seen]
    merged = FinishedShard(
        shard.name,
        [*ids, *(k for k, _ in new)],
        torch.cat([embeddings, retried.embeddings[[i for _, i in new]].float()]),
        [*kept, *retried.failed],
    )
    return write_shard(out_dir, shard, merged, meta, dtype)


def read_shard(path: str) -> tuple[list[str], torch.Tensor]:
    """``(ids, float32 [N, D] embeddings)`` of one shard's Parquet file."""
    return read_parquet(path, ("id",))
