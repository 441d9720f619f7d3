"""How long a rerun takes to skip N finished shards (it must grow linearly with N).

    python benchmarks/skip_shards.py            # 1000 and 3000 shards
    python benchmarks/skip_shards.py 1000 10000

Writes N one-row shards to a temporary folder, then times ``clip.data.resume.pending`` (one
folder listing, one stats read and one Parquet footer per shard). Prints seconds and
microseconds per shard for each N: a flat per-shard cost is linear.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from clip import shards
from clip.data.resume import pending
from clip.shards import Shard

META = {"model_digest": "sha256:x", "precision": "float32", "dtype": "float32", "decode": "exact"}


def main(sizes: list[int]) -> None:
    for n in sizes:
        with tempfile.TemporaryDirectory() as out:
            planned = [Shard(f"s{i:06d}", "files", "", (f"{i}.jpg",)) for i in range(n)]
            for shard in planned:
                done = shards.FinishedShard(shard.name, [shard.members[0]], torch.zeros(1, 8), [])
                shards.write_shard(out, shard, done, META, torch.float32)
            start = time.perf_counter()
            todo, finished = pending(out, planned, META)
            seconds = time.perf_counter() - start
            assert not todo and len(finished) == n
            per = seconds / n * 1e6
            print(f"skip {n:>6} finished shards: {seconds:6.2f} s ({per:.0f} µs/shard)")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 3000])
