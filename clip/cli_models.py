"""``clip models``: the table of named weights, and ``--verify`` of OpenAI's cached files.

One row per registry entry (:func:`clip.registry.all_weights`): name, parameters, input
resolution, published ImageNet zero-shot top-1 and whether the weights are cached. OpenAI's
weights are cached when their file is in clip's cache directory (checked by name; ``clip.load``
verifies on use); the others when a weights file of theirs is in the Hugging Face hub cache
(``huggingface_hub.try_to_load_from_cache``; ``-`` when huggingface_hub is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

from clip.cli_common import EXIT_FAILURE, EXIT_OK, Printer
from clip.download import MODELS, default_cache_dir, verify_cache
from clip.registry import PretrainedWeights, all_weights

__all__ = ["add_models_parser", "cached_path", "run_models"]


def add_models_parser(sub: Any) -> None:
    """Add the ``models`` sub-command to ``sub`` (an argparse sub-parsers object)."""
    models = sub.add_parser(
        "models",
        help="list the named weights: size, resolution, ImageNet top-1, cached",
        description=(
            "List every named set of weights clip.load accepts, with its parameter count, input "
            "resolution, published ImageNet zero-shot top-1 and whether it is cached. OpenAI's "
            "weights count as cached when their file is in clip's cache directory (checked by "
            "name, not hashed: clip.load verifies on use); the others when a weights file is in "
            "the Hugging Face hub cache ('-' without huggingface_hub installed). --verify hashes "
            "every cached OpenAI file now and marks it 'ok' or 'corrupt' (exit code 1 if any is)."
        ),
    )
    models.add_argument(
        "--cache-dir", help="clip's cache directory (default $CLIP_CACHE_DIR or ~/.cache/clip)"
    )
    models.add_argument(
        "--hub-cache-dir",
        metavar="DIR",
        help="Hugging Face hub cache (default huggingface_hub's: $HF_HUB_CACHE, "
        "$HF_HOME/hub or ~/.cache/huggingface/hub)",
    )
    models.add_argument("--json", action="store_true", help="print the table as JSON")
    models.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every cached OpenAI model file and report ok/corrupt (exit 1 on corruption)",
    )


def cached_path(
    weights: PretrainedWeights,
    cache_dir: Optional[str] = None,
    hub_cache_dir: Optional[str] = None,
) -> tuple[Optional[bool], Optional[str]]:
    """Whether ``weights`` are cached, and where.

    Args:
        weights: a registry entry.
        cache_dir: clip's cache directory, for OpenAI's weights (default
            :func:`clip.download.default_cache_dir`).
        hub_cache_dir: the Hugging Face hub cache, for the others (default huggingface_hub's).

    Returns:
        ``(True, path)`` when cached, ``(False, None)`` when not, ``(None, None)`` when it cannot
        be told (hub weights without huggingface_hub installed).
    """
    if weights.openai_name is not None:
        root = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
        path = os.path.join(root, os.path.basename(MODELS[weights.openai_name]))
        return (True, path) if os.path.isfile(path) else (False, None)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None, None
    hub_dir = os.path.expanduser(hub_cache_dir) if hub_cache_dir else None
    assert weights.hub_repo is not None
    for filename in weights.filenames:
        found = try_to_load_from_cache(weights.hub_repo, filename, cache_dir=hub_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return True, found
    return False, None


def _row(weights: PretrainedWeights, args: argparse.Namespace) -> dict[str, Any]:
    cached, path = cached_path(weights, args.cache_dir, args.hub_cache_dir)
    return {
        "name": weights.name,
        "num_parameters": weights.num_parameters,
        "resolution": weights.config.image_resolution,
        "top1": weights.top1,
        "cached": cached,
        "path": path,
        "hub_repo": weights.hub_repo,
        "openai_name": weights.openai_name,
    }


def _table(rows: list[dict[str, Any]], out: Printer) -> None:
    width = max(len(row["name"]) for row in rows)
    out(f"{'name':<{width}}  {'params':>7}  {'res':>3}  {'top-1':>5}  cached")
    for row in rows:
        params = f"{row['num_parameters'] / 1e6:.1f}M"
        top1 = "-" if row["top1"] is None else f"{row['top1']:.1f}"
        cached = {True: "yes", False: "no", None: "-"}[row["cached"]]
        out(f"{row['name']:<{width}}  {params:>7}  {row['resolution']:>3}  {top1:>5}  {cached}")


def _verify(args: argparse.Namespace, out: Printer) -> int:
    root = os.path.expanduser(args.cache_dir) if args.cache_dir else default_cache_dir()
    width = max(map(len, MODELS))
    found = verify_cache(root)
    for entry in found:
        status = f"{entry.status:<7}  {entry.path}" if entry.status != "missing" else "-"
        out(f"{entry.name:<{width}}  {status}")
    corrupt = sum(entry.status == "corrupt" for entry in found)
    if corrupt:
        out(f"{corrupt} corrupt file(s): the next clip.load of each downloads it again")
    return EXIT_FAILURE if corrupt else EXIT_OK


def run_models(args: argparse.Namespace, out: Printer) -> int:
    """Run ``clip models``.

    Args:
        args: the parsed arguments (``cache_dir``, ``hub_cache_dir``, ``json``, ``verify``).
        out: where lines go (stdout).

    Returns:
        The exit code: 0, or 1 when ``--verify`` found a corrupt file.
    """
    if args.verify:
        return _verify(args, out)
    rows = [_row(weights, args) for weights in all_weights()]
    if args.json:
        out(json.dumps(rows, indent=1))
    else:
        _table(rows, out)
    return EXIT_OK
