"""Command line: ``clip embed``, ``clip classify``, ``clip models``, ``clip evaluate`` and
``clip finetune``.

A thin layer over :mod:`clip.pipeline`, :func:`clip.load` and the registry; ``embed`` and
``classify`` live in :mod:`clip.cli_embed` and :mod:`clip.cli_classify`, ``models`` in
:mod:`clip.cli_models`, ``evaluate`` in :mod:`clip.cli_evaluate`, ``finetune`` in
:mod:`clip.cli_finetune`. This is the only module that
prints. Exit codes:

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
import sys
from collections.abc import Sequence
from typing import Optional

from clip.cli_classify import add_classify_parser, run_classify
from clip.cli_common import (  # noqa: F401 (EXIT_OK, Printer: re-exported, see CLI_NAMES)
    CLI_NAMES,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Printer,
    UsageError,
)
from clip.cli_embed import add_embed_parser, run_embed
from clip.cli_evaluate import add_evaluate_parser, run_evaluate
from clip.cli_finetune import add_finetune_parser, run_finetune
from clip.cli_models import add_models_parser, run_models

__all__ = [*CLI_NAMES, "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip",
        description="CLIP from the command line: embed images or captions, zero-shot classify.",
        epilog="exit codes: 0 success, 1 runtime failure, 2 usage error, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_embed_parser(sub)
    add_classify_parser(sub)
    add_models_parser(sub)
    add_evaluate_parser(sub)
    add_finetune_parser(sub)
    return parser


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
            return run_models(args, out)
        if args.command == "embed":
            return run_embed(args, err)
        if args.command == "evaluate":
            return run_evaluate(args, out, err)
        if args.command == "finetune":
            return run_finetune(args, out, err)
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
