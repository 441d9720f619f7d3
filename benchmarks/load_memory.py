#!/usr/bin/env python
"""Peak memory and time of ``load(..., device="cpu")``, each in a fresh process.

Two uses:

- ``python benchmarks/load_memory.py [--model ViT-L/14] [--reference-dir DIR]`` writes the model's
  random weights as a TorchScript archive (fp16), fp16 and fp32 state dicts and an fp32
  safetensors file, loads each with clip and with OpenAI's reference in fresh processes, and
  prints the rows of table 5 of ``benchmarks/RESULTS.md`` (what ``run.py --only 5`` measures,
  without the other workloads' set-up).
- ``python benchmarks/load_memory.py {clip|reference} CHECKPOINT REFERENCE_DIR`` (the probe, run
  by the above and by ``benchmarks/run.py``): load one file in this process; print time and peak
  RSS as JSON. The process must be fresh for its peak RSS to mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc (``VmRSS`` now, ``VmHWM`` peak), in bytes.

    ``VmHWM`` starts afresh at exec, unlike ``getrusage``'s ``ru_maxrss``, which a child process
    inherits from the parent that forked it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def probe(impl: str, path: str, ref_dir: str) -> None:
    """Load ``path`` with ``impl`` in this process; print seconds and RSS figures as JSON."""
    import torch

    torch.set_num_threads(1)
    if impl == "clip":
        import clip as package
    else:
        from bench_tokenizer import load_reference

        package = load_reference(ref_dir)
    base = status_bytes("VmRSS")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = package.load(path, device="cpu", jit=False)
    seconds = time.perf_counter() - start
    assert next(model.parameters()).dtype == torch.float32
    peak = status_bytes("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "base_rss": base}))


def rss_cell(run: dict[str, float], fp32_bytes: int) -> str:
    """Peak RSS, and its growth over the RSS after imports, as multiples of the fp32 weights."""
    peak, growth = run["peak_rss"], run["peak_rss"] - run["base_rss"]
    return f"{peak / 2**30:.2f} GiB ({peak / fp32_bytes:.2f}×), +{growth / fp32_bytes:.2f}×"


def table(model_name: str, ref_dir: Optional[str]) -> None:
    """Print table 5's rows for ``model_name`` (the reference is installed if not given)."""
    import run  # the benchmark driver: its checkpoints, probes and row format

    with tempfile.TemporaryDirectory(prefix="clip-load-") as tmp_name:
        tmp = Path(tmp_name)
        if not ref_dir:
            ref_dir = run.install_reference(str(tmp / "reference"))
        files, fp32_bytes = run.write_checkpoints(model_name, tmp)
        import torch

        import clip

        safetensors = tmp / "sd32.safetensors"
        clip.save(torch.load(files["state dict (fp32)"], weights_only=True), safetensors)
        print(f"{model_name}: fp32 weights {fp32_bytes / 2**30:.2f} GiB")
        print("| checkpoint | clip time | reference time | clip peak RSS | reference peak RSS |")
        print("|---|---|---|---|---|")
        for name, path in [*files.items(), ("safetensors (fp32)", safetensors)]:
            ours = run.load_in_subprocess("clip", path, ref_dir)
            if path == safetensors:  # the reference cannot read safetensors
                cells = [f"{ours['seconds']:.2f} s", "—", rss_cell(ours, fp32_bytes), "—"]
            else:
                theirs = run.load_in_subprocess("reference", path, ref_dir)
                cells = [
                    f"{ours['seconds']:.2f} s",
                    f"{theirs['seconds']:.2f} s",
                    rss_cell(ours, fp32_bytes),
                    rss_cell(theirs, fp32_bytes),
                ]
            print(f"| {model_name} {name} | " + " | ".join(cells) + " |", flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("impl", nargs="?", choices=["clip", "reference"], help="probe mode")
    parser.add_argument("checkpoint", nargs="?", help="probe mode: the file to load")
    parser.add_argument("probe_reference_dir", nargs="?", help="probe mode: the reference's dir")
    parser.add_argument("--model", default="ViT-L/14", help="table mode: architecture")
    parser.add_argument("--reference-dir", help="table mode: directory holding the reference")
    args = parser.parse_args(argv)
    if args.impl is None:
        table(args.model, args.reference_dir)
    elif args.checkpoint is None or args.probe_reference_dir is None:
        parser.error("probe mode needs: {clip|reference} CHECKPOINT REFERENCE_DIR")
    else:
        probe(args.impl, args.checkpoint, args.probe_reference_dir)


if __name__ == "__main__":
    main()
