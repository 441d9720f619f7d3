"""``clip.load`` and friends: the thin layer between files and :mod:`clip.model`.

Also the compatibility surface of OpenAI's ``clip.clip`` module (``_MODELS``, ``_download``,
``_transform``) for research code that imports those names.
"""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Optional, Union

import torch

from clip.checkpoint import read_checkpoint
from clip.download import MODELS, available_models, download
from clip.jit import trace
from clip.model import CLIP, build_from_state_dict, convert_weights
from clip.preprocess import Preprocess, transform
from clip.tokenizer import tokenize

__all__ = ["available_models", "load", "tokenize"]

_MODELS = MODELS
_download = download
_transform = transform

Device = Union[str, torch.device]


def load(
    name: Union[str, os.PathLike[str]],
    device: Optional[Device] = None,
    jit: bool = False,
    download_root: Optional[Union[str, os.PathLike[str]]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    resolution: Optional[int] = None,
) -> tuple[Union[CLIP, torch.jit.ScriptModule], Preprocess]:
    """Load a CLIP model and its image preprocessing.

    Args:
        name: a name from :func:`available_models` (downloaded and SHA256-verified into
            ``download_root``), or the path of a checkpoint: an OpenAI TorchScript archive or a
            state dict saved with ``torch.save``.
        device: where to put the model; default ``"cuda"`` if available, else ``"cpu"``.
            On CUDA the weights OpenAI keeps in fp16 are fp16; elsewhere everything is fp32.
        jit: return a TorchScript module (:class:`clip.jit.TracedCLIP`, traced from our model
            on ``device`` in its dtype) instead of a :class:`clip.model.CLIP`. Moving or casting
            the whole module later (``.to()``, ``.cpu()``, ``.float()``...) re-traces it there.
            A plain state dict with ``jit=True`` warns and loads eagerly.
        download_root: cache directory for named models (default ``$CLIP_CACHE_DIR`` or
            ``~/.cache/clip``).
        dtype: ``None`` for the default above; ``torch.float32`` for fp32 everywhere;
            ``torch.float16`` or ``torch.bfloat16`` for OpenAI's mixed layout in that dtype
            (convolutions, linear layers and projections in it; LayerNorm, BatchNorm and
            embeddings fp32), on any device. Inputs to ``encode_*`` are cast to it.
        resolution: input side in pixels, if not the checkpoint's: the vision positional
            embedding is resized (see :meth:`clip.model.CLIP.resize_input`) and the returned
            preprocess produces images of this size.

    Returns:
        ``(model, preprocess)``: the model in eval mode, and a transform mapping a PIL image to
        the model's input tensor [3, R, R].

    Raises:
        RuntimeError: if ``name`` is neither a known model nor an existing file, or ``device``
            is not available on this machine.
        ValueError: if ``dtype`` is not one of the above, or ``resolution`` not a multiple of
            the patch size (ViT) or of 32 (ResNet).
    """
    device = _usable_device(device)
    _check_dtype(dtype)
    state_dict, is_archive = read_checkpoint(_resolve(name, download_root))
    if jit and not is_archive:
        warnings.warn(
            f"{name!r} is a state dict, not a TorchScript archive; loading it with jit=False",
            stacklevel=2,
        )
        jit = False
    model = build_from_state_dict(state_dict)
    # Drop our reference to the file's tensors: the model then holds the only one, and the upcast
    # in settle_dtype frees each fp16 original as soon as its fp32 copy exists (peak ≈ 1 copy).
    del state_dict
    model = settle_dtype(model, device, dtype).to(device)
    if resolution is not None:
        model.resize_input(resolution)
    preprocess = transform(model.visual.input_resolution)
    return (trace(model) if jit else model), preprocess


def _usable_device(device: Optional[Device]) -> torch.device:
    """The requested device (default: cuda if available, else cpu), checked to exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    available = {
        "cuda": torch.cuda.is_available,
        "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
    }
    if device.type in available and not available[device.type]():
        raise RuntimeError(
            f"device {str(device)!r} was requested but is not available on this machine; "
            "pass device='cpu' (or leave device=None to pick the best available)"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(
            f"device {str(device)!r} was requested but only "
            f"{torch.cuda.device_count()} CUDA device(s) exist"
        )
    return device


def _resolve(
    name: Union[str, os.PathLike[str]], download_root: Optional[Union[str, os.PathLike[str]]]
) -> str:
    root = None if download_root is None else os.path.expanduser(os.fspath(download_root))
    if isinstance(name, str) and name in MODELS:
        return download(MODELS[name], root)
    path = os.path.expanduser(os.fspath(name))
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise RuntimeError(f"{path!r} is a directory; pass a checkpoint file or a model name")
    name = str(name)
    close = difflib.get_close_matches(name, available_models(), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RuntimeError(
        f"Model {name} not found; available models = {available_models()}, "
        f"or pass the path of a checkpoint file.{hint}"
    )


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(
            f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}"
        )


def settle_dtype(model: CLIP, device: torch.device, dtype: Optional[torch.dtype] = None) -> CLIP:
    """Put ``model`` in its working precision, in place.

    ``dtype=None``: OpenAI's mixed fp16 precision for CUDA, fp32 for every other device ("cpu",
    "mps"...). ``torch.float32``: fp32. ``torch.float16``/``torch.bfloat16``: the mixed layout of
    :func:`clip.model.convert_weights` in that dtype, whatever the device.
    """
    _check_dtype(dtype)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = model.float()
    if dtype != torch.float32:
        convert_weights(model)
    if dtype == torch.bfloat16:
        for tensor in model.parameters():
            if tensor.dtype == torch.float16:
                tensor.data = tensor.data.to(torch.bfloat16)
    return model
