"""Write outputs whole or not at all, with the metadata that says what made them; read them back.

Every file goes through :func:`clip.data.fs.open_write` (temporary file, fsync, rename, fsync of
the folder). Formats: ``.npy`` (float32 [N, D], numpy not needed) with a rows file naming each
row; Parquet with a key column and a fixed-size-list ``embedding`` column; JSON for stats, plans
and the ``<out>.meta.json`` sidecar that records the model and precision of a single-file output.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from clip.data import fs

__all__ = [
    "load_embeddings",
    "meta_file",
    "parquet_row_count",
    "pyarrow",
    "raw_bytes",
    "read_json",
    "read_meta",
    "read_parquet",
    "rows_file",
    "save_embeddings",
    "write_json",
    "write_parquet",
]

PathLike = Union[str, "os.PathLike[str]"]
_NPY_MAGIC = b"\x93NUMPY"


def pyarrow() -> Any:
    """The ``pyarrow`` module with ``pyarrow.parquet`` loaded.

    Raises:
        ImportError: naming the extra to install.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(
            "Parquet output needs pyarrow: pip install 'clip-torch[parquet]' (or write .npy)"
        ) from e
    return pa


def raw_bytes(data: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor (numpy-free)."""
    size = data.numel() * data.element_size()
    return ctypes.string_at(data.data_ptr(), size) if size else b""


def write_json(path: str, value: Any) -> None:
    """Write ``value`` as JSON to ``path``, atomically."""
    with fs.open_write(path) as f:
        f.write(json.dumps(value, indent=1).encode())


def read_json(path: str) -> Any:
    """The JSON value in ``path``.

    Raises:
        OSError: if it cannot be read; ValueError: if it is not JSON.
    """
    return json.loads(fs.read_bytes(path).decode("utf-8"))


# ---- .npy and the single-file outputs -------------------------------------------------------


def rows_file(path: PathLike) -> str:
    """The text file listing an ``.npy`` output's row keys: ``x.npy`` → ``x.rows.txt``."""
    return os.path.splitext(os.fspath(path))[0] + ".rows.txt"


def meta_file(path: PathLike) -> str:
    """The sidecar recording what made a single-file output: ``x.npy`` → ``x.npy.meta.json``."""
    return os.fspath(path) + ".meta.json"


def read_meta(path: PathLike) -> Optional[dict[str, Any]]:
    """The metadata recorded beside ``path`` (None if there is none)."""
    sidecar = meta_file(path)
    if not fs.exists(sidecar):
        return None
    value = read_json(sidecar)
    return value if isinstance(value, dict) else None


def save_embeddings(
    path: PathLike,
    keys: Sequence[str],
    embeddings: torch.Tensor,
    key_name: str = "path",
    meta: Optional[dict[str, Any]] = None,
) -> None:
    """Write embeddings atomically as ``.npy`` or ``.parquet``.

    ``.npy``: a float32 [N, D] array, plus :func:`rows_file` with one key per line (written first,
    so an interrupted save leaves at worst extra lines, which :func:`load_embeddings` ignores).
    ``.parquet``: columns ``key_name`` (string) and ``embedding`` (fixed-size list of float32);
    needs the ``parquet`` extra (pyarrow). numpy is not needed.

    Args:
        path: output file, ending in ``.npy`` or ``.parquet``.
        keys: one per row (image path or caption); must not contain newlines for ``.npy``.
        embeddings: [N, D].
        key_name: the key column's name in Parquet ("path" or "text").
        meta: if given, written first to :func:`meta_file` (what made the output: model,
            precision), for reruns to check.

    Raises:
        ValueError: on an unknown extension, a row-count mismatch or a key with a newline.
    """
    path = os.fspath(path)
    if len(keys) != embeddings.shape[0]:
        raise ValueError(f"{len(keys)} keys for {embeddings.shape[0]} embeddings")
    data = embeddings.detach().to("cpu", torch.float32).contiguous()
    kind = _format_of(path)
    if kind == "npy" and any("\n" in k or "\r" in k for k in keys):
        raise ValueError("a key contains a line break; write Parquet instead of .npy")
    if meta is not None:
        write_json(meta_file(path), meta)
    if kind == "npy":
        with fs.open_write(rows_file(path)) as f:
            f.write("".join(f"{k}\n" for k in keys).encode())
        with fs.open_write(path) as f:
            f.write(_npy_bytes(data))
    else:
        write_parquet(path, keys, data, key_name)


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
        return read_parquet(path)
    embeddings = _npy_tensor(fs.read_bytes(path), path)
    keys = fs.read_bytes(rows_file(path)).decode("utf-8").split("\n")[:-1]
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


def _npy_bytes(data: torch.Tensor) -> bytes:
    """NPY format 1.0 of a float32 C-order array (header padded to 64 bytes, then raw data)."""
    order = "<" if sys.byteorder == "little" else ">"
    header = f"{{'descr': '{order}f4', 'fortran_order': False, 'shape': {tuple(data.shape)}, }}"
    header += " " * (63 - (len(_NPY_MAGIC) + 4 + len(header)) % 64) + "\n"
    size = struct.pack("<H", len(header))
    return _NPY_MAGIC + b"\x01\x00" + size + header.encode() + raw_bytes(data)


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


# ---- Parquet --------------------------------------------------------------------------------


def write_parquet(
    path: str,
    keys: Sequence[str],
    data: torch.Tensor,
    key_name: str,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Columns ``key_name`` and ``embedding`` (fixed-size lists of ``data``'s float32/float16).

    Args:
        path: the file, replaced atomically.
        keys: one per row.
        data: [N, D] float32 or float16 on the CPU.
        key_name: the key column's name.
        metadata: key-value pairs stored in the file's schema metadata.
    """
    pa = pyarrow()
    data = data.detach().cpu().contiguous()
    raw = pa.py_buffer(raw_bytes(data))
    arrow_type = pa.float16() if data.dtype == torch.float16 else pa.float32()
    values = pa.Array.from_buffers(arrow_type, data.numel(), [None, raw])
    column = pa.FixedSizeListArray.from_arrays(values, max(1, data.shape[1]))
    table = pa.table({key_name: pa.array(list(keys), type=pa.string()), "embedding": column})
    if metadata:
        table = table.replace_schema_metadata(metadata)
    with fs.open_write(path) as f:
        pa.parquet.write_table(table, f)


def parquet_row_count(path: str) -> int:
    """Rows in a Parquet file, from its footer.

    Raises:
        OSError or ValueError (pyarrow's ``ArrowInvalid``): if the file is not whole Parquet.
    """
    pa = pyarrow()
    with fs.open_read(path) as f:
        return int(pa.parquet.ParquetFile(f).metadata.num_rows)


def read_parquet(
    path: str, key_names: Sequence[str] = ("path", "text")
) -> tuple[list[str], torch.Tensor]:
    """``(keys, float32 [N, D])`` of a table with columns (one of ``key_names``, embedding)."""
    pa = pyarrow()
    with fs.open_read(path) as f:
        table = pa.parquet.read_table(f)
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
