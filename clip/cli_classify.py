"""``clip classify``: zero-shot labels for images, from ``--labels`` or ImageNet's classes."""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

from clip import pipeline
from clip.cli_common import (
    EXIT_FAILURE,
    EXIT_OK,
    Printer,
    UsageError,
    add_common_options,
    batch_options,
    find_images,
    load_model,
    positive_int,
    report_skipped,
)

__all__ = ["add_classify_parser", "run_classify"]


def add_classify_parser(sub: Any) -> None:
    """Add the ``classify`` sub-command to the ``sub`` parsers."""
    p = sub.add_parser(
        "classify",
        help="zero-shot labels for images",
        description="Print the top-k labels with probabilities for each image.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or globs")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated prompts, e.g. "a dog,a cat"')
    labels.add_argument(
        "--imagenet",
        action="store_true",
        help="the 1000 ImageNet classes with the 80 prompt templates",
    )
    p.add_argument("--top-k", type=positive_int, default=3, help="labels to print per image (3)")
    add_common_options(p, batch_size=64)


@torch.no_grad()
def run_classify(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    """Run ``clip classify``: labels on ``out``, problems on ``err``; return the exit code."""
    labels = _labels(args)
    paths = find_images(args.images)
    model = load_model(args)
    classifier, names = _classifier(model, labels, args)  # [D, C]
    scale = torch.as_tensor(model.logit_scale).detach().float().exp().cpu()
    failed: list[tuple[str, str]] = []
    any_ok = False
    for batch in pipeline.iter_image_batches(model, paths, **batch_options(args)):
        failed.extend(batch.failed)
        if not batch.paths:
            continue
        any_ok = True
        probs = (scale * batch.embeddings @ classifier).softmax(dim=-1)  # [n, C]
        top = probs.topk(min(args.top_k, len(names)), dim=-1)
        for path, values, indices in zip(batch.paths, top.values.tolist(), top.indices.tolist()):
            out(f"{path}: " + ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(values, indices)))
    report_skipped(err, failed)
    return EXIT_OK if any_ok else EXIT_FAILURE


def _labels(args: argparse.Namespace) -> Optional[list[str]]:
    if args.imagenet:
        return None
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        raise UsageError("--labels needs at least one label")
    return labels


def _classifier(
    model: torch.nn.Module, labels: Optional[list[str]], args: argparse.Namespace
) -> tuple[torch.Tensor, list[str]]:
    """Normalised class embeddings [D, C] (float32, CPU) and the class names."""
    if labels is not None:
        text = pipeline.embed_texts(model, labels, batch_size=args.batch_size)  # [C, D]
        return text.t(), labels
    import clip  # the ImageNet names, templates and ensembling live in the package root

    weights = clip.zero_shot_classifier(
        model, clip.imagenet_classes, clip.imagenet_templates, batch_size=args.batch_size
    )
    return weights.float().cpu(), list(clip.imagenet_classes)
