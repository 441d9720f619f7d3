#!/usr/bin/env python
"""Load one checkpoint on the CPU in this (fresh) process; print time and peak RSS as JSON.

Usage: ``python benchmarks/load_memory.py {clip|reference} CHECKPOINT REFERENCE_DIR``
(run by ``benchmarks/run.py``; the process must be fresh for its peak RSS to mean anything).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

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


def main() -> None:
    impl, path, ref_dir = sys.argv[1:4]
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


if __name__ == "__main__":
    main()
