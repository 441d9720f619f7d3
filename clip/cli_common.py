"""What the command line's sub-commands share: exit codes, common options, finding images.

See :mod:`clip.cli` for the commands and what each exit code means.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from clip.clip import load
from clip.data.discover import discover, kind_of, read_list
from clip.data.embed import default_device

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Printer",
    "UsageError",
    "add_common_options",
    "default_workers",
    "find_images",
    "load_model",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "say",
    "show_progress",
]

Printer = Callable[[str], None]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def add_common_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """Add the options every sub-command takes, with ``batch_size`` as the default."""
    p.add_argument(
        "--model", default="ViT-B/32", help="model name, checkpoint file or model folder (ViT-B/32)"
    )
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, mps (default: cuda if any)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        metavar="N",
        help=f"images or texts per forward pass ({batch_size})",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        metavar="N",
        help=f"image decoding processes, 0 decodes in the main one ({default_workers()})",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help="where named models are downloaded (~/.cache/clip)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def default_workers() -> int:
    """Image decoding processes when ``--workers`` is not given."""
    return min(4, os.cpu_count() or 1)


def find_images(inputs: Sequence[str]) -> list[str]:
    """Image paths (normalised, each once) of a single-file job: images, and those of lists."""
    named = [i for i in inputs if kind_of(i) in ("tar", "parquet")]
    if named:  # before looking for them: the fix is the same whether they exist or not
        raise UsageError(
            f"{named[0]} is read shard by shard: give --out FOLDER (one output per shard)"
        )
    try:
        found = discover(inputs)
        found.refuse_other()
        listed = [p for listing in found.lists for p in read_list(listing)]
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    sharded = found.tars + found.parquets
    if sharded:
        raise UsageError(
            f"{sharded[0]} is read shard by shard: give --out FOLDER (one output per shard)"
        )
    images = sorted(set(found.images + listed))
    if not images:
        raise UsageError(f"no images found in {', '.join(inputs)}")
    return images


def load_model(
    args: argparse.Namespace, device: Optional[str] = None, precision: Optional[torch.dtype] = None
) -> torch.nn.Module:
    """The model of ``--model`` on ``device`` (default ``--device``, else the default one)."""
    device = device or args.device or default_device()
    model, _ = load(args.model, device=device, download_root=args.cache_dir, dtype=precision)
    return model


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to show progress bars: not ``--quiet`` and stderr is a terminal."""
    return not args.quiet and sys.stderr.isatty()


def say(args: argparse.Namespace, err: Callable[[str], None], message: str) -> None:
    """Tell ``message`` on ``err`` unless ``--quiet``."""
    if not args.quiet:
        err(f"clip: {message}")
