"""``clip.load`` and friends: the thin layer between files and :mod:`clip.model`.

Also the compatibility surface of OpenAI's ``clip.clip`` module (``_MODELS``, ``_download``,
``_transform``) for research code that imports those names.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from clip.config import CLIPConfig
from clip.download import MODELS, available_models, download
from clip.jit import trace
from clip.model import CLIP, build_from_state_dict, convert_weights
from clip.preprocess import Preprocess, transform
from clip.sources import open_weights
from clip.tokenizer import tokenize

__all__ = ["available_models", "load", "tokenize"]

_MODELS = MODELS
_download = download
_transform = transform

Device = Union[str, torch.device]


ConfigArg = Union[CLIPConfig, Mapping[str, Any], str, "os.PathLike[str]"]


def load(
    name: Union[str, os.PathLike[str]],
    device: Optional[Device] = None,
    jit: bool = False,
    download_root: Optional[Union[str, os.PathLike[str]]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    resolution: Optional[int] = None,
    config: Optional[ConfigArg] = None,
) -> tuple[Union[CLIP, torch.jit.ScriptModule], Preprocess]:
    """Load a CLIP model and its image preprocessing.

    Args:
        name: one of

            - a name from :func:`available_models` (OpenAI's nine, e.g. ``"ViT-B/32"``),
              downloaded and SHA256-verified into ``download_root``;
            - a name from :func:`clip.available_weights`, e.g. ``"ViT-L-14/dfn2b"``: weights of
              OpenAI's architecture trained by others, from the Hugging Face hub (needs the
              ``hub`` extra), with the activation, head width and preprocessing they were
              trained with;
            - ``"hf-hub:ORG/REPO"`` (or ``"hf-hub:ORG/REPO@REVISION"``): a hub repository in
              open_clip's layout;
            - the path of a folder in open_clip's layout (``open_clip_config.json`` and
              ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), as written by
              :func:`clip.save`;
            - the path of a checkpoint file: an OpenAI TorchScript archive, a state dict saved
              with ``torch.save``, or a safetensors file.
        device: where to put the model; default ``"cuda"`` if available, else ``"cpu"``.
            On CUDA the weights OpenAI keeps in fp16 are fp16; elsewhere everything is fp32.
        jit: return a TorchScript module (:class:`clip.jit.TracedCLIP`, traced from our model
            on ``device`` in its dtype) instead of a :class:`clip.model.CLIP`. Moving or casting
            the whole module later (``.to()``, ``.cpu()``, ``.float()``...) re-traces it there.
            A bare state-dict file with ``jit=True`` warns and loads eagerly, as OpenAI's
            package does.
        download_root: cache directory for downloads (default ``$CLIP_CACHE_DIR`` or
            ``~/.cache/clip`` for OpenAI's files, the Hugging Face cache for the hub).
        dtype: ``None`` for the default above; ``torch.float32`` for fp32 everywhere;
            ``torch.float16`` or ``torch.bfloat16`` for OpenAI's mixed layout in that dtype
            (convolutions, linear layers and projections in it; LayerNorm, BatchNorm and
            embeddings fp32), on any device. Inputs to ``encode_*`` are cast to it.
        resolution: input side in pixels, if not the checkpoint's: the vision positional
            embedding is resized (see :meth:`clip.model.CLIP.resize_input`) and the returned
            preprocess produces images of this size.
        config: what the weights' shapes cannot tell, for weights without their config (or to
            replace it): a :class:`clip.config.CLIPConfig`, an open_clip config (a dict, or the
            path of an ``open_clip_config.json``), or a name from :func:`clip.available_weights`.
            Default: the folder's or file's own config, else OpenAI's values (QuickGELU, heads
            of 64, OpenAI's preprocessing).

    Returns:
        ``(model, preprocess)``: the model in eval mode, and a transform mapping a PIL image to
        the model's input tensor [3, R, R], as the weights were trained with.

    Raises:
        RuntimeError: if ``name`` is neither a known model nor an existing file or folder, or
            ``device`` is not available on this machine.
        ValueError: if ``dtype`` is not one of the above, ``resolution`` not a multiple of the
            patch size (ViT) or of 32 (ResNet), or ``config`` does not describe the weights.
        clip.config.UnsupportedModelError: for weights of another model family (SigLIP,
            ConvNeXt, EVA, CoCa...), which open_clip loads.
    """
    device = _usable_device(device)
    _check_dtype(dtype)
    source = open_weights(name, download_root, config)
    if jit and not (source.is_archive or source.traceable):
        warnings.warn(
            f"{name!r} is a state dict, not a TorchScript archive; loading it with jit=False",
            stacklevel=2,
        )
        jit = False
    model = build_from_state_dict(source.state_dict, source.config)
    # Drop our reference to the file's tensors: the model then holds the only one, and the upcast
    # in settle_dtype frees each fp16 original as soon as its fp32 copy exists (peak ≈ 1 copy).
    del source
    model = settle_dtype(model, device, dtype).to(device)
    if resolution is not None:
        model.resize_input(resolution)
    preprocess = transform(model.visual.input_resolution, model.config.preprocess)
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
