"""Command line: ``clip embed``, ``clip classify`` and ``clip models``.

A thin layer over :mod:`clip.pipeline`, :func:`clip.load` and the registry; ``embed`` and
``classify`` live in :mod:`clip.cli_embed` and :mod:`clip.cli_classify`. This is the only
module that prints. Exit codes:

* 0 — success, even if some images were unreadable (they are listed on stderr); for ``embed``,
  the output holds at least one row;
* 1 — runtime failure: the model cannot be loaded, the output cannot be read or written, or
  nothing could be embedded or classified (every image unreadable); ``models --verify`` found
  a corrupt file;
* 2 — usage error: bad arguments, an input that does not exist, no images found;
* 130 — interrupted (Ctrl-C); ``embed`` first saves what it finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Callable, Optional

from clip.cli_classify import add_classify_parser, run_classify
from clip.cli_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Printer,
    UsageError,
)
from clip.cli_embed import add_embed_parser, run_embed
from clip.download import MODELS, default_cache_dir, verify_cache

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Printer",
    "UsageError",
    "main",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip",
        description="CLIP from the command line: embed images or captions, zero-shot classify.",
        epilog="exit codes: 0 success, 1 runtime failure, 2 usage error, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_embed_parser(sub)
    add_classify_parser(sub)
    models = sub.add_parser(
        "models",
        help="list the released models and which are in the cache",
        description=(
            "List the released model names; 'present' marks those whose file is in the cache "
            "directory (checked by name, not hashed: clip.load verifies on use, and hashes a "
            "file again only when its size or modification time changed). --verify hashes "
            "every cached file now and marks it 'ok' or 'corrupt' (exit code 1 if any is)."
        ),
    )
    models.add_argument(
        "--cache-dir", help="cache directory (default $CLIP_CACHE_DIR or ~/.cache/clip)"
    )
    models.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every cached model file and report ok/corrupt (exit 1 on corruption)",
    )
    return parser


# ---- models ---------------------------------------------------------------------------------


def _models(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    root = os.path.expanduser(args.cache_dir) if args.cache_dir else default_cache_dir()
    width = max(map(len, MODELS))
    if args.verify:
        found = verify_cache(root)
        for entry in found:
            status = f"{entry.status:<7}  {entry.path}" if entry.status != "missing" else "-"
            out(f"{entry.name:<{width}}  {status}")
        corrupt = sum(entry.status == "corrupt" for entry in found)
        if corrupt:
            out(f"{corrupt} corrupt file(s): the next clip.load of each downloads it again")
        return EXIT_FAILURE if corrupt else EXIT_OK
    for name, url in MODELS.items():
        path = os.path.join(root, os.path.basename(url))
        status = f"present  {path}" if os.path.isfile(path) else "-"
        out(f"{name:<{width}}  {status}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code (0 success, 1 runtime failure, 2 usage error, 130 interrupted).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage (code 2) or help (code 0)
        return int(e.code or 0)

    def out(line: str) -> None:
        print(line, flush=True)

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.command == "models":
            return _models(args, out)
        if args.command == "embed":
            return run_embed(args, err)
        return run_classify(args, out, err)
    except UsageError as e:
        err(f"clip {args.command}: error: {e}")
        return EXIT_USAGE
    except (OSError, RuntimeError, ValueError, ImportError) as e:
        err(f"clip {args.command}: error: {_one_line(e)}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        err("clip: interrupted")
        return EXIT_INTERRUPTED


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
