"""Command line: ``clip embed``, ``clip classify`` and ``clip models``.

A thin layer over :mod:`clip.pipeline`, :func:`clip.load` and the registry. This is the only
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
from typing import Any, Callable, Optional

import torch

from clip import pipeline
from clip.clip import load
from clip.data import fs
from clip.data.discover import discover, kind_of, read_list
from clip.data.embed import default_device
from clip.data.resume import model_digest, resume_file, weights_digest
from clip.download import MODELS, default_cache_dir, verify_cache
from clip.retry import RetryPolicy
from clip.tokenizer import tokenize

Printer = Callable[[str], None]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip",
        description="CLIP from the command line: embed images or captions, zero-shot classify.",
        epilog="exit codes: 0 success, 1 runtime failure, 2 usage error, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(sub)
    _add_classify(sub)
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


def _common(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--model", default="ViT-B/32", help="model name or checkpoint file (ViT-B/32)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, mps (default: cuda if any)")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch_size,
        metavar="N",
        help=f"images or texts per forward pass ({batch_size})",
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        metavar="N",
        help=f"image decoding processes, 0 decodes in the main one ({_default_workers()})",
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help="where named models are downloaded (~/.cache/clip)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


def _add_embed(sub: Any) -> None:
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
    _common(p, batch_size=64)
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
        type=_positive_int,
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
        "--actors", type=_positive_int, metavar="N", help="Ray model replicas (one per GPU)"
    )
    group.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and progress bars"
    )
    net = p.add_argument_group("URL inputs (http(s) rows of Parquet files and lists)")
    net.add_argument(
        "--retries",
        type=_non_negative_int,
        default=RetryPolicy.retries,
        metavar="N",
        help=f"retries of a read that failed transiently (503, 429, reset, timeout); a 404 "
        f"is not retried ({RetryPolicy.retries})",
    )
    net.add_argument(
        "--timeout",
        type=_positive_float,
        default=RetryPolicy.timeout_s,
        metavar="S",
        help=f"seconds without a byte before a read is abandoned ({RetryPolicy.timeout_s:g})",
    )


def _add_classify(sub: Any) -> None:
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
    p.add_argument("--top-k", type=_positive_int, default=3, help="labels to print per image (3)")
    _common(p, batch_size=64)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


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


# ---- embed ----------------------------------------------------------------------------------


def _embed(args: argparse.Namespace, err: Callable[[str], None]) -> int:
    if bool(args.inputs) == bool(args.text):
        raise UsageError("give image PATHs or --text CAPTIONS.txt (one of the two)")
    _refuse_unused(args)
    if args.workers is None and args.ray is None:
        args.workers = _default_workers()
    policy = RetryPolicy(retries=args.retries, timeout_s=args.timeout)
    before = fs.set_default_policy(policy)  # every URL read of this command, in every worker
    try:
        if _sharded(args):
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


def _embed_one_file(args: argparse.Namespace, err: Callable[[str], None]) -> int:
    key_name = "text" if args.text else "path"
    inputs = _captions(args.text) if args.text else _images(args.inputs)
    if os.path.splitext(args.out)[1].lower() not in (".npy", ".parquet"):
        raise UsageError(f"--out must end in .npy or .parquet, got {args.out!r}")
    device = args.device or default_device()
    precision = _precision(args, device)
    digest = model_digest(args.model)
    model = None if digest else _load(args, device, precision)
    meta = {
        "model": args.model,
        "model_digest": digest or weights_digest(model),  # type: ignore[arg-type]
        "precision": str(precision).removeprefix("torch."),
        "key": key_name,
    }
    done_keys, done, todo = resume_file(args.out, inputs, meta)
    if not todo:
        _say(args, err, f"nothing to do: all {len(inputs)} inputs are already in {args.out}")
        return EXIT_OK
    model = model or _load(args, device, precision)
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


def _embed_shards(args: argparse.Namespace, err: Callable[[str], None]) -> int:
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
            progress=_progress(args),
            verbose=args.verbose,
        )
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    done = f" ({len(summary.skipped)} already done)" if summary.skipped else ""
    if summary.retried:
        done += f"; reran the failed rows of {len(summary.retried)}"
    rank = f"rank {summary.rank}/{summary.world_size}: " if summary.world_size > 1 else ""
    _say(
        args,
        err,
        f"{rank}wrote {len(summary.written)} of {summary.shards} shards{done} into {args.out}: "
        f"{summary.embedded} images embedded, {summary.failed} unreadable (see *.stats.json) "
        f"in {summary.seconds:.1f} s",
    )
    return EXIT_OK


def _images(inputs: Sequence[str]) -> list[str]:
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
        model,
        paths,
        batch_size=args.batch_size,
        num_workers=args.workers,
        fast_decode=args.fast_decode,
        progress=_progress(args),
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
            model, fits, batch_size=args.batch_size, progress=_progress(args)
        )
    except KeyboardInterrupt:
        return [], torch.empty(0, 0), failed, True
    return fits, embeddings, failed, False


def _report(
    args: argparse.Namespace, err: Callable[[str], None], n_new: int, n_old: int, failed: list
) -> None:
    what = "captions" if args.text else "images"
    kept = f" ({n_old} already there)" if n_old else ""
    _say(args, err, f"embedded {n_new} {what} into {args.out}{kept}")
    if failed:
        err(f"clip: skipped {len(failed)} {what} that could not be embedded:")
        for key, reason in failed:
            err(f"  {key}: {reason}")


# ---- classify -------------------------------------------------------------------------------


@torch.no_grad()
def _classify(
    args: argparse.Namespace, out: Callable[[str], None], err: Callable[[str], None]
) -> int:
    labels = _labels(args)
    args.workers = _default_workers() if args.workers is None else args.workers
    paths = _images(args.images)
    model = _load(args)
    classifier, names = _classifier(model, labels, args)  # [D, C]
    scale = torch.as_tensor(model.logit_scale).detach().float().exp().cpu()
    failed: list[tuple[str, str]] = []
    any_ok = False
    for batch in pipeline.iter_image_batches(
        model, paths, batch_size=args.batch_size, num_workers=args.workers, progress=_progress(args)
    ):
        failed.extend(batch.failed)
        if not batch.paths:
            continue
        any_ok = True
        probs = (scale * batch.embeddings @ classifier).softmax(dim=-1)  # [n, C]
        top = probs.topk(min(args.top_k, len(names)), dim=-1)
        for path, values, indices in zip(batch.paths, top.values.tolist(), top.indices.tolist()):
            out(f"{path}: " + ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(values, indices)))
    for path, reason in failed:
        err(f"clip: skipped {path}: {reason}")
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


# ---- shared ---------------------------------------------------------------------------------


def _load(
    args: argparse.Namespace, device: Optional[str] = None, precision: Optional[torch.dtype] = None
) -> torch.nn.Module:
    device = device or args.device or default_device()
    model, _ = load(args.model, device=device, download_root=args.cache_dir, dtype=precision)
    return model


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _say(args: argparse.Namespace, err: Callable[[str], None], message: str) -> None:
    if not args.quiet:
        err(f"clip: {message}")


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
            return _embed(args, err)
        return _classify(args, out, err)
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
