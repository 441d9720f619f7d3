"""Files to normalised embeddings on one machine: the layer under ``clip embed`` and ``classify``.

Images are decoded and preprocessed in :class:`torch.utils.data.DataLoader` workers while the model
runs on the previous batch; unreadable or corrupt files are skipped and reported, never fatal. The
default path is bit-identical to ``preprocess(Image.open(p))`` stacked per batch, then
``model.encode_image``, then L2 normalisation. :func:`iter_image_batches` yields per-batch results
so callers (the command line, a cluster job) can stream, checkpoint or stop early.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import glob
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Callable, NamedTuple, Optional, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clip.preprocess import transform
from clip.tokenizer import tokenize

__all__ = [
    "IMAGE_EXTENSIONS",
    "EmbeddedImages",
    "ImageBatch",
    "embed_images",
    "embed_texts",
    "embedding_width",
    "find_images",
    "input_resolution",
    "iter_image_batches",
    "load_embeddings",
    "load_image",
    "rows_file",
    "save_embeddings",
]

# File name endings treated as images when expanding folders and globs (compared lower-cased).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

Transform = Callable[[Image.Image], torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class EmbeddedImages:
    """What :func:`embed_images` returns.

    Attributes:
        embeddings: float32 [N, D], each row L2-normalised, in the order of ``paths``.
        paths: the inputs that were embedded, in input order.
        failed: ``(path, reason)`` for each input that could not be read or decoded.
    """

    embeddings: torch.Tensor
    paths: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class ImageBatch(NamedTuple):
    """One batch from :func:`iter_image_batches`: like :class:`EmbeddedImages`, for a slice."""

    embeddings: torch.Tensor  # [n, D] float32, normalised
    paths: list[str]
    failed: list[tuple[str, str]]


def find_images(inputs: Iterable[PathLike]) -> list[str]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of image paths.

    A file named explicitly is kept whatever its extension (if it is not an image, embedding it
    reports it as failed); files found in folders or by a glob are kept only if their extension is
    in :data:`IMAGE_EXTENSIONS`.

    Args:
        inputs: paths of files or folders, or glob patterns (``**`` recurses).

    Returns:
        Sorted, de-duplicated paths, spelled as found (relative inputs give relative paths).

    Raises:
        FileNotFoundError: if an input does not exist, or a pattern matches nothing.
    """
    found: set[str] = set()
    for item in inputs:
        path = os.fspath(item)
        if os.path.isfile(path):
            found.add(path)
        elif os.path.isdir(path):
            found.update(_images_under(path))
        elif glob.has_magic(path):
            matches = glob.glob(path, recursive=True)
            if not matches:
                raise FileNotFoundError(f"no files match {path!r}")
            found.update(p for p in matches if os.path.isfile(p) and _is_image_name(p))
            for folder in filter(os.path.isdir, matches):
                found.update(_images_under(folder))
        else:
            raise FileNotFoundError(f"no such file or directory: {path!r}")
    return sorted(found)


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _images_under(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        yield from (os.path.join(root, f) for f in files if _is_image_name(f))


def input_resolution(model: torch.nn.Module) -> int:
    """The side of the square input ``model`` expects (``model.visual.input_resolution``)."""
    res = getattr(getattr(model, "visual", None), "input_resolution", None)
    if res is None:  # a traced model keeps it as a buffer on the top-level module
        res = getattr(model, "input_resolution", None)
    if res is None:
        raise TypeError(
            f"cannot tell the input resolution of {type(model).__name__}; pass preprocess="
        )
    return int(res)


def load_image(
    path: Union[str, IO[bytes]], preprocess: Transform, draft_px: Optional[int] = None
) -> torch.Tensor:
    """Open ``path`` and apply ``preprocess``; with ``draft_px``, decode large JPEGs reduced.

    Args:
        path: an image file, or a binary file object holding one.
        preprocess: PIL image → tensor.
        draft_px: if set, a JPEG whose shorter side is at least twice ``draft_px`` is decoded at
            the smallest 1/2, 1/4 or 1/8 scale whose shorter side is still ≥ ``draft_px``
            (``PIL.Image.draft``). Faster, but not bit-identical to a full decode.

    Returns:
        ``preprocess`` applied to the image.
    """
    with Image.open(path) as image:
        if draft_px is not None and image.format == "JPEG":
            w, h = image.size
            scale = draft_px / min(w, h)  # the shortest-side resize preprocess will do
            image.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        return preprocess(image)


class _ImageFiles(Dataset):
    """Index → ``(index, tensor or None, failure reason or None)``; never raises on bad files."""

    def __init__(
        self, paths: Sequence[str], preprocess: Transform, draft_px: Optional[int]
    ) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.draft_px = draft_px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            with _one_thread():
                return i, load_image(self.paths[i], self.preprocess, self.draft_px), None
        except Exception as e:  # any decoder error is this file's problem, not the run's
            return i, None, f"{type(e).__name__}: {e}".replace("\n", " ")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run one image's small tensor ops on one thread (as DataLoader workers already do).

    Elementwise results do not depend on the thread count, so this is exact; it avoids waking the
    model's intra-op thread pool for [3, R, R] tensors, which costs far more than the work when
    the cores are busy (measured 0.5 ms vs 47 ms per image for ToTensor + Normalize on 2 shared
    cores).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _collate(
    items: list[tuple[int, Optional[torch.Tensor], Optional[str]]],
) -> tuple[list[int], Optional[torch.Tensor], list[tuple[int, str]]]:
    """Stack the decoded images of a batch [n, 3, R, R]; keep failures aside."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None and reason is not None]
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, bad


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (cpu for a model without any)."""
    tensor = next(iter(model.parameters()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _call(model: torch.nn.Module, method: str, x: torch.Tensor) -> torch.Tensor:
    """``model.<method>(x)``, typed (``nn.Module.__getattr__`` is typed as returning modules)."""
    out: torch.Tensor = getattr(model, method)(x)
    return out


def embedding_width(model: torch.nn.Module) -> int:
    """D, the width of the model's embeddings (0 if it cannot be told)."""
    projection = getattr(model, "text_projection", None)
    return int(projection.shape[1]) if isinstance(projection, torch.Tensor) else 0


def _empty(model: torch.nn.Module) -> torch.Tensor:
    """[0, D]: no rows, the model's embedding width."""
    return torch.empty(0, embedding_width(model))


def _normalised(features: torch.Tensor) -> torch.Tensor:
    """float32 rows of unit L2 norm."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def iter_image_batches(
    model: torch.nn.Module,
    paths: Sequence[str],
    *,
    preprocess: Optional[Transform] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    fast_decode: bool = False,
    progress: bool = False,
) -> Iterator[ImageBatch]:
    """Like :func:`embed_images`, but yield each batch's result as soon as it is ready.

    Batches come in input order; stopping the iteration early stops the workers.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"need batch_size ≥ 1 and num_workers ≥ 0, got {batch_size} and {num_workers}"
        )
    device = torch.device(device) if device is not None else _model_device(model)
    res = input_resolution(model) if preprocess is None or fast_decode else 0
    preprocess = preprocess or transform(res)
    loader = DataLoader(
        _ImageFiles(paths, preprocess, res if fast_decode else None),
        batch_size=batch_size,
        num_workers=min(num_workers, -(-len(paths) // batch_size)),  # no idle workers
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    with tqdm(total=len(paths), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for indices, images, bad in loader:
            embeddings = _empty(model)
            if images is not None:
                images = images.to(device, non_blocking=True)  # [n, 3, R, R]
                features = _call(model, "encode_image", images)  # [n, D]
                embeddings = _normalised(features).cpu()
            bar.update(len(indices) + len(bad))
            failed = [(paths[i], reason) for i, reason in bad]
            yield ImageBatch(embeddings, [paths[i] for i in indices], failed)


def embed_images(
    model: torch.nn.Module,
    paths: Sequence[str],
    *,
    preprocess: Optional[Transform] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    fast_decode: bool = False,
    progress: bool = False,
) -> EmbeddedImages:
    """Embed image files into L2-normalised float32 vectors, skipping files that cannot be read.

    Decoding and preprocessing run in ``num_workers`` DataLoader worker processes, overlapping the
    model; on CUDA batches go through pinned memory with non-blocking copies. The default path
    gives exactly ``model.encode_image(torch.stack([preprocess(Image.open(p)) for p in batch]))``
    normalised, for consecutive batches of ``batch_size`` readable files.

    Args:
        model: a CLIP model (eager or traced), already on its device.
        paths: image files, embedded in this order (see :func:`find_images`).
        preprocess: PIL image → [3, R, R] tensor; default the standard transform for
            ``model.visual.input_resolution``.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes (0: decode in this process).
        device: where images go; default the device of the model's parameters.
        fast_decode: decode large JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) that still covers
            the model input after the shorter-side resize. Much faster on photos far larger than
            the model input; NOT bit-exact (pixels differ slightly from a full decode + bicubic
            resize). Files other than JPEG, and JPEGs under twice the input size, are unaffected.
        progress: show a tqdm progress bar (stderr).

    Returns:
        :class:`EmbeddedImages` with ``embeddings`` [N, D], ``paths`` and ``failed``.

    Raises:
        ValueError: if ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    batches = list(
        iter_image_batches(
            model,
            paths,
            preprocess=preprocess,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            fast_decode=fast_decode,
            progress=progress,
        )
    )
    return _concat(batches, _empty(model))


def _concat(batches: Sequence[ImageBatch], empty: torch.Tensor) -> EmbeddedImages:
    embeddings = torch.cat([empty, *(b.embeddings for b in batches)])
    return EmbeddedImages(
        embeddings,
        [p for b in batches for p in b.paths],
        [f for b in batches for f in b.failed],
    )


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
    truncate: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Embed texts into L2-normalised float32 vectors, in order.

    Args:
        model: a CLIP model, already on its device.
        texts: the texts.
        batch_size: texts per forward pass.
        device: where tokens go; default the device of the model's parameters.
        truncate: cut texts longer than the context instead of raising.
        progress: show a tqdm progress bar (stderr).

    Returns:
        float32 [N, D], each row of unit norm.

    Raises:
        RuntimeError: if a text is longer than the context and ``truncate`` is False.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    context = int(getattr(model, "context_length", 77))
    out: list[torch.Tensor] = []
    with tqdm(total=len(texts), unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            tokens = tokenize(chunk, context_length=context, truncate=truncate).to(device)
            out.append(_normalised(_call(model, "encode_text", tokens)).cpu())  # [n, D]
            bar.update(len(chunk))
    return torch.cat([_empty(model), *out])


# ---- embeddings on disk ---------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"


def rows_file(path: PathLike) -> str:
    """The text file listing an ``.npy`` output's row keys: ``x.npy`` → ``x.rows.txt``."""
    return os.path.splitext(os.fspath(path))[0] + ".rows.txt"


def save_embeddings(
    path: PathLike, keys: Sequence[str], embeddings: torch.Tensor, key_name: str = "path"
) -> None:
    """Write embeddings atomically (temporary file + ``os.replace``) as ``.npy`` or ``.parquet``.

    ``.npy``: a float32 [N, D] array, plus :func:`rows_file` with one key per line (written first,
    so an interrupted save leaves at worst extra lines, which :func:`load_embeddings` ignores).
    ``.parquet``: columns ``key_name`` (string) and ``embedding`` (fixed-size list of float32);
    needs the ``parquet`` extra (pyarrow). numpy is not needed.

    Args:
        path: output file, ending in ``.npy`` or ``.parquet``.
        keys: one per row (image path or caption); must not contain newlines for ``.npy``.
        embeddings: [N, D].
        key_name: the key column's name in Parquet ("path" or "text").

    Raises:
        ValueError: on an unknown extension, a row-count mismatch or a key with a newline.
    """
    path = os.fspath(path)
    if len(keys) != embeddings.shape[0]:
        raise ValueError(f"{len(keys)} keys for {embeddings.shape[0]} embeddings")
    data = embeddings.detach().to("cpu", torch.float32).contiguous()
    kind = _format_of(path)
    if kind == "npy":
        if any("\n" in k or "\r" in k for k in keys):
            raise ValueError("a key contains a line break; write Parquet instead of .npy")
        _atomic_write(rows_file(path), "".join(f"{k}\n" for k in keys).encode())
        _atomic_write(path, _npy_bytes(data))
    else:
        _write_parquet(path, keys, data, key_name)


def load_embeddings(path: PathLike) -> tuple[list[str], torch.Tensor]:
    """Read what :func:`save_embeddings` wrote.

    Returns:
        ``(keys, embeddings)``: keys in row order and a float32 [N, D] tensor.

    Raises:
        ValueError: if the file is not a float32 2-D array / expected Parquet table, or its rows
            file lists fewer keys than it has rows.
    """
    path = os.fspath(path)
    if _format_of(path) == "parquet":
        return _read_parquet(path)
    with open(path, "rb") as f:
        embeddings = _npy_tensor(f.read(), path)
    with open(rows_file(path), encoding="utf-8") as f:
        keys = f.read().split("\n")[:-1]
    if len(keys) < embeddings.shape[0]:
        raise ValueError(
            f"{rows_file(path)} lists {len(keys)} rows but {path} has {embeddings.shape[0]}; "
            "they do not belong together (remove both to start over)"
        )
    return keys[: embeddings.shape[0]], embeddings


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".parquet"):
        raise ValueError(f"output must end in .npy or .parquet, got {path!r}")
    return ext[1:]


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _npy_bytes(data: torch.Tensor) -> bytes:
    """NPY format 1.0 of a float32 C-order array (header padded to 64 bytes, then raw data)."""
    order = "<" if sys.byteorder == "little" else ">"
    header = f"{{'descr': '{order}f4', 'fortran_order': False, 'shape': {tuple(data.shape)}, }}"
    header += " " * (63 - (len(_NPY_MAGIC) + 4 + len(header)) % 64) + "\n"
    return (
        _NPY_MAGIC
        + b"\x01\x00"
        + struct.pack("<H", len(header))
        + header.encode()
        + _raw_bytes(data)
    )


def _raw_bytes(data: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor (numpy-free)."""
    size = data.numel() * data.element_size()
    return ctypes.string_at(data.data_ptr(), size) if size else b""


def _npy_tensor(blob: bytes, path: str) -> torch.Tensor:
    """Parse an NPY (1.0 or 2.0) float32 2-D C-order array."""
    if not blob.startswith(_NPY_MAGIC):
        raise ValueError(f"{path} is not a .npy file")
    major = blob[6]
    size_fmt, start = ("<H", 10) if major == 1 else ("<I", 12)
    (header_len,) = struct.unpack(size_fmt, blob[8:start])
    header = ast.literal_eval(blob[start : start + header_len].decode("latin1"))
    order = "<" if sys.byteorder == "little" else ">"
    shape = tuple(header.get("shape", ()))
    if (
        header.get("descr") not in (f"{order}f4", "=f4")
        or header["fortran_order"]
        or len(shape) != 2
    ):
        raise ValueError(f"{path} must hold a float32 2-D C-order array, has {header}")
    raw = bytearray(blob[start + header_len :])
    if len(raw) != shape[0] * shape[1] * 4:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes of data for shape {shape}")
    if not raw:
        return torch.empty(shape)
    return torch.frombuffer(raw, dtype=torch.float32).reshape(shape)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(
            "Parquet output needs pyarrow: pip install 'clip-torch[parquet]' (or write .npy)"
        ) from e
    return pyarrow


def _write_parquet(path: str, keys: Sequence[str], data: torch.Tensor, key_name: str) -> None:
    """Columns ``key_name`` and ``embedding`` (fixed-size lists of ``data``'s float32/float16)."""
    pa = _pyarrow()
    raw = pa.py_buffer(_raw_bytes(data))
    arrow_type = pa.float16() if data.dtype == torch.float16 else pa.float32()
    values = pa.Array.from_buffers(arrow_type, data.numel(), [None, raw])
    column = pa.FixedSizeListArray.from_arrays(values, max(1, data.shape[1]))
    table = pa.table({key_name: pa.array(list(keys), type=pa.string()), "embedding": column})
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        pa.parquet.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_parquet(
    path: str, key_names: Sequence[str] = ("path", "text")
) -> tuple[list[str], torch.Tensor]:
    """``(keys, float32 [N, D])`` of a table with columns (one of ``key_names``, embedding)."""
    pa = _pyarrow()
    table = pa.parquet.read_table(path)
    names = table.column_names
    if len(names) != 2 or names[1] != "embedding" or names[0] not in key_names:
        raise ValueError(
            f"{path} must have columns ({'|'.join(key_names)}, embedding), has {names}"
        )
    keys = [str(k) for k in table.column(0).to_pylist()]
    column = table.column(1).combine_chunks()
    values = column.flatten().cast(pa.float32())
    raw = bytearray(values.buffers()[1])[values.offset * 4 : (values.offset + len(values)) * 4]
    flat = torch.frombuffer(raw, dtype=torch.float32) if raw else torch.empty(0)
    width = getattr(column.type, "list_size", flat.numel() // max(1, len(keys)))
    if flat.numel() != len(keys) * width:
        raise ValueError(f"{path}: embeddings of unequal length")
    return keys, flat.reshape(len(keys), width)
