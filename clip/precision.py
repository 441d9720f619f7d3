"""Training precision that cannot NaN: fp32 master weights, mixed precision by autocast.

OpenAI's ``clip.load`` on CUDA returns fp16 Linear/Conv weights (its "fp16 CUDA layout"), and
fine-tuning that model directly with Adam gives NaN after one step (OpenAI CLIP issues #57, #40).
Adam's arithmetic does not fit fp16: torch's default ε = 1e-8 rounds to 0 in fp16 (the CLIP
paper's 1e-6 is a subnormal, held to about 6 %), squared gradients below 6e-8 flush to 0, so
``m / (sqrt(v) + ε)`` divides by (nearly) zero and overflows; and an fp16 weight near 1 cannot
take an update below 5e-4, so lr = 1e-5 steps round away. :func:`prepare_for_training`
therefore upcasts every fp16/bf16 parameter to fp32, with a warning that says so, and mixed
precision is done the standard way instead:

- ``"fp32"``: no autocast, no loss scaling.
- ``"bf16"``: ``torch.autocast(device, torch.bfloat16)``; bf16 has fp32's range, no scaling.
- ``"fp16"``: ``torch.autocast(device, torch.float16)`` plus a ``torch.amp.GradScaler``, which
  scales the loss so fp16 gradients do not underflow, skips steps whose gradients overflow and
  adapts the scale. Works on CUDA, and on the CPU too (slow there; the tests use it).

The loss (:func:`clip.loss.contrastive_loss`) always runs in fp32, autocast or not.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["PRECISIONS", "Precision", "prepare_for_training"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What a training step needs for a precision: the autocast context and the loss scaler.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device_type: ``"cpu"``, ``"cuda"``... (the ``torch.autocast`` device type).
        scaler: a ``torch.amp.GradScaler``, enabled for fp16 only. Disabled, its ``scale(loss)``
            returns the loss, ``step(opt)`` calls ``opt.step()`` and ``unscale_``/``update`` do
            nothing, so one training step serves every precision. Save ``scaler.state_dict()``
            with the optimiser's to resume.
    """

    name: str
    device_type: str
    scaler: torch.amp.GradScaler = field(repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (``torch.float32`` for fp32: no autocast)."""
        return _DTYPES[self.name]

    def autocast(self) -> AbstractContextManager[object]:
        """A fresh context for the forward pass: ``torch.autocast`` for bf16/fp16, else a no-op."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def _check_precision(precision: str) -> str:
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision.lower()


def prepare_for_training(
    model: nn.Module,
    precision: str = "fp32",
    device: Optional[Union[str, torch.device]] = None,
) -> Precision:
    """Make ``model`` trainable in place (fp32 master weights, on ``device``) for ``precision``.

    Call before creating the optimiser: the optimiser must hold the fp32 parameters.

    Args:
        model: the model, e.g. from ``clip.load`` (any dtype; OpenAI's fp16 CUDA layout too).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (any case); see the module docstring.
        device: where to train (moved there in place); default the device of the model's
            parameters.

    Returns:
        The :class:`Precision`: ``with precision.autocast(): ...`` for the forward pass and
        ``precision.scaler`` for backward and step (see :func:`clip.training.train_step`).

    Raises:
        ValueError: on an unknown precision, a model without floating parameters, or bf16 on a
            CUDA device without bf16 support.

    Warns:
        UserWarning: when fp16/bf16 parameters are upcast to fp32 (why: see the module
        docstring).
    """
    name = _check_precision(precision)
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise ValueError(f"{type(model).__name__} has no floating point parameters to train")
    target = torch.device(device) if device is not None else params[0].device
    if name == "bf16" and target.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"{target} does not support bf16; use precision='fp16' (with loss scaling) or 'fp32'"
        )
    with warnings.catch_warnings():
        # An enabled scaler on a device type torch cannot scale on warns and disables itself.
        warnings.simplefilter("error", UserWarning)
        try:
            scaler = torch.amp.GradScaler(target.type, enabled=name == "fp16")
        except UserWarning as e:
            raise ValueError(
                f"precision='fp16' needs loss scaling, which is not available on {target}: {e}"
            ) from e
    halves = (torch.float16, torch.bfloat16)
    low = sorted({str(p.dtype).replace("torch.", "") for p in params if p.dtype in halves})
    if low:
        warnings.warn(
            f"the model has {'/'.join(low)} parameters (OpenAI's fp16 layout from clip.load on "
            "CUDA, or a dtype= argument): upcasting them to fp32 master weights for training. "
            "Adam in fp16 goes NaN after one step (its eps and squared gradients underflow; "
            f"OpenAI CLIP issues #57, #40); precision={name!r} gets mixed precision from "
            "autocast instead. Load with dtype=torch.float32 to skip this conversion.",
            UserWarning,
            stacklevel=2,
        )
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.dtype in halves:  # not .to(float32): a float64 part stays float64
                tensor.data = tensor.data.float()
                if tensor.grad is not None:
                    tensor.grad = tensor.grad.float()
    model.to(device=target)
    return Precision(name, target.type, scaler)
