"""Image–caption pairs: CSV/TSV/Parquet tables and webdataset ``.tar`` shards, one reader.

The input of fine-tuning (``clip finetune``) and of retrieval evaluation (``clip evaluate
retrieval``):

* a table: ``.csv`` (comma) or ``.tsv`` (tab), quoted the usual way (a caption may hold the
  delimiter, quotes or newlines inside double quotes), or ``.parquet``; one row per pair, the image
  path in column ``filepath`` and the caption in ``title`` by default (open_clip's CSV loader's
  names), other columns by name. Relative image paths are read from the table's folder; URLs are
  fetched. An image named on several rows is one image with several captions;
* webdataset ``.tar`` shards: a file, several, a folder (its ``.tar`` files, recursively: the
  ``.parquet``/``.json`` metadata img2dataset writes beside them is not read) or a glob (the
  tars and tables it matches). A sample is the members sharing a key (``dir/000123.jpg`` and
  ``dir/000123.txt``); it needs an image (any extension of
  :data:`clip.data.discover.IMAGE_EXTENSIONS`, any case) and a ``.txt`` caption. Samples
  missing one of them are skipped, counted in :attr:`Pairs.skipped` and warned about. Shards
  are indexed once (member offsets), and each image is then read by seeking, so a
  :class:`PairsDataset` has random access and a length. Compressed tars (``.tar.gz``) cannot
  be seeked into and are refused.

Images are decoded by :func:`clip.data.decode.decode`, the data path's one decoder, so a bad image
is a failure with a reason, never an exception. What a failure does depends on the reader:

* :class:`PairsDataset` (training) always returns a pair, so that every batch has the same size
  (a distributed contrastive loss gathers equal batches from every rank): a pair whose image
  cannot be decoded is replaced by the next pair (in index order, wrapping) whose image can, with
  a warning giving the reason; the index returned is the replacement's (if the replacement is in
  the same batch too, the batch holds that pair twice: compare indices to find it). The choice
  depends only on the data, so it is the same in every epoch and after a resume;
* :class:`ImageRefs` (evaluation) decodes each image once and reports ``(index, None, reason)``,
  so that an evaluation drops the image and its captions and says so.
"""

from __future__ import annotations

import csv
import glob as _glob_syntax  # has_magic only: every file access goes through clip.data.fs
import io
import os
import tarfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import Dataset

from clip.data import fs
from clip.data.decode import decode, split_key
from clip.data.discover import IMAGE_EXTENSIONS, PathLike, as_list

__all__ = [
    "CAPTION_COLUMN",
    "IMAGE_COLUMN",
    "TABLE_EXTENSIONS",
    "ImageRef",
    "ImageRefs",
    "Pairs",
    "PairsDataset",
    "TarMember",
    "decode_image",
    "read_pairs",
]

IMAGE_COLUMN = "filepath"  # open_clip's CSV defaults
CAPTION_COLUMN = "title"
TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet")
_TEXT_EXTENSION = ".txt"
_COMPRESSED_TARS = (".tar.gz", ".tgz")

Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class TarMember:
    """An image inside a plain ``.tar``: where its bytes are, so it can be read by seeking.

    Attributes:
        tar: the shard (normalised path or URL).
        key: the sample key (``dir/000123``).
        offset: byte offset of the member's data in the tar.
        size: the member's size in bytes.
    """

    tar: str
    key: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.tar}#{self.key}"

    def read(self) -> bytes:
        """The member's bytes.

        Raises:
            OSError: if the tar cannot be read or ends early.
        """
        with fs.open_read(self.tar) as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.tar} ends inside {self.key} (the shard changed or is truncated)")
        return data


ImageRef = Union[str, TarMember]  # an image file or URL, or an image inside a tar


@dataclass
class Pairs:
    """Image–caption pairs, read by :func:`read_pairs`.

    Attributes:
        images: each distinct image once, in order of first appearance.
        captions: one caption per pair, in input order.
        image_of: for each pair, the index of its image in ``images``.
        skipped: ``(sample, why)`` for each tar sample without an image or a caption.
    """

    images: list[ImageRef] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    image_of: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def add(self, image: ImageRef, caption: str, seen: dict[ImageRef, int]) -> None:
        """Append one pair; an image already in ``seen`` gets another caption."""
        index = seen.setdefault(image, len(self.images))
        if index == len(self.images):
            self.images.append(image)
        self.captions.append(caption)
        self.image_of.append(index)


def read_pairs(
    source: Union[PathLike, Iterable[PathLike]],
    *,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> Pairs:
    """Read image–caption pairs from tables and webdataset shards (see the module docstring).

    Args:
        source: a ``.csv``/``.tsv``/``.parquet`` table, a ``.tar`` shard, a folder or glob of
            shards, or several of these (read in order; a single ``str`` or ``Path`` is one).
        image_column: the table column of image paths or URLs.
        caption_column: the table column of captions.

    Returns:
        The pairs, in input order (folders and globs sorted).

    Raises:
        FileNotFoundError: if an input does not exist, or a folder or glob holds no ``.tar``.
        ValueError: a table without one of the columns (naming those it has), a row without an
            image path or caption, a compressed tar, an input of another kind, or no pairs.
    """
    pairs, seen = Pairs(), dict[ImageRef, int]()
    for path in _inputs(source):
        if path.lower().endswith(TABLE_EXTENSIONS):
            rows = _table_rows(path, image_column, caption_column)
            folder = path.rsplit("/", 1)[0] if fs.is_url(path) else os.path.dirname(path)
            for image, caption in rows:
                ref = image if fs.is_url(image) else fs.normalize(fs.join(folder, image))
                pairs.add(ref, caption, seen)
        else:
            _read_tar(path, pairs, seen)
    if pairs.skipped:
        shown = "; ".join(f"{name}: {why}" for name, why in pairs.skipped[:3])
        warnings.warn(
            f"skipped {len(pairs.skipped)} tar samples without an image or a caption "
            f"({shown}{' …' if len(pairs.skipped) > 3 else ''})",
            stacklevel=2,
        )
    if not pairs.captions:
        raise ValueError(f"no image–caption pairs in {', '.join(as_list(source))}")
    return pairs


def _inputs(source: Union[PathLike, Iterable[PathLike]]) -> list[str]:
    """Tables and tars, in order: files as given, folders and globs expanded to their tars."""
    found: list[str] = []
    for given in as_list(source):
        if fs.isfile(given):
            _check_kind(given)
            found.append(fs.normalize(given))
            continue
        tars = (".tar", *_COMPRESSED_TARS)
        if fs.isdir(given):  # a folder of shards (its tables may be metadata: not read)
            matches = [m for m in fs.walk_files(given) if m.lower().endswith(tars)]
        elif _glob_syntax.has_magic(given):  # what the pattern names: shards or tables
            matches = [m for m in fs.glob(given) if m.lower().endswith((*tars, *TABLE_EXTENSIONS))]
        else:
            raise FileNotFoundError(f"no such file or directory: {given!r}")
        if not matches:
            raise FileNotFoundError(
                f"{given!r} holds no .tar shards; give a .csv/.tsv/.parquet table or .tar files"
            )
        for match in matches:
            _check_kind(match)
        found.extend(fs.normalize(m) for m in matches)
    return found


def _check_kind(path: str) -> None:
    name = path.lower()
    if name.endswith(_COMPRESSED_TARS):
        raise ValueError(
            f"{path} is compressed: its images cannot be read by seeking; decompress it "
            "(gunzip) and give the .tar"
        )
    if not name.endswith((".tar", *TABLE_EXTENSIONS)):
        raise ValueError(
            f"{path} is not a pairs file: give a .csv/.tsv/.parquet table (image path and "
            "caption columns) or webdataset .tar shards"
        )


# ---- tables ----------------------------------------------------------------------------------


def _table_rows(path: str, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    """(image path, caption) per row of a CSV, TSV or Parquet table."""
    if path.lower().endswith(".parquet"):
        names, columns = _parquet_columns(path, (image_column, caption_column))
    else:
        names, columns = _csv_columns(path, (image_column, caption_column))
    missing = [c for c in (image_column, caption_column) if c not in names]
    if missing:
        which = " and ".join(repr(c) for c in missing)
        raise ValueError(
            f"{path} has no column {which} (columns: {', '.join(map(repr, names))}); name the "
            "image and caption columns (image_column=/caption_column=, or --image-column/"
            "--caption-column)"
        )
    rows = []
    for number, (image, caption) in enumerate(zip(*columns), start=1):
        if image is None or not str(image).strip():
            raise ValueError(f"{path}: row {number} has no image path in {image_column!r}")
        if caption is None:
            raise ValueError(f"{path}: row {number} has no caption in {caption_column!r}")
        rows.append((str(image).strip(), str(caption)))
    return rows


def _csv_columns(path: str, wanted: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    text = fs.read_bytes(path).decode("utf-8-sig")  # a BOM is not part of the first name
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path} is empty: it needs a header row naming its columns")
    names = [name.strip() for name in header]
    if not all(w in names for w in wanted):
        return names, []
    where = [names.index(w) for w in wanted]
    columns: list[list[Any]] = [[] for _ in wanted]
    for line, row in enumerate(reader, start=2):
        if not row:
            continue  # a blank line
        if len(row) != len(names):
            raise ValueError(
                f"{path}: record {line} has {len(row)} fields, the header {len(names)}; quote "
                'fields that hold the delimiter ("a, b")'
            )
        for column, k in zip(columns, where):
            column.append(row[k])
    return names, columns


def _parquet_columns(path: str, wanted: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    from clip.data.write import pyarrow

    with fs.open_read(path) as f:
        table_file = pyarrow().parquet.ParquetFile(f)
        names = list(table_file.schema_arrow.names)
        if not all(w in names for w in wanted):
            return names, []
        table = table_file.read(columns=list(wanted))
    return names, [table.column(w).to_pylist() for w in wanted]


# ---- webdataset shards -----------------------------------------------------------------------


def _read_tar(path: str, pairs: Pairs, seen: dict[ImageRef, int]) -> None:
    """Index one shard: each sample's first image member and its caption, in member order."""
    images: dict[str, TarMember] = {}
    captions: dict[str, str] = {}
    order: list[str] = []
    with fs.open_read(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_key(member.name)
            if key not in images and key not in captions:
                order.append(key)
            if ext in IMAGE_EXTENSIONS and key not in images:
                images[key] = TarMember(path, key, member.offset_data, member.size)
            elif ext == _TEXT_EXTENSION and key not in captions:
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                captions[key] = data.decode("utf-8", errors="replace").strip()
    for key in order:
        if key in images and key in captions:
            pairs.add(images[key], captions[key], seen)
        else:
            lacks = "caption (.txt)" if key in images else "image"
            pairs.skipped.append((f"{path}#{key}", f"no {lacks}"))


# ---- decoding --------------------------------------------------------------------------------


def decode_image(
    ref: ImageRef, preprocess: Transform
) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """``(pixels, None)``, or ``(None, reason)`` if the image cannot be read or decoded.

    Args:
        ref: an image path or URL, or a :class:`TarMember`.
        preprocess: PIL image → tensor (e.g. :func:`clip.preprocess.transform_uint8`).
    """
    if isinstance(ref, TarMember):
        try:
            source: Union[io.BytesIO, str, BaseException] = io.BytesIO(ref.read())
        except Exception as e:  # a read error is this image's problem, reported as decode's
            source = e
        return decode(source, preprocess)
    return decode(ref, preprocess)


class ImageRefs(Dataset):
    """Index → ``(index, pixels or None, reason or None)`` for a list of images; never raises.

    The contract of :class:`clip.data.decode.ImageFiles`, for images that may be tar members.
    """

    def __init__(self, images: Sequence[ImageRef], preprocess: Transform):
        self.images = list(images)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        return (i, *decode_image(self.images[i], self.preprocess))


class PairsDataset(Dataset):
    """Pairs as ``(pixels, caption, index)``, in input order, for a training DataLoader.

    ``pixels`` is what ``preprocess`` gives (uint8 [3, R, R] from
    :func:`clip.preprocess.transform_uint8`, for :func:`clip.data.embed.encode_images` or
    :func:`clip.preprocess.normalize_uint8` to finish on the model's side). Every item is a pair,
    so the default collate gives fixed batches: a pair whose image cannot be decoded is replaced by
    the next decodable one (see the module docstring), ``index`` naming the pair returned, and a
    warning gives the reason; :attr:`failed` records them (in this process: each DataLoader
    worker has its own copy). Picklable, for worker processes.

    Args:
        source: :class:`Pairs`, or what :func:`read_pairs` reads.
        preprocess: PIL image → tensor.
        image_column, caption_column: the table columns (when ``source`` is not :class:`Pairs`).

    Raises:
        As :func:`read_pairs`.
    """

    def __init__(
        self,
        source: Union[Pairs, PathLike, Iterable[PathLike]],
        preprocess: Transform,
        *,
        image_column: str = IMAGE_COLUMN,
        caption_column: str = CAPTION_COLUMN,
    ):
        if isinstance(source, Pairs):
            self.pairs = source
        else:
            self.pairs = read_pairs(
                source, image_column=image_column, caption_column=caption_column
            )
        self.preprocess = preprocess
        self.failed: dict[int, str] = {}  # image index → reason

    def __len__(self) -> int:
        return len(self.pairs)

    def decode(self, i: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
        """Pair ``i``'s image as ``(pixels, None)`` or ``(None, reason)``: no replacement."""
        return decode_image(self.pairs.images[self.pairs.image_of[i]], self.preprocess)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        n = len(self)
        index = int(i)
        if not -n <= index < n:
            raise IndexError(f"pair index {i} out of range for {n} pairs")
        index %= n
        for step in range(n):
            j = (index + step) % n
            image = self.pairs.image_of[j]
            if image in self.failed:
                continue
            pixels, reason = self.decode(j)
            if pixels is not None:
                return pixels, self.pairs.captions[j], j
            self.failed[image] = reason or "unknown error"
            warnings.warn(
                f"skipped image {self.pairs.images[image]}: {self.failed[image]}", stacklevel=2
            )
        first = next(iter(self.failed.items()))
        raise RuntimeError(
            f"none of the {len(self.pairs.images)} images of the pairs can be decoded "
            f"(e.g. {self.pairs.images[first[0]]}: {first[1]})"
        )
