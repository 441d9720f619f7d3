"""Sharded embedding jobs: inputs cut into shards, one output file per shard, resumable.

The engine-independent half of :mod:`clip.distributed`. A :class:`Shard` is a unit of work
with a stable name; its result is ``OUT/<name>.parquet`` (columns ``id`` and ``embedding``) and
``OUT/<name>.stats.json``. Both are written atomically, stats first, so a shard is finished
exactly when its Parquet file exists; a rerun skips finished shards. Inputs:

* image files, folders and globs, pooled, sorted and cut every ``shard_size`` files
  (``images-00000``, ``images-00001``, ...);
* file lists (``.txt``: one image path per line, relative to the list's folder), cut the same
  way and named after the list;
* Parquet files with a column of paths or http(s) URLs, cut every ``shard_size`` rows;
* webdataset-style ``.tar`` files, one shard each; a sample's id is its key (member name up to
  the first dot), its image the first member with an image extension.

Unreadable images are counted in the stats and never stop a shard. Nothing here imports Ray.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Callable, NamedTuple, Optional, Union

import torch

from clip import pipeline
from clip.data import fs

__all__ = [
    "SHARD_FILE_EXTENSIONS",
    "Chunk",
    "FinishedShard",
    "Shard",
    "ShardAssembler",
    "finished",
    "iter_chunks",
    "plan_shards",
    "write_shard",
]

Source = Union[str, IO[bytes]]  # what Image.open accepts: a path or an open binary file
Transform = Callable[[Any], torch.Tensor]

_TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
SHARD_FILE_EXTENSIONS = (*_TAR_EXTENSIONS, ".parquet")  # inputs read as shards of their own
_LIST_EXTENSIONS = (".txt", ".lst")
_FETCH_THREADS = 16  # concurrent URL fetches per chunk


@dataclass(frozen=True)
class Shard:
    """One unit of work and its output name.

    Attributes:
        name: output stem: the shard writes ``<name>.parquet`` and ``<name>.stats.json``.
        kind: ``"files"``, ``"parquet"`` or ``"tar"``.
        source: the list, Parquet or tar file it reads ("" for pooled image files).
        members: for ``files``, the image paths.
        start, stop: for ``parquet``, the row range.
        column: for ``parquet``, the column of paths or URLs.
    """

    name: str
    kind: str
    source: str = ""
    members: tuple[str, ...] = ()
    start: int = 0
    stop: int = 0
    column: str = ""

    def fingerprint(self) -> str:
        """A hash of what the shard reads, so a rerun can tell a shard's inputs changed."""
        fields = asdict(self)
        if self.kind in ("parquet", "tar"):
            fields["size"] = os.path.getsize(self.source)
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Shard:
        fields = json.loads(text)
        fields["members"] = tuple(fields["members"])
        return Shard(**fields)


class Chunk(NamedTuple):
    """Up to ``batch_size`` decoded images of one shard, in shard order."""

    shard: str
    number: int  # 0, 1, ... within the shard
    last: bool  # the shard's final chunk
    ids: list[str]
    pixels: torch.Tensor  # [n, 3, R, R] (preprocess output), the readable images of this chunk
    failed: list[tuple[str, str]]  # (id, reason)


class FinishedShard(NamedTuple):
    """Every chunk of a shard, embedded and joined in order."""

    name: str
    ids: list[str]
    embeddings: torch.Tensor  # [N, D]
    failed: list[tuple[str, str]]


# ---- planning -------------------------------------------------------------------------------


def plan_shards(
    inputs: Sequence[str], shard_size: int = 10_000, column: Optional[str] = None
) -> list[Shard]:
    """Cut ``inputs`` into shards with stable names (see the module docstring).

    Args:
        inputs: image files, folders, globs, file lists (``.txt``), ``.parquet`` and ``.tar``.
        shard_size: images (or Parquet rows) per shard for everything but tars.
        column: the Parquet column of paths or URLs (default: ``path``, else ``url``).

    Returns:
        The shards, in input order.

    Raises:
        ValueError: on ``shard_size`` < 1, two shards with one name, or a Parquet file
            without the column.
        FileNotFoundError: if an input does not exist.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    shards: list[Shard] = []
    images: list[str] = []
    for item in _expand(inputs):
        if item.endswith(_TAR_EXTENSIONS):
            if not os.path.isfile(item):  # read only when the shard runs: check it now
                raise FileNotFoundError(f"no such file or no files match: {item!r}")
            shards.append(Shard(_stem(item), "tar", item))
        elif item.endswith(".parquet"):
            shards.extend(_parquet_shards(item, shard_size, column))
        elif item.endswith(_LIST_EXTENSIONS):
            shards.extend(_file_shards(_stem(item), _listed(item), shard_size, item))
        else:
            images.append(item)
    if images:
        shards.extend(_file_shards("images", pipeline.find_images(images), shard_size, ""))
    _check_unique(shards)
    return shards


def _expand(inputs: Sequence[str]) -> list[str]:
    """Globs matching shard files (``data/*.tar``) become those files; the rest stay as given."""
    out: list[str] = []
    for item in map(os.fspath, inputs):
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else []
        whole = [m for m in matches if m.endswith(SHARD_FILE_EXTENSIONS)]
        out.extend(whole if whole and len(whole) == len(matches) else [item])
    return out


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (*_TAR_EXTENSIONS, ".parquet", *_LIST_EXTENSIONS):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _listed(path: str) -> list[str]:
    """The paths in a file list, relative ones taken from the list's folder."""
    folder = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [os.path.join(folder, p) for p in lines if p and not p.startswith("#")]


def _file_shards(prefix: str, paths: list[str], size: int, source: str) -> list[Shard]:
    return [
        Shard(f"{prefix}-{k:05d}", "files", source, tuple(paths[start : start + size]))
        for k, start in enumerate(range(0, len(paths), size))
    ]


def _parquet_shards(path: str, size: int, column: Optional[str]) -> list[Shard]:
    pq = pipeline._pyarrow().parquet
    meta = pq.ParquetFile(path)
    names = meta.schema_arrow.names
    chosen = column or next((c for c in ("path", "url") if c in names), None)
    if chosen is None or chosen not in names:
        wanted = repr(column) if column else "'path' or 'url'"
        raise ValueError(f"{path} has no column {wanted} (columns: {names}); pass column=")
    rows = meta.metadata.num_rows
    starts = range(0, rows, size)
    return [
        Shard(
            _stem(path) if len(starts) == 1 else f"{_stem(path)}-{k:05d}",
            "parquet",
            path,
            start=start,
            stop=min(rows, start + size),
            column=chosen,
        )
        for k, start in enumerate(starts)
    ]


def _check_unique(shards: list[Shard]) -> None:
    seen: dict[str, Shard] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(
                f"two inputs give shard name {shard.name!r} ({seen[shard.name].source or 'images'}"
                f" and {shard.source or 'images'}); rename one of them"
            )
        seen[shard.name] = shard


# ---- reading and decoding -------------------------------------------------------------------


def iter_items(shard: Shard) -> Iterator[tuple[str, Callable[[], Source]]]:
    """``(id, open)`` for each image of ``shard``; ``open()`` gives a path or a binary file."""
    if shard.kind == "files":
        return ((p, _const(p)) for p in shard.members)
    if shard.kind == "tar":
        return _tar_items(shard.source)
    if shard.kind == "parquet":
        return _parquet_items(shard)
    raise ValueError(f"unknown shard kind {shard.kind!r}")


def _const(path: str) -> Callable[[], Source]:
    return lambda: path


def _bytes(data: bytes) -> Callable[[], Source]:
    return lambda: io.BytesIO(data)


def _tar_items(path: str) -> Iterator[tuple[str, Callable[[], Source]]]:
    """Samples of a webdataset-style tar, streamed: (key, image bytes), first image per key."""
    seen: set[str] = set()
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            key, ext = _split_key(member.name)
            if not member.isfile() or ext not in pipeline.IMAGE_EXTENSIONS or key in seen:
                continue
            seen.add(key)
            f = tar.extractfile(member)
            yield key, _bytes(f.read() if f is not None else b"")
        # tarfile ends quietly when the data stops at a member boundary; a whole archive ends
        # with a zero block, which tarfile has read in full by now.
        if tar.fileobj is not None and tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")


def _split_key(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` → ``("dir/000123", ".jpg")``: the key ends at the basename's first dot."""
    folder, base = os.path.split(name)
    stem, dot, rest = base.partition(".")
    ext = "." + rest.rsplit(".", 1)[-1].lower() if dot else ""
    return os.path.join(folder, stem), ext


def _parquet_items(shard: Shard) -> Iterator[tuple[str, Callable[[], Source]]]:
    values = _parquet_rows(shard.source, shard.column, shard.start, shard.stop)
    folder = os.path.dirname(shard.source)
    for value in values:
        text = "" if value is None else str(value)
        if text.startswith(("http://", "https://")):
            yield text, _fetcher(text)
        else:
            yield text, _const(os.path.join(folder, text) if text else text)


def _parquet_rows(path: str, column: str, start: int, stop: int) -> list[Any]:
    """Rows ``start:stop`` of one column, reading only the row groups that hold them (a file cut
    into many shards is not read whole by each)."""
    parquet = pipeline._pyarrow().parquet.ParquetFile(path)
    groups: list[int] = []
    first = offset = 0  # first: the file row where the first group read begins
    for g in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(g).num_rows
        if offset < stop and offset + rows > start:
            first = first if groups else offset
            groups.append(g)
        offset += rows
    table = parquet.read_row_groups(groups, columns=[column])
    return list(table.column(0).slice(start - first, stop - start).to_pylist())


def _fetcher(url: str) -> Callable[[], Source]:
    return lambda: fs.open_read(url)  # retried as fs.default_policy() says


def iter_chunks(
    shard: Shard,
    preprocess: Transform,
    batch_size: int,
    draft_px: Optional[int] = None,
) -> Iterator[Chunk]:
    """Decode ``shard`` into chunks of ``batch_size`` images (the last flagged ``last``).

    A shard that cannot be read at all (a truncated tar) ends early, with the reason listed
    under the shard's own name in ``failed``; it does not raise.
    """
    pending: Optional[Chunk] = None
    index = 0
    for ids, openers, broken in _batches(shard, batch_size):
        chunk = _decode(shard.name, index, ids, openers, preprocess, draft_px)
        chunk.failed.extend(broken)
        if pending is not None:
            yield pending
        pending, index = chunk, index + 1
    if pending is None:
        pending = Chunk(shard.name, 0, True, [], torch.empty(0), [])
    yield pending._replace(last=True)


def _batches(
    shard: Shard, size: int
) -> Iterator[tuple[list[str], list[Callable[[], Source]], list[tuple[str, str]]]]:
    ids: list[str] = []
    openers: list[Callable[[], Source]] = []
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


def _decode(
    shard: str,
    index: int,
    ids: list[str],
    openers: list[Callable[[], Source]],
    preprocess: Transform,
    draft_px: Optional[int],
) -> Chunk:
    good: list[tuple[str, torch.Tensor]] = []
    failed: list[tuple[str, str]] = []
    with pipeline._one_thread():
        for key, source in zip(ids, _open_all(openers)):
            try:
                if isinstance(source, Exception):
                    raise source
                good.append((key, pipeline.load_image(source, preprocess, draft_px)))
            except Exception as e:  # one bad image is that image's problem, not the shard's
                failed.append((key, f"{type(e).__name__}: {e}".replace("\n", " ")))
    pixels = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return Chunk(shard, index, False, [k for k, _ in good], pixels, failed)


def _open_all(openers: list[Callable[[], Source]]) -> list[Union[Source, Exception]]:
    """Call every opener, a few at a time: URL fetches wait on the network, not the CPU."""
    if len(openers) < 2:
        return [_try(o) for o in openers]
    with ThreadPoolExecutor(max_workers=min(_FETCH_THREADS, len(openers))) as pool:
        return list(pool.map(_try, openers))


def _try(opener: Callable[[], Source]) -> Union[Source, Exception]:
    try:
        return opener()
    except Exception as e:  # reported with the image it belongs to
        return e


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


def _paths(out_dir: str, name: str) -> tuple[str, str]:
    base = os.path.join(out_dir, name)
    return base + ".parquet", base + ".stats.json"


def finished(out_dir: str, shard: Shard, meta: dict[str, Any]) -> bool:
    """Whether ``shard``'s output exists; it must come from the same inputs and settings.

    Raises:
        ValueError: if the output exists but was written from other inputs, another model or
            another dtype (mixing them would silently give inconsistent embeddings).
    """
    parquet, stats = _paths(out_dir, shard.name)
    if not os.path.exists(parquet):
        return False
    try:
        with open(stats, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{parquet} exists but {stats} is unreadable ({e}); delete both") from e
    expected = {"fingerprint": shard.fingerprint(), **meta}
    changed = [k for k, v in expected.items() if recorded.get(k) != v]
    if changed:
        raise ValueError(
            f"{parquet} was written with other {', '.join(changed)} "
            f"({', '.join(f'{k}={recorded.get(k)!r}' for k in changed)}); "
            "write to a new output folder, or delete that shard to redo it"
        )
    return True


def write_shard(
    out_dir: str, shard: Shard, result: FinishedShard, meta: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """Write ``<name>.stats.json`` then ``<name>.parquet``, each atomically; return the stats.

    Args:
        out_dir: the output folder (created if missing).
        shard: the shard.
        result: its embeddings.
        meta: settings recorded in the stats (``model``, ``dtype``) and checked on reruns.
        dtype: ``torch.float32`` or ``torch.float16`` for the embedding column.
    """
    os.makedirs(out_dir, exist_ok=True)
    parquet, stats_path = _paths(out_dir, shard.name)
    stats = {
        "shard": shard.name,
        "fingerprint": shard.fingerprint(),
        **meta,
        "embedded": len(result.ids),
        "failed": len(result.failed),
        "failures": [{"id": k, "reason": r} for k, r in result.failed],
    }
    pipeline._atomic_write(stats_path, json.dumps(stats, indent=1).encode())
    _write_table(parquet, result.ids, result.embeddings, dtype)
    return stats


def _write_table(path: str, ids: list[str], embeddings: torch.Tensor, dtype: torch.dtype) -> None:
    data = embeddings.detach().to("cpu", dtype).contiguous()
    pipeline._write_parquet(path, ids, data, "id")


def read_shard(path: str) -> tuple[list[str], torch.Tensor]:
    """``(ids, float32 [N, D] embeddings)`` of one shard's Parquet file."""
    return pipeline._read_parquet(path, ("id",))
