"""Reading CLIP weights from disk: OpenAI's TorchScript archives and plain state dicts."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Union

import torch
from torch import Tensor

__all__ = ["CheckpointError", "is_torchscript_archive", "read_checkpoint"]

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
        path: a TorchScript archive as OpenAI released them, or a ``torch.save``'d state dict.

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
    return _read_state_dict(path), False


def _read_archive(path: str) -> dict[str, Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit deprecation
            module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError subclasses with long C++ traces
        raise CheckpointError(
            f"{path!r} looks like a TorchScript archive but cannot be read: {e}"
        ) from e
    return dict(module.state_dict())


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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path!r} does not hold a state dict (a dict of tensors); got {type(obj).__name__}"
        )
    return obj
