"""Opt-in speed-ups that trade exactness or start-up time for throughput.

Nothing here runs unless called: ``clip.load`` returns the exact model, whose outputs match OpenAI's
reference. Each function changes the model in place (module names, state-dict keys and the
``encode_image`` / ``encode_text`` API stay as they are) and returns it for chaining::

    model, preprocess = clip.load("RN50", device="cpu")
    model = clip.optimize(model, compile=True, channels_last=True)

Measured speed-ups and deviations are in ``benchmarks/RESULTS.md`` (``python benchmarks/run.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from clip.model import CLIP, ModifiedResNet

__all__ = ["compile_model", "optimize", "quantize_int8", "to_channels_last"]


def optimize(
    model: CLIP, *, compile: bool = False, channels_last: bool = False, int8: bool = False
) -> CLIP:
    """Apply the chosen opt-in speed-ups to ``model`` in place.

    Args:
        model: a model from ``clip.load`` (eval mode).
        compile: :func:`compile_model` — ``torch.compile`` both towers. The first call of each
            input shape compiles (seconds to minutes); outputs equal the default within fp32
            rounding (relative ~1e-6).
        channels_last: :func:`to_channels_last` — NHWC weights in a ResNet image tower (its
            inputs are NHWC by default). Same arithmetic in another order (relative ~1e-6).
        int8: :func:`quantize_int8` — CPU dynamic int8 quantization of the Linear layers.
            Approximate: on full-size models with random weights, image embeddings deviate by
            2-4e-2 relative to their largest value (cosine similarity to the exact embedding
            ≥ 0.999); CPU only.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: for ``channels_last`` on a ViT, or ``int8`` on a model off the CPU.
    """
    if int8:
        quantize_int8(model)
    if channels_last:
        to_channels_last(model)
    if compile:
        compile_model(model)
    return model


def compile_model(model: CLIP, **compile_kwargs: Any) -> CLIP:
    """Compile the image tower and the text transformer with ``torch.compile``, in place.

    ``nn.Module.compile`` is used, so ``model.visual`` and ``model.transformer`` keep their
    types, attributes and state-dict keys. The text transformer sees a different length for
    each batch (texts are trimmed to their longest prompt), so it is compiled with dynamic
    shapes.

    Args:
        model: the model.
        **compile_kwargs: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``).

    Returns:
        The same ``model`` object.
    """
    model.visual.compile(**compile_kwargs)
    model.transformer.compile(**{"dynamic": True, **compile_kwargs})
    return model


def to_channels_last(model: CLIP) -> CLIP:
    """Store a ResNet image tower's weights NHWC and feed it NHWC images, in place.

    The default model already feeds its ResNet trunk channels-last images (the bulk of the
    speed-up, exact to fp32 rounding); this also stores the convolution weights NHWC, which saves
    re-laying them out on each call (measure it: on a 2-core CPU the difference is in the noise).

    Args:
        model: a model with a ResNet image tower (RN50, RN101, RN50x4...).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: if the image tower is a ViT (its one convolution gains nothing).
    """
    visual = model.visual
    if not isinstance(visual, ModifiedResNet):
        raise ValueError(
            "channels_last only speeds up ResNet image towers (RN50, RN101, ...); "
            f"this model's image tower is a {type(visual).__name__}: leave channels_last off"
        )
    visual.to(memory_format=torch.channels_last)
    visual.register_forward_pre_hook(_images_to_channels_last)
    return model


def _images_to_channels_last(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    images, *rest = args  # [B, 3, R, R]
    return (images.contiguous(memory_format=torch.channels_last), *rest)


def quantize_int8(model: CLIP) -> CLIP:
    """Replace every ``nn.Linear`` by a dynamically int8-quantized one (CPU only), in place.

    Covers the MLPs of both transformers and the ResNet attention pool; the fused attention
    in-projections (a raw weight, as in OpenAI's checkpoints) and convolutions stay fp32.

    Args:
        model: a model on the CPU in fp32.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: if the model is not on the CPU or not in fp32.
    """
    weight = model.token_embedding.weight
    if weight.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"int8 dynamic quantization runs on the CPU in fp32; this model is on "
            f"{weight.device} in {model.dtype}: load it with clip.load(name, device='cpu')"
        )
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the API still works.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=".*quantized tensor creation", category=UserWarning
        )
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
