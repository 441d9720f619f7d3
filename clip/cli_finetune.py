"""``clip finetune``: contrastive fine-tuning on image–caption pairs, resumable, torchrun-ready.

A thin layer over :func:`clip.finetune.finetune`: options become a
:class:`clip.finetune.FinetuneOptions`; inputs that do not exist and an output folder holding
another run are usage errors (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from typing import Any

from clip.cli_common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    Printer,
    UsageError,
    add_batch_size_option,
    add_cache_and_quiet_options,
    add_device_option,
    add_pairs_column_options,
    add_workers_option,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_workers,
    show_progress,
)
from clip.finetune import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_EPOCHS,
    FinetuneOptions,
    FinetuneOptionsError,
    RunMismatchError,
    finetune,
)
from clip.optim import BETAS, DEFAULT_LR, DEFAULT_WARMUP, DEFAULT_WEIGHT_DECAY, EPS
from clip.precision import PRECISIONS

__all__ = ["add_finetune_parser", "run_finetune"]


def _sci(x: float) -> str:
    """1e-06 → 1e-6."""
    return f"{x:g}".replace("e-0", "e-")


_PARAGRAPHS = (
    "Fine-tune a CLIP model contrastively on image-caption pairs and write the result to DIR "
    "in the hub layout (clip.load(DIR), open_clip's local-dir:DIR). TRAIN and --val are "
    ".csv/.tsv/.parquet tables (image path and caption columns, paths relative to the table) "
    "or webdataset .tar shards (files, a folder or a glob). Each epoch visits the pairs in a "
    "fresh order drawn from --seed and the epoch, in full batches: the pairs left over after "
    "the last full batch are skipped that epoch. Captions longer than the model's context are "
    "cut, with a warning.",
    "Defaults are for fine-tuning a pre-trained model, not pre-training: AdamW with betas "
    f"{BETAS}, eps {_sci(EPS)} and weight decay {DEFAULT_WEIGHT_DECAY:g} (CLIP's own), a peak "
    f"learning rate of {_sci(DEFAULT_LR)} (WiSE-FT and FLYP fine-tune at 1e-5 to 3e-5; 1e-4 and "
    f"above erase zero-shot robustness) after {DEFAULT_WARMUP} linear warmup steps (at most a "
    f"tenth of the run), then a cosine decay to 0, for {DEFAULT_EPOCHS} epochs. For a locked "
    "image tower (--lock-image) on small data, raise --lr (1e-4 to 1e-3).",
    "DIR gets metrics.jsonl (a line per step: loss, lr, images/s; a line per evaluation: "
    "val_loss, recall@1/5/10), finetune.json (the settings) and a checkpoint every "
    "--checkpoint-every steps and at each epoch's end. Rerun the same command after a crash to "
    "continue from the last checkpoint; a rerun with other settings is refused.",
    "Under torchrun --nproc-per-node K each process trains on its own --batch-size pairs of "
    "every step (the global batch is K times that) and the loss is computed over all of them.",
)
DESCRIPTION = "\n\n".join(textwrap.fill(p, 90) for p in _PARAGRAPHS)


def add_finetune_parser(sub: Any) -> None:
    """Add the ``finetune`` sub-command to the ``sub`` parsers."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on image-caption pairs (resumable; torchrun for many GPUs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("train", nargs="+", metavar="TRAIN", help="training pairs: a table or shards")
    p.add_argument(
        "--model", required=True, metavar="NAME|FILE|FOLDER", help="the model to start from"
    )
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the run's folder")
    p.add_argument(
        "--val", metavar="VAL", help="validation pairs, evaluated before training and per epoch"
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=DEFAULT_EPOCHS,
        metavar="N",
        help=f"passes over TRAIN ({DEFAULT_EPOCHS})",
    )
    add_batch_size_option(
        p,
        DEFAULT_BATCH_SIZE,
        metavar="B",
        help=f"pairs per step per process ({DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=DEFAULT_LR,
        help=f"peak learning rate ({_sci(DEFAULT_LR)})",
    )
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        metavar="STEPS",
        help=f"linear warmup steps ({DEFAULT_WARMUP}, at most a tenth of the run)",
    )
    p.add_argument(
        "--wd",
        type=_non_negative_float,
        default=DEFAULT_WEIGHT_DECAY,
        help=f"AdamW weight decay of the weight matrices ({DEFAULT_WEIGHT_DECAY:g})",
    )
    p.add_argument(
        "--precision",
        type=str.lower,
        choices=PRECISIONS,
        help="fp32, or mixed precision with autocast (fp16 adds loss scaling); master weights "
        "stay fp32 (default: bf16 on a CUDA device that has it, else fp32)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, more time",
    )
    p.add_argument(
        "--lock-image", action="store_true", help="freeze the image tower (LiT); train the text"
    )
    add_device_option(p, help="cpu, cuda, cuda:1 (default: cuda if any)")
    add_pairs_column_options(p)
    add_workers_option(p, what="image decoding processes")
    p.add_argument("--seed", type=non_negative_int, default=0, help="of the epochs' orders (0)")
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=DEFAULT_CHECKPOINT_EVERY,
        metavar="N",
        help=f"steps between checkpoints, also one per epoch ({DEFAULT_CHECKPOINT_EVERY})",
    )
    p.add_argument(
        "--max-grad-norm",
        type=positive_float,
        metavar="X",
        help="clip the gradients' global norm to X (default: no clipping)",
    )
    add_cache_and_quiet_options(p)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def run_finetune(args: argparse.Namespace, out: Printer, err: Printer) -> int:
    """Run ``clip finetune``: the summary on ``out`` (rank 0, unless ``--quiet``); the exit code."""
    options = FinetuneOptions(
        train=args.train,
        model=args.model,
        out=args.out,
        val=args.val,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.wd,
        precision=args.precision,
        grad_checkpointing=args.grad_checkpointing,
        lock_image=args.lock_image,
        device=args.device,
        image_column=args.image_column,
        caption_column=args.caption_column,
        workers=resolve_workers(args),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        max_grad_norm=args.max_grad_norm,
        cache_dir=args.cache_dir,
        progress=show_progress(args),
    )
    try:
        result = finetune(options)
    except (FileNotFoundError, FinetuneOptionsError, RunMismatchError) as e:
        raise UsageError(str(e)) from e
    except FloatingPointError as e:  # a NaN loss: a runtime failure, reported in one line
        raise RuntimeError(str(e)) from e
    except KeyboardInterrupt:
        err("clip finetune: interrupted; rerun the same command to resume from the last checkpoint")
        return EXIT_INTERRUPTED
    if args.quiet or int(os.environ.get("RANK", 0)) != 0:
        return EXIT_OK
    if result.already_finished:
        out(f"{result.out} holds this run, finished: nothing to do")
    else:
        resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
        out(
            f"fine-tuned {result.steps} steps ({_count(result.epochs, 'epoch')} of "
            f"{result.pairs} pairs, {_count(result.world_size, 'process')}{resumed})"
        )
    if result.final_loss is not None:
        out(f"final training loss  {result.final_loss:.4f}")
    if result.evaluation:
        numbers = result.evaluation
        out(
            f"validation loss      {numbers['val_loss']:.4f}   image→text R@1 "
            f"{100 * numbers['image_to_text_R@1']:.2f}%   text→image R@1 "
            f"{100 * numbers['text_to_image_R@1']:.2f}%"
        )
    out(f"model saved to {result.out} (clip.load({result.out!r}))")
    return EXIT_OK
