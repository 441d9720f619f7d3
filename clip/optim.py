"""Optimiser pieces for fine-tuning CLIP: parameter groups, AdamW, the cosine schedule, the
``logit_scale`` clamp, and the literature's defaults for *fine-tuning* (not pre-training).

Defaults, and where they come from:

- :data:`BETAS` (0.9, 0.98) and :data:`EPS` 1e-6: AdamW as in the CLIP paper (Radford et al.
  2021, its table of training hyperparameters; β2 = 0.98 and ε = 1e-6 for stability at large
  batch).
- :data:`DEFAULT_WEIGHT_DECAY` 0.1: the CLIP paper's ViT value, kept by WiSE-FT (Wortsman et al.
  2022), FLYP (Goyal et al. 2023) and open_clip's fine-tuning recipes.
- :data:`DEFAULT_LR` 1e-5: full fine-tuning of a pre-trained ViT-B needs a learning rate two
  orders of magnitude below pre-training's (5e-4): WiSE-FT fine-tunes end to end at 3e-5 (batch
  512), FLYP at 1e-5; rates of 1e-4 and above erase zero-shot robustness (open_clip #740).
  Raise it (1e-4 to 1e-3) for what trains from scratch: a linear head, or the text tower of a
  locked-image (LiT) run on small data.
- :data:`DEFAULT_WARMUP` 500 steps: WiSE-FT and FLYP warm up for 500 steps, then decay with a
  cosine to 0 (:func:`cosine_schedule`).
- ``logit_scale`` is clamped to ln 100 after every step (:func:`clamp_logit_scale`), as in CLIP.

Weight decay: AdamW's decay pulls every decayed weight toward 0 each step. It applies to matrices
(Linear and Conv weights, attention ``in_proj_weight``, ``proj``, ``text_projection``), not to
gains and biases (LayerNorm/BatchNorm weights, every bias), embeddings (``token_embedding``,
``positional_embedding``, ``class_embedding``, the attention pool's ``positional_embedding``)
nor ``logit_scale``, whose pull toward 0 would mean a temperature of 1 (:func:`param_groups`).

Typical use::

    optimizer = make_optimizer(model, lr=DEFAULT_LR)
    scheduler = cosine_schedule(optimizer, warmup_steps=DEFAULT_WARMUP, total_steps=steps)
    ...  # each step: loss.backward(); optimizer.step(); scheduler.step(); clamp_logit_scale(model)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "BETAS",
    "DEFAULT_LR",
    "DEFAULT_WARMUP",
    "DEFAULT_WEIGHT_DECAY",
    "EPS",
    "MAX_LOGIT_SCALE",
    "CosineWithWarmup",
    "clamp_logit_scale",
    "cosine_schedule",
    "make_optimizer",
    "param_groups",
]

DEFAULT_LR = 1e-5
DEFAULT_WARMUP = 500
DEFAULT_WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.98)
EPS = 1e-6
# CLIP clamps the learned temperature's inverse at 100: logit_scale ≤ ln 100.
MAX_LOGIT_SCALE = math.log(100)

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _decays(module: nn.Module, name: str, param: torch.Tensor) -> bool:
    """Whether ``module.<name>`` is a matrix that weight decay applies to."""
    if isinstance(module, (nn.Embedding, *_NORMS)) or param.ndim < 2:
        return False  # embeddings, gains, biases, logit_scale (and any other scalar or vector)
    return not name.endswith("embedding")  # positional_embedding (ViT, text, attention pool)


def param_groups(
    model: nn.Module, weight_decay: float = DEFAULT_WEIGHT_DECAY
) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a not-decayed group.

    Decayed: matrices (Linear/Conv weights, ``in_proj_weight``, ``proj``, ``text_projection``).
    Not decayed: LayerNorm/BatchNorm weights, biases, embeddings (``token_embedding``, every
    ``positional_embedding``, ``class_embedding``) and ``logit_scale``. Parameters with
    ``requires_grad=False`` (a locked tower) are left out; a parameter shared between modules
    appears once. Works on any module tree, wrappers (DDP) included.

    Args:
        model: the model, e.g. a :class:`clip.model.CLIP`.
        weight_decay: the decayed group's coefficient (≥ 0).

    Returns:
        ``[{"params": [...], "param_names": [...], "weight_decay": weight_decay},
        {"params": [...], "param_names": [...], "weight_decay": 0.0}]``, ready for any
        ``torch.optim`` optimiser; a group with no parameters is dropped.

    Raises:
        ValueError: if ``weight_decay`` is negative or no parameter requires grad.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    seen: set[int] = set()
    decay: tuple[list[torch.Tensor], list[str]] = ([], [])
    no_decay: tuple[list[torch.Tensor], list[str]] = ([], [])
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            params, names = decay if _decays(module, name, param) else no_decay
            params.append(param)
            names.append(f"{module_name}.{name}" if module_name else name)
    if not seen:
        raise ValueError(
            "the model has no parameter with requires_grad=True: nothing to train (is every "
            "tower locked?)"
        )
    groups = [
        {"params": decay[0], "param_names": decay[1], "weight_decay": float(weight_decay)},
        {"params": no_decay[0], "param_names": no_decay[1], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    betas: tuple[float, float] = BETAS,
    eps: float = EPS,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with the CLIP paper's betas and eps.

    Create it after :func:`clip.precision.prepare_for_training` (which may change the model's
    dtype) and after locking towers (only trainable parameters are included).

    Args:
        model: the model.
        lr: peak learning rate (> 0); see :data:`DEFAULT_LR` for the choice.
        weight_decay: decoupled weight decay of the matrices (≥ 0).
        betas: Adam's (β1, β2).
        eps: Adam's ε. 1e-6 underflows in fp16: keep fp32 master weights.

    Returns:
        The optimiser.

    Raises:
        ValueError: on a non-positive lr, a negative weight decay, or nothing to train.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


class CosineWithWarmup:
    """The learning-rate factor of :func:`cosine_schedule` at optimiser step ``step`` (0-based).

    An object rather than a closure so that ``LambdaLR.state_dict()`` records (and
    ``load_state_dict`` restores) the warmup and total steps.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return 0.0
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return f"CosineWithWarmup(warmup_steps={self.warmup_steps}, total_steps={self.total_steps})"


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """Linear warmup to the optimiser's lr, then a cosine decay to 0 at ``total_steps``.

    Step s (the number of ``scheduler.step()`` calls so far, one per optimiser step) trains
    with ``lr * (s + 1) / warmup_steps`` for s < ``warmup_steps`` (the ramp from 0, reaching lr
    at its last step), then ``lr * ½ (1 + cos(π (s - warmup_steps) / (total_steps -
    warmup_steps)))`` until ``total_steps`` (every planned step has lr > 0), and 0 after. Each
    parameter group follows its own lr.

    Resume: save ``scheduler.state_dict()`` with the optimiser's, and after rebuilding both
    (same arguments) load the optimiser's state then the scheduler's.

    Args:
        optimizer: the optimiser; its groups' current lr is the peak.
        warmup_steps: steps of linear warmup (0 for none).
        total_steps: steps of the whole run (warmup included), ≥ ``warmup_steps`` and ≥ 1.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR``; call ``.step()`` after each ``optimizer.step()``.

    Raises:
        ValueError: on negative, non-integer or inconsistent step counts.
    """
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) is longer than the whole run ({total_steps} steps); "
            "lower --warmup or train for more steps"
        )
    return LambdaLR(optimizer, CosineWithWarmup(warmup_steps, total_steps))


def clamp_logit_scale(model: nn.Module, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp every parameter named ``logit_scale`` to [0, ``max_value``] in place, without grad.

    Call after each optimiser step. Found by name, so it works through wrappers (DDP...).

    Args:
        model: the model (or a wrapper around it).
        max_value: the upper bound, ln 100 as in CLIP.

    Raises:
        ValueError: if the model has no ``logit_scale`` parameter.
    """
    found = False
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "logit_scale":
                param.clamp_(0.0, max_value)
                found = True
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no logit_scale parameter to clamp; pass the CLIP model"
        )
