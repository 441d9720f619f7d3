"""Command line: ``clip classify`` (zero-shot labels for images) and ``clip models``.

A thin layer over :func:`clip.load` and :func:`clip.tokenize`; all output goes through argparse's
stdout/stderr here, never from library code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

import torch
from PIL import Image

from clip.clip import load
from clip.download import available_models
from clip.tokenizer import tokenize


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip", description="CLIP from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the released model names")
    classify = sub.add_parser("classify", help="zero-shot labels for images")
    classify.add_argument("images", nargs="+", help="image files")
    classify.add_argument("--labels", required=True, help='comma-separated, e.g. "a dog,a cat"')
    classify.add_argument("--model", default="ViT-B/32", help="model name or checkpoint file")
    classify.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: auto)")
    classify.add_argument("--top-k", type=int, default=3, help="labels to print per image")
    return parser


@torch.no_grad()
def _classify(args: argparse.Namespace) -> int:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        print("clip: --labels needs at least one label", file=sys.stderr)
        return 2
    model, preprocess = load(args.model, device=args.device)
    device = next(model.parameters()).device
    text = model.encode_text(tokenize(labels).to(device))
    text = text / text.norm(dim=-1, keepdim=True)
    for path in args.images:
        image = preprocess(Image.open(path)).unsqueeze(0).to(device)
        features = model.encode_image(image)
        features = features / features.norm(dim=-1, keepdim=True)
        probs = (model.logit_scale.exp() * features @ text.t()).softmax(dim=-1)[0]
        top = probs.topk(min(args.top_k, len(labels)))
        shown = ", ".join(f"{labels[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices))
        print(f"{path}: {shown}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    args = _parser().parse_args(argv)
    if args.command == "models":
        print("\n".join(available_models()))
        return 0
    try:
        return _classify(args)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"clip: error: {e}", file=sys.stderr)
        return 1
