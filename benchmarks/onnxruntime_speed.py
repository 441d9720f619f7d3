#!/usr/bin/env python
"""ONNX Runtime against torch on the CPU: ``clip.optimize(model, onnxruntime=True)``, the
onnxruntime peer, ONNX Runtime's options, int8 and ``torch.compile`` (issue "Speed II").

Full-size ViT-B/32 and RN50 with the random weights of ``tests/checkpoints.py``, fp32, one
process; every contender of a row runs alternately with the others (``timing.alternate``,
medians), ONNX Runtime with intra-op spinning off (a spinning pool takes the cores torch needs
next; the opt-in's default). Tables:

1. ``encode_image``: default model, the onnxruntime peer (``clip.export_onnx`` files, default
   session options), OpenAI's reference exported the same way, and the opt-in;
2. ``encode_text``: default (trimmed to the last end-of-text), the peer (full context, as
   exported), the opt-in's dynamic-length text transformer;
3. ONNX Runtime's graph optimisation levels and transformer fusions, each with its deviation;
4. int8: ``optimize(int8=True)`` against ONNX Runtime's dynamic quantisation of the image tower;
5. parity: ``optimize(compile=True)`` (inductor freezing: oneDNN fusions and prepacked weights)
   and TorchScript with the oneDNN Graph fuser;
6. end to end: a folder of JPEGs through ``clip.pipeline.embed_images``, and ``clip embed``
   with and without ``--onnxruntime`` in fresh processes (load and export included).

Usage (about 15 minutes on 2 cores)::

    python benchmarks/onnxruntime_speed.py [--reps 7] [--only 1,2,3,4,5,6]
        [--reference-dir DIR] [--out benchmarks/RESULTS.md]

With ``--out`` the report replaces its section of the results file (the others are kept).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import peers  # noqa: E402
from bench_tokenizer import install_reference, load_reference  # noqa: E402
from run import long_captions  # noqa: E402
from timing import Table, alternate, deviation, fmt, wait_quiet, write_section  # noqa: E402
from workload_folder import write_jpegs  # noqa: E402

import clip  # noqa: E402
from clip.model import CLIP  # noqa: E402
from clip.onnxrt import export_tower, fuse, session_options, use_onnxruntime  # noqa: E402

SECTION = "## ONNX Runtime (`benchmarks/onnxruntime_speed.py`)"
QUIET_WAIT = 0.0  # --quiet-wait
Fn = Callable[[torch.Tensor], torch.Tensor]


def session(path: Path, level: str = "all", spinning: bool = False) -> Any:
    import onnxruntime as ort

    options = session_options(level, threads=torch.get_num_threads(), spinning=spinning)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, dtype: torch.dtype = torch.float32) -> Fn:
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.to(dtype).numpy()})[0])


WAITS: list[float] = []  # seconds each race waited for the other jobs to leave the CPUs


def race(fns: dict[str, Fn], x: torch.Tensor, reps: int) -> tuple[dict, dict]:
    """Items/s and the output of each contender on ``x``, calls alternating."""
    WAITS.append(wait_quiet(QUIET_WAIT))
    outs: dict[str, torch.Tensor] = {}

    def call(name: str, fn: Fn) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode():
                outs[name] = fn(x)

        return go

    seconds = alternate({k: call(k, f) for k, f in fns.items()}, reps)
    return {k: x.shape[0] / v for k, v in seconds.items()}, outs


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def fresh(sd: dict) -> CLIP:
    return peers.ours(sd, "cpu", half=False).module  # type: ignore[return-value]


def timed_optimize(sd: dict) -> tuple[CLIP, float]:
    start = time.perf_counter()
    model = clip.optimize(fresh(sd), onnxruntime=True)
    return model, time.perf_counter() - start


def dev(got: torch.Tensor, want: torch.Tensor) -> str:
    rel, cos = deviation(got, want)
    return f"{rel:.1e} / {cos:.6f}"


def add_vs_default(t: Table, name: str, rate: dict, outs: dict) -> None:
    """A row per contender other than "default": its rate against the default's."""
    for key in [k for k in rate if k != "default"]:
        speed = f"**{rate[key] / rate['default']:.2f}×**"
        row = [f"{name} batch 16, {key}", fmt(rate["default"]), fmt(rate[key]), speed]
        t.add([*row, dev(outs[key], outs["default"])])


# --------------------------------------------------------------------------------------------


def image_table(a: argparse.Namespace, tmp: Path, t: Table) -> None:
    ref = load_reference(a.reference_dir)
    for name in ("ViT-B/32", "RN50"):
        _, sd = peers.weights(name)
        default = fresh(sd)
        _, setup = timed_optimize(sd)  # the cache starts empty: this one exports
        opt, warm = timed_optimize(sd)  # this one loads the cached export
        peer = peers.onnxruntime_peer(default, tmp / "peer")
        ref_model = ref.model.build_model({k: v.clone() for k, v in sd.items()}).float().eval()
        ref_path = export_tower(ref_model.visual, images(2), {0: "batch"}, tmp / "ref.onnx")
        del ref_model
        fns = {
            "default": default.encode_image,
            "peer": peer.encode_image,
            "reference export": run_session(session(ref_path, spinning=False)),
            "opt-in": opt.encode_image,
        }
        for batch in (16, 1):
            rate, outs = race(fns, images(16)[:batch], a.reps * (2 if batch == 1 else 1))
            t.add(
                [
                    f"{name} batch {batch}",
                    *(fmt(rate[k]) for k in fns),
                    f"**{rate['opt-in'] / rate['default']:.2f}×**",
                    f"{rate['opt-in'] / max(rate['peer'], rate['reference export']):.2f}×",
                    dev(outs["opt-in"], outs["default"]),
                ]
            )
        t.note(
            f"{name}: clip.optimize(onnxruntime=True) took {setup:.1f} s the first time (export, "
            f"fusions, sessions) and {warm:.1f} s with the export cached"
        )
        shutil.rmtree(tmp / "peer")


def text_table(a: argparse.Namespace, tmp: Path, t: Table) -> None:
    _, sd = peers.weights("ViT-B/32")
    default = fresh(sd)
    opt, _ = timed_optimize(sd)
    peer = peers.onnxruntime_peer(default, tmp / "peer")
    plain = use_onnxruntime(fresh(sd), fusions=False)
    classes, templates = list(clip.imagenet_classes), list(clip.imagenet_templates)
    cases = {
        '32 × "a photo of a {class}."': [f"a photo of a {c}." for c in classes[:32]],
        "80-template ensemble of 1 class": [tp.format(classes[7]) for tp in templates],
        "16 long captions (≥50 tokens)": long_captions(16),
    }
    fns = {
        "default": default.encode_text,
        "peer": peer.encode_text,
        "opt-in, no fusions": plain.encode_text,
        "opt-in": opt.encode_text,
    }
    for case, texts in cases.items():
        rate, outs = race(fns, clip.tokenize(texts, truncate=True), a.reps)
        t.add(
            [
                case,
                *(fmt(rate[k]) for k in fns),
                f"**{rate['opt-in'] / rate['default']:.2f}×**",
                dev(outs["opt-in"], outs["default"]),
            ]
        )
    shutil.rmtree(tmp / "peer")


def options_table(a: argparse.Namespace, tmp: Path, t: Table) -> None:
    _, sd = peers.weights("ViT-B/32")
    default = fresh(sd)
    plain = export_tower(default.visual, images(2), {0: "batch"}, tmp / "plain.onnx")
    fused_path, skip_path = tmp / "fused.onnx", tmp / "skip.onnx"
    shutil.copy(plain, fused_path)
    shutil.copy(plain, skip_path)
    fused: dict[str, str] = {}
    for key, path, skip in (("fusions (", fused_path, False), ("SkipLayerNorm", skip_path, True)):
        stats = fuse(path, heads=12, width=768, skip_layer_norm=skip)
        fused[key] = ", ".join(f"{v} {k}" for k, v in stats.items() if v) or "none"
    variants = {f"level {lv}, no fusions": (plain, lv, False) for lv in ("disable", "basic")}
    variants.update({f"level {lv}, no fusions": (plain, lv, False) for lv in ("extended", "all")})
    variants["level all + fusions with SkipLayerNormalization"] = (skip_path, "all", False)
    variants["level all + fusions (the opt-in)"] = (fused_path, "all", False)
    variants["level all + fusions (the opt-in), spinning on"] = (fused_path, "all", True)
    fns: dict[str, Fn] = {"default (torch)": default.encode_image}
    for key, (path, level, spin) in variants.items():
        fns[key] = run_session(session(path, level, spin))
    rate, outs = race(fns, images(16), a.reps)
    for key in fns:
        t.add(
            [
                key,
                fmt(rate[key]),
                f"{rate[key] / rate['default (torch)']:.2f}×",
                dev(outs[key], outs["default (torch)"]),
                next((v for k, v in fused.items() if k in key and "spinning" not in key), "—"),
            ]
        )
    t.note(
        "ViT-B/32 encode_image batch 16. ONNX Runtime's attention fusion looks for separate "
        "q/k/v projections (HF's layout); this graph's packed in-projection does not match it, "
        "so no Attention node is fused. Where the opt-in's time goes (ONNX Runtime's profiler, "
        f"kernel time by operator): {profile(fused_path)}"
    )


def profile(path: Path) -> str:
    """The largest shares of kernel time by operator type in a session running ``path``."""
    import json
    from collections import Counter

    import onnxruntime as ort

    options = peers.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, {sess.get_inputs()[0].name: images(16).numpy()})
    events = json.loads(Path(sess.end_profiling()).read_text())
    time_by_op: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time_by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(time_by_op.values())
    return ", ".join(f"{op} {us / total:.1%}" for op, us in time_by_op.most_common(7))


def int8_table(a: argparse.Namespace, tmp: Path, t: Table) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in ("ViT-B/32", "RN50"):
        _, sd = peers.weights(name)
        default, opt = fresh(sd), clip.optimize(fresh(sd), onnxruntime=True)
        q8 = clip.optimize(fresh(sd), int8=True)
        src = opt.visual._compiled_call_impl.path  # type: ignore[union-attr]
        ort8 = {}
        for ops in (None, ["MatMul"]):  # every op it can quantize, or only the matmuls
            out = tmp / f"int8-{ops}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(src, out, weight_type=QuantType.QInt8, op_types_to_quantize=ops)
            ort8["" if ops is None else ", MatMul only"] = run_session(session(out))
        fns = {
            "default": default.encode_image,
            "torch int8": q8.encode_image,
            "onnxruntime int8": ort8[""],
            "onnxruntime int8, MatMul only": ort8[", MatMul only"],
            "opt-in fp32": opt.encode_image,
        }
        rate, outs = race(fns, images(16), a.reps)
        add_vs_default(t, name, rate, outs)


def compile_table(a: argparse.Namespace, tmp: Path, t: Table) -> None:
    for name in ("ViT-B/32", "RN50"):
        _, sd = peers.weights(name)
        default, opt = fresh(sd), clip.optimize(fresh(sd), onnxruntime=True)
        compiled = clip.optimize(fresh(sd), compile=True)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled.encode_image(images(16))
        first = time.perf_counter() - start
        x = images(16)
        fns: dict[str, Fn] = {
            "default": default.encode_image,
            "compile (inductor freezing, oneDNN)": compiled.encode_image,
        }
        torch.jit.enable_onednn_fusion(True)  # oneDNN Graph (LLGA) in TorchScript
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated
                traced = torch.jit.freeze(torch.jit.trace(fresh(sd).visual, x).eval())
                for _ in range(2):  # the profiling executor fuses on the second run
                    traced(x)
            fns["TorchScript + oneDNN Graph"] = traced
        except RuntimeError as e:
            t.note(f"{name}: TorchScript + oneDNN Graph fails here: RuntimeError: {e}")
        fns["opt-in onnxruntime"] = opt.encode_image
        try:
            rate, outs = race(fns, x, a.reps)
        finally:
            torch.jit.enable_onednn_fusion(False)
        add_vs_default(t, name, rate, outs)
        t.note(f"{name}: compile's first call (compiling) took {first:.1f} s")


def end_to_end_table(a: argparse.Namespace, tmp: Path, t: Table) -> None:
    from clip.pipeline import embed_images

    folder = tmp / "jpegs"
    folder.mkdir()
    paths = write_jpegs(folder, 64, (640, 480), 0) + write_jpegs(folder, 64, (1920, 1080), 1)
    _, sd = peers.weights("ViT-B/32")
    default, (opt, setup) = fresh(sd), timed_optimize(sd)
    outs: dict[str, torch.Tensor] = {}

    def pipeline(key: str, model: CLIP) -> Callable[[], None]:
        def go() -> None:
            outs[key] = embed_images(model, paths, num_workers=a.workers, batch_size=64).embeddings

        return go

    seconds = alternate({k: pipeline(k, m) for k, m in (("d", default), ("o", opt))}, a.reps // 2)
    d, o = len(paths) / seconds["d"], len(paths) / seconds["o"]
    t.add(
        [
            f"{len(paths)} JPEGs, embed_images (model ready)",
            fmt(d),
            fmt(o),
            f"**{o / d:.2f}×**",
            dev(outs["o"], outs["d"]),
        ]
    )
    checkpoint = tmp / "vit-b-32.pt"
    torch.save(sd, checkpoint)
    results: dict[str, torch.Tensor] = {}

    def cli(key: str, *extra: str) -> Callable[[], None]:
        def go() -> None:
            import numpy as np

            out = tmp / f"cli-{key}.npy"
            out.unlink(missing_ok=True)
            command = [sys.executable, "-m", "clip", "embed", str(folder), "--out", str(out)]
            command += ["--model", str(checkpoint), "--device", "cpu", "--workers", str(a.workers)]
            subprocess.run([*command, *extra], check=True, cwd=HERE.parent, capture_output=True)
            results[key] = torch.from_numpy(np.load(out))

        return go

    os.environ["CLIP_CACHE_DIR"] = str(tmp / "cli-cache")  # starts empty: the first run exports
    start = time.perf_counter()
    cli("cold", "--onnxruntime")()
    cold = time.perf_counter() - start
    walls = alternate(
        {"default": cli("default"), "warm": cli("warm", "--onnxruntime")}, 3, warmup=False
    )
    for label, key in (("export cached", "warm"), ("first run, export included", "cold")):
        wall = walls.get(key, cold)
        t.add(
            [
                f"`clip embed` {len(paths)} JPEGs, fresh process, {label}",
                f"{walls['default']:.1f} s",
                f"{wall:.1f} s",
                f"**{walls['default'] / wall:.2f}×**",
                dev(results[key], results["default"]),
            ]
        )
    per_image = 1 / d - 1 / o
    t.note(
        f"optimize(onnxruntime=True) took {setup:.1f} s here; at the measured rates it pays for "
        + (f"itself after about {setup / per_image:,.0f} images" if per_image > 0 else "nothing")
    )


# --------------------------------------------------------------------------------------------

TABLES: dict[int, tuple[str, list[str], Callable[..., None]]] = {
    1: (
        "1. encode_image, CPU fp32 (images/s)",
        ["case", "default", "onnxruntime peer", "reference export", "opt-in", "opt-in / default",
         "opt-in / best onnxruntime", "max rel dev / min cosine"],
        image_table,
    ),
    2: (
        "2. encode_text, ViT-B/32 text tower (texts/s)",
        ["case", "default", "onnxruntime peer", "opt-in, no fusions", "opt-in", "opt-in / default",
         "max rel dev / min cosine"],
        text_table,
    ),
    3: (
        "3. ONNX Runtime's graph optimisations and fusions, ViT-B/32 batch 16 (images/s)",
        ["session", "images/s", "vs default", "max rel dev / min cosine", "fused operators"],
        options_table,
    ),
    4: (
        "4. int8, batch 16 (images/s)",
        ["case", "default", "this", "speed-up", "max rel dev / min cosine"],
        int8_table,
    ),
    5: (
        "5. parity: torch's own compilers, batch 16 (images/s)",
        ["case", "default", "this", "speed-up", "max rel dev / min cosine"],
        compile_table,
    ),
    6: (
        "6. end to end, ViT-B/32 (images/s, or wall seconds)",
        ["case", "default", "--onnxruntime", "speed-up", "max rel dev / min cosine"],
        end_to_end_table,
    ),
}  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="alternating runs per row (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=1, help="decode workers (table 6)")
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated table numbers")
    parser.add_argument("--reference-dir", help="directory holding the reference's clip/")
    parser.add_argument("--out", help="results file whose onnxruntime section is replaced")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each row, wait up to S seconds for other jobs to leave the CPUs idle",
    )
    a = parser.parse_args(argv)
    global QUIET_WAIT
    QUIET_WAIT = a.quiet_wait
    missing = peers.onnxruntime_missing()
    if missing:
        print(missing)
        return 1
    torch.set_num_threads(a.threads)
    import onnxruntime

    head = [
        SECTION,
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{os.cpu_count()} logical cores, {a.threads} threads; load average before: "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; median of {a.reps} alternating runs per row",
        "",
        "Command: `python benchmarks/onnxruntime_speed.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
        + "`",
        "",
    ]
    print("\n".join(head), flush=True)
    blocks = []
    with tempfile.TemporaryDirectory(prefix="clip-ort-bench-") as name:
        tmp = Path(name)
        if not a.reference_dir:
            a.reference_dir = install_reference(str(tmp / "reference"))
        for number in sorted(int(n) for n in a.only.split(",")):
            title, columns, fill = TABLES[number]
            table = Table(title, columns)
            print(table.header(), flush=True)
            work = tmp / f"t{number}"
            work.mkdir()
            os.environ["CLIP_CACHE_DIR"] = str(work / "cache")  # each table exports afresh
            fill(a, work, table)
            load = " ".join(f"{v:.1f}" for v in os.getloadavg())
            waited = f"; rows waited {', '.join(f'{w:.0f}' for w in WAITS)} s for idle CPUs"
            table.note(
                f"load average after this table: {load} (1, 5, 15 min){waited * bool(WAITS)}"
            )
            WAITS.clear()
            blocks.append(table.markdown())
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(head + blocks)
    if a.out:
        write_section(Path(a.out), SECTION, text)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
