#!/usr/bin/env python
"""Inductor options for ``clip.optimize(compile=True)``: each against the default model, CPU fp32.

Each (model, batch, configuration) runs in a fresh process with an empty inductor cache, so the
first-call time is a cold compile; the compiled and the default model then alternate
(``timing.alternate``, medians). Configurations:

* ``library`` — what ``clip.optimize(model, compile=True)`` does now (freezing);
* ``plain`` — ``nn.Module.compile()`` with inductor's defaults (the previous behaviour);
* ``freeze`` — inductor freezing (weights as constants, BatchNorm folding, prepacked weights);
* ``freeze-noprepack`` — freezing without oneDNN/MKL weight prepacking;
* ``freeze-autotune`` — freezing + ``max_autotune`` (C++ GEMM templates benchmarked against MKL);
* ``freeze-cppwrap`` — freezing + ``cpp_wrapper``.

Inductor's flags are set globally in the child process: dynamo reads ``freezing`` while tracing,
so ``torch.compile(options={"freezing": True})`` alone would not freeze.

Usage::

    python benchmarks/compile_options.py [--models ViT-B/32 RN50] [--batches 16 1]
        [--configs library plain ...] [--reps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent

CONFIGS: dict[str, dict[str, Any]] = {
    "library": {},
    "plain": {},
    "freeze": {"freezing": True},
    "freeze-noprepack": {"freezing": True, "cpp.weight_prepack": False},
    "freeze-autotune": {"freezing": True, "max_autotune": True},
    "freeze-cppwrap": {"freezing": True, "cpp_wrapper": True},
}


def one(model_name: str, batch: int, config: str, reps: int) -> dict[str, Any]:
    """Time one configuration against the default model in this process."""
    import peers
    import torch
    import torch._inductor.config as inductor_config
    from timing import alternate, deviation

    from clip.optimize import compile_model

    torch.set_num_threads(2)
    for key, value in CONFIGS[config].items():
        holder = inductor_config.cpp if key.startswith("cpp.") else inductor_config
        setattr(holder, key.removeprefix("cpp."), value)
    _, sd = peers.weights(model_name)
    default = peers.ours(sd, "cpu", half=False).module
    model = peers.ours(sd, "cpu", half=False).module
    if config == "library":
        compile_model(model)
    else:
        model.visual.compile()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def call(m: Any) -> Any:
        def run() -> Any:
            with torch.inference_mode():
                return m.encode_image(x)

        return run

    expected = call(default)()
    start = time.perf_counter()
    got = call(model)()
    first = time.perf_counter() - start
    rel, cos = deviation(got, expected)
    sec = alternate({"default": call(default), "opt": call(model)}, reps)
    return {
        "model": model_name,
        "batch": batch,
        "config": config,
        "default img/s": round(batch / sec["default"], 2),
        "compiled img/s": round(batch / sec["opt"], 2),
        "speed-up": round(sec["default"] / sec["opt"], 3),
        "max rel dev": f"{rel:.1e}",
        "min cosine": f"{cos:.9f}",
        "first call s": round(first, 1),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B/32", "RN50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 1])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "CONFIG"), help="internal")
    args = parser.parse_args(argv)
    if args.one:
        sys.path.insert(0, str(HERE))
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2], args.reps)), flush=True)
        return 0
    for model_name in args.models:
        for batch in args.batches:
            for config in args.configs:
                reps = args.reps * (3 if batch == 1 else 1)
                with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                    command = [sys.executable, __file__, "--reps", str(reps), "--one"]
                    out = subprocess.run(
                        [*command, model_name, str(batch), config],
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
                print(rows[-1] if rows else f"{model_name} {batch} {config}: {out.stderr[-2000:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
