#!/usr/bin/env python
"""Load time and ``encode_image`` speed of a full-size GELU ViT-B/32 in open_clip's hub layout,
clip against open_clip, on the same random weights.

``python benchmarks/zoo_speed.py [--reps 5] [--batch 8] [--out benchmarks/RESULTS.md]``

The model has the shapes of LAION's ViT-B-32/laion2b_s34b_b79k (GELU, heads of 64): it is built
with random weights, saved once with ``clip.save(model, folder)`` (open_clip_config.json +
open_clip_model.safetensors), and then:

- **load**: ``clip.load(folder, device="cpu")`` and
  ``open_clip.create_model_and_transforms("local-dir:" + folder)``, each in a fresh process with
  both packages already imported (import time excluded), median of ``--reps`` alternating runs;
- **encode_image**: both models loaded in this process, a batch of ``--batch`` images, fp32,
  calls alternating (see ``timing.alternate``), after checking that both give the same features.

With ``--out``, the table replaces the section of that name in the results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from timing import write_section  # noqa: E402

SECTION = "## Model zoo: load and encode_image of a GELU ViT-B/32 (`benchmarks/zoo_speed.py`)"


def probe(impl: str, folder: str) -> None:
    """Load ``folder`` with ``impl`` in this (fresh) process; print the seconds as JSON."""
    import torch

    torch.set_num_threads(2)
    import open_clip

    import clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()  # imports excluded: both packages are already imported
        if impl == "clip":
            clip.load(folder, device="cpu")
        else:
            open_clip.create_model_and_transforms("local-dir:" + folder)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds}))


def load_seconds(impl: str, folder: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--probe", impl, folder],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def build_folder(root: str) -> str:
    import torch

    import clip
    from clip.config import CLIPConfig
    from clip.model import CLIP

    config = CLIPConfig(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12, activation="gelu")
    torch.manual_seed(0)
    model = CLIP.from_config(config).eval()
    folder = str(Path(root) / "vit-b-32-gelu")
    clip.save(model, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", help="results file whose zoo section is replaced")
    parser.add_argument("--probe", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe)
        return

    import open_clip
    import torch
    from timing import alternate

    import clip

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as root:
        folder = build_folder(root)
        loads: dict[str, list[float]] = {"clip": [], "open_clip": []}
        for i in range(args.reps):
            order = ["clip", "open_clip"] if i % 2 == 0 else ["open_clip", "clip"]
            for impl in order:
                loads[impl].append(load_seconds(impl, folder))
        ours, _ = clip.load(folder, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, _, _ = open_clip.create_model_and_transforms("local-dir:" + folder)
        theirs.eval()
        images = torch.randn(args.batch, 3, 224, 224)
        with torch.inference_mode():
            a, b = ours.encode_image(images), theirs.encode_image(images)
        rel = float((a - b).abs().max() / b.abs().max())
        if rel > 1e-5:
            raise SystemExit(f"features differ: relative error {rel:.2e}")

        def run(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model.encode_image(images)

        seconds = alternate(
            {"clip": lambda: run(ours), "open_clip": lambda: run(theirs)}, reps=args.reps
        )
    load = {k: statistics.median(v) for k, v in loads.items()}
    rate = {k: args.batch / v for k, v in seconds.items()}
    lines = [
        SECTION,
        "",
        f"Command: `python benchmarks/zoo_speed.py --reps {args.reps} --batch {args.batch}`",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch "
        f"{torch.__version__}, open_clip {open_clip.__version__}; CPU, {torch.get_num_threads()} "
        "threads",
        "- random weights with the shapes of ViT-B-32/laion2b_s34b_b79k (GELU), saved once by "
        "`clip.save(model, folder)`; both load that folder; features agree within "
        f"{rel:.1e} relative",
        "",
        "| | clip | open_clip | clip advantage |",
        "|---|---|---|---|",
        f"| load, fresh process (s) | {load['clip']:.2f} | {load['open_clip']:.2f} | "
        f"{load['open_clip'] / load['clip']:.2f}× |",
        f"| encode_image, batch {args.batch} (images/s) | {rate['clip']:.1f} | "
        f"{rate['open_clip']:.1f} | {rate['clip'] / rate['open_clip']:.2f}× |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(Path(args.out), SECTION, text)


if __name__ == "__main__":
    main()
