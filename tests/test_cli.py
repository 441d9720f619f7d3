"""The command line, end to end on tiny checkpoints and generated images in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoints import TINY, make_state_dict
from PIL import Image
from test_pipeline import write_images

import clip
from clip import cli, pipeline
from clip.cli import main

ROOT = Path(__file__).resolve().parents[1]
NAMES = [
    "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
    "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tiny_files: dict[str, dict[str, Path]]) -> str:
    """The tiny ViT as an OpenAI archive: the same model as conftest's ``vit_model``, which the
    tests compare the command line's output with."""
    return str(tiny_files["tiny-vit"]["archive"])


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Readable images (JPEG, PNG with alpha, grayscale, palette GIF) + corrupt and truncated."""
    return write_images(tmp_path / "imgs")


def embed(checkpoint: str, *args: str) -> int:
    return main(["embed", *args, "--model", checkpoint, "--device", "cpu", "--workers", "0"])


def good_paths(images: dict[str, Path]) -> list[str]:
    return sorted(str(p) for k, p in images.items() if k not in ("corrupt", "truncated"))


def test_embed_npy_equals_the_library(
    checkpoint: str, vit_model: torch.nn.Module, images: dict, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "e.npy"
    assert embed(checkpoint, str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "2") == 0
    expected = pipeline.embed_images(vit_model, good_paths(images), batch_size=2)
    assert np.array_equal(np.load(out), expected.embeddings.numpy())
    assert (tmp_path / "e.rows.txt").read_text().splitlines() == expected.paths
    err = capsys.readouterr().err
    assert f"embedded {len(expected.paths)} images" in err
    assert f"{images['corrupt']}: " in err and f"{images['truncated']}: " in err
    assert "Traceback" not in err
    # no temp files left; the sidecar records the model and precision
    assert sorted(os.listdir(tmp_path)) == ["e.npy", "e.npy.meta.json", "e.rows.txt", "imgs"]


def test_embed_parquet(
    checkpoint: str, vit_model: torch.nn.Module, images: dict, tmp_path: Path
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "e.parquet"
    assert embed(checkpoint, str(images["gray"]), str(images["alpha"]), "--out", str(out)) == 0
    table = pq.read_table(out)
    paths = sorted([str(images["gray"]), str(images["alpha"])])
    assert table.column_names == ["path", "embedding"]
    assert table.column("path").to_pylist() == paths
    with torch.no_grad():
        preprocess = clip.clip.transform(vit_model.visual.input_resolution)
        direct = vit_model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]))
    direct = direct / direct.norm(dim=-1, keepdim=True)
    got = torch.tensor(table.column("embedding").to_pylist())
    assert torch.equal(got, direct)


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_embed_resumes(
    checkpoint: str, images: dict, tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = str(tmp_path / f"e{suffix}")
    first = [str(images["jpeg"]), str(images["gray"])]
    assert embed(checkpoint, *first, "--out", out) == 0
    before = pipeline.load_embeddings(out)
    asked: list[list[str]] = []
    original = pipeline.iter_image_batches

    def recording(model: torch.nn.Module, paths: list[str], **kw: Any) -> Iterator:
        asked.append(list(paths))
        return original(model, paths, **kw)

    monkeypatch.setattr(pipeline, "iter_image_batches", recording)
    assert embed(checkpoint, str(tmp_path / "imgs"), "--out", out) == 0
    good = good_paths(images)
    new = sorted(set(map(str, images.values())) - set(first))
    assert asked == [new]  # only inputs not already in the output
    keys, embeddings = pipeline.load_embeddings(out)
    assert keys == first + [p for p in new if p in good]
    assert torch.equal(embeddings[:2], before[1])
    fresh = tmp_path / f"fresh{suffix}"
    assert embed(checkpoint, *keys, "--out", str(fresh), "--batch-size", "1") == 0
    fresh_keys, fresh_rows = pipeline.load_embeddings(fresh)  # sorted: a fresh run's order
    reordered = fresh_rows[[fresh_keys.index(k) for k in keys]]
    assert (reordered - embeddings).abs().max() < 1e-5
    # Nothing new: exit 0, no model loaded, file untouched.
    asked.clear()
    assert embed(checkpoint, *keys, "--out", out) == 0 and asked == []


def test_embed_interrupted_keeps_finished_batches(
    checkpoint: str, images: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = pipeline.iter_image_batches

    def interrupted(model: torch.nn.Module, paths: list[str], **kw: Any) -> Iterator:
        yield next(original(model, paths, **kw))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "iter_image_batches", interrupted)
    out = tmp_path / "e.npy"
    paths = [str(images[k]) for k in ("jpeg", "alpha", "gray", "tall")]
    assert embed(checkpoint, *paths, "--out", str(out), "--batch-size", "2") == 130
    assert pipeline.load_embeddings(out)[0] == sorted(paths)[:2]


def test_embed_text(
    checkpoint: str, vit_model: torch.nn.Module, tmp_path: Path, capsys: Any
) -> None:
    captions = tmp_path / "captions.txt"
    long = "word " * 100
    captions.write_text(f"a dog\n\na photo of a cat\na dog\n{long}\n", encoding="utf-8")
    out = tmp_path / "t.npy"
    assert embed(checkpoint, "--text", str(captions), "--out", str(out)) == 0
    expected = pipeline.embed_texts(vit_model, ["a dog", "a photo of a cat"])
    assert np.array_equal(np.load(out), expected.numpy())
    assert (tmp_path / "t.rows.txt").read_text().splitlines() == ["a dog", "a photo of a cat"]
    assert "too long" in capsys.readouterr().err  # reported, not fatal
    captions.write_text("a dog\na bird\n", encoding="utf-8")
    assert embed(checkpoint, "--text", str(captions), "--out", str(out), "--quiet") == 0
    assert (tmp_path / "t.rows.txt").read_text().splitlines() == [
        "a dog",
        "a photo of a cat",
        "a bird",
    ]
    assert capsys.readouterr().err == ""


def test_embed_fast_decode_flag(checkpoint: str, images: dict, tmp_path: Path) -> None:
    small = [str(images["jpeg"]), str(images["alpha"])]  # too small to be decoded reduced
    exact, fast = tmp_path / "a.npy", tmp_path / "b.npy"
    assert embed(checkpoint, *small, "--out", str(exact)) == 0
    assert embed(checkpoint, *small, "--out", str(fast), "--fast-decode") == 0
    assert np.array_equal(np.load(exact), np.load(fast))


def test_embed_errors(checkpoint: str, images: dict, tmp_path: Path, capsys: Any) -> None:
    out = str(tmp_path / "e.npy")
    imgs = str(tmp_path / "imgs")
    cases = [
        ([str(tmp_path / "missing.jpg"), "--out", out], 2, "no such file"),
        ([imgs, "--out", str(tmp_path / "e.csv")], 2, ".npy or .parquet"),
        ([imgs, "--text", str(images["jpeg"]), "--out", out], 2, "one of the two"),
        (["--out", out], 2, "one of the two"),
        (["--text", str(tmp_path / "none.txt"), "--out", out], 2, "no such file"),
        ([str(images["corrupt"]), str(images["truncated"]), "--out", out], 1, "skipped 2"),
        ([imgs, "--out", out, "--batch-size", "0"], 2, "must be ≥ 1"),
    ]
    for args, code, message in cases:
        assert embed(checkpoint, *args) == code, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert not os.path.exists(out)
    assert main(["embed", imgs, "--out", out, "--model", "NoSuchModel"]) == 1
    err = capsys.readouterr().err
    assert "available models" in err and len(err.strip().splitlines()) == 1
    assert main(["embed", imgs]) == 2  # argparse: --out is required
    assert "--out" in capsys.readouterr().err


def test_embed_refuses_another_models_output_of_the_same_width(
    checkpoint: str, tiny_files: dict, images: dict, tmp_path: Path, capsys: Any
) -> None:
    other = tmp_path / "other.pt"  # the same architecture and width, other weights
    torch.save(make_state_dict(TINY["tiny-vit"], salt=1), other)
    out = tmp_path / "e.npy"
    assert embed(str(other), str(images["jpeg"]), "--out", str(out)) == 0
    before = pipeline.load_embeddings(out)
    assert embed(checkpoint, str(images["gray"]), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "another model" in err and str(other) in err and checkpoint in err
    keys, rows = pipeline.load_embeddings(out)
    assert keys == before[0] and torch.equal(rows, before[1])  # untouched


def test_embed_refuses_an_output_without_a_record(
    checkpoint: str, images: dict, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "e.npy"
    pipeline.save_embeddings(out, ["elsewhere.jpg"], torch.ones(1, 7))  # no meta sidecar
    assert embed(checkpoint, str(images["jpeg"]), "--out", str(out)) == 1
    assert "no record of the model" in capsys.readouterr().err
    assert pipeline.load_embeddings(out)[0] == ["elsewhere.jpg"]


def test_embed_refuses_another_precision(
    checkpoint: str, images: dict, tmp_path: Path, capsys: Any
) -> None:
    out = str(tmp_path / "e.npy")
    assert embed(checkpoint, str(images["jpeg"]), "--out", out) == 0
    assert embed(checkpoint, str(images["gray"]), "--out", out, "--precision", "bfloat16") == 1
    err = capsys.readouterr().err
    assert "'float32'" in err and "'bfloat16'" in err
    assert len(pipeline.load_embeddings(out)[0]) == 1


def test_embed_keys_rows_by_one_spelling(
    checkpoint: str, images: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "e.npy")
    assert embed(checkpoint, "imgs/a.jpg", "--out", out) == 0
    assert embed(checkpoint, "./imgs/a.jpg", "imgs//b.png", "--out", out) == 0
    keys = pipeline.load_embeddings(out)[0]
    assert keys == [str(images["jpeg"]), str(images["alpha"])]  # absolute, each once


def test_classify(tiny_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 50, 4), 120, dtype=np.uint8)).save(image)
    args = ["classify", str(image), "--labels", "a dog, a cat", "--model"]
    code = main([*args, str(tiny_files["tiny-vit"]["archive"]), "--device", "cpu", "--top-k", "5"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ")
    probs = [float(part.rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split(", ")]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 2e-3


def test_classify_matches_the_model(
    checkpoint: str, vit_model: torch.nn.Module, images: dict, capsys: Any
) -> None:
    labels = ["a dog", "a cat", "a bird"]
    paths = [str(images["jpeg"]), str(images["corrupt"]), str(images["tall"])]
    argv = ["classify", *paths, "--labels", ",".join(labels), "--model", checkpoint, "--top-k", "2"]
    assert main([*argv, "--device", "cpu", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert f"skipped {images['corrupt']}" in captured.err
    good = sorted([str(images["jpeg"]), str(images["tall"])])
    with torch.no_grad():
        image = pipeline.embed_images(vit_model, good).embeddings
        text = vit_model.encode_text(clip.tokenize(labels))
        text = text / text.norm(dim=-1, keepdim=True)
        probs = (vit_model.logit_scale.exp() * image @ text.t()).softmax(dim=-1)
    for line, path, row in zip(lines, good, probs):
        top = row.topk(2)
        assert line == f"{path}: " + ", ".join(
            f"{labels[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist())
        )
    assert len(lines) == 2


def test_classify_imagenet(
    checkpoint: str,
    vit_model: torch.nn.Module,
    images: dict,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real 1000 x 80 prompts take minutes even on a tiny model; the wiring is what is tested.
    classes, templates = clip.imagenet_classes[:20], clip.imagenet_templates[:3]
    monkeypatch.setattr(clip, "imagenet_classes", classes, raising=False)
    monkeypatch.setattr(clip, "imagenet_templates", templates, raising=False)
    argv = ["classify", str(images["jpeg"]), "--imagenet", "--model", checkpoint, "--top-k", "3"]
    assert main([*argv, "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    with torch.no_grad():
        weights = clip.zero_shot_classifier(vit_model, classes, templates)
        image = pipeline.embed_images(vit_model, [str(images["jpeg"])]).embeddings
        top = (vit_model.logit_scale.exp() * image @ weights).softmax(dim=-1)[0].topk(3)
    shown = ", ".join(f"{classes[i]} {p:.3f}" for p, i in zip(top.values, top.indices.tolist()))
    assert line == f"{images['jpeg']}: {shown}"


def test_classify_usage_errors(capsys: Any) -> None:
    assert main(["classify", "x.png", "--labels", " , "]) == 2
    assert main(["classify", "x.png"]) == 2  # --labels or --imagenet is required
    assert main(["classify", "x.png", "--labels", "a", "--imagenet"]) == 2
    assert main(["classify", "x.png", "--labels", "a", "--model", "NoSuchModel"]) == 2  # no x.png
    assert "no such file" in capsys.readouterr().err


def test_errors_exit_nonzero(tmp_path: Path, images: dict, capsys: Any) -> None:
    img = str(images["jpeg"])
    assert main(["classify", img, "--labels", "a", "--model", "NoSuchModel"]) == 1
    assert "available models" in capsys.readouterr().err
    assert main(["classify", str(images["corrupt"]), "--labels", "a", "--model", "x"]) == 1


def test_models_marks_cached_files(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ViT-B-32.pt").write_bytes(b"weights")
    (tmp_path / "RN50.pt.partial").write_bytes(b"half")
    assert main(["models", "--cache-dir", str(tmp_path), "--hub-cache-dir", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    openai = {row[0]: row[-1] for row in rows if row[0].endswith("/openai")}
    assert [clip.registry.get(name).openai_name for name in openai] == NAMES
    assert openai["ViT-B-32/openai"] == "yes"
    assert all(openai[name] == "no" for name in openai if name != "ViT-B-32/openai")
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    assert main(["models"]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()}
    assert rows["ViT-B-32/openai"] == "yes" and rows["RN50/openai"] == "no"


def test_help(capsys: Any) -> None:
    assert main(["--help"]) == 0
    assert "embed" in capsys.readouterr().out
    for command in ("embed", "classify", "models"):
        assert main([command, "--help"]) == 0
        assert "--" in capsys.readouterr().out
    assert main([]) == 2


def test_python_dash_m(tmp_path: Path) -> None:
    env = {**os.environ, "CLIP_CACHE_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "clip", "models"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert run.returncode == 0 and "ViT-B-32/openai" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "clip", "embed", "missing.jpg", "--out", str(tmp_path / "e.npy")],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "missing.jpg" in run.stderr


def test_exit_codes_of_real_runs_are_the_documented_ones(
    checkpoint: str, images: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "e.npy")
    runs = {
        cli.EXIT_OK: embed(checkpoint, str(images["jpeg"]), "--out", out),
        cli.EXIT_FAILURE: embed(
            checkpoint, str(images["corrupt"]), "--out", str(tmp_path / "f.npy")
        ),
        cli.EXIT_USAGE: embed(checkpoint, str(tmp_path / "missing.jpg"), "--out", out),
    }
    original = pipeline.iter_image_batches

    def interrupted(model: torch.nn.Module, paths: list[str], **kw: Any) -> Iterator:
        yield next(original(model, paths, **kw))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "iter_image_batches", interrupted)
    runs[cli.EXIT_INTERRUPTED] = embed(checkpoint, str(tmp_path / "imgs"), "--out", out)
    assert runs == {code: code for code in runs}
    documented = {0: "success", 1: "runtime failure", 2: "usage error", 130: "interrupted"}
    for code, meaning in documented.items():  # the module docstring, --help and the README
        assert f"* {code} — {meaning}" in (cli.__doc__ or "")
        assert f"{code} {meaning}" in cli._parser().epilog
        assert f"{code} {meaning}" in (ROOT / "README.md").read_text()
    assert set(runs) == set(documented)


def test_embed_retry_failed_reruns_failed_rows_of_finished_shards(
    checkpoint: str, images: dict, tmp_path: Path, capsys: Any
) -> None:
    from clip.shards import read_shard

    late = tmp_path / "late.png"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images['jpeg']}\n{late}\n")
    out = str(tmp_path / "shards")
    assert embed(checkpoint, str(listing), "--out", out) == 0
    assert read_shard(f"{out}/list-00000.parquet")[0] == [str(images["jpeg"])]
    Image.new("RGB", (40, 40), "red").save(late)
    assert embed(checkpoint, str(listing), "--out", out, "--retry-failed") == 0
    assert "reran the failed rows of 1" in capsys.readouterr().err
    assert read_shard(f"{out}/list-00000.parquet")[0] == [str(images["jpeg"]), str(late)]
    assert embed(checkpoint, str(images["jpeg"]), "--out", f"{out}.npy", "--retry-failed") == 2
    assert "folder of shards" in capsys.readouterr().err


def test_embed_to_one_file_takes_lists_and_refuses_what_it_cannot_read(
    checkpoint: str, images: dict, tmp_path: Path, capsys: Any
) -> None:
    folder = tmp_path / "imgs"
    (tmp_path / "list.txt").write_text(f"{images['jpeg']}\nimgs/b.png\n")
    out = str(tmp_path / "e.npy")
    assert embed(checkpoint, str(tmp_path / "list.txt"), "--out", out) == 0
    assert pipeline.load_embeddings(out)[0] == sorted([str(images["jpeg"]), str(images["alpha"])])
    (folder / "notes.md").write_text("no image")
    assert embed(checkpoint, str(folder), "--out", out) == 2
    assert "notes.md" in capsys.readouterr().err
    (folder / "notes.md").unlink()
    (folder / "C.TAR").write_bytes(b"")
    assert embed(checkpoint, str(folder), "--out", out) == 2
    assert "C.TAR is read shard by shard" in capsys.readouterr().err
