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
from typing import Any, Optional

import torch
from torch import Tensor, nn

from clip.model import CLIP, ModifiedResNet

__all__ = ["compile_model", "optimize", "quantize_int8", "to_channels_last"]


def optimize(
    model: CLIP,
    *,
    compile: bool = False,
    channels_last: bool = False,
    int8: bool = False,
    onnxruntime: bool = False,
) -> CLIP:
    """Apply the chosen opt-in speed-ups to ``model`` in place.

    Args:
        model: a model from ``clip.load`` (eval mode).
        compile: :func:`compile_model` — ``torch.compile`` both towers, freezing their weights
            into the compiled graphs for grad-free calls (inference: later in-place weight edits
            are refused, see :func:`compile_model`). The first call of each input shape compiles
            (seconds to minutes); outputs equal the default within fp32 rounding (relative
            ~1e-6; BatchNorm folded into the convolutions of a ResNet: ~2e-6).
        channels_last: :func:`to_channels_last` — NHWC weights in a ResNet image tower (its
            inputs are NHWC by default). Same arithmetic in another order (relative ~1e-6).
        int8: :func:`quantize_int8` — CPU dynamic int8 quantization of the Linear layers.
            Approximate: on full-size models with random weights, image embeddings deviate by
            2-4e-2 relative to their largest value (cosine similarity to the exact embedding
            ≥ 0.999); CPU only.
        onnxruntime: :func:`clip.onnxrt.use_onnxruntime` — ``encode_image`` and ``encode_text``
            run through ONNX Runtime sessions (CPU, fp32), built now from the model's weights
            (the first export takes seconds to a minute; it is cached on disk, see
            :mod:`clip.onnxrt_cache`); ``encode_text`` still runs only up to the
            batch's last end-of-text token. Outputs equal the default within fp32 rounding
            (relative ~1e-6). Calls with gradients, hooks or changed weights run in torch,
            with one warning. Not combinable with the other opt-ins.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: for ``channels_last`` on a ViT, ``int8`` or ``onnxruntime`` on a model off
            the CPU, or ``onnxruntime`` with another opt-in.
        ImportError: for ``onnxruntime`` without the ``onnx`` extra installed.
    """
    if onnxruntime:
        if int8 or channels_last or compile:
            raise ValueError(
                "onnxruntime=True runs both towers in ONNX Runtime, so int8, channels_last and "
                "compile (torch paths) do not apply: pick onnxruntime=True alone"
            )
        from clip.onnxrt import use_onnxruntime

        return use_onnxruntime(model)
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

    Calls with gradients off (``torch.no_grad()`` / ``torch.inference_mode()``) run with
    inductor's *freezing*: at the first call of each input shape the compiled module's weights
    are baked into the graph as constants, BatchNorm is folded into the convolutions before it
    (ResNet towers), and weights are laid out ahead of time for the CPU kernels. What that
    implies:

    * Inference only. Calls with gradients on are compiled separately, without freezing: they
      read the live weights and are differentiable, like the default model.
    * Weights are read once. Editing a compiled module's weights in place afterwards
      (``load_state_dict``, an optimizer step, ``with torch.no_grad(): p.mul_(...)``) makes the
      next grad-free call raise ``RuntimeError`` instead of silently using the old values
      (compiling the same model again does not help: its frozen graphs stay cached); compile
      a new model built from the edited weights instead
      (``clip.model.build_from_state_dict(model.state_dict())``). Replacing a parameter object
      triggers a recompile.
    * Memory: each compiled graph (one per input shape, or one with a dynamic batch after the
      second shape) keeps its own prepacked copy of the weights beside the module's parameters.

    Pass ``options={"freezing": False}`` to compile without freezing (weights stay live).

    Args:
        model: the model.
        **compile_kwargs: passed to ``torch.compile``, overriding the defaults above (e.g.
            ``mode="max-autotune"``, ``backend="aot_eager"``, ``options={"freezing": False}``).

    Returns:
        The same ``model`` object.
    """
    options = compile_kwargs.get("options") or {}
    freezing = bool(options.get("freezing", True))
    towers = (
        (model.visual, compile_kwargs),
        (model.transformer, {"dynamic": True, **compile_kwargs}),
    )
    for module, kwargs in towers:
        previous = module._compiled_call_impl
        module.compile(**kwargs)
        if freezing:
            # nn.Module.compile keeps the compiled callable here; wrap it so freezing is on while
            # dynamo traces (it reads inductor's global flag then: options= alone is not enough).
            frozen = _FrozenCall(module, module._compiled_call_impl)
            if isinstance(previous, _FrozenCall):
                # dynamo keeps the graphs frozen for these very parameters: keep checking them
                frozen.versions = previous.versions
            module._compiled_call_impl = frozen
    return model


class _FrozenCall:
    """A module's compiled call, run with inductor freezing when gradients are off.

    Remembers the version counters of the module's tensors at its first frozen call, and
    refuses grad-free calls after any of them changed (the frozen graphs hold the old values).
    """

    def __init__(self, module: nn.Module, compiled: Any) -> None:
        self.module = module
        self.compiled = compiled
        self.versions: Optional[list[int]] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return self.compiled(*args, **kwargs)  # traced without freezing: live weights
        versions = _versions(self.module)
        if self.versions is not None and versions != self.versions:
            raise RuntimeError(
                f"the weights of this compiled {type(self.module).__name__} changed in place "
                "after clip.optimize(compile=True) froze them into the compiled graph, which "
                "would still use the old values. Compile a new model built from the edited "
                "weights (clip.model.build_from_state_dict(model.state_dict())), or compile "
                "with compile_model(model, options={'freezing': False}) to keep them live"
            )
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            result = self.compiled(*args, **kwargs)
        self.versions = versions
        return result


def _versions(module: nn.Module) -> list[int]:
    """Version counters of a module's parameters and buffers (bumped by every in-place edit)."""
    tensors = [*module.parameters(), *module.buffers()]
    return [t._version for t in tensors if not t.is_inference()]


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
