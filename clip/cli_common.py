"""What the command line's sub-commands share: exit codes, common options, finding images.

See :mod:`clip.cli` for the commands and what each exit code means.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

from clip.clip import load
from clip.data.discover import discover, kind_of, read_list
from clip.data.embed import default_device
from clip.data.pairs import CAPTION_COLUMN, IMAGE_COLUMN

# What :mod:`clip.cli` re-exports: the exit codes and the types every command's runner uses.
CLI_NAMES = ("EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "Printer", "UsageError")

__all__ = [
    *CLI_NAMES,
    "CLI_NAMES",
    "add_batch_size_option",
    "add_cache_and_quiet_options",
    "add_common_options",
    "add_device_option",
    "add_pairs_column_options",
    "add_workers_option",
    "batch_options",
    "default_workers",
    "find_images",
    "load_model",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "report_skipped",
    "resolve_workers",
    "say",
    "show_progress",
]

Printer = Callable[[str], None]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def add_common_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    """Add the options every sub-command that runs a model takes.

    Args:
        p: the sub-command's parser.
        batch_size: the default of ``--batch-size``.
    """
    p.add_argument(
        "--model", default="ViT-B/32", help="model name, checkpoint file or model folder (ViT-B/32)"
    )
    add_device_option(p)
    add_batch_size_option(p, batch_size, help=f"images or texts per forward pass ({batch_size})")
    add_workers_option(p)
    add_cache_and_quiet_options(p)


def add_device_option(
    p: argparse.ArgumentParser, help: str = "cpu, cuda, cuda:1, mps (default: cuda if any)"
) -> None:
    """Add ``--device DEV``.

    Args:
        p: the sub-command's parser.
        help: its help text.
    """
    p.add_argument("--device", metavar="DEV", help=help)


def add_batch_size_option(
    p: argparse.ArgumentParser, default: int, help: str, metavar: str = "N"
) -> None:
    """Add ``--batch-size``, an integer ≥ 1.

    Args:
        p: the sub-command's parser.
        default: its default.
        help: its help text (which should name the default).
        metavar: what the help calls its value.
    """
    p.add_argument("--batch-size", type=positive_int, default=default, metavar=metavar, help=help)


def add_workers_option(
    p: argparse.ArgumentParser, what: str = "image decoding processes, 0 decodes in the main one"
) -> None:
    """Add ``--workers N`` (default ``None``: :func:`resolve_workers` picks the number).

    Args:
        p: the sub-command's parser.
        what: its help text, before the default number in parentheses.
    """
    p.add_argument(
        "--workers", type=non_negative_int, metavar="N", help=f"{what} ({default_workers()})"
    )


def add_pairs_column_options(p: argparse.ArgumentParser) -> None:
    """Add ``--image-column`` and ``--caption-column``: where a table of image-caption pairs
    keeps each (see :func:`clip.data.pairs.read_pairs`).

    Args:
        p: the sub-command's parser.
    """
    p.add_argument(
        "--image-column", default=IMAGE_COLUMN, help=f"table column of image paths ({IMAGE_COLUMN})"
    )
    p.add_argument(
        "--caption-column",
        default=CAPTION_COLUMN,
        help=f"table column of captions ({CAPTION_COLUMN})",
    )


def add_cache_and_quiet_options(p: argparse.ArgumentParser) -> None:
    """Add ``--cache-dir DIR`` (where named models are downloaded) and ``--quiet``/``-q``.

    Args:
        p: the sub-command's parser.
    """
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


def resolve_workers(args: argparse.Namespace) -> int:
    """Image decoding processes: ``--workers``, else :func:`default_workers`.

    Args:
        args: the parsed arguments (``workers``).

    Returns:
        The number of processes; 0 decodes in the main one.
    """
    return default_workers() if args.workers is None else args.workers


def batch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords :func:`clip.pipeline.iter_image_batches` and :mod:`clip.evaluate` take.

    Args:
        args: the parsed arguments (``batch_size``, ``workers``, ``quiet``).

    Returns:
        ``batch_size``, ``num_workers`` (:func:`resolve_workers`) and ``progress``
        (:func:`show_progress`).
    """
    return {
        "batch_size": args.batch_size,
        "num_workers": resolve_workers(args),
        "progress": show_progress(args),
    }


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


def say(args: argparse.Namespace, err: Printer, message: str) -> None:
    """Tell ``message`` on ``err`` unless ``--quiet``."""
    if not args.quiet:
        err(f"clip: {message}")


def report_skipped(err: Printer, failed: Sequence[tuple[str, str]]) -> None:
    """Tell each input that could not be read, and why, on ``err`` (one line each).

    Args:
        err: where the lines go (stderr).
        failed: ``(input, reason)`` pairs.
    """
    for name, reason in failed:
        err(f"clip: skipped {name}: {reason}")
