"""What deciding whether ``encode_text`` may trim costs, against ``encode_text`` itself.

``CLIP.text_is_trimmable()`` runs on every ``encode_text`` call (masks causal, nothing hooked or
patched). This times it, the trimmed ``encode_text`` and the full-length path a hook causes, on a
ViT-B/32-sized text tower with random weights, on the CPU::

    python benchmarks/text_trim_overhead.py [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from checkpoints import PUBLISHED, make_state_dict

import clip
from clip.model import build_from_state_dict


def median_ms(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_from_state_dict(make_state_dict(PUBLISHED["ViT-B/32"][0])).eval()
    check_us = timeit.timeit(model.text_is_trimmable, number=2000) / 2000 * 1e6
    print(f"text_is_trimmable(): {check_us:.1f} us per call")
    with torch.no_grad():
        for batch in (1, 8):
            text = clip.tokenize(["a photo of a cat"] * batch)
            model.encode_text(text)
            ms = median_ms(lambda text=text: model.encode_text(text), args.repeats)
            print(f"encode_text batch {batch}: {ms:.2f} ms (check: {check_us / 10 / ms:.2f}%)")
        handle = model.transformer.resblocks[0].register_forward_hook(lambda m, a, o: None)
        text = clip.tokenize(["a photo of a cat"])
        ms = median_ms(lambda: model.encode_text(text), args.repeats)
        handle.remove()
        print(f"encode_text batch 1, a block hooked (all 77 columns): {ms:.2f} ms")


if __name__ == "__main__":
    main()
