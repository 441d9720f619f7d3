"""``clip evaluate``: zero-shot accuracy, retrieval recall and a linear probe, as tables and JSON.

A thin layer over :mod:`clip.evaluate`: inputs are read (and refused, exit code 2) before the
model is loaded; every image goes through :func:`clip.evaluate.image_features`.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any, Optional

from clip import evaluate
from clip.cli_common import (
    EXIT_OK,
    Printer,
    UsageError,
    add_common_options,
    add_pairs_column_options,
    batch_options,
    load_model,
    report_skipped,
)
from clip.data import fs
from clip.data.imagefolder import ImageFolder, read_image_folder
from clip.data.pairs import Pairs, read_pairs

__all__ = ["add_evaluate_parser", "run_evaluate"]


def add_evaluate_parser(sub: Any) -> None:
    """Add the ``evaluate`` sub-command (and its tasks) to the ``sub`` parsers."""
    p = sub.add_parser(
        "evaluate",
        help="zero-shot accuracy, retrieval recall or a linear probe",
        description=(
            "Measure a model: zero-shot accuracy on an ImageFolder, image<->text recall@1/5/10 "
            "on image-caption pairs, or a linear probe's accuracy. Prints a table; --json also "
            "writes the numbers. Unreadable images are left out and listed on stderr."
        ),
    )
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    z = tasks.add_parser(
        "zeroshot",
        help="top-1/top-5 and per-class accuracy on an ImageFolder",
        description=(
            "Zero-shot accuracy on FOLDER/CLASS/IMAGE (class folders in sorted order). The "
            "classifier averages the prompts of each class (clip.zero_shot_classifier)."
        ),
    )
    z.add_argument("folder", metavar="FOLDER", help="one sub-folder of images per class")
    z.add_argument(
        "--classes",
        metavar="FILE",
        help="class names, one a line, in sorted folder order (default: the folder names, "
        "'_' as spaces)",
    )
    z.add_argument(
        "--templates",
        metavar="FILE",
        help="prompt templates, one a line, each with {} for the class name (default: the 80 "
        "ImageNet templates)",
    )
    _options(z)
    r = tasks.add_parser(
        "retrieval",
        help="image->text and text->image recall@1/5/10 on image-caption pairs",
        description=(
            "Recall@1/5/10 on a .csv/.tsv/.parquet table (image path and caption columns; paths "
            "relative to the table's folder) or webdataset .tar shards (files, a folder or a "
            "glob; IMAGE + .txt per sample). An image on several rows has all their captions; "
            "any of them counts as found."
        ),
    )
    r.add_argument("pairs", nargs="+", metavar="PAIRS", help="a table, or .tar shards")
    add_pairs_column_options(r)
    r.add_argument(
        "--truncate", action="store_true", help="cut captions longer than the model's context"
    )
    _options(r)
    lp = tasks.add_parser(
        "linear-probe",
        help="logistic regression on frozen image features: test accuracy",
        description=(
            "Fit clip.linear_probe on the image features of TRAIN_FOLDER and report its accuracy "
            "on TEST_FOLDER (both ImageFolders; classes matched by folder name)."
        ),
    )
    lp.add_argument("train", metavar="TRAIN_FOLDER", help="one sub-folder per class")
    lp.add_argument("test", metavar="TEST_FOLDER", help="class folders named as in TRAIN_FOLDER")
    _options(lp)


def _options(p: argparse.ArgumentParser) -> None:
    add_common_options(p, batch_size=64)
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")


def run_evaluate(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    """Run ``clip evaluate TASK``: the table on ``out``, problems on ``err``; the exit code."""
    if args.json and (os.path.isdir(args.json) or args.json.endswith(("/", os.sep))):
        raise UsageError(f"--json names a file to write, got the folder {args.json!r}")
    if args.task == "zeroshot":
        return _zeroshot(args, out, err)
    if args.task == "retrieval":
        return _retrieval(args, out, err)
    return _linear_probe(args, out, err)


def _folder(path: str) -> ImageFolder:
    try:
        return read_image_folder(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e


def _lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError as e:
        raise UsageError(f"no such {what} file: {path!r}") from e
    kept = [line for line in lines if line]
    if not kept:
        raise UsageError(f"{path} has no {what} (one a line)")
    return kept


def _templates(path: Optional[str]) -> Optional[list[str]]:
    if path is None:
        return None
    templates = _lines(path, "templates")
    for number, template in enumerate(templates, start=1):
        try:
            filled = template.format("x")
        except (IndexError, KeyError, ValueError):
            filled = None
        if "{}" not in template or filled is None:
            raise UsageError(
                f"{path}: template {number} ({template!r}) needs one {{}} for the class name "
                "(and '{{'/'}}' for literal braces): 'a photo of a {}.'"
            )
    return templates


def _zeroshot(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    listing = _folder(args.folder)
    names = _lines(args.classes, "class names") if args.classes else None
    if names is not None and len(names) != len(listing.classes):
        raise UsageError(
            f"{args.classes} has {len(names)} class names for the {len(listing.classes)} class "
            f"folders of {args.folder}; give one a line, in sorted folder order"
        )
    templates = _templates(args.templates)
    model = load_model(args)
    result = evaluate.evaluate_zeroshot(
        model, listing, classnames=names, templates=templates, **batch_options(args)
    )
    report_skipped(err, result.failed)
    _write_json(args, result.to_json(), folder=listing.root)
    counts = f"{result.images} images, {len(result.classes)} classes"
    out(f"zero-shot: {counts}, {result.templates} templates")
    out(f"top-1  {_pct(result.top1)}")
    if result.top5 is not None:
        out(f"top-5  {_pct(result.top5)}")
    width = max(5, *(len(name) for name in result.classes))
    out("")
    out(f"{'class':<{width}}  {'images':>6}  {'top-1':>7}")
    for name, (n, acc) in zip(result.classes, result.per_class):
        out(f"{name:<{width}}  {n:>6}  {_pct(acc):>7}")
    return EXIT_OK


def _retrieval(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    pairs = _pairs(args)
    for sample, why in pairs.skipped:
        err(f"clip: skipped sample {sample}: {why}")
    model = load_model(args)
    result = evaluate.evaluate_retrieval(
        model, pairs, truncate=args.truncate, **batch_options(args)
    )
    report_skipped(err, result.failed)
    _write_json(args, result.to_json(), pairs=args.pairs)
    out(f"retrieval: {result.images} images, {result.captions} captions")
    ks = list(result.image_to_text)
    out(f"{'':<10}" + "".join(f"  {'R@' + str(k):>7}" for k in ks))
    for label, recalls in (
        ("image→text", result.image_to_text),
        ("text→image", result.text_to_image),
    ):
        out(f"{label:<10}" + "".join(f"  {_pct(recalls[k]):>7}" for k in ks))
    return EXIT_OK


def _pairs(args: argparse.Namespace) -> Pairs:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped samples are listed one a line instead
            return read_pairs(
                args.pairs, image_column=args.image_column, caption_column=args.caption_column
            )
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e


def _linear_probe(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    train, test = _folder(args.train), _folder(args.test)
    try:
        evaluate.check_probe_folders(train, test)
    except ValueError as e:
        raise UsageError(str(e)) from e
    model = load_model(args)
    result = evaluate.evaluate_linear_probe(model, train, test, **batch_options(args))
    report_skipped(err, result.failed)
    _write_json(args, result.to_json(), train=train.root, test=test.root)
    out(
        f"linear probe: {len(result.classes)} classes, {result.train_images} training images, "
        f"{result.test_images} test images"
    )
    out(f"accuracy  {_pct(result.accuracy)}")
    out(f"C         {'-' if result.C is None else f'{result.C:.4g}'}")
    return EXIT_OK


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _write_json(args: argparse.Namespace, result: dict[str, Any], **inputs: Any) -> None:
    """Write ``--json`` (atomically): the task, the model and inputs, then the results."""
    if args.json:
        record = {"task": result.pop("task"), "model": args.model, **inputs, **result}
        fs.write_bytes(args.json, (json.dumps(record, indent=2) + "\n").encode())
