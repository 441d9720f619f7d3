#!/usr/bin/env python
"""Benchmark ``clip.tokenize`` against the reference tokenizer and check the ids are identical.

The reference (``clip-anytorch`` by default) is pip-installed into a temporary directory, or
taken from ``--reference-dir``, and imported in this process under the name ``ref_clip`` so
that it cannot be confused with this package. Both tokenizers are built before timing; their
word caches start empty. Exits 1 if any id differs.

Usage::

    python benchmarks/bench_tokenizer.py [--n 50000] [--reference-dir DIR] [--repeat 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clip.tokenizer import default_tokenizer, tokenize  # noqa: E402

REFERENCE = "clip-anytorch==2.6.0"

_WORD_TEXT = """a an the of on in at with and or to from by over under near behind next beside
photo picture image painting drawing sketch rendering illustration close-up view shot
dog cat bird horse cow sheep elephant bear zebra giraffe man woman child boy girl person
people group team family crowd car truck bus train bicycle motorcycle airplane boat ship
street road city town village beach ocean sea lake river mountain forest tree flower grass
field park garden house building bridge tower castle church kitchen room table chair bed
sofa window door wall floor sky cloud sun moon star night day morning evening sunset rain
snow red blue green yellow black white orange purple pink brown gray golden silver dark
bright small large big tiny huge old young new happy sad running walking sitting standing
playing eating drinking holding wearing looking flying swimming riding driving jumping
pizza sandwich cake coffee tea water wine beer apple banana orange bowl plate cup glass
laptop phone computer keyboard camera book clock vase umbrella bag hat shirt dress shoes
is are was were has have it's don't can't they're we'll i'm she'd you've
"""
WORDS = _WORD_TEXT.split()
UNICODE_BITS = ["café", "naïve", "jalapeño", "über", "日本", "猫", "東京", "서울", "москва",
                "αθήνα", "😀", "👍🏽", "🇯🇵", "❤️", "—", "…", "“quoted”", "it’s", "½", "°C",
                "&amp;", "&quot;", "Ã©"]  # fmt: skip
PUNCT = [",", ".", "!", "?", ";", ":", " -", " (", ")", "'", '"', "...", "!!"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Return ``n`` deterministic captions; about 10% contain non-ASCII text or entities."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 18)):
            r = rng.random()
            if r < 0.8:
                parts.append(rng.choice(WORDS))
            elif r < 0.9:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 5))))
            else:
                parts[-1:] = [(parts[-1] if parts else "") + rng.choice(PUNCT)]
        if rng.random() < 0.1:
            parts.insert(rng.randint(0, len(parts)), rng.choice(UNICODE_BITS))
        text = " ".join(parts)
        if rng.random() < 0.3:
            text = text.capitalize()
        captions.append(text)
    return captions


def install_reference(target: str, requirement: str = REFERENCE) -> str:
    """pip-install the reference (no dependencies) into the folder ``target``; returns it."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target]
    subprocess.run([*pip, requirement], check=True)
    return target


def load_reference(ref_dir: str) -> types.ModuleType:
    """Import the reference package found in ``ref_dir/clip`` under the name ``ref_clip``."""
    try:
        import pkg_resources  # noqa: F401  (the reference imports `packaging` through it)
    except ImportError:
        import packaging.version

        stub = types.ModuleType("pkg_resources")
        stub.packaging = packaging  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stub
    package_dir = Path(ref_dir) / "clip"
    spec = importlib.util.spec_from_file_location(
        "ref_clip", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ref_clip"] = module
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` once; return its result and the elapsed seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(ref_dir: str, n: int, repeat: int) -> int:
    """Benchmark both tokenizers on ``n`` captions; return the process exit code."""
    captions = make_captions(n)
    ref = load_reference(ref_dir)
    default_tokenizer()  # build the vocabulary outside the timed region (the reference does)
    for attempt in range(repeat):
        label = "cold caches" if attempt == 0 else "warm caches"
        expected, t_ref = timed(lambda: ref.tokenize(captions, truncate=True))
        ours, t_ours = timed(lambda: tokenize(captions, truncate=True))
        mismatches = int((expected.to(ours.dtype) != ours).any(dim=1).sum())
        print(f"[{label}] {n} captions")
        print(f"  reference: {n / t_ref:12,.0f} texts/s ({t_ref:.3f} s)")
        print(f"  clip:      {n / t_ours:12,.0f} texts/s ({t_ours:.3f} s)")
        print(f"  speed-up:  {t_ref / t_ours:.2f}x")
        print(f"  mismatching rows: {mismatches}")
        if mismatches or expected.shape != ours.shape:
            return 1
    return 0


def main() -> int:
    """Parse arguments, provide the reference and run the benchmark."""
    parser = argparse.ArgumentParser(description="clip.tokenize vs reference tokenizer")
    parser.add_argument("--n", type=int, default=50_000, help="number of captions")
    parser.add_argument("--repeat", type=int, default=1, help="passes (later ones are warm)")
    parser.add_argument("--reference-dir", help="directory with the reference's clip/ inside")
    parser.add_argument("--reference", default=REFERENCE, help="pip requirement to install")
    args = parser.parse_args()
    if args.reference_dir:
        return run(args.reference_dir, args.n, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        return run(install_reference(tmp, args.reference), args.n, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
