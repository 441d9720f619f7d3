"""Workload 3 of ``run.py``: a folder of JPEGs to embeddings on disk, against the reference's
straightforward loop, and the fast-decode opt-in (table 3b)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import peers
import torch
from PIL import Image
from timing import Table, alternate, deviation, fmt, peer_row

Settings = argparse.Namespace


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[str]:
    """``n`` photo-like JPEGs: smooth colour fields plus grain (noise alone decodes atypically)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)
        base = Image.fromarray(small).resize(size, Image.BICUBIC)
        grain = rng.integers(-12, 13, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        path = folder / f"{size[0]}x{size[1]}_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def reference_loop(ref_model: Any, ref_preprocess: Any, paths: list[str], device: str, out: str):
    """The straightforward loop: open, preprocess, batch, encode, normalise, save."""
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(paths), 64):
            batch = torch.stack([ref_preprocess(Image.open(p)) for p in paths[i : i + 64]])
            features = ref_model.encode_image(batch.to(device)).float()
            chunks.append(features / features.norm(dim=-1, keepdim=True))
    embeddings = torch.cat(chunks).cpu()
    np.save(out, embeddings.numpy())
    return embeddings


def ours_pipeline(model: Any, paths: list[str], s: Settings, out: str, fast: bool = False):
    from clip.pipeline import embed_images

    result = embed_images(
        model, paths, num_workers=s.workers, device=s.device, fast_decode=fast, batch_size=64
    )
    np.save(out, result.embeddings.numpy())
    return result.embeddings


def end_to_end(s: Settings, group: list[peers.Peer], ref: Any, tmp: Path, table: Table) -> None:
    per_size = 16 if s.quick else 64
    small = write_jpegs(tmp, per_size, (640, 480), seed=0)
    large = write_jpegs(tmp, per_size, (1920, 1080), seed=1)
    ours_model, ref_model = group[0].module, group[1].module
    ref_preprocess = ref.clip._transform(224)
    out = str(tmp / "embeddings.npy")
    results: dict[str, torch.Tensor] = {}

    def run(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: results.__setitem__(name, fn())

    paths, case = small + large, f"{2 * per_size} JPEGs, mixed sizes"
    fns = {
        "clip": run("clip", lambda: ours_pipeline(ours_model, paths, s, out)),
        "reference": run(
            "ref", lambda: reference_loop(ref_model, ref_preprocess, paths, s.device, out)
        ),
    }
    seconds = alternate(fns, max(1, s.reps - 1), s.device, warmup=False)
    table.add(peer_row(case, {k: len(paths) / v for k, v in seconds.items()}))
    rel, cos = deviation(results["clip"], results["ref"])
    table.note(f"{case}: clip vs reference embeddings: max rel diff {rel:.1e}")
    fns = {
        "exact": run("exact", lambda: ours_pipeline(ours_model, large, s, out)),
        "fast": run("fast", lambda: ours_pipeline(ours_model, large, s, out, fast=True)),
    }
    seconds = alternate(fns, max(1, s.reps - 1), s.device, warmup=False)
    rel, cos = deviation(results["fast"], results["exact"])
    exact, fast = len(large) / seconds["exact"], len(large) / seconds["fast"]
    t = Table(
        f"3b. fast decode (opt-in), {len(large)} 1920×1080 JPEGs",
        ["scope", "exact img/s", "fast img/s", "speed-up", "max rel dev", "min cosine"],
    )
    print(t.header())
    t.add(
        [
            "end to end",
            fmt(exact),
            fmt(fast),
            f"**{fast / exact:.2f}×**",
            f"{rel:.1e}",
            f"{cos:.5f}",
        ]
    )
    t.add(["decode + preprocess only", *decode_only(large, s)])
    s.fast_decode = t


def decode_only(paths: list[str], s: Settings) -> list[str]:
    """The part fast decode changes, without the model: exact vs draft-mode JPEG decoding."""
    from clip.pipeline import load_image
    from clip.preprocess import transform

    preprocess = transform(224)
    out: dict[str, torch.Tensor] = {}

    def run(name: str, draft: Optional[int]) -> Callable[[], None]:
        return lambda: out.__setitem__(
            name, torch.stack([load_image(p, preprocess, draft) for p in paths])
        )

    seconds = alternate({"exact": run("exact", None), "fast": run("fast", 224)}, max(2, s.reps))
    exact, fast = len(paths) / seconds["exact"], len(paths) / seconds["fast"]
    rel, cos = deviation(out["fast"], out["exact"])
    return [fmt(exact), fmt(fast), f"**{fast / exact:.2f}×**", f"{rel:.1e} (pixels)", f"{cos:.5f}"]
