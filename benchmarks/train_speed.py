#!/usr/bin/env python
"""Training speed and peak memory of a full-size ViT-B/32 on the CPU, with and without gradient
checkpointing (``model.set_grad_checkpointing(True)``).

``python benchmarks/train_speed.py [--batch 32] [--steps 3] [--reps 2] [--out FILE]``

Each measurement runs in a fresh process (so its peak RSS means something): random weights with
ViT-B/32's shapes, fp32, AdamW through ``clip.training.train_step`` (forward of both towers,
contrastive loss, backward, optimizer step) on ``--batch`` random images and captions. One warm-up
step, then the median of ``--steps`` timed steps. The two settings alternate ``--reps`` times and
the medians are reported. With ``--out``, the table replaces its section of that results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

SECTION = "## Fine-tuning: training speed and memory of ViT-B/32 (`benchmarks/train_speed.py`)"


def peak_rss() -> int:
    """Peak resident memory of this process since it started, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def probe(checkpointing: bool, batch: int, steps: int) -> None:
    """Train ``steps`` timed steps in this fresh process; print seconds per step and peak RSS."""
    import torch

    import clip
    from clip.config import CLIPConfig
    from clip.model import CLIP
    from clip.optim import make_optimizer
    from clip.precision import prepare_for_training
    from clip.training import train_step

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = CLIP.from_config(CLIPConfig(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)).train()
    precision = prepare_for_training(model, "fp32", torch.device("cpu"))
    model.set_grad_checkpointing(checkpointing)
    optimizer = make_optimizer(model, lr=1e-5)
    images = torch.randn(batch, 3, 224, 224)
    texts = clip.tokenize([f"a photo of thing number {i}" for i in range(batch)])
    train_step(model, images, texts, optimizer, precision)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, images, texts, optimizer, precision)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "peak_rss": peak_rss()}))


def measure(checkpointing: bool, batch: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--probe", str(int(checkpointing))]
    cmd += ["--batch", str(batch), "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", help="results file whose section is replaced")
    parser.add_argument("--probe", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        probe(bool(args.probe), args.batch, args.steps)
        return

    import torch

    runs: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(args.reps):
        for checkpointing in (False, True) if i % 2 == 0 else (True, False):
            runs[checkpointing].append(measure(checkpointing, args.batch, args.steps))
    rows = []
    for checkpointing in (False, True):
        seconds = statistics.median(r["seconds"] for r in runs[checkpointing])
        rss = statistics.median(r["peak_rss"] for r in runs[checkpointing])
        rows.append((checkpointing, args.batch / seconds, rss / 2**30))
    base_speed, base_rss = rows[0][1], rows[0][2]
    lines = [
        SECTION,
        "",
        f"Command: `python benchmarks/train_speed.py --batch {args.batch} --steps {args.steps} "
        f"--reps {args.reps}`",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
        "CPU, 2 threads, fp32, AdamW, each setting in a fresh process, alternating",
        f"- random weights with ViT-B/32's shapes, batch {args.batch} images and captions per "
        "step; peak RSS includes the model, its gradients and Adam's two moments "
        "(about 2.4 GB together)",
        "",
        "| grad checkpointing | training images/s | vs off | peak RSS (GiB) | vs off |",
        "|---|---|---|---|---|",
    ]
    for checkpointing, speed, rss in rows:
        lines.append(
            f"| {'on' if checkpointing else 'off'} | {speed:.2f} | {speed / base_speed:.2f}× | "
            f"{rss:.2f} | {rss / base_rss:.2f}× |"
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        from zoo_speed import write_section

        write_section(Path(args.out), text, SECTION)


if __name__ == "__main__":
    main()
