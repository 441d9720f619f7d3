"""One rank of tests/test_loss.py's 2-process gloo test: ``python loss_worker.py RANK WORLD
INIT_FILE OUT``. Runs every case on this rank's slice of a shared batch and saves what it saw
(losses, gradients, error messages) to OUT for the test to compare with one process."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from clip.loss import contrastive_loss, gather_with_grad

D_IN, EMBED = 12, 8
# Rows per rank in each case: equal halves, a short last batch, a rank with nothing.
CASES = {"equal": [4, 4], "unequal": [5, 3], "empty_rank": [6, 0]}


class Towers(nn.Module):
    """Two linear "towers" and a logit scale: enough to check every gradient path."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(D_IN, EMBED, bias=False)
        self.text = nn.Linear(D_IN, EMBED)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))

    def forward(self, x_image: Tensor, x_text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image = self.image(x_image)
        text = self.text(x_text)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return image, text, self.logit_scale.exp()


def make_case(total: int) -> tuple[Towers, Tensor, Tensor]:
    """The same model and batch in every process."""
    torch.manual_seed(0)
    x_image, x_text = torch.randn(total, D_IN), torch.randn(total, D_IN)
    torch.manual_seed(1)
    return Towers(), x_image, x_text


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_case(sizes: list[int], rank: int) -> dict[str, Any]:
    model, x_image, x_text = make_case(sum(sizes))
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    x_image = x_image[rows].clone().requires_grad_(True)
    x_text = x_text[rows].clone().requires_grad_(True)
    loss = contrastive_loss(*model(x_image, x_text))
    loss.backward()
    result: dict[str, Any] = {
        "loss": loss.item(),
        "grads": grads(model),
        "x_image_grad": x_image.grad,
        "x_text_grad": x_text.grad,
    }
    ddp_model, x_image, x_text = make_case(sum(sizes))
    ddp = DistributedDataParallel(ddp_model)
    contrastive_loss(*ddp(x_image[rows], x_text[rows])).backward()
    result["ddp_grads"] = grads(ddp_model)
    return result


def error_of(fn: Any) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def main() -> None:
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, Any] = {name: run_case(sizes, rank) for name, sizes in CASES.items()}

    unit = torch.nn.functional.normalize(torch.randn(3, EMBED), dim=-1)
    # Only rank 1 forgets to normalise: every rank must raise, none may wait forever.
    scale = 2.0 if rank == 1 else 1.0
    results["unnormalised"] = error_of(lambda: contrastive_loss(unit * scale, unit, 10.0))
    width = EMBED if rank == 0 else EMBED - 2
    other = torch.nn.functional.normalize(torch.randn(3, width), dim=-1)
    results["widths"] = error_of(lambda: contrastive_loss(other, other, 10.0))
    # The group is still in step afterwards.
    results["after"] = contrastive_loss(unit, unit, 10.0).item()
    results["gathered"] = gather_with_grad(torch.full((rank + 1, 2), float(rank)))
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, out)


if __name__ == "__main__":
    main()
