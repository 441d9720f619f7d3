"""WiSE-FT: weight-space ensembling of a zero-shot and a fine-tuned CLIP (Wortsman et al., 2022).

Fine-tuning raises accuracy on the target data but can cost the zero-shot model's robustness to
distribution shift. Interpolating the weights, θ = (1 - α)·θ_zero_shot + α·θ_fine_tuned, recovers
most of that robustness while keeping most of the gain; the paper sweeps α over [0, 1] (0.5 is a
good default). Both models must come from the same pre-trained weights: the interpolation of two
independently trained models is meaningless.

    zero_shot, preprocess = clip.load("ViT-B/32", device="cpu")
    finetuned = clip.load("my-finetuned-folder", device="cpu")[0]
    model = clip.wise_ft(zero_shot, finetuned, alpha=0.5)
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor, nn

from clip.model import CLIP

__all__ = ["wise_ft"]

_WRAPPERS = "DistributedDataParallel, DataParallel and torch.compile wrappers"


def wise_ft(
    zero_shot_model: nn.Module,
    finetuned_model: Union[nn.Module, Mapping[str, Tensor]],
    alpha: float,
) -> CLIP:
    """Interpolate two CLIPs' weights: ``(1 - alpha) * zero_shot + alpha * finetuned``.

    The result is a new model, a copy of ``zero_shot_model`` (same class, ``config``, devices,
    dtypes, train/eval mode and ``requires_grad`` flags; no ``.grad``) holding the interpolated
    weights. Neither input is changed.

    How each tensor is combined:

    - floating-point tensors are interpolated in float32 (float64 if either side is float64),
      then cast to the zero-shot tensor's dtype: a float16 zero-shot model gives a float16
      result (``.float()`` it first for a float32 one). A fine-tuned tensor on another device is
      brought to the zero-shot tensor's device.
    - the endpoints are exact: ``alpha=0`` gives the zero-shot weights bit for bit, ``alpha=1``
      the fine-tuned weights (cast to the zero-shot dtypes; bit for bit when they match), and a
      tensor fine-tuning left unchanged (a frozen tower) keeps its exact values at every alpha.
    - integer and bool tensors (BatchNorm's ``num_batches_tracked`` in the ResNets) cannot be
      interpolated; they are taken from the nearer endpoint: zero-shot for ``alpha < 0.5``,
      fine-tuned otherwise.

    Args:
        zero_shot_model: the starting model, a :class:`clip.model.CLIP` (eager, as
            ``clip.load(..., jit=False)`` gives), or one inside DistributedDataParallel,
            DataParallel or ``torch.compile``, which is unwrapped.
        finetuned_model: the model fine-tuned from it (same architecture, wrapped or not), or its
            state dict (a ``"module."`` prefix left by DistributedDataParallel is accepted).
        alpha: the weight of the fine-tuned model, in [0, 1] (a float, or a 0-d tensor such as
            an element of ``torch.linspace(0, 1, 11)``). Extrapolation beyond [0, 1] is refused.

    Returns:
        The interpolated model, unwrapped; its ``config`` is the zero-shot model's.

    Raises:
        TypeError: a model is traced (``jit=True``) or not a CLIP, ``alpha`` is not a number, or
            a state dict entry is not a tensor.
        ValueError: ``alpha`` is outside [0, 1] or NaN; the two models differ in architecture
            (the first differing key or shape is named); a weight is on the meta device.
    """
    a = _check_alpha(alpha)
    zero_shot = _unwrap(zero_shot_model, "zero_shot_model")
    if isinstance(finetuned_model, Mapping):
        tuned = _check_state_dict(finetuned_model, zero_shot.state_dict())
    else:
        finetuned = _unwrap(finetuned_model, "finetuned_model")
        _check_configs(zero_shot, finetuned)
        tuned = finetuned.state_dict()
    start = zero_shot.state_dict()
    _check_keys_and_shapes(start, tuned)

    result = copy.deepcopy(zero_shot)
    for parameter in result.parameters():
        parameter.grad = None
    target = result.state_dict()  # tensors sharing storage with the result's parameters
    with torch.no_grad():
        for key, out in target.items():
            out.copy_(_mix(start[key], tuned[key], a))
    return result


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, Tensor) and alpha.numel() == 1 and alpha.dtype != torch.bool:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number in [0, 1], got {type(alpha).__name__} {alpha!r}")
    a = float(alpha)
    if math.isnan(a) or not 0.0 <= a <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (0: the zero-shot model, 1: the fine-tuned one), got {a}; "
            "wise_ft does not extrapolate beyond the two models"
        )
    return a


def _unwrap(model: object, name: str) -> CLIP:
    """The eager CLIP inside DDP / DataParallel / torch.compile wrappers; refuse anything else."""
    inner = model
    for _ in range(8):  # wrappers may nest (a compiled DDP model)
        if isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = inner.module
        elif isinstance(inner, nn.Module) and isinstance(
            getattr(inner, "_orig_mod", None), nn.Module
        ):
            inner = inner._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    if isinstance(inner, torch.jit.ScriptModule):
        raise TypeError(
            f"{name} is a TorchScript module (clip.load(..., jit=True)); wise_ft needs the eager "
            "model, whose weights it can copy: load it with clip.load(name, jit=False)"
        )
    if not isinstance(inner, CLIP):
        raise TypeError(
            f"{name} must be a clip.model.CLIP (from clip.load or CLIP.from_config), or one in "
            f"{_WRAPPERS}; got {type(inner).__module__}.{type(inner).__qualname__}"
        )
    return inner


def _check_configs(zero_shot: CLIP, finetuned: CLIP) -> None:
    """Refuse models whose hyperparameters differ (the activation does not show in shapes)."""
    a, b = zero_shot.config, finetuned.config
    if a.replace(preprocess=b.preprocess) != b:
        diff = [
            f"{name}: {getattr(a, name)!r} vs {getattr(b, name)!r}"
            for name in a.model_kwargs()
            if getattr(a, name) != getattr(b, name)
        ]
        raise ValueError(
            "the zero-shot and fine-tuned models have different architectures "
            f"({'; '.join(diff)}); WiSE-FT interpolates a model with its own fine-tuned copy"
        )
    if a.preprocess != b.preprocess:
        warnings.warn(
            "the zero-shot and fine-tuned models preprocess images differently "
            f"({a.preprocess} vs {b.preprocess}); the result keeps the zero-shot model's",
            stacklevel=3,
        )


def _check_state_dict(
    tuned: Mapping[str, object], start: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A fine-tuned state dict's tensors by key, without a DDP ``module.`` prefix."""
    for key, value in tuned.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"finetuned_model[{key!r}] is a {type(value).__name__}, not a tensor: pass the "
                "model or its state dict (e.g. checkpoint['state_dict']), not a training checkpoint"
            )
    tensors: dict[str, Tensor] = dict(tuned)  # type: ignore[arg-type]  # checked above
    prefix = "module."
    if set(tensors) != set(start) and tensors and all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _check_keys_and_shapes(start: Mapping[str, Tensor], tuned: Mapping[str, Tensor]) -> None:
    missing = [k for k in start if k not in tuned]
    extra = [k for k in tuned if k not in start]
    if missing or extra:
        what = (
            f"the fine-tuned weights lack {missing[0]!r}"
            if missing
            else f"the fine-tuned weights have {extra[0]!r}, which the zero-shot model lacks"
        )
        raise ValueError(
            f"the zero-shot and fine-tuned models have different architectures: {what} "
            f"({len(missing)} missing, {len(extra)} unexpected keys); WiSE-FT interpolates a "
            "model with its own fine-tuned copy"
        )
    for key, a in start.items():
        b = tuned[key]
        if a.shape != b.shape:
            raise ValueError(
                f"the zero-shot and fine-tuned models have different architectures: {key!r} is "
                f"{tuple(a.shape)} in the zero-shot model and {tuple(b.shape)} in the fine-tuned "
                "one"
            )
        if _interpolable(a) != _interpolable(b):
            raise ValueError(
                f"{key!r} is {a.dtype} in the zero-shot model but {b.dtype} in the fine-tuned "
                "one: they are not the same kind of tensor"
            )
        for side, t in (("zero-shot", a), ("fine-tuned", b)):
            if t.is_meta:
                raise ValueError(
                    f"the {side} model's {key!r} is on the meta device (no values); load its "
                    "weights first"
                )


def _interpolable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _mix(start: Tensor, end: Tensor, alpha: float) -> Tensor:
    """One tensor of the result, in ``start``'s dtype and on its device."""
    end = end.to(start.device)
    if not _interpolable(start):
        return start if alpha < 0.5 else end.to(start.dtype)
    if alpha == 0.0:
        return start
    if alpha == 1.0:
        return end.to(start.dtype)
    dtype = torch.promote_types(torch.promote_types(start.dtype, end.dtype), torch.float32)
    # lerp is start + w·(end - start): exact where fine-tuning left a tensor unchanged
    return torch.lerp(start.to(dtype), end.to(dtype), alpha).to(start.dtype)
