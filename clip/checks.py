"""Refusing bad inputs to CLIP's towers with a message that names the fix."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_device", "check_id_dtype"]


def check_id_dtype(dtype: torch.dtype, vocab_size: int) -> None:
    """Refuse an integer dtype too narrow for the vocabulary's ids (e.g. uint8 for 49408 ids):
    ids cast into it were already wrapped around, so no answer computed from them is right."""
    if torch.iinfo(dtype).max < vocab_size - 1:
        raise TypeError(
            f"text is {dtype}, which holds ids up to {torch.iinfo(dtype).max}, but this model's "
            f"vocabulary has {vocab_size} ids (the end-of-text id is {vocab_size - 1}): such ids "
            "were corrupted when they were cast. Keep clip.tokenize's output as it is (int32 or "
            "int64), or cast with .long() before narrowing"
        )


def check_device(x: Tensor, weight: Tensor, what: str) -> None:
    """Refuse ``x`` (named ``what`` in the message) when it is not on ``weight``'s device."""
    if x.device != weight.device:
        raise ValueError(
            f"{what} is on {x.device} but the model is on {weight.device}; "
            f"move it with {what}.to({str(weight.device)!r})"
        )
