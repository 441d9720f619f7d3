"""Decode images: files, tar members, Parquet rows and URLs → uint8 pixels, failures captured.

The one decoder of the data path. By default an image becomes uint8 [3, R, R] through
:func:`clip.preprocess.transform_uint8` (resize, crop, RGB: a quarter of the bytes of float32 to
move between processes); :func:`clip.data.embed.encode_images` finishes the normalisation in the
batch, bit-identically to the float transform. A custom ``preprocess`` is applied as given. An
image that cannot be read or decoded gives ``(None, reason)``, never an exception.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from clip.data import fs
from clip.data.discover import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from clip.data.plan import Shard

__all__ = [
    "ImageFiles",
    "decode",
    "decode_many",
    "failure",
    "iter_items",
    "load_image",
    "parquet_rows",
    "split_key",
]

Source = Union[str, IO[bytes]]  # a path or URL, or an open binary file
Opener = Callable[[], Source]
Transform = Callable[[Any], torch.Tensor]

_FETCH_THREADS = 16  # concurrent URL fetches per chunk


def failure(error: BaseException) -> str:
    """How a failed input is reported: ``"ExceptionType: message"`` on one line."""
    return f"{type(error).__name__}: {error}".replace("\n", " ")


def _open_image(source: Source) -> Image.Image:
    if isinstance(source, str) and fs.is_url(source):
        return Image.open(fs.open_read(source))
    return Image.open(source)  # a local path (PIL reads it, keeping .filename) or a file


def load_image(source: Source, preprocess: Transform, draft_px: Optional[int] = None) -> Any:
    """Open ``source`` and apply ``preprocess``; with ``draft_px``, decode large JPEGs reduced.

    Args:
        source: an image file or URL, or a binary file object holding one.
        preprocess: PIL image → tensor.
        draft_px: if set, a JPEG whose shorter side is at least twice ``draft_px`` is decoded at
            the smallest 1/2, 1/4 or 1/8 scale whose shorter side is still ≥ ``draft_px``
            (``PIL.Image.draft``). Faster, but not bit-identical to a full decode.

    Returns:
        ``preprocess`` applied to the image.
    """
    with _open_image(source) as image:
        if draft_px is not None and image.format == "JPEG":
            w, h = image.size
            scale = draft_px / min(w, h)  # the shortest-side resize preprocess will do
            image.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        return preprocess(image)


def decode(
    source: Union[Source, BaseException], preprocess: Transform, draft_px: Optional[int] = None
) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """``(pixels, None)``, or ``(None, reason)`` if ``source`` (or the error fetching it) fails."""
    try:
        if isinstance(source, BaseException):
            raise source
        return load_image(source, preprocess, draft_px), None
    except Exception as e:  # any decoder error is this image's problem, not the job's
        return None, failure(e)


class ImageFiles(Dataset):
    """Index → ``(index, pixels or None, failure reason or None)``; never raises on bad files."""

    def __init__(self, paths: Sequence[str], preprocess: Transform, draft_px: Optional[int]):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.draft_px = draft_px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        return (i, *decode(self.paths[i], self.preprocess, self.draft_px))


def decode_many(
    ids: Sequence[str], openers: Sequence[Opener], preprocess: Transform, draft_px: Optional[int]
) -> tuple[list[str], torch.Tensor, list[tuple[str, str]]]:
    """Fetch (a few at a time) and decode: ``(ids decoded, pixels [n, 3, R, R], failed)``."""
    good: list[tuple[str, torch.Tensor]] = []
    failed: list[tuple[str, str]] = []
    for key, source in zip(ids, _open_all(openers)):
        pixels, reason = decode(source, preprocess, draft_px)
        if pixels is None:
            failed.append((key, reason or "unknown error"))
        else:
            good.append((key, pixels))
    stacked = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return [k for k, _ in good], stacked, failed


def _open_all(openers: Sequence[Opener]) -> list[Union[Source, BaseException]]:
    """Call every opener, a few at a time: URL fetches wait on the network, not the CPU."""
    if len(openers) < 2:
        return [_try(o) for o in openers]
    with ThreadPoolExecutor(max_workers=min(_FETCH_THREADS, len(openers))) as pool:
        return list(pool.map(_try, openers))


def _try(opener: Opener) -> Union[Source, BaseException]:
    try:
        return opener()
    except Exception as e:  # reported with the image it belongs to
        return e


# ---- the items of a shard -------------------------------------------------------------------


def iter_items(shard: Shard) -> Iterator[tuple[str, Opener]]:
    """``(id, open)`` for each image of ``shard`` (only those in ``shard.only`` if it is set).

    ``open()`` gives a path, or a binary file for tar members and fetched URLs.

    Raises:
        ValueError: for an unknown shard kind.
    """
    if shard.kind == "files":
        items: Iterator[tuple[str, Opener]] = ((p, _const(p)) for p in shard.members)
    elif shard.kind == "tar":
        items = _tar_items(shard.source, frozenset(shard.only) or None)
    elif shard.kind == "parquet":
        items = _parquet_items(shard)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
    if shard.only and shard.kind != "tar":
        wanted = frozenset(shard.only)
        items = (item for item in items if item[0] in wanted)
    return items


def _const(path: str) -> Opener:
    return lambda: path


def _bytes(data: bytes) -> Opener:
    return lambda: io.BytesIO(data)


def _tar_items(path: str, only: Optional[frozenset[str]]) -> Iterator[tuple[str, Opener]]:
    """Samples of a webdataset-style tar, streamed: (key, image bytes), first image per key."""
    seen: set[str] = set()
    with fs.open_read(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            key, ext = split_key(member.name)
            if not member.isfile() or ext not in IMAGE_EXTENSIONS or key in seen:
                continue
            seen.add(key)
            if only is not None and key not in only:
                continue
            f = tar.extractfile(member)
            yield key, _bytes(f.read() if f is not None else b"")
        # tarfile ends quietly when the data stops at a member boundary; a whole archive ends
        # with a zero block, which tarfile has read in full by now.
        if tar.fileobj is not None and tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")


def split_key(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` → ``("dir/000123", ".jpg")``: the key ends at the basename's first dot
    (webdataset's rule), the extension is the last one, lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    ext = "." + rest.rsplit(".", 1)[-1].lower() if dot else ""
    return (f"{folder}/{stem}" if folder else stem), ext


def _parquet_items(shard: Shard) -> Iterator[tuple[str, Opener]]:
    values = parquet_rows(shard.source, shard.column, shard.start, shard.stop)
    folder = os.path.dirname(shard.source)  # relative paths are read from the table's folder
    for value in values:
        text = "" if value is None else str(value)
        if fs.is_url(text):
            yield text, _fetcher(text)
        else:
            yield text, _const(fs.join(folder, text) if text else text)


def parquet_rows(path: str, column: str, start: int, stop: int) -> list[Any]:
    """Rows ``start:stop`` of one column, reading only the row groups that hold them (a file cut
    into many shards is not read whole by each)."""
    from clip.data.write import pyarrow

    with fs.open_read(path) as f:
        parquet = pyarrow().parquet.ParquetFile(f)
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


def _fetcher(url: str) -> Opener:
    return lambda: io.BytesIO(fs.read_bytes(url))
