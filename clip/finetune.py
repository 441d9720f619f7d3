"""``clip finetune`` as a library: contrastive fine-tuning on image–caption pairs, resumable.

:func:`finetune` runs the whole job described by a :class:`FinetuneOptions`: it reads the pairs
(:mod:`clip.data.pairs`), loads the model in fp32, prepares the precision
(:func:`clip.precision.prepare_for_training`), optionally locks the image tower and turns on
gradient checkpointing, builds AdamW over :func:`clip.optim.param_groups` with the cosine
schedule, and runs :func:`clip.training.train_step` over each epoch's batches
(:mod:`clip.finetune_data`). The output folder (:mod:`clip.finetune_state`) gets
``metrics.jsonl``, a checkpoint every ``checkpoint_every`` steps and at each epoch's end, and the
final model in the hub layout (``clip.load(out)``, open_clip's ``local-dir:out``).

Resume: rerunning with the same options continues from the last checkpoint, and the loss curve is
the one an uninterrupted run gives (in fp32 on the CPU, bit for bit): the model, optimiser,
scaler, schedule and random states are restored, and each epoch's order depends only on the
seed and the epoch. Other options are refused, naming the differences.

Scale-out: under ``torchrun --nproc-per-node K`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) each
process joins a process group (NCCL on CUDA, gloo on the CPU), trains
``DistributedDataParallel(ContrastiveForward(model))`` on its ``batch_size`` pairs of each global
batch of ``batch_size × K``, and the loss gathers every rank's features
(:func:`clip.contrastive_loss`). Rank 0 writes the metrics, checkpoints and the final model; every
rank resumes from the same checkpoint (``out`` must be on a file system all ranks share).
Validation runs on rank 0 while the others wait.

Defaults are for fine-tuning a pre-trained CLIP, not for pre-training (see :mod:`clip.optim`):
AdamW with betas (0.9, 0.98), eps 1e-6, weight decay 0.1, peak learning rate 1e-5 after a
500-step linear warmup (at most a tenth of the run), then a cosine decay to 0; 10 epochs, as
WiSE-FT and FLYP fine-tune.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from clip.checkpoint import config_of, save
from clip.clip import load
from clip.data import fs
from clip.data.discover import as_list
from clip.data.pairs import CAPTION_COLUMN, IMAGE_COLUMN, Pairs, read_pairs
from clip.data.resume import weights_digest
from clip.finetune_data import (
    EpochBatches,
    batches,
    evaluate_pairs,
    pairs_digest,
    steps_per_epoch,
    to_model_inputs,
    tokenize_captions,
    training_dataset,
)
from clip.finetune_ranks import Ranks, rng_state, set_rng_state, start_ranks
from clip.finetune_state import MetricsLog, RunFolder, RunMismatchError
from clip.freeze import lock_image_tower
from clip.optim import (
    DEFAULT_LR,
    DEFAULT_WARMUP,
    DEFAULT_WEIGHT_DECAY,
    cosine_schedule,
    make_optimizer,
)
from clip.precision import PRECISIONS, prepare_for_training
from clip.training import ContrastiveForward, train_step

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_EPOCHS",
    "FinetuneOptions",
    "FinetuneOptionsError",
    "FinetuneResult",
    "RunMismatchError",
    "default_precision",
    "enable_grad_checkpointing",
    "finetune",
]

DEFAULT_EPOCHS = 10  # WiSE-FT and FLYP fine-tune ImageNet for 10 epochs
DEFAULT_BATCH_SIZE = 64  # per process; larger is better for a contrastive loss, if it fits
DEFAULT_CHECKPOINT_EVERY = 1000
# Testing hook: the process exits at once (os._exit, like a kill) after this global step.
EXIT_AFTER_STEP_ENV = "CLIP_FINETUNE_EXIT_AFTER_STEP"

PathLike = Union[str, "os.PathLike[str]"]
Inputs = Union[PathLike, Sequence[PathLike]]


class FinetuneOptionsError(ValueError):
    """Options that cannot run: a bad value, or values that do not fit the data (a batch larger
    than the training set, a warmup longer than the run)."""


@dataclass(frozen=True)
class FinetuneOptions:
    """What :func:`finetune` does; the fields mirror ``clip finetune``'s options.

    Attributes:
        train: the training pairs: a ``.csv``/``.tsv``/``.parquet`` table, ``.tar`` shards, a
            folder or glob of shards, or a list of these (:func:`clip.data.pairs.read_pairs`).
        model: a model name, checkpoint file or model folder (anything ``clip.load`` takes).
        out: the output folder (see :mod:`clip.finetune_state`).
        val: validation pairs, evaluated before training and after each epoch, or None.
        epochs: passes over ``train``.
        batch_size: pairs per step *per process* (the global batch is this × processes).
        lr: peak learning rate (default :data:`clip.optim.DEFAULT_LR`, 1e-5).
        warmup: linear warmup steps; None for :data:`clip.optim.DEFAULT_WARMUP` (500) or a
            tenth of the run, whichever is shorter.
        weight_decay: AdamW's decoupled weight decay of the weight matrices.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``; None for bf16 on a CUDA device that
            supports it, else fp32 (:func:`default_precision`).
        grad_checkpointing: recompute activations in the backward pass (less memory, ~30% more
            time): ``model.set_grad_checkpointing(True)``.
        lock_image: freeze the image tower (LiT), training the text tower and ``logit_scale``.
        device: where to train; default ``cuda:LOCAL_RANK`` if CUDA is available, else cpu.
            Under torchrun a bare ``"cuda"`` means ``cuda:LOCAL_RANK``.
        image_column, caption_column: the table columns of image paths and captions.
        workers: image decoding processes (0: in the training process); default
            ``min(4, CPUs)``. The numbers do not depend on it.
        seed: what each epoch's order is drawn from.
        checkpoint_every: steps between checkpoints (one is also written at each epoch's end).
        max_grad_norm: clip the gradients' global norm to this, or None.
        cache_dir: where named models are downloaded.
        progress: show a tqdm bar (rank 0) with the loss, learning rate and images/s.
    """

    train: Inputs
    model: str
    out: PathLike
    val: Optional[Inputs] = None
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    warmup: Optional[int] = None
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    precision: Optional[str] = None
    grad_checkpointing: bool = False
    lock_image: bool = False
    device: Optional[str] = None
    image_column: str = IMAGE_COLUMN
    caption_column: str = CAPTION_COLUMN
    workers: Optional[int] = None
    seed: int = 0
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    max_grad_norm: Optional[float] = None
    cache_dir: Optional[str] = None
    progress: bool = False


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        out: the output folder (absolute), holding the final model.
        steps: optimiser steps of the whole run.
        epochs: epochs of the run.
        pairs: training pairs read.
        world_size: processes that trained.
        final_loss: the last step's training loss (the global batch's), None if unknown.
        evaluation: the last validation record (``val_loss``, recalls...), or None.
        resumed_from: the global step the run resumed from a checkpoint at, or None.
        already_finished: the folder held this run, finished: nothing was done.
    """

    out: str
    steps: int
    epochs: int
    pairs: int
    world_size: int
    final_loss: Optional[float] = None
    evaluation: Optional[dict[str, Any]] = field(default=None)
    resumed_from: Optional[int] = None
    already_finished: bool = False


def default_precision(device: torch.device) -> str:
    """bf16 on a CUDA device that supports it (mixed precision at fp32's range), else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def enable_grad_checkpointing(model: nn.Module) -> None:
    """``model.set_grad_checkpointing(True)``, refused clearly for a model without it.

    Raises:
        RuntimeError: if the model has no ``set_grad_checkpointing`` method.
    """
    method = getattr(model, "set_grad_checkpointing", None)
    if not callable(method):
        raise RuntimeError(
            f"gradient checkpointing was asked for, but {type(model).__name__} has no "
            "set_grad_checkpointing() in this version of clip; upgrade clip-torch, or train "
            "without --grad-checkpointing (a smaller --batch-size saves memory too)"
        )
    method(True)


def _check(options: FinetuneOptions) -> None:
    """Refuse option values that cannot run, naming the option."""

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    problems = []
    if not as_list(options.train):
        problems.append("train names no input")
    for name, least in (("epochs", 1), ("batch_size", 1), ("checkpoint_every", 1), ("seed", 0)):
        value = getattr(options, name)
        if not is_int(value) or value < least:
            problems.append(f"{name} must be an int >= {least}, got {value!r}")
    if options.warmup is not None and (not is_int(options.warmup) or options.warmup < 0):
        problems.append(f"warmup must be an int >= 0 or None, got {options.warmup!r}")
    if options.workers is not None and (not is_int(options.workers) or options.workers < 0):
        problems.append(f"workers must be an int >= 0 or None, got {options.workers!r}")
    if not (isinstance(options.lr, (int, float)) and options.lr > 0):
        problems.append(f"lr must be > 0, got {options.lr!r}")
    if not (isinstance(options.weight_decay, (int, float)) and options.weight_decay >= 0):
        problems.append(f"weight_decay must be >= 0, got {options.weight_decay!r}")
    if options.max_grad_norm is not None and not options.max_grad_norm > 0:
        problems.append(f"max_grad_norm must be > 0 or None, got {options.max_grad_norm!r}")
    if options.precision is not None and str(options.precision).lower() not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)} or None")
    if problems:
        raise FinetuneOptionsError("; ".join(problems))


def _identity(path: PathLike) -> str:
    """An input as recorded: URLs as given, local paths absolute."""
    text = os.fspath(path)
    return text if fs.is_url(text) else os.path.abspath(text)


def _read_pairs(source: Inputs, columns: dict[str, str]) -> Pairs:
    """:func:`read_pairs`, its refusals of the input (a missing column...) as option errors."""
    try:
        return read_pairs(source, **columns)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise FinetuneOptionsError(str(e)) from e


# ---- the run ---------------------------------------------------------------------------------


def finetune(options: FinetuneOptions) -> FinetuneResult:
    """Fine-tune a CLIP on image–caption pairs into ``options.out`` (see the module docstring).

    Args:
        options: what to train, on what, how (:class:`FinetuneOptions`).

    Returns:
        :class:`FinetuneResult`. ``options.out`` then holds the final fp32 model in the hub
        layout, ``metrics.jsonl`` and ``finetune.json``.

    Raises:
        FinetuneOptionsError: an option value that cannot run, too few pairs for one global
            batch, a warmup longer than the run, inputs :func:`clip.data.pairs.read_pairs`
            refuses (a missing column...).
        FileNotFoundError: an input that does not exist.
        RunMismatchError: ``out`` holds another run (other settings) or other files.
        RuntimeError: the model cannot be loaded; gradient checkpointing asked of a model
            without it.
        FloatingPointError: a non-finite loss in fp32/bf16 (see :func:`train_step`).
    """
    _check(options)
    ranks = start_ranks(options.device)
    try:
        return _Run(options, ranks).run()
    finally:
        ranks.close()


class _Run:
    """One call of :func:`finetune`: the state shared by its steps."""

    def __init__(self, options: FinetuneOptions, ranks: Ranks) -> None:
        self.o, self.ranks, self.device = options, ranks, ranks.device
        self.folder = RunFolder(os.fspath(options.out))
        self.workers = min(4, os.cpu_count() or 1) if options.workers is None else options.workers
        self.metrics = MetricsLog(None)
        self.last_eval: Optional[dict[str, Any]] = None

    def run(self) -> FinetuneResult:
        o, ranks = self.o, self.ranks
        columns = {"image_column": o.image_column, "caption_column": o.caption_column}
        train = _read_pairs(o.train, columns)
        val = _read_pairs(o.val, columns) if o.val is not None else None
        per_epoch = steps_per_epoch(len(train), o.batch_size, ranks.world_size)
        if per_epoch == 0:
            raise FinetuneOptionsError(
                f"the training set has {len(train)} pairs, fewer than one batch of "
                f"{o.batch_size * ranks.world_size} (batch size {o.batch_size} × "
                f"{ranks.world_size} processes); lower the batch size"
            )
        total = o.epochs * per_epoch
        warmup = min(DEFAULT_WARMUP, total // 10) if o.warmup is None else o.warmup
        if warmup > total:
            raise FinetuneOptionsError(
                f"the warmup ({warmup} steps) is longer than the whole run ({total} steps: "
                f"{o.epochs} epochs of {per_epoch}); lower the warmup"
            )
        precision_name = (o.precision or default_precision(self.device)).lower()
        settings = {
            "train": [_identity(p) for p in as_list(o.train)],
            "val": None if o.val is None else [_identity(p) for p in as_list(o.val)],
            "model": _identity(o.model) if os.path.exists(o.model) else os.fspath(o.model),
            "epochs": o.epochs,
            "batch_size": o.batch_size,
            "lr": float(o.lr),
            "warmup": warmup,
            "weight_decay": float(o.weight_decay),
            "precision": precision_name,
            "lock_image": bool(o.lock_image),
            "image_column": o.image_column,
            "caption_column": o.caption_column,
            "seed": o.seed,
            "max_grad_norm": None if o.max_grad_norm is None else float(o.max_grad_norm),
            "world_size": ranks.world_size,
            "pairs": len(train),
            "pairs_sha256": pairs_digest(train),
        }
        status = ranks.on_main(lambda: self.folder.prepare(settings))
        result = FinetuneResult(self.folder.path, total, o.epochs, len(train), ranks.world_size)
        if status == "finished":
            return self._finished(result)
        try:
            return self._train(train, val, total, per_epoch, warmup, precision_name, result)
        finally:
            self.metrics.close()

    def _finished(self, result: FinetuneResult) -> FinetuneResult:
        records = self.folder.read_metrics()
        losses = [r["loss"] for r in records if "loss" in r]
        evals = [r for r in records if "eval" in r]
        return replace(
            result,
            already_finished=True,
            final_loss=losses[-1] if losses else None,
            evaluation=evals[-1] if evals else None,
        )

    def _train(
        self,
        train: Pairs,
        val: Optional[Pairs],
        total: int,
        per_epoch: int,
        warmup: int,
        precision_name: str,
        result: FinetuneResult,
    ) -> FinetuneResult:
        o, ranks, device = self.o, self.ranks, self.device
        model, _ = load(o.model, device=device, download_root=o.cache_dir, dtype=torch.float32)
        config = config_of(model)
        if config is None:
            raise RuntimeError(f"{o.model!r} did not load as a CLIP model with a configuration")
        ranks.on_main(lambda: self.folder.check_model(weights_digest(model)))
        with warnings.catch_warnings():
            if not ranks.main:  # one warning per job, not one per rank
                warnings.simplefilter("ignore")
            tokens = tokenize_captions(train.captions, config.context_length)
        precision = prepare_for_training(model, precision_name, device)
        if o.grad_checkpointing:
            enable_grad_checkpointing(model)
        if o.lock_image:
            lock_image_tower(model)
        optimizer = make_optimizer(model, lr=o.lr, weight_decay=o.weight_decay)
        scheduler = cosine_schedule(optimizer, warmup, total)
        state = self.folder.load_checkpoint()
        step, first_epoch, in_epoch = 0, 0, 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            precision.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"][ranks.rank], device)
            step, first_epoch, in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
            result = replace(result, resumed_from=step)
        if ranks.main:
            self.metrics = self.folder.open_metrics(step if state is not None else -1)
        del state
        net: nn.Module = model
        if ranks.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(ContrastiveForward(model), device_ids=ids)
        dataset = training_dataset(train, config.image_resolution, config.preprocess)
        if val is not None and step == 0:
            self._evaluate(model, val, step, 0)
        model.train()

        def checkpoint(next_epoch: int, next_in_epoch: int) -> None:
            rng = ranks.gather(rng_state(device))
            if ranks.main:
                self.folder.save_checkpoint(
                    {
                        "format": 1,
                        "step": step,
                        "epoch": next_epoch,
                        "step_in_epoch": next_in_epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": precision.scaler.state_dict(),
                        "rng": rng,
                    }
                )

        exit_after = int(os.environ.get(EXIT_AFTER_STEP_ENV, "0") or 0)
        global_batch = o.batch_size * ranks.world_size
        last_loss: Optional[float] = None
        bar = tqdm(
            total=total,
            initial=step,
            unit="step",
            disable=not (o.progress and ranks.main),
            dynamic_ncols=True,
        )
        with bar:
            for epoch in range(first_epoch, o.epochs):
                sampler = EpochBatches(
                    len(train), o.batch_size, o.seed, epoch, ranks.rank, ranks.world_size, in_epoch
                )
                loader = batches(dataset, sampler, self.workers, pin_memory=device.type == "cuda")
                tick = time.perf_counter()
                for k, (pixels, _, indices) in enumerate(loader, start=in_epoch):
                    images, texts = to_model_inputs(
                        pixels, indices, tokens, config.preprocess, device
                    )
                    lr = float(scheduler.get_last_lr()[0])
                    share = train_step(
                        net, images, texts, optimizer, precision, scheduler, o.max_grad_norm
                    )
                    last_loss = ranks.mean(share)
                    step += 1
                    now = time.perf_counter()
                    speed = global_batch / max(now - tick, 1e-9)
                    tick = now
                    self.metrics.write(
                        {
                            "step": step,
                            "epoch": epoch + 1,
                            "loss": last_loss,
                            "lr": lr,
                            "logit_scale": float(model.logit_scale.detach().exp()),
                            "images_per_s": round(speed, 2),
                        }
                    )
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                    if k + 1 < per_epoch and step % o.checkpoint_every == 0:
                        checkpoint(epoch, k + 1)
                    if step == exit_after:
                        os._exit(75)
                in_epoch = 0
                if val is not None:
                    self._evaluate(model, val, step, epoch + 1)
                    model.train()
                checkpoint(epoch + 1, 0)
        if ranks.main:
            save(model, self.folder.path)
            self.folder.mark_finished({"steps": step, "final_loss": last_loss})
            self.folder.remove_checkpoint()
        ranks.barrier()
        return replace(result, final_loss=last_loss, evaluation=self.last_eval)

    def _evaluate(self, model: nn.Module, val: Pairs, step: int, epochs_done: int) -> None:
        """Validation on rank 0 (the others wait), logged as an ``eval`` line."""
        if self.ranks.main:
            with torch.no_grad():
                numbers = evaluate_pairs(model, val, self.o.batch_size, self.workers, self.device)
            self.last_eval = {"eval": "val", "step": step, "epoch": epochs_done, **numbers}
            self.metrics.write(self.last_eval)
        self.ranks.barrier()
