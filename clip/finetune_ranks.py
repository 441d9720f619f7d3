"""The processes of ``clip finetune``: one, or torchrun's ranks, and their random states.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`start_ranks` joins the process group (NCCL on CUDA,
gloo on the CPU) and puts each rank on ``cuda:LOCAL_RANK``; :class:`Ranks` holds the few
collectives the fine-tuning loop needs (rank 0 decides and the others follow, a mean of the
loss, gathering the random states for a checkpoint). In one process each is a no-op.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import distributed as dist

from clip.data.embed import default_device
from clip.finetune_state import RunMismatchError

__all__ = ["Ranks", "rng_state", "set_rng_state", "start_ranks"]

T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place among the torchrun ranks (one rank without torchrun)."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which writes the outputs."""
        return self.rank == 0

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give every rank its result; a failure raises on every rank
        (rank 0's own exception there, a :class:`RunMismatchError` or RuntimeError elsewhere)."""
        if self.world_size == 1:
            return fn()
        shared: list[Any] = [None]
        error: Optional[BaseException] = None
        if self.main:
            try:
                shared[0] = ("ok", fn())
            except Exception as e:
                error = e
                kind = "mismatch" if isinstance(e, RunMismatchError) else "error"
                shared[0] = (kind, str(e))
        dist.broadcast_object_list(shared, src=0)
        if error is not None:
            raise error
        kind, value = shared[0]
        if kind == "mismatch":
            raise RunMismatchError(value)
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this object joined."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def start_ranks(device: Optional[str]) -> Ranks:
    """Join the torchrun process group (if ``WORLD_SIZE`` > 1) and pick this rank's device.

    Raises:
        ValueError: if a CUDA device is asked for and there is none.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = torch.device(device if device is not None else default_device())
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        if target.index is None:
            target = torch.device("cuda", local_rank)
    if dist.is_available() and dist.is_initialized():  # the caller's own group
        return Ranks(dist.get_rank(), dist.get_world_size(), target, owns_group=False)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Ranks(0, 1, target, owns_group=False)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), target, owns_group=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states: torch CPU (and CUDA on ``device``), Python's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
