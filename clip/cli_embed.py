"""``clip embed``: images or captions to normalised embeddings, one file or a folder of shards.

One file (``.npy``/``.parquet``) is written by :mod:`clip.pipeline` in this process; a folder of
shards by :func:`clip.distributed.embed_dataset` (ranks or Ray).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from clip import pipeline
from clip.cli_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Printer,
    UsageError,
    add_common_options,
    batch_options,
    default_workers,
    find_images,
    load_model,
    non_negative_int,
    positive_float,
    positive_int,
    say,
    show_progress,
)
from clip.data import fs
from clip.data.embed import default_device
from clip.data.resume import model_digest, resume_file, weights_digest
from clip.retry import RetryPolicy
from clip.tokenizer import tokenize

__all__ = ["add_embed_parser", "run_embed"]


def add_embed_parser(sub: Any) -> None:
    """Add the ``embed`` sub-command to the ``sub`` parsers."""
    p = sub.add_parser(
        "embed",
        help="images or captions to normalised embeddings (.npy or .parquet)",
        description=(
            "Embed images (files, folders searched recursively, glob patterns) or, with --text, "
            "captions (one per line) into L2-normalised float32 vectors. OUT.npy gets a sidecar "
            "OUT.rows.txt naming each row; OUT.parquet gets columns path (or text) and embedding. "
            "Rerunning with the same --out embeds only inputs not already in it and appends; "
            "an output of another model or precision is refused (OUT.meta.json records them). "
            "Unreadable images are skipped and listed on stderr. "
            "An --out without .npy/.parquet is a folder of shards: one SHARD.parquet (id, "
            "embedding) and SHARD.stats.json per input shard; inputs may then also be file lists "
            "(.txt), Parquet files with a path/url column and webdataset .tar files; a rerun "
            "skips finished shards. Under torchrun each rank takes its share of the shards; "
            "with --ray the job runs on a Ray cluster."
        ),
    )
    p.add_argument("inputs", nargs="*", metavar="PATH", help="image files, folders or globs")
    p.add_argument("--out", "-o", required=True, help="output file: .npy or .parquet")
    p.add_argument("--text", metavar="CAPTIONS.txt", help="embed the lines of this file instead")
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at reduced size (faster, not bit-exact)",
    )
    p.add_argument(
        "--onnxruntime",
        action="store_true",
        help="run the model through ONNX Runtime (CPU, float32; one output file): faster on "
        "many CPUs, equal to 1e-6; the first run with a model exports it (up to a minute), "
        "later runs reuse the export cached in the cache directory",
    )
    add_common_options(p, batch_size=64)
    p.add_argument(
        "--precision",
        choices=("float32", "float16", "bfloat16"),
        help="dtype the model computes in (float16 on CUDA, else float32; Ray: float32); "
        "recorded, and a rerun in another precision is refused",
    )
    group = p.add_argument_group("sharded output (--out FOLDER)")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on Ray: the cluster at ADDRESS, else $RAY_ADDRESS or a local one",
    )
    group.add_argument(
        "--shard-size",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="images or Parquet rows per shard (10000); each tar is one shard",
    )
    group.add_argument(
        "--dtype", choices=("float32", "float16"), default="float32", help="stored (float32)"
    )
    group.add_argument("--column", help="Parquet column of paths or URLs (path, else url)")
    group.add_argument(
        "--retry-failed",
        action="store_true",
        help="also rerun the failed rows of finished shards and merge those that succeed",
    )
    group.add_argument(
        "--actors", type=positive_int, metavar="N", help="Ray model replicas (one per GPU)"
    )
    group.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and progress bars"
    )
    net = p.add_argument_group("URL inputs (http(s) rows of Parquet files and lists)")
    net.add_argument(
        "--retries",
        type=non_negative_int,
        default=RetryPolicy.retries,
        metavar="N",
        help=f"retries of a read that failed transiently (503, 429, reset, timeout); a 404 "
        f"is not retried ({RetryPolicy.retries})",
    )
    net.add_argument(
        "--timeout",
        type=positive_float,
        default=RetryPolicy.timeout_s,
        metavar="S",
        help=f"seconds without a byte before a read is abandoned ({RetryPolicy.timeout_s:g})",
    )


def run_embed(args: argparse.Namespace, err: Printer) -> int:
    """Run ``clip embed``; tell progress and problems on ``err``; return the exit code."""
    if bool(args.inputs) == bool(args.text):
        raise UsageError("give image PATHs or --text CAPTIONS.txt (one of the two)")
    _refuse_unused(args)
    if args.workers is None and args.ray is None:
        args.workers = default_workers()
    policy = RetryPolicy(retries=args.retries, timeout_s=args.timeout)
    before = fs.set_default_policy(policy)  # every URL read of this command, in every worker
    try:
        if _sharded(args):
            if args.onnxruntime:
                raise UsageError(
                    "--onnxruntime runs the model of one output file (--out FILE.npy or "
                    ".parquet), not the workers of a folder of shards: drop it or write one file"
                )
            return _embed_shards(args, err)
        if args.retry_failed:
            raise UsageError(
                "--retry-failed reruns the failed rows of a folder of shards (--out FOLDER)"
            )
        return _embed_one_file(args, err)
    finally:
        fs.set_default_policy(before)


def _refuse_unused(args: argparse.Namespace) -> None:
    """Refuse the options the chosen engine would ignore."""
    if args.ray is None and args.actors:
        raise UsageError("--actors sets the number of Ray model replicas: add --ray or drop it")
    if args.ray is None and args.verbose:
        raise UsageError("--verbose shows Ray's own logs: add --ray or drop it")
    if args.ray is not None and args.workers is not None:
        raise UsageError(
            "--workers sets local decoding processes; with --ray, Ray tasks decode: drop it"
        )


def _embed_one_file(args: argparse.Namespace, err: Printer) -> int:
    key_name = "text" if args.text else "path"
    inputs = _captions(args.text) if args.text else find_images(args.inputs)
    if os.path.splitext(args.out)[1].lower() not in (".npy", ".parquet"):
        raise UsageError(f"--out must end in .npy or .parquet, got {args.out!r}")
    device = args.device or ("cpu" if args.onnxruntime else default_device())
    precision = _precision(args, device)
    if args.onnxruntime and (torch.device(device).type != "cpu" or precision != torch.float32):
        raise UsageError(
            f"--onnxruntime runs on the CPU in float32; this run asks for {device} in "
            f"{str(precision).removeprefix('torch.')}: drop --device/--precision or --onnxruntime"
        )
    digest = model_digest(args.model)
    model = None if digest else load_model(args, device, precision)
    meta = {
        "model": args.model,
        "model_digest": digest or weights_digest(model),  # type: ignore[arg-type]
        "precision": str(precision).removeprefix("torch."),
        "key": key_name,
    }
    done_keys, done, todo = resume_file(args.out, inputs, meta)
    if not todo:
        say(args, err, f"nothing to do: all {len(inputs)} inputs are already in {args.out}")
        return EXIT_OK
    model = model or load_model(args, device, precision)
    if args.onnxruntime:
        from clip.optimize import optimize

        model = optimize(model, onnxruntime=True)  # type: ignore[arg-type]
    width = pipeline.embedding_width(model)
    if done_keys and done.shape[1] != width:
        raise RuntimeError(
            f"{args.out} holds {done.shape[1]}-dim embeddings but this model gives {width}; "
            "write to another --out"
        )
    if args.text:
        keys, new, failed, interrupted = _embed_texts(model, todo, args)
    else:
        keys, new, failed, interrupted = _embed_image_files(model, todo, args)
    if keys:
        rows = _cat(done, new)
        pipeline.save_embeddings(args.out, [*done_keys, *keys], rows, key_name, meta=meta)
    _report(args, err, len(keys), len(done_keys), failed)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if keys or done_keys else EXIT_FAILURE


def _precision(args: argparse.Namespace, device: str) -> torch.dtype:
    """The dtype the model computes in: --precision, else float16 on CUDA (as clip.load)."""
    if args.precision:
        return getattr(torch, str(args.precision))
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _sharded(args: argparse.Namespace) -> bool:
    """Whether --out names a folder of shards rather than one .npy/.parquet file."""
    ext = os.path.splitext(args.out.rstrip("/" + os.sep))[1].lower()
    folder = os.path.isdir(args.out) or args.out.endswith(("/", os.sep)) or not ext
    single = ext in (".npy", ".parquet") and not folder
    if not single and not folder:
        raise UsageError(
            f"--out must end in .npy or .parquet (one file) or name a folder (shards), "
            f"got {args.out!r}"
        )
    if args.ray is not None and single:
        raise UsageError("--ray writes a folder of shards: give --out FOLDER, not a file")
    if not single and args.text:
        raise UsageError("--text writes one file: give --out CAPTIONS.npy or .parquet")
    return not single


def _embed_shards(args: argparse.Namespace, err: Printer) -> int:
    from clip import distributed

    try:
        summary = distributed.embed_dataset(
            args.inputs,
            args.out,
            model=args.model,
            ray=False if args.ray is None else args.ray or True,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            dtype=args.dtype,
            precision=args.precision,
            column=args.column,
            fast_decode=args.fast_decode,
            actors=args.actors,
            workers=args.workers,
            device=args.device,
            download_root=args.cache_dir,
            retry_failed=args.retry_failed,
            progress=show_progress(args),
            verbose=args.verbose,
        )
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    done = f" ({len(summary.skipped)} already done)" if summary.skipped else ""
    if summary.retried:
        done += f"; reran the failed rows of {len(summary.retried)}"
    rank = f"rank {summary.rank}/{summary.world_size}: " if summary.world_size > 1 else ""
    say(
        args,
        err,
        f"{rank}wrote {len(summary.written)} of {summary.shards} shards{done} into {args.out}: "
        f"{summary.embedded} images embedded, {summary.failed} unreadable (see *.stats.json) "
        f"in {summary.seconds:.1f} s",
    )
    return EXIT_OK


def _captions(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError as e:
        raise UsageError(f"no such file: {path!r}") from e
    captions = list(dict.fromkeys(line for line in lines if line))  # each caption once, in order
    if not captions:
        raise UsageError(f"{path} has no captions (one per line)")
    return captions


def _cat(done: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return torch.cat([done, new]) if done.numel() else new


def _embed_image_files(
    model: torch.nn.Module, paths: list[str], args: argparse.Namespace
) -> tuple[list[str], torch.Tensor, list[tuple[str, str]], bool]:
    """Embed, keeping every finished batch if interrupted: (keys, embeddings, failed, stopped)."""
    batches: list[pipeline.ImageBatch] = []
    stream = pipeline.iter_image_batches(
        model, paths, fast_decode=args.fast_decode, **batch_options(args)
    )
    try:
        batches.extend(stream)
    except KeyboardInterrupt:
        return *_joined(batches), True
    return *_joined(batches), False


def _joined(
    batches: list[pipeline.ImageBatch],
) -> tuple[list[str], torch.Tensor, list[tuple[str, str]]]:
    embeddings = torch.cat([b.embeddings for b in batches]) if batches else torch.empty(0, 0)
    paths = [p for b in batches for p in b.paths]
    return paths, embeddings, [f for b in batches for f in b.failed]


def _embed_texts(
    model: torch.nn.Module, captions: list[str], args: argparse.Namespace
) -> tuple[list[str], torch.Tensor, list[tuple[str, str]], bool]:
    """Embed captions; ones longer than the context are reported, not fatal."""
    context = int(getattr(model, "context_length", 77))
    fits, failed = [], []
    for caption in captions:
        try:
            tokenize(caption, context_length=context)
            fits.append(caption)
        except RuntimeError as e:
            failed.append((caption, str(e)))
    try:
        embeddings = pipeline.embed_texts(
            model, fits, batch_size=args.batch_size, progress=show_progress(args)
        )
    except KeyboardInterrupt:
        return [], torch.empty(0, 0), failed, True
    return fits, embeddings, failed, False


def _report(args: argparse.Namespace, err: Printer, n_new: int, n_old: int, failed: list) -> None:
    what = "captions" if args.text else "images"
    kept = f" ({n_old} already there)" if n_old else ""
    say(args, err, f"embedded {n_new} {what} into {args.out}{kept}")
    if failed:
        err(f"clip: skipped {len(failed)} {what} that could not be embedded:")
        for key, reason in failed:
            err(f"  {key}: {reason}")
