#!/usr/bin/env python
"""Scale-out benchmark: a sharded embedding job with 1 and 2 Ray actors, side by side.

Builds full-size ViT-B/32 with random weights, writes a folder of photo-like JPEGs, starts a
local Ray instance with this machine's CPUs, then alternates whole jobs
(``clip.distributed.embed_dataset``, each into a fresh output folder, actor start-up and model
load included) between:

* ``ranks``: no Ray, one process, decoding in one DataLoader worker;
* ``ray, 1 actor`` and ``ray, 2 actors``: decode tasks plus an actor pool.

It also times the two stages alone (decode + preprocess on one core; ``encode_image`` on one
thread) to show where the bottleneck is. Usage::

    python benchmarks/scale.py [--images 192] [--reps 2]

Prints a Markdown table; ``benchmarks/RESULTS.md`` quotes it with a reading.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import peers  # noqa: E402
from timing import alternate  # noqa: E402
from workload_folder import write_jpegs  # noqa: E402

import clip  # noqa: E402
from clip import distributed, pipeline  # noqa: E402
from clip.preprocess import transform  # noqa: E402


def job(images: Path, out: Path, checkpoint: str, args: argparse.Namespace, **kw: Any) -> Callable:
    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        summary = distributed.embed_dataset(
            [str(images)],
            str(out),
            model=checkpoint,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            **kw,
        )
        assert summary.embedded == args.images, summary

    return run


def stage_rates(paths: list[str], checkpoint: str, batch: int) -> dict[str, float]:
    """Images/s of decode + preprocess alone, and of encode_image alone, each on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        preprocess = transform(224)
        start = time.perf_counter()
        for p in paths[:48]:
            pipeline.load_image(p, preprocess)
        decode = 48 / (time.perf_counter() - start)
        model, _ = clip.load(checkpoint, device="cpu")
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            model.encode_image(x)
            start = time.perf_counter()
            for _ in range(3):
                model.encode_image(x)
        encode = 3 * batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"decode": decode, "encode": encode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="clip-scale-"))
    try:
        checkpoint = str(tmp / "vit-b-32.pt")
        torch.save(peers.weights("ViT-B/32")[1], checkpoint)
        folder = tmp / "images"
        folder.mkdir()
        paths = write_jpegs(folder, args.images, (640, 480), seed=0)
        rates = stage_rates(paths, checkpoint, args.batch_size)
        cpus = os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        fns = {
            "ranks (1 process, 1 decode worker)": job(
                folder, tmp / "o0", checkpoint, args, workers=1
            ),
            "ray, 1 actor": job(folder, tmp / "o1", checkpoint, args, ray=True, actors=1),
            "ray, 2 actors": job(folder, tmp / "o2", checkpoint, args, ray=True, actors=2),
        }
        seconds = alternate(fns, args.reps, warmup=False)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(args, cpus, rates, seconds))
    return 0


def report(
    args: argparse.Namespace, cpus: int, rates: dict[str, float], seconds: dict[str, float]
) -> str:
    base = seconds["ray, 1 actor"]
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{cpus} CPUs; torch {torch.__version__}; ray {__import__('ray').__version__}",
        f"- {args.images} JPEGs 640×480, ViT-B/32 (random weights), batch {args.batch_size}, "
        f"{args.images // args.shard_size} shards of {args.shard_size}; median of {args.reps} "
        "alternating whole jobs, start-up and model load included",
        f"- stages alone, one core each: decode + preprocess {rates['decode']:.1f} img/s, "
        f"encode_image {rates['encode']:.1f} img/s",
        "",
        "| job | images/s | vs ray, 1 actor |",
        "|---|---|---|",
    ]
    for name, s in seconds.items():
        lines.append(f"| {name} | {args.images / s:.1f} | {base / s:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
