#!/usr/bin/env python
"""The benchmark suite: this package against OpenAI's reference, open_clip and transformers.

Every implementation gets the same random full-size weights (ViT-B/32 and RN50, from
``tests/checkpoints.py``); runs alternate between implementations and medians are reported, with
the ratio of ours to the best other implementation. Workloads (numbers as in the "Speed and
memory" issue):

1. ``encode_image``, batch 16 and 1 — plus the opt-ins of ``clip.optimize`` with their deviation;
2. ``encode_text`` on "a photo of a {class}." prompts, an 80-template ensemble, long captions;
3. end to end: a folder of JPEGs (640×480 and 1920×1080) → normalised embeddings on disk,
   ``clip.pipeline.embed_images`` against a straightforward reference loop; plus fast decode;
4. zero-shot: a 50-class × 80-template classifier (``clip.zero_shot_classifier`` against the
   reference notebook's per-class loop), then classifying 256 images;
5. load time and peak RSS for a ViT-L/14-sized checkpoint, each in a fresh process;
6. ``--device cuda``: workloads 1–3 on the GPU in fp16.

Usage (the full suite is sized for under 10 minutes on a quiet 2-core CPU — it took 14 on one
shared with four other jobs; ``--quick`` takes a few minutes)::

    python benchmarks/run.py [--quick] [--device cuda] [--threads N] [--out benchmarks/RESULTS.md]

The reference (``clip-anytorch``) is pip-installed into a temporary directory unless
``--reference-dir`` names a directory that holds its ``clip/`` package.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import peers  # noqa: E402
from bench_tokenizer import REFERENCE, install_reference, load_reference, make_captions  # noqa: E402
from timing import Table, alternate, deviation, fmt, peer_row, peer_table, write_section  # noqa: E402
from workload_folder import end_to_end, write_jpegs  # noqa: E402, F401  (run.write_jpegs kept)

import clip  # noqa: E402
from clip.optimize import optimize  # noqa: E402

Settings = argparse.Namespace


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------


def matmul_gflops(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput (2048² × 2048²), median of 5."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    seconds = alternate({"mm": lambda: a @ b}, reps=5, device=device)["mm"]
    return 2 * 2048**3 / seconds / 1e9


def gflop_per_image(model: torch.nn.Module, resolution: int, device: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, resolution, resolution, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.encode_image(x.to(model.dtype))
    return counter.get_total_flops() / 1e9


def machine_description(s: Settings) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    import open_clip
    import transformers

    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible; torch threads: {s.threads}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"open_clip {open_clip.__version__}, transformers {transformers.__version__}, "
        f"reference {s.reference_name}",
        f"- mode: {'--quick' if s.quick else 'full'}, device {s.device}",
    ]
    if s.device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Workload 1: encode_image, and the opt-ins
# --------------------------------------------------------------------------------------------


def images(n: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g).to(device=device, dtype=dtype)


def encode_image(s: Settings, model_name: str, group: list[peers.Peer], table: Table) -> None:
    x = images(16, s.device, s.dtype)
    for batch in (16, 1):
        fns = {p.name: _call(p.encode_image, x[:batch]) for p in group}
        seconds = alternate(fns, s.reps * (2 if batch == 1 else 1), s.device)
        table.add(
            peer_row(f"{model_name} batch {batch}", {k: batch / v for k, v in seconds.items()})
        )
        if batch == 16 and s.device == "cpu":
            ours = batch / seconds["clip"]
            table.note(
                f"{model_name}: {s.gflop[model_name]:.2f} GFLOP/image; clip at batch 16 reaches "
                f"{ours * s.gflop[model_name] / s.peak:.0%} of the measured matmul peak"
            )


def _call(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return fn(x)

    return run


def opt_ins(s: Settings, model_name: str, sd: dict, table: Table) -> None:
    """Each opt-in of clip.optimize on a fresh model against the default model."""
    choices: list[dict[str, bool]] = [{"int8": True}]
    if model_name == "RN50":
        choices.insert(0, {"channels_last": True})
    if peers.onnxruntime_missing() is None:  # exporting takes up to a minute per model
        choices.append({"onnxruntime": True})
    if not s.quick:  # compiling (with freezing) takes up to a minute per model
        choices.append({"compile": True})
    default = peers.ours(sd, "cpu", half=False).module
    x = images(16, "cpu", torch.float32, seed=1)
    with torch.inference_mode():
        expected = default.encode_image(x)
    for flags in choices:
        start = datetime.datetime.now()
        model = optimize(peers.ours(sd, "cpu", half=False).module, **flags)
        with torch.inference_mode():
            got = model.encode_image(x)  # first call: compiles, if compiling
        first = (datetime.datetime.now() - start).total_seconds()
        fns = {"default": _call(default.encode_image, x), "opt": _call(model.encode_image, x)}
        seconds = alternate(fns, s.reps, warmup=False)
        rel, cos = deviation(got, expected)
        name = "+".join(flags)
        table.add(
            [
                f"{model_name} batch 16, {name}",
                fmt(16 / seconds["default"]),
                fmt(16 / seconds["opt"]),
                f"**{seconds['default'] / seconds['opt']:.2f}×**",
                f"{rel:.1e}",
                f"{cos:.6f}",
                f"{first:.1f} s",
            ]
        )


# --------------------------------------------------------------------------------------------
# Workload 2: encode_text
# --------------------------------------------------------------------------------------------


def long_captions(n: int) -> list[str]:
    words = make_captions(8 * n, seed=1)
    return [" ".join(words[8 * i : 8 * i + 8]) for i in range(n)]  # ~50-77 tokens each


def encode_text(s: Settings, group: list[peers.Peer], table: Table) -> None:
    n = 16 if s.quick else 32
    classes = list(clip.imagenet_classes)
    templates = list(clip.imagenet_templates)
    cases = {
        f'{n} × "a photo of a {{class}}."': [f"a photo of a {c}." for c in classes[:n]],
        "80-template ensemble of 1 class": [t.format(classes[7]) for t in templates],
        f"{n // 2} long captions (≥50 tokens)": long_captions(n // 2),
    }
    if s.quick:
        cases.pop("80-template ensemble of 1 class")
    for case, texts in cases.items():
        ids = clip.tokenize(texts, truncate=True).to(s.device)
        fns = {p.name: _call(p.encode_text, ids) for p in group}
        for p in group:  # warm up on two rows only: the reference is slow on full batches
            _call(p.encode_text, ids[:2])()
        seconds = alternate(fns, max(1, s.reps - 1), s.device, warmup=False)
        table.add(peer_row(case, {k: len(texts) / v for k, v in seconds.items()}))


# --------------------------------------------------------------------------------------------
# Workload 4: zero-shot classifier
# --------------------------------------------------------------------------------------------


def reference_classifier(ref: Any, model: Any, classnames: list[str], templates: list[str]):
    """The reference notebook's loop: one class at a time."""
    weights = []
    with torch.inference_mode():
        for name in classnames:
            ids = ref.tokenize([t.format(name) for t in templates]).to(
                model.token_embedding.weight.device
            )
            emb = model.encode_text(ids)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


def zero_shot(s: Settings, group: list[peers.Peer], ref: Any, table: Table) -> None:
    n_classes, n_ref = (10, 1) if s.quick else (50, 2)
    classes = list(clip.imagenet_classes)[:n_classes]
    templates = list(clip.imagenet_templates)
    ours_model, ref_model = group[0].module, group[1].module
    built: dict[str, torch.Tensor] = {}

    def build_ours() -> None:
        with torch.inference_mode():
            built["clip"] = clip.zero_shot_classifier(ours_model, classes, templates)

    def build_ref() -> None:
        built["ref"] = reference_classifier(ref, ref_model, classes[:n_ref], templates)

    seconds = alternate({"clip": build_ours, "reference": build_ref}, 1, s.device, warmup=False)
    per_class = {"clip": n_classes / seconds["clip"], "reference": n_ref / seconds["reference"]}
    table.add(peer_row(f"build {n_classes} classes × 80 templates", per_class))
    rel, _ = deviation(built["clip"][:, :n_ref].t(), built["ref"].t())
    table.note(
        f"classifier build in classes/s; the reference loop ran on the first {n_ref} classes "
        f"(its cost is linear in classes); max rel diff of those columns: {rel:.1e}"
    )
    n_images = 32 if s.quick else 128
    x = images(n_images, s.device, s.dtype, seed=2)

    def classify(model: Any, weights: torch.Tensor) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                for i in range(0, n_images, 64):
                    f = model.encode_image(x[i : i + 64])
                    (100 * (f / f.norm(dim=-1, keepdim=True)) @ weights.to(f.dtype)).argmax(-1)

        return run

    fns = {
        "clip": classify(ours_model, built["clip"]),
        "reference": classify(ref_model, built["clip"]),
    }
    seconds = alternate(fns, 1, s.device, warmup=False)
    table.add(
        peer_row(f"classify {n_images} images", {k: n_images / v for k, v in seconds.items()})
    )


# --------------------------------------------------------------------------------------------
# Workload 5: loading memory, in fresh processes
# --------------------------------------------------------------------------------------------


def write_checkpoints(model_name: str, tmp: Path) -> tuple[dict[str, Path], int]:
    """The model as a released-layout archive, a fp16-mixed state dict and an fp32 state dict."""
    from checkpoints import write_openai_archive

    arch, sd16 = peers.weights(model_name, layout="openai")
    files = {"TorchScript archive (fp16)": tmp / "archive.pt", "state dict (fp16)": tmp / "sd16.pt"}
    write_openai_archive(arch, sd16, str(files["TorchScript archive (fp16)"]))
    torch.save(sd16, files["state dict (fp16)"])
    fp32_bytes = sum(4 * t.numel() for t in sd16.values() if t.is_floating_point())
    sd32 = {k: v.float() if v.is_floating_point() else v for k, v in sd16.items()}
    del sd16
    files["state dict (fp32)"] = tmp / "sd32.pt"
    torch.save(sd32, files["state dict (fp32)"])
    return files, fp32_bytes


def load_in_subprocess(impl: str, path: Path, ref_dir: str) -> dict[str, float]:
    probe = [sys.executable, str(HERE / "load_memory.py"), impl, str(path), ref_dir]
    done = subprocess.run(probe, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def loading(s: Settings, tmp: Path, table: Table) -> None:
    model_name = "ViT-B/32" if s.quick else "ViT-L/14"
    files, fp32_bytes = write_checkpoints(model_name, tmp)
    gib = 2**30
    table.note(
        f"{model_name}: fp32 weights {fp32_bytes / gib:.2f} GiB. Peak RSS (VmHWM) of a fresh "
        "process that imports the package, then loads on the CPU; in brackets as a multiple of "
        "the fp32 weight bytes; after it, the growth over the RSS before loading (imports: torch "
        "alone is several hundred MiB) as a multiple of the fp32 weight bytes"
    )
    for fmt_name, path in files.items():
        runs = {
            impl: load_in_subprocess(impl, path, s.reference_dir) for impl in ("clip", "reference")
        }
        ours, theirs = runs["clip"], runs["reference"]
        table.add(
            [
                f"{model_name} {fmt_name}",
                f"{ours['seconds']:.2f} s",
                f"{theirs['seconds']:.2f} s",
                _rss(ours, fp32_bytes),
                _rss(theirs, fp32_bytes),
            ]
        )


def _rss(run: dict[str, float], fp32_bytes: int) -> str:
    """Peak RSS, and its growth over the RSS after imports, as multiples of the fp32 weights."""
    peak, growth = run["peak_rss"], run["peak_rss"] - run["base_rss"]
    return f"{peak / 2**30:.2f} GiB ({peak / fp32_bytes:.2f}×), +{growth / fp32_bytes:.2f}×"


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    s = parse(argv)
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="clip-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not s.reference_dir:
            s.reference_dir = install_reference(str(tmp / "reference"))
        ref = load_reference(s.reference_dir)
        print(machine_description(s), flush=True)
        tables = run_workloads(s, ref, tmp)
    report = render(s, tables)
    if s.out:  # the part before the first "## " section; the other scripts' sections are kept
        write_section(Path(s.out), "# Benchmark results", report)
        print(f"wrote {s.out}")
    return 0


def parse(argv: Optional[list[str]]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller inputs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=1, help="decode workers (workload 3)")
    parser.add_argument("--reference-dir", help="directory holding the reference's clip/")
    parser.add_argument("--out", help="write the report as markdown to this file")
    parser.add_argument(
        "--only", default="1,2,3,4,5", help="comma-separated workload numbers (default all)"
    )
    s = parser.parse_args(argv)
    s.argv = sys.argv[1:] if argv is None else argv
    s.reps = 1 if s.quick else 3
    s.only = {int(w) for w in s.only.split(",")}
    s.dtype = torch.float16 if s.device == "cuda" else torch.float32
    s.reference_name = REFERENCE
    s.fast_decode = None
    return s


def run_workloads(s: Settings, ref: Any, tmp: Path) -> list[Table]:
    half = s.device == "cuda"
    s.peak = matmul_gflops(s.device, s.dtype)
    s.gflop = {}
    tables = {
        "image": peer_table(f"1. encode_image ({s.device}, {s.dtype})", "images/s"),
    }
    optins = Table(
        "1b. opt-ins (clip.optimize), CPU fp32",
        [
            "case",
            "default img/s",
            "opt-in img/s",
            "speed-up",
            "max rel dev",
            "min cosine",
            "setup + first call",
        ],
    )
    missing = peers.onnxruntime_missing() if s.device == "cpu" else "onnxruntime peer: CPU only"
    if missing:
        tables["image"].note(missing)
    for model_name in ("ViT-B/32", "RN50"):
        _, sd = peers.weights(model_name)
        ort_dir = tmp if s.only & {1, 2} else None  # its export takes up to a minute
        group = peers.build_all(model_name, sd, ref, s.device, half, ort_dir)
        s.gflop[model_name] = gflop_per_image(group[0].module, 224, s.device)
        if 1 in s.only:
            encode_image(s, model_name, group, tables["image"])
        if model_name == "ViT-B/32":
            run_text_workloads(s, group, ref, tmp, tables)
        del group
        if 1 in s.only and s.device == "cpu":
            print(optins.header())
            opt_ins(s, model_name, sd, optins)
    result = [t for t in (tables.pop("image"), optins, *tables.values()) if t.rows]
    if s.fast_decode is not None:
        result.append(s.fast_decode)
    if 5 in s.only and s.device == "cpu":
        load = Table(
            "5. load (fresh process, CPU)",
            ["checkpoint", "clip time", "reference time", "clip peak RSS", "reference peak RSS"],
        )
        print(load.header())
        loading(s, tmp, load)
        result.append(load)
    return result


def run_text_workloads(
    s: Settings, group: list[peers.Peer], ref: Any, tmp: Path, tables: dict
) -> None:
    if 2 in s.only:
        tables["text"] = peer_table(f"2. encode_text ({s.device}, ViT-B/32 text tower)", "texts/s")
        encode_text(s, group, tables["text"])
    ref_group = group[:2]
    if 3 in s.only:
        tables["e2e"] = peer_table("3. folder of JPEGs → embeddings on disk (ViT-B/32)", "images/s")
        end_to_end(s, ref_group, ref, tmp, tables["e2e"])
    if 4 in s.only:
        tables["zs"] = peer_table("4. zero-shot (ViT-B/32)", "classes/s or images/s")
        zero_shot(s, ref_group, ref, tables["zs"])


def render(s: Settings, tables: list[Table]) -> str:
    head = [
        "# Benchmark results",
        "",
        machine_description(s),
        f"- fp32 matmul: {s.peak:.0f} GFLOP/s measured",
    ]
    head += [f"- {m}: {g:.2f} GFLOP per image" for m, g in s.gflop.items()]
    head += [
        "",
        "Command: `python benchmarks/run.py " + " ".join(s.argv) + "`",
        "",
    ]
    return "\n".join(head + [t.markdown() for t in tables])


if __name__ == "__main__":
    sys.exit(main())
