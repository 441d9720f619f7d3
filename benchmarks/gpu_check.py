#!/usr/bin/env python
"""GPU checks in one script: PASS/FAIL per check, with the numbers behind each verdict.

Sized for under 5 minutes on one GPU. The checks:

1. ``fp16``: ``clip.load`` on the device (fp16 mixed precision on CUDA) against the fp32 CPU
   model, image and text, for the tiny test checkpoints and full-size ViT-B/32 and RN50 with
   random weights built in-process (no download);
2. ``jit``: ``jit=True`` on the device, then ``.cpu()`` (the model re-traces itself) and
   ``.float()``, against the fp32 CPU model;
3. ``compile``: ``clip.optimize(model, compile=True)`` (inductor with freezing) against the same
   model uncompiled, and its refusal of in-place weight edits;
4. ``pipeline``: ``clip.pipeline.embed_images`` with device set (pinned-memory DataLoader on
   CUDA, two decode workers) against the fp32 CPU embeddings;
5. ``ranks``: two torchrun-style rank processes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) that call
   ``torch.cuda.set_device(LOCAL_RANK)`` and then ``clip.distributed.embed_dataset``: with
   ``LOCAL_RANK`` 0 and 1 (on a 1-GPU machine rank 1 must fail with a clear message), and both
   on ``LOCAL_RANK=0`` (the shards of both ranks must cover every image once);
6. ``suite``: the benchmark suite's GPU rows, ``benchmarks/run.py --device cuda --quick --only 1``
   with ``--reference-dir`` (a folder holding the reference's ``clip/``, made beforehand where
   there is network with ``pip install --no-deps --target DIR clip-anytorch``); skipped without.

Without CUDA it prints "no CUDA: skipped" and exits 0. ``--device cpu`` is a dry run of every
check on the CPU (fp16 on the CPU for check 1), so the script's code paths run anywhere;
``tests/test_gpu_check.py`` runs it that way.

Usage::

    python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--skip compile,suite]
        [--reference-dir DIR] [--out benchmarks/RESULTS.md]

Exit status: 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(HERE)]

from checkpoints import PUBLISHED, TINY, Arch, make_state_dict, write_openai_archive  # noqa: E402
from timing import deviation  # noqa: E402

import clip  # noqa: E402
from clip.atomic import atomic_write  # noqa: E402
from clip.model import CLIP, build_from_state_dict  # noqa: E402

CHECKS = ("fp16", "jit", "compile", "pipeline", "ranks", "suite")


@dataclass
class Row:
    check: str
    case: str
    status: str  # PASS, FAIL or SKIP
    detail: str


# ---- helpers --------------------------------------------------------------------------------


def inputs(arch: Arch, n: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random images [n, 3, R, R] and token rows [n, 77] of different lengths (CPU)."""
    g = torch.Generator().manual_seed(seed)
    r = arch.image_resolution
    images = torch.randn(n, 3, r, r, generator=g)
    texts = clip.tokenize([" ".join(["a photo of a cat"] * (1 + 3 * i)) for i in range(n)])
    return images, texts


def verdict(check: str, case: str, got: Tensor, want: Tensor, rel_max: float) -> Row:
    rel, cos = deviation(got, want)
    ok = rel <= rel_max and got.shape == want.shape
    detail = f"max rel dev {rel:.2e} (limit {rel_max:.0e}), min cosine {cos:.6f}"
    return Row(check, case, "PASS" if ok else "FAIL", detail)


def encodings(model: Any, images: Tensor, texts: Tensor, device: str) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model.encode_image(images.to(device)), model.encode_text(texts.to(device))


def fp32_cpu(sd: dict[str, Tensor]) -> CLIP:
    return build_from_state_dict({k: v.clone() for k, v in sd.items()}).float()


def models(quick: bool, tiny: list[str]) -> Iterator[tuple[str, Arch, dict[str, Tensor]]]:
    """The tiny test models, then (unless quick) full-size ViT-B/32 and RN50, random weights."""
    for name in tiny:
        yield name, TINY[name], make_state_dict(TINY[name], layout="openai")
    if not quick:
        for name in ("ViT-B/32", "RN50"):
            arch = PUBLISHED[name][0]
            yield name, arch, make_state_dict(arch, layout="openai")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def half_dtype(device: str) -> Optional[torch.dtype]:
    """``clip.load``'s dtype: its default on CUDA (fp16 mixed); forced fp16 on a CPU dry run."""
    return None if device.startswith("cuda") else torch.float16


# ---- 1. fp16 against fp32 CPU ---------------------------------------------------------------


def check_fp16(a: argparse.Namespace, tmp: Path) -> list[Row]:
    rows = []
    for name, arch, sd in models(a.quick, a.tiny):
        path = tmp / f"{name.replace('/', '-')}.pt"
        torch.save(sd, path)
        model, _ = clip.load(str(path), device=a.device, dtype=half_dtype(a.device))
        images, texts = inputs(arch)
        got = encodings(model, images, texts, a.device)
        want = encodings(fp32_cpu(sd), images, texts, "cpu")
        layout = f"{model.dtype}".removeprefix("torch.")
        for what, g, w in zip(("image", "text"), got, want):
            rows.append(verdict("fp16", f"{name} {what} ({layout})", g, w, 2e-2))
        del model
        path.unlink()
    return rows


# ---- 2. jit on the device, then .cpu() ------------------------------------------------------


def check_jit(a: argparse.Namespace, tmp: Path) -> list[Row]:
    rows = []
    for name in a.tiny:
        arch = TINY[name]
        sd = make_state_dict(arch, layout="openai")
        path = tmp / f"{name}-jit.pt"
        with quiet():
            write_openai_archive(arch, sd, str(path))
        model, _ = clip.load(str(path), device=a.device, jit=True, dtype=half_dtype(a.device))
        keys = set(model.state_dict())
        facts = (
            int(model.context_length),
            int(model.vocab_size),
            model.visual.input_resolution,
            any("attn_mask" in k for k in keys),
        )
        ok = facts == (arch.context_length, arch.vocab_size, arch.image_resolution, False)
        detail = "context_length, vocab_size, visual.input_resolution, attn_mask keys: "
        rows.append(Row("jit", f"{name} attributes", "PASS" if ok else "FAIL", f"{detail}{facts}"))
        images, texts = inputs(arch)
        want = encodings(fp32_cpu(sd), images, texts, "cpu")
        got = encodings(model, images, texts, a.device)
        rows.append(
            verdict("jit", f"{name} on {a.device} ({model.dtype}) image", got[0], want[0], 2e-2)
        )
        start = time.perf_counter()
        model.cpu()
        retrace = time.perf_counter() - start
        got = encodings(model, images, texts, "cpu")
        for what, g, w in zip(("image", "text"), got, want):
            row = verdict("jit", f"{name} .cpu() {what} ({model.dtype})", g, w, 2e-2)
            row.detail += f"; .cpu() took {retrace:.2f} s"
            rows.append(row)
        model.float()
        got = encodings(model, images, texts, "cpu")
        for what, g, w in zip(("image", "text"), got, want):
            rows.append(verdict("jit", f"{name} .cpu().float() {what}", g, w, 1e-5))
    return rows


# ---- 3. optimize(compile=True) with inductor ------------------------------------------------


def check_compile(a: argparse.Namespace, tmp: Path) -> list[Row]:
    rows = []
    cases = [("tiny-vit", TINY["tiny-vit"])]
    if not a.quick:
        cases.append(("ViT-B/32", PUBLISHED["ViT-B/32"][0]))
    for name, arch in cases:
        sd = make_state_dict(arch, layout="openai")
        path = tmp / "compile.pt"
        torch.save(sd, path)
        model, _ = clip.load(str(path), device=a.device)
        plain, _ = clip.load(str(path), device=a.device)
        images, texts = inputs(arch)
        want = encodings(plain, images, texts, a.device)
        start = time.perf_counter()
        clip.optimize(model, compile=True)
        got = encodings(model, images, texts, a.device)
        first = time.perf_counter() - start
        limit = 1e-5 if model.dtype == torch.float32 else 5e-3
        for what, g, w in zip(("image", "text"), got, want):
            row = verdict("compile", f"{name} {what} ({model.dtype})", g, w, limit)
            row.detail += f"; compile + first calls {first:.1f} s"
            rows.append(row)
        with torch.no_grad():
            model.visual.proj.mul_(2)
        try:
            encodings(model, images, texts, a.device)
            rows.append(Row("compile", f"{name} weight edit", "FAIL", "edited weights not refused"))
        except RuntimeError as e:
            ok = "changed in place" in str(e)
            rows.append(
                Row("compile", f"{name} weight edit", "PASS" if ok else "FAIL", str(e)[:90])
            )
        del model, plain
        path.unlink()
    return rows


# ---- 4. embed_images with pinned memory -----------------------------------------------------


def write_images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        pixels = torch.randint(0, 256, (48 + 8 * i, 64, 3), generator=g, dtype=torch.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(str(path))
    return paths


def check_pipeline(a: argparse.Namespace, tmp: Path) -> list[Row]:
    from torch.utils.data import DataLoader

    from clip.pipeline import embed_images

    arch = TINY["tiny-vit"]
    sd = make_state_dict(arch, layout="openai")
    path = tmp / "pipeline.pt"
    torch.save(sd, path)
    folder = tmp / "images"
    folder.mkdir()
    paths = write_images(folder, 10)
    pinned: list[bool] = []
    original = DataLoader.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        pinned.append(bool(kwargs.get("pin_memory", False)))
        original(self, *args, **kwargs)

    model, _ = clip.load(str(path), device=a.device)
    DataLoader.__init__ = spy  # type: ignore[method-assign]
    try:
        got = embed_images(model, paths, batch_size=4, num_workers=2, device=a.device)
    finally:
        DataLoader.__init__ = original  # type: ignore[method-assign]
    want = embed_images(fp32_cpu(sd), paths, batch_size=4, num_workers=0, device="cpu")
    expect_pinned = a.device.startswith("cuda")
    rows = [
        verdict(
            "pipeline", f"embed_images {len(paths)} images", got.embeddings, want.embeddings, 2e-2
        )
    ]
    ok = pinned == [expect_pinned] and got.paths == want.paths and not got.failed
    rows.append(
        Row(
            "pipeline",
            "pin_memory, order, failures",
            "PASS" if ok else "FAIL",
            f"DataLoader pin_memory={pinned} (expected [{expect_pinned}]), "
            f"same order {got.paths == want.paths}, failed {len(got.failed)}",
        )
    )
    return rows


# ---- 5. torchrun-style ranks ----------------------------------------------------------------

RANK_CHILD = r"""
import json, os, sys, torch
sys.path[:0] = [sys.argv[1]]
from clip.distributed import embed_dataset
report = {"rank": int(os.environ["RANK"]), "local_rank": int(os.environ["LOCAL_RANK"])}
if torch.cuda.is_available():
    try:
        torch.cuda.set_device(report["local_rank"])
        report["set_device"] = "ok"
    except Exception as e:
        report["set_device"] = f"{type(e).__name__}: {e}".splitlines()[0]
try:
    summary = embed_dataset(sys.argv[4:], sys.argv[3], model=sys.argv[2], shard_size=3,
                            batch_size=2, workers=0)
    report["shards"] = summary.done if hasattr(summary, "done") else None
    report["ok"] = True
except Exception as e:
    report["ok"] = False
    report["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
print("REPORT " + json.dumps(report))
"""


def run_ranks(model: str, out: Path, paths: list[str], local_ranks: tuple[int, int]) -> list[dict]:
    procs = []
    for rank, local in enumerate(local_ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(local)}
        cmd = [sys.executable, "-c", RANK_CHILD, str(REPO), model, str(out), *paths]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    reports = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
        if lines:
            reports.append(json.loads(lines[-1][len("REPORT ") :]))
        else:
            reports.append(
                {"ok": False, "error": f"exit {proc.returncode}: {stderr.strip()[-300:]}"}
            )
    return reports


def rows_written(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for file in sorted(out.glob("*.parquet")):
        ids += [str(i) for i in pq.read_table(file, columns=["id"]).column("id").to_pylist()]
    return ids


def check_ranks(a: argparse.Namespace, tmp: Path) -> list[Row]:
    arch = TINY["tiny-vit"]
    model = tmp / "ranks.pt"
    torch.save(make_state_dict(arch, layout="openai"), model)
    folder = tmp / "rank-images"
    folder.mkdir()
    paths = write_images(folder, 12)
    listing = tmp / "images.txt"  # one list file: several shards of 3 images, split by rank
    atomic_write(listing, "\n".join(paths).encode() + b"\n")
    gpus = torch.cuda.device_count() if a.device.startswith("cuda") else 0
    rows = []
    for label, local_ranks in (("LOCAL_RANK 0,1", (0, 1)), ("LOCAL_RANK 0,0", (0, 0))):
        out = tmp / f"ranks-{local_ranks[1]}"
        reports = run_ranks(str(model), out, [str(listing)], local_ranks)
        ids = rows_written(out)
        covered = sorted(ids) == sorted(paths) and len(ids) == len(set(ids))
        facts = "; ".join(
            f"rank {r.get('rank', i)}: set_device {r.get('set_device', 'n/a')}, "
            + ("ok" if r.get("ok") else f"error {r.get('error')}")
            for i, r in enumerate(reports)
        )
        needs_second_gpu = local_ranks[1] >= max(gpus, 1) and gpus > 0
        if needs_second_gpu:
            # rank 1 has no GPU: it must fail with a message naming the device, not hang or
            # silently share GPU 0; rank 0 must still finish its shards
            err = str(reports[1].get("error", ""))
            clear = not reports[1].get("ok") and ("cuda:1" in err or "device" in err.lower())
            ok = bool(reports[0].get("ok")) and clear
            facts += f"; {gpus} GPU(s): rank 1 must fail clearly"
        else:
            ok = all(r.get("ok") for r in reports) and covered
            facts += f"; {len(ids)}/{len(paths)} images written once: {covered}"
        rows.append(Row("ranks", label, "PASS" if ok else "FAIL", facts))
    return rows


# ---- 6. the suite's GPU rows ----------------------------------------------------------------


def check_suite(a: argparse.Namespace, tmp: Path) -> list[Row]:
    if not a.device.startswith("cuda"):
        return [Row("suite", "run.py --device cuda", "SKIP", "dry run: no CUDA rows to run")]
    if not a.reference_dir:
        # run.py would pip install the reference, and GPU machines often have no network
        return [Row("suite", "run.py --device cuda", "SKIP", "needs --reference-dir (see --help)")]
    cmd = [sys.executable, str(HERE / "run.py"), "--device", "cuda", "--quick", "--only", "1"]
    cmd += ["--reference-dir", a.reference_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
    print("\n".join(tail))
    status = "PASS" if proc.returncode == 0 else "FAIL"
    hint = "" if proc.returncode == 0 or a.reference_dir else " (pass --reference-dir?)"
    return [
        Row("suite", " ".join(cmd[2:]), status, f"exit {proc.returncode} in {seconds:.0f} s{hint}")
    ]


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], list[Row]]] = {
    "fp16": check_fp16,
    "jit": check_jit,
    "compile": check_compile,
    "pipeline": check_pipeline,
    "ranks": check_ranks,
    "suite": check_suite,
}


# ---- report ---------------------------------------------------------------------------------


def header(a: argparse.Namespace) -> str:
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "none (dry run)"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"GPU check {when}: device {a.device}, GPU {gpu}, torch {torch.__version__}, "
        f"python {platform.python_version()}, {'quick' if a.quick else 'full'}"
    )


def markdown(a: argparse.Namespace, rows: list[Row], seconds: float) -> str:
    lines = [
        f"## benchmarks/gpu_check.py ({header(a)})",
        "",
        f"`python benchmarks/gpu_check.py {' '.join(a.argv)}` took {seconds:.0f} s.",
        "",
    ]
    lines += ["| check | case | result | numbers |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.case} | {r.status} | {r.detail.replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\nUsage::")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny models only")
    parser.add_argument("--skip", default="", help="comma-separated checks to skip")
    parser.add_argument(
        "--tiny", default=",".join(TINY), help="comma-separated tiny test models (fp16, jit)"
    )
    parser.add_argument("--reference-dir", help="directory holding the reference's clip/ (suite)")
    parser.add_argument("--out", help="append the report as markdown to this file")
    a = parser.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else argv
    a.skip = {s for s in a.skip.split(",") if s}
    a.tiny = [t for t in a.tiny.split(",") if t]
    if not set(a.tiny) <= set(TINY):
        parser.error(f"--tiny takes names from {', '.join(TINY)}, got {a.tiny}")
    unknown = a.skip - set(CHECKS)
    if unknown:
        parser.error(
            f"unknown checks in --skip: {sorted(unknown)}; choose from {', '.join(CHECKS)}"
        )
    return a


def main(argv: Optional[list[str]] = None) -> int:
    a = parse(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA: skipped (python benchmarks/gpu_check.py --device cpu runs a CPU dry run)")
        return 0
    print(header(a), flush=True)
    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="clip-gpu-check-") as tmp_name:
        for name in CHECKS:
            if name in a.skip:
                new = [Row(name, "-", "SKIP", "--skip")]
            else:
                folder = Path(tmp_name) / name
                folder.mkdir()
                t = time.perf_counter()
                try:
                    with quiet():
                        new = RUNNERS[name](a, folder)
                except Exception as e:  # a crashed check is a failed check; the others still run
                    new = [Row(name, "-", "FAIL", f"{type(e).__name__}: {e}".splitlines()[0])]
                print(f"-- {name}: {time.perf_counter() - t:.1f} s", flush=True)
            for row in new:
                print(f"{row.status:4}  {row.check:8} {row.case:38} {row.detail}", flush=True)
            rows += new
    seconds = time.perf_counter() - start
    failed = [r for r in rows if r.status == "FAIL"]
    passed = sum(r.status == "PASS" for r in rows)
    skipped = len(rows) - passed - len(failed)
    print(f"{passed} passed, {len(failed)} failed, {skipped} skipped in {seconds:.0f} s")
    if a.out:
        out = Path(a.out)
        before = out.read_text() if out.exists() else ""
        atomic_write(
            out, (before.rstrip("\n") + "\n\n" + markdown(a, rows, seconds)).lstrip("\n").encode()
        )
        print(f"appended to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
