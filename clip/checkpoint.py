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
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

from clip.atomic import open_atomic
from clip.config import CLIPConfig
from clip.folder import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    check_describes,
    config_from_open_clip,
    find_weights,
    new_save_id,
    open_clip_document,
    read_config_file,
    save_id_of,
    write_config,
)
from clip.weights import ARCHIVE_EXTRA_KEYS

__all__ = [
    "CheckpointError",
    "config_of",
    "is_safetensors",
    "is_torchscript_archive",
    "read_checkpoint",
    "read_folder",
    "read_safetensors_metadata",
    "save",
    "saved_config",
]

# The safetensors metadata key under which :func:`save` stores the model's open_clip config.
CONFIG_METADATA_KEY = "open_clip_config"

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


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty for other files).

    Args:
        path: any file; only a safetensors header is read.

    Returns:
        The ``__metadata__`` mapping (``{"format": "pt", ...}``), or ``{}``.
    """
    if not is_safetensors(path):
        return {}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def saved_config(path: PathLike) -> Optional[dict[str, Any]]:
    """The open_clip config document :func:`save` stored in a safetensors file, if any."""
    text = read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def read_folder(
    folder: PathLike, config: Optional[CLIPConfig] = None
) -> tuple[dict[str, Tensor], CLIPConfig]:
    """The weights and configuration of a model folder in open_clip's hub layout.

    Args:
        folder: a directory with ``open_clip_config.json`` and ``open_clip_model.safetensors``
            (or ``open_clip_pytorch_model.bin``).
        config: use this instead of the folder's config file.

    Returns:
        ``(state_dict, config)``.

    Raises:
        FileNotFoundError: if the folder has no weights, or no config and none is given.
        CheckpointError: if the config and the weights come from different saves.
        clip.config.UnsupportedModelError: for another model family.
        ValueError: if the config does not describe the weights.
    """
    folder = os.fspath(folder)
    weights = find_weights(folder)
    if config is not None:
        state_dict, _ = read_checkpoint(weights)
        check_describes(config, state_dict)
        return state_dict, config
    # Everything that can refuse the folder before its weights are read (gigabytes).
    config_path = os.path.join(folder, CONFIG_NAME)
    stored = saved_config(weights)
    if not os.path.isfile(config_path):
        if stored is not None and save_id_of(stored):
            raise CheckpointError(
                f"{folder!r} has the weights of an unfinished clip.save (killed before it "
                f"wrote {CONFIG_NAME}); save the model again"
            )
        raise FileNotFoundError(
            f"{folder!r} has weights but no {CONFIG_NAME}, which says what shapes cannot "
            "(activation, head width, preprocessing); pass config= (a registry name such as "
            "'ViT-B-32/laion2b_s34b_b79k', an open_clip config file or a CLIPConfig)"
        )
    doc = read_config_file(config_path)
    try:
        config_from_open_clip(doc)  # another family, or a malformed config
    except ValueError as e:  # also UnsupportedModelError: name the file that says so
        raise type(e)(f"{config_path}: {e}") from e
    written, described = save_id_of(stored or {}), save_id_of(doc)
    if written is not None and described is not None and written != described:
        raise CheckpointError(
            f"{folder!r}: {CONFIG_NAME} and {os.path.basename(weights)} were written by different "
            "saves (a save interrupted between the two files?); save the model again"
        )
    # A config without our save id (open_clip's, or ours stripped of it, as on the hub) beside
    # the weights of a folder save is trusted when it describes the model that save wrote;
    # otherwise the save went over a folder open_clip wrote and was killed before its config.
    if written is not None and described is None and not _same_model(doc, stored or {}):
        raise CheckpointError(
            f"{folder!r}: {CONFIG_NAME} describes another model than the one clip.save wrote "
            f"into {os.path.basename(weights)} (a save over this folder, interrupted before its "
            "config?); save the model again, or pass config= to choose"
        )
    state_dict, _ = read_checkpoint(weights)
    return state_dict, config_from_open_clip(doc, state_dict)


def _same_model(doc: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether two open_clip config documents describe the same model and preprocessing."""
    try:
        return config_from_open_clip(doc) == config_from_open_clip(other)
    except ValueError:
        return False


def config_of(model: torch.nn.Module) -> Optional[CLIPConfig]:
    """The :class:`CLIPConfig` of a CLIP model, also wrapped (DataParallel/DDP, ``jit=True``)."""
    inner = getattr(model, "module", model)
    eager = inner.__dict__.get("_eager", inner)
    config = getattr(eager, "config", None)
    return config if isinstance(config, CLIPConfig) else None


def save(
    model_or_state_dict: Union[torch.nn.Module, Mapping[str, Tensor]],
    path: PathLike,
    *,
    config: Optional[CLIPConfig] = None,
) -> None:
    """Save CLIP weights as safetensors, atomically: a model folder, or a single file.

    A folder (``path`` is a directory, ends with a separator, or has no file extension) gets
    open_clip's hub layout: ``open_clip_model.safetensors`` and ``open_clip_config.json``. It loads
    with ``clip.load(folder)`` and open_clip's ``local-dir:`` and can be pushed to the hub as it
    is. The weights are written first, then the config, each atomically, and both carry one save
    id: a save killed in between leaves a folder that refuses to load instead of a wrong model.
    A stale ``open_clip_pytorch_model.bin`` is removed.

    A file path (``model.safetensors``) gets the weights alone, with the config in the file's
    metadata, so ``clip.load(path)`` still knows the activation, head width and preprocessing.

    Tensors keep OpenAI's key names and their own dtypes. No code is stored, so loading never
    unpickles anything. Needs the ``safetensors`` extra.

    Args:
        model_or_state_dict: a :class:`clip.model.CLIP` (also wrapped in DataParallel/DDP, or the
            TorchScript module of ``clip.load(..., jit=True)``), or its state dict.
        path: destination folder or file.
        config: the model's configuration; default ``model.config``, or for a bare state dict
            what its shapes tell with OpenAI's defaults for the rest.

    Raises:
        ImportError: if safetensors is not installed.
        TypeError: if the argument holds no tensors to save.
        ValueError: if ``config`` does not describe the weights.
        FileExistsError: if ``path`` has no extension (a folder) but is an existing file.
    """
    obj = model_or_state_dict
    raw = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not _is_state_dict(raw):
        raise TypeError(
            "clip.save expects a model or a state dict (a non-empty dict of str -> Tensor), "
            f"got {type(obj).__name__}"
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in _strip_module_prefix(dict(raw)).items()}
    tensors = {k: v for k, v in tensors.items() if k not in ARCHIVE_EXTRA_KEYS}
    if config is None and isinstance(obj, torch.nn.Module):
        config = config_of(obj)
    if config is None:
        config = CLIPConfig.from_state_dict(tensors)
    else:
        check_describes(config, tensors)
    path = os.fspath(path)
    if _is_folder_target(path):
        _write_folder(tensors, config, path)
    else:
        doc = open_clip_document(config)
        _write_atomically(tensors, path, {CONFIG_METADATA_KEY: json.dumps(doc)})


def _is_folder_target(path: str) -> bool:
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        return True
    if os.path.splitext(os.path.basename(path))[1] != "":
        return False
    if os.path.exists(path):
        raise FileExistsError(
            f"{path!r} is an existing file, and clip.save writes a model folder to a path without "
            f"an extension; save to {path + '.safetensors'!r} for a single file, or remove it"
        )
    return True


def _write_folder(tensors: dict[str, Tensor], config: CLIPConfig, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    doc = open_clip_document(config, save_id=new_save_id())
    weights = os.path.join(folder, SAFETENSORS_NAME)
    _write_atomically(tensors, weights, {CONFIG_METADATA_KEY: json.dumps(doc)})
    write_config(folder, doc)
    stale = os.path.join(folder, BIN_NAME)
    if os.path.isfile(stale):
        os.remove(stale)


def _write_atomically(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """Serialise ``tensors`` as safetensors and replace ``path`` with them in one step.

    The serialised bytes are built in memory (one more copy of the weights while saving), since
    :func:`clip.atomic.open_atomic` hands out an open file, not a name for safetensors to open.
    """
    st = _safetensors_torch()
    data = st.save(tensors, metadata={"format": "pt", "producer": "clip-torch", **metadata})
    with open_atomic(path) as f:
        f.write(data)
