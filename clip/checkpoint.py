"""Reading and writing CLIP weights: OpenAI's TorchScript archives, state dicts, safetensors.

Nothing stored in a file is ever executed: pickles are read with ``weights_only=True``, TorchScript
archives only for their tensors, and safetensors hold nothing but tensors. :func:`save` writes
safetensors so that a model can be converted once and never unpickled again.

Every reader returns tensors in memory this process owns, never views of the file: a model loaded
from ``path`` can be saved over ``path`` (what fine-tuning loops do), and the file can be
replaced or deleted while the model lives.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor

from clip.atomic import open_atomic

__all__ = ["CheckpointError", "is_safetensors", "is_torchscript_archive", "read_checkpoint", "save"]

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A file that cannot be read as CLIP weights."""


def is_torchscript_archive(path: PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding compiled code), not a state dict.

    Args:
        path: file to inspect; only the zip directory is read.

    Returns:
        True for archives written by ``torch.jit.save``.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_checkpoint(path: PathLike) -> tuple[dict[str, Tensor], bool]:
    """Read the weights in ``path`` onto the CPU without running code stored in the file.

    Args:
        path: a TorchScript archive as OpenAI released them, a ``torch.save``'d state dict
            (also wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, and with the
            ``module.`` key prefix of DataParallel/DDP), or a safetensors file.

    Returns:
        ``(state_dict, is_archive)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is neither an archive nor a state dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if is_torchscript_archive(path):
        return _read_archive(path), True
    if is_safetensors(path):
        return _strip_module_prefix(_read_safetensors(path)), False
    return _read_state_dict(path), False


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (a little-endian length, then JSON).

    Args:
        path: file to inspect; only its first 9 bytes are read.

    Returns:
        True for files written by ``safetensors`` (e.g. :func:`save`).
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len < os.path.getsize(path)


def _read_archive(path: str) -> dict[str, Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit deprecation
            module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError subclasses with long C++ traces
        raise CheckpointError(
            f"{path!r} looks like a TorchScript archive but cannot be read "
            f"(truncated or corrupt download? delete it and download again): {e}"
        ) from None
    state_dict = dict(module.state_dict())  # detached tensors: nothing refers to the module
    del module
    return state_dict


# Lines of torch.load's messages that explain weights_only in general, not this file.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _corrupt(path: str, e: Exception) -> CheckpointError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    details = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    reason = details[-1] if details else type(e).__name__
    return CheckpointError(
        f"{path!r} is neither a TorchScript archive nor a torch.save'd state dict "
        f"(truncated or corrupt download? delete it and download again): {reason}"
    )


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """The state dict in a ``torch.save`` file, read into memory this process owns.

    Never memory-mapped: a mapped tensor keeps reading the file, so saving over it (what a
    fine-tuning loop does with ``torch.save(model.state_dict(), path)``) would truncate the pages
    under the tensors being written (SIGBUS, and a truncated file). ``torch.load`` reads each
    storage record straight into its own buffer, so the peak is one copy of the weights, and an
    fp16 file's upcast (in :func:`clip.clip.settle_dtype`) frees each original in turn.
    """
    return _strip_module_prefix(_unwrap(_torch_load(path), path))


def _torch_load(path: str) -> object:
    try:
        # An open file, not the name: torch.load hands names ending in .safetensors to
        # safetensors, which cannot read a torch.save'd file called that.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise _corrupt(path, e) from e
        raise CheckpointError(
            f"{path!r} is not a plain state dict: it refers to the Python object {found[1]}, and "
            "loading it would execute code, which is refused for safety. If you trust the file, "
            "re-save its weights with torch.save(model.state_dict(), path)"
        ) from e
    except Exception as e:
        raise _corrupt(path, e) from e


# Keys under which training scripts commonly nest the model's state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _unwrap(obj: object, path: str) -> dict[str, Tensor]:
    """The state dict in ``obj``: ``obj`` itself, or ``obj[key]`` for a training-script wrapper."""
    if _is_state_dict(obj):
        return dict(obj)  # type: ignore[call-overload]
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
    kind = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else None
    raise CheckpointError(
        f"{path!r} does not hold a state dict (a dict of tensors, possibly under one of the keys "
        f"{list(_WRAPPER_KEYS)}); got {kind or type(obj).__name__}. Save the weights with "
        "torch.save(model.state_dict(), path) or clip.save(model, path)"
    )


def _strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys without the ``module.`` prefix that DataParallel and DDP add to every key."""
    while state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "reading or writing .safetensors files needs the optional safetensors package: "
            "pip install 'clip-torch[safetensors]'"
        ) from None
    return safetensors.torch


def _read_safetensors(path: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file, in memory this process owns (never a view of the file).

    safetensors maps the file by default, which would alias it as a mapped ``torch.load`` does.
    Its ``pread`` backend (safetensors >= 0.8) reads each tensor into its own buffer (one copy
    of the weights at the peak); older versions map, and each tensor is copied out of the map.
    """
    st = _safetensors_torch()
    try:
        if "backend" in inspect.signature(st.load_file).parameters:
            return dict(st.load_file(path, device="cpu", backend="pread"))
        with st.safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(
            f"{path!r} looks like a safetensors file but cannot be read "
            f"(truncated or corrupt? write it again with clip.save): {e}"
        ) from e


def save(model_or_state_dict: Union[torch.nn.Module, Mapping[str, Tensor]], path: PathLike) -> None:
    """Write CLIP weights to ``path`` as safetensors, atomically; ``clip.load(path)`` reads them.

    The file holds OpenAI's state-dict key names and the tensors' own dtypes (a model loaded on
    CUDA keeps OpenAI's fp16 weights in fp16; one loaded on CPU is all fp32). No code is stored,
    so loading it never unpickles anything. Needs the ``safetensors`` extra.

    Args:
        model_or_state_dict: a :class:`clip.model.CLIP` (also wrapped in DataParallel/DDP, or the
            TorchScript module of ``clip.load(..., jit=True)``), or its state dict.
        path: destination; written to a temporary file beside it and renamed into place.

    Raises:
        ImportError: if safetensors is not installed.
        TypeError: if the argument holds no tensors to save.
    """
    obj = model_or_state_dict
    raw = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not _is_state_dict(raw):
        raise TypeError(
            "clip.save expects a model or a state dict (a non-empty dict of str -> Tensor), "
            f"got {type(obj).__name__}"
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in _strip_module_prefix(dict(raw)).items()}
    _write_atomically(tensors, os.fspath(path))


def _write_atomically(tensors: dict[str, Tensor], path: str) -> None:
    """Serialise ``tensors`` as safetensors and replace ``path`` with them in one step.

    The serialised bytes are built in memory (one more copy of the weights while saving), since
    :func:`clip.atomic.open_atomic` hands out an open file, not a name for safetensors to open.
    """
    st = _safetensors_torch()
    data = st.save(tensors, metadata={"format": "pt", "producer": "clip-torch"})
    with open_atomic(path) as f:
        f.write(data)
