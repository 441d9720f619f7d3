"""Discover inputs: what each path names, by one case-insensitive list of extensions.

A path is an image (``.jpg``, ``.PNG``, ...), a webdataset ``.tar`` (``.tar.gz``, ``.tgz``), a
``.parquet`` table of paths or URLs, or a file list (``.txt``/``.lst``, one path per line).
Folders are searched recursively and glob patterns expanded; every file found there is sorted
into one of these kinds, and files of no kind are returned as ``other`` so that a job can refuse
them by name instead of dropping them. A single ``str`` or ``PathLike`` is one input, never a
sequence of characters.
"""

from __future__ import annotations

import glob as _glob_syntax  # has_magic only: every file access goes through clip.data.fs
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

from clip.data import fs

__all__ = [
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "SHARD_FILE_EXTENSIONS",
    "TAR_EXTENSIONS",
    "Found",
    "as_list",
    "discover",
    "kind_of",
    "read_list",
    "stem",
]

PathLike = Union[str, "os.PathLike[str]"]

# Every comparison below is on the lower-cased name: "A.JPG" is an image, "C.TAR" a tar.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS = (".parquet",)
LIST_EXTENSIONS = (".txt", ".lst")
SHARD_FILE_EXTENSIONS = (*TAR_EXTENSIONS, *PARQUET_EXTENSIONS)  # read as shards of their own


def as_list(items: Union[PathLike, Iterable[PathLike]]) -> list[str]:
    """``items`` as a list of strings; a single ``str`` or ``PathLike`` is one item.

    Args:
        items: one path (``"photos/"``, ``Path("cat.jpg")``) or an iterable of them.

    Returns:
        The paths as strings, in order.

    Raises:
        TypeError: for ``bytes`` or an item that is not a path.
    """
    if isinstance(items, (str, os.PathLike)):
        return [os.fspath(items)]
    if isinstance(items, (bytes, bytearray)):
        raise TypeError("give paths as str or os.PathLike, not bytes")
    out = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"expected a path (str or os.PathLike), got {type(item).__name__}")
        out.append(os.fspath(item))
    return out


def kind_of(path: str) -> str:
    """``"image"``, ``"tar"``, ``"parquet"``, ``"list"`` or ``"other"``, by the name's ending."""
    name = path.lower()
    if name.endswith(TAR_EXTENSIONS):
        return "tar"
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if name.endswith(LIST_EXTENSIONS):
        return "list"
    return "image" if os.path.splitext(name)[1] in IMAGE_EXTENSIONS else "other"


def stem(path: str) -> str:
    """The file name without its tar/Parquet/list extension (``C.TAR`` → ``C``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    name = os.path.basename(name)
    for ext in (*TAR_EXTENSIONS, *PARQUET_EXTENSIONS, *LIST_EXTENSIONS):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass
class Found:
    """Inputs sorted by kind: normalised paths (:func:`clip.data.fs.normalize`), each once.

    Attributes:
        images, tars, parquets, lists: files of that kind, in discovery order.
        other: files found in folders or by globs that are none of these (a file named
            explicitly is an image whatever its extension: reading it reports if it is not).
    """

    images: list[str] = field(default_factory=list)
    tars: list[str] = field(default_factory=list)
    parquets: list[str] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def add(self, path: str, named: bool, seen: set[str]) -> None:
        path = fs.normalize(path)
        if path in seen:
            return
        seen.add(path)
        kind = kind_of(path)
        if kind == "other" and named:
            kind = "image"
        getattr(self, {"list": "lists", "other": "other"}.get(kind, f"{kind}s")).append(path)

    def refuse_other(self) -> None:
        """Raise if folders or globs held files that are no kind of input, naming them.

        Raises:
            ValueError: naming up to five of them, and the fix.
        """
        if self.other:
            shown = ", ".join(self.other[:5]) + (" …" if len(self.other) > 5 else "")
            raise ValueError(
                f"{len(self.other)} files found in the input folders/globs are not images, .tar, "
                f".parquet or .txt/.lst lists: {shown}; move them out, or give a glob that "
                "matches only inputs (e.g. 'photos/**/*.jpg')"
            )


def read_list(path: str) -> list[str]:
    """The image paths in a file list (one a line; ``#`` comments), relative ones taken from the
    list's folder, normalised.

    Raises:
        ValueError: if the list names a tar, Parquet file or another list.
    """
    folder = os.path.dirname(path)
    lines = [line.strip() for line in fs.read_bytes(path).decode("utf-8").splitlines()]
    paths = [p if fs.is_url(p) else fs.join(folder, p) for p in lines if p and p[0] != "#"]
    refused = [p for p in paths if kind_of(p) in ("tar", "parquet", "list")]
    if refused:
        raise ValueError(f"{path} lists {refused[0]}: a list holds images; give it as an input")
    return [fs.normalize(p) for p in paths]


def discover(inputs: Union[PathLike, Iterable[PathLike]]) -> Found:
    """Expand files, folders (recursively) and glob patterns (``**`` recurses) into :class:`Found`.

    Args:
        inputs: one path or pattern, or several.

    Returns:
        The files, by kind; folder contents and glob matches in sorted order.

    Raises:
        FileNotFoundError: if an input does not exist, or a pattern matches nothing.
    """
    found, seen = Found(), set[str]()
    for path in as_list(inputs):
        if fs.isfile(path):
            found.add(path, True, seen)
        elif fs.isdir(path):
            for f in fs.walk_files(path):
                found.add(f, False, seen)
        elif _glob_syntax.has_magic(path):
            matches = fs.glob(path)
            if not matches:
                raise FileNotFoundError(f"no files match {path!r}")
            for match in matches:
                if fs.isdir(match):
                    for f in fs.walk_files(match):
                        found.add(f, False, seen)
                else:
                    found.add(match, False, seen)
        else:
            raise FileNotFoundError(f"no such file or directory: {path!r}")
    return found
