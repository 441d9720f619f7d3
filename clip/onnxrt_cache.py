"""The on-disk cache of the towers :func:`clip.onnxrt.use_onnxruntime` exports.

Exporting a tower takes seconds to minutes (ViT-B/32: ~30 s on 2 cores); the graph it gives
depends only on the tower's weights, its code and settings, and the exporter. So each exported
(and fused) tower is kept in ``$CLIP_CACHE_DIR/onnxruntime/<key>/`` (default
``~/.cache/clip/onnxruntime``), and a later process with the same tower loads it in a second.

The key is a SHA256 over everything the graph depends on: every parameter's and buffer's name,
dtype, shape and bytes; each module's class, the compiled code of its methods, and its plain
attributes (``num_heads``, ``eps``, ``input_resolution``...); the export settings and the code of
:func:`clip.export.export_tower` and :func:`clip.export.fuse`; and the versions of clip, torch,
onnx and onnxruntime. A tower with a hook or a method patched on an
instance is exported afresh and not cached (what it computes is not in its code).

An entry is written to a temporary folder beside its final name and renamed into place whole,
so a killed export leaves no entry (its leftover is removed by a later call after a day).
``info.json`` records each file's SHA256, checked when the entry is used: a damaged entry is
removed and exported again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from clip.atomic import atomic_write, fsync_dir
from clip.download import default_cache_dir
from clip.export import export_tower, fuse
from clip.layers import global_hooks_active, is_hooked

__all__ = ["ExportCache", "code_identity", "tower_key"]

log = logging.getLogger(__name__)

FORMAT = "clip-onnxruntime-export-1"
STALE_SECONDS = 24 * 3600  # a temporary folder this old is a killed export's leftover
_PLAIN = (bool, int, float, str, type(None))


class ExportCache:
    """Exported towers on disk, one folder per key.

    Args:
        root: the cache folder (``None``: ``$CLIP_CACHE_DIR/onnxruntime``, by default
            ``~/.cache/clip/onnxruntime``).
    """

    def __init__(self, root: Union[str, os.PathLike[str], None] = None) -> None:
        self.root = Path(root) if root is not None else Path(default_cache_dir()) / "onnxruntime"

    def get(self, key: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict]:
        """The folder of entry ``key``, built by ``build(folder)`` first if it is missing.

        Args:
            key: the entry's key (:func:`tower_key`).
            build: writes the entry's files into the empty folder it is given and returns what
                ``info.json`` should also record (e.g. the fused operators).

        Returns:
            The entry's folder and its ``info.json`` contents.
        """
        folder = self.root / key
        info = self._verified(folder)
        if info is not None:
            return folder, info
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=self.root))
        try:
            extra = build(staging)
            files = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
            info = {"format": FORMAT, "files": files, **extra}
            atomic_write(staging / "info.json", json.dumps(info, indent=1).encode())
            for name in files:
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
            try:
                os.rename(staging, folder)
            except OSError:  # another process published the same entry first: use it
                if self._verified(folder) is None:
                    raise
            fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder, json.loads((folder / "info.json").read_text())

    def _verified(self, folder: Path) -> Optional[dict]:
        """``info.json`` of the entry in ``folder`` if every file checks out; a damaged entry
        is removed."""
        try:
            info = json.loads((folder / "info.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            info = None
        ok = isinstance(info, dict) and info.get("format") == FORMAT
        files = info.get("files", {}) if ok and info is not None else {}
        ok = ok and all(
            (folder / n).is_file() and _sha256(folder / n) == h for n, h in files.items()
        )
        if ok and info is not None:
            return info
        log.warning(
            "removing the damaged ONNX Runtime cache entry %s; it is exported again", folder
        )
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def _remove_stale(self) -> None:
        now = time.time()
        for tmp in self.root.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(tmp, ignore_errors=True)


def tower_key(module: nn.Module, settings: dict[str, Any]) -> Optional[str]:
    """The cache key of exporting ``module`` with ``settings``, or None when it must not be
    cached (a hook, or a method patched on an instance: not visible in the module's code).

    Args:
        module: the tower.
        settings: whatever else the export depends on (JSON-serialisable).

    Returns:
        A hex SHA256, or None.
    """
    import onnx
    import onnxruntime

    import clip

    h = hashlib.sha256()
    versions = [FORMAT, clip.__version__, torch.__version__, onnx.__version__]
    h.update(json.dumps([versions, onnxruntime.__version__, settings], sort_keys=True).encode())
    if global_hooks_active():
        return None
    for exporter in (export_tower, fuse):  # what our exporter and fusion pass do
        h.update(code_identity(exporter.__code__))
    classes: set[type] = set()
    for name, m in _named_modules(module):
        if is_hooked(m) or any(callable(v) for k, v in vars(m).items() if not k.startswith("_")):
            return None
        classes.add(type(m))
        plain = {k: v for k, v in vars(m).items() if _is_plain(v) and not k.startswith("_")}
        h.update(json.dumps([name, type(m).__qualname__, plain], sort_keys=True).encode())
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(m, kind).items():
                h.update(
                    f"{kind} {key} {None if t is None else (t.dtype, tuple(t.shape))}".encode()
                )
                if t is not None:
                    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        for chunk in _code_of(cls):
            h.update(chunk)
    return h.hexdigest()


def _named_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    yield "", root
    for name, m in root.named_modules(remove_duplicate=False):
        if name:
            yield name, m


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _code_of(cls: type) -> Iterator[bytes]:
    """The identity of what ``cls``'s methods compute: their compiled code, by name."""
    yield f"{cls.__module__}.{cls.__qualname__}".encode()
    for base in cls.__mro__:
        if base is object:
            continue
        for name, value in sorted(vars(base).items()):
            for fn in _functions_in(value):
                code = getattr(fn, "__code__", None)
                yield name.encode() + (code_identity(code) if code is not None else b"")


def code_identity(code: types.CodeType) -> bytes:
    """What a function's code computes, as bytes that stay the same across calls and processes.

    Its bytecode, names and constants, nested functions included. (``marshal.dumps`` of a code
    object is not stable: it changes once the interpreter has specialised the code.)

    Args:
        code: a function's ``__code__``.

    Returns:
        The bytes.
    """
    parts = [code.co_code, repr((code.co_names, code.co_varnames, code.co_freevars)).encode()]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            parts.append(code_identity(const))
        elif isinstance(const, frozenset):  # its order follows string hashing, per process
            parts.append(repr(sorted(map(repr, const))).encode())
        else:
            parts.append(repr(const).encode())
    return b"\0".join(parts)


def _functions_in(value: Any) -> list[Any]:
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset) if f is not None]
    if isinstance(value, (staticmethod, classmethod)):
        return [value.__func__]
    return [value] if callable(value) else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
