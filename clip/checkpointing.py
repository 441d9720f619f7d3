"""Activation checkpointing for training: blocks recompute their activations in backward instead of
keeping them (see :meth:`clip.model.CLIP.set_grad_checkpointing`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed"]


def checkpointed(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with activation checkpointing: its activations are not kept for backward but
    recomputed then, trading compute for memory.

    BatchNorm running statistics are updated once, by the forward pass: the recomputation runs
    with them saved and restored, so a checkpointed ResNet stage trains exactly as an unchecked
    one.
    """
    calls = 0

    def run(inp: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return module(inp)
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [[b.clone() for b in m.buffers()] for m in norms]
        try:
            return module(inp)
        finally:
            with torch.no_grad():
                for m, copies in zip(norms, saved):
                    for b, c in zip(m.buffers(), copies):
                        b.copy_(c)

    return checkpoint(run, x, use_reentrant=False)
