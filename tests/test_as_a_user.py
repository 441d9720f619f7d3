"""Try it as a user: plain strings and Paths, mixed folders, reruns with other settings, kills.

Each test runs the public API the way the README shows it, with the inputs and reruns that real
jobs see, and checks that nothing is lost (every input is embedded or reported as failed) and
nothing is duplicated (each input has at most one row).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from checkpoints import TINY, make_state_dict
from PIL import Image
from test_pipeline import smooth_image

from clip.cli import main
from clip.distributed import embed_dataset
from clip.pipeline import embed_images, embed_texts, find_images, load_embeddings
from clip.shards import plan_shards, read_shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def jpeg_bytes(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(smooth_image(30, 40, seed)).save(out, "JPEG")
    return out.getvalue()


def mixed_folder(root: Path) -> dict[str, list[str]]:
    """A folder as users have them: images (upper-case too), a tar, a Parquet list and a .txt
    list (both naming images kept elsewhere); returns the ids each kind must give."""
    data, elsewhere = root / "data", root / "elsewhere"
    data.mkdir(parents=True)
    elsewhere.mkdir()
    Image.fromarray(smooth_image(40, 50, 1)).save(data / "A.JPG")
    Image.fromarray(smooth_image(50, 40, 2)).save(data / "b.png")
    with tarfile.open(data / "C.TAR", "w") as tar:
        for key in ("000", "001"):
            blob = jpeg_bytes(int(key) + 3)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    for i in range(4):
        Image.fromarray(smooth_image(33, 44, 10 + i)).save(elsewhere / f"e{i}.jpg")
    pq.write_table(
        pa.table({"path": ["../elsewhere/e0.jpg", "../elsewhere/e1.jpg"]}), data / "t.parquet"
    )
    (data / "more.txt").write_text(f"{elsewhere / 'e2.jpg'}\n../elsewhere/e3.jpg\n")
    return {
        "images": [str(data / "A.JPG"), str(data / "b.png")],
        "tar": ["000", "001"],
        "parquet": ["../elsewhere/e0.jpg", "../elsewhere/e1.jpg"],
        "list": [str(elsewhere / "e2.jpg"), str(elsewhere / "e3.jpg")],
    }


def all_rows(out: Path) -> tuple[list[str], torch.Tensor]:
    parts = [read_shard(str(p)) for p in sorted(out.glob("*.parquet"))]
    return [k for ids, _ in parts for k in ids], torch.cat([e for _, e in parts])


def test_plain_strings_and_paths_are_single_items(
    vit_model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(smooth_image(40, 40)).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    assert embed_texts(vit_model, "a photo of a cat").shape[0] == 1
    for one in ("cat.jpg", Path("cat.jpg")):
        result = embed_images(vit_model, one)
        assert result.paths == ["cat.jpg"] and result.failed == []
    assert find_images(".") == find_images(tmp_path) == [str(tmp_path / "cat.jpg")]
    assert [s.members for s in plan_shards(".")] == [(str(tmp_path / "cat.jpg"),)]


def test_a_mixed_folder_is_embedded_whole_and_once(
    vit_file: str, vit_model: torch.nn.Module, tmp_path: Path
) -> None:
    expected = mixed_folder(tmp_path)
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "notes.md").write_text("a file that is no input")
    with pytest.raises(ValueError, match=r"notes\.md"):  # refused by name, not dropped
        embed_dataset(str(data), out, model=vit_file, shard_size=2, workers=0)
    assert not out.exists() or not list(out.glob("*.parquet"))
    (data / "notes.md").unlink()
    summary = embed_dataset(str(data), out, model=vit_file, shard_size=2, workers=0)
    assert (summary.embedded, summary.failed) == (8, 0)
    ids, rows = all_rows(out)
    assert sorted(ids) == sorted(k for keys in expected.values() for k in keys)
    assert len(ids) == len(set(ids))
    by_id = dict(zip(ids, rows))
    direct = embed_images(vit_model, expected["images"] + expected["list"], batch_size=1)
    for key, row in zip(direct.paths, direct.embeddings):
        assert (by_id[key] - row).abs().max() < 1e-5
    # the single-file command refuses what it cannot hold, by name, instead of skipping it
    code = main(["embed", str(data), "--out", str(tmp_path / "e.npy"), "--model", vit_file])
    assert code == 2


def test_reruns_with_other_settings_are_refused_or_skipped(
    vit_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed_folder(tmp_path)
    data, out = str(tmp_path / "data"), tmp_path / "out"
    job = {"model": vit_file, "shard_size": 2, "workers": 0}
    embed_dataset(data, out, **job)  # type: ignore[arg-type]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    same = embed_dataset(data, out, **job)  # type: ignore[arg-type]
    assert same.written == [] and len(same.skipped) == 4  # tar, Parquet, list, images
    other = tmp_path / "other.pt"
    torch.save(make_state_dict(TINY["tiny-vit"], salt=1), other)  # same width, other weights
    changes = [
        ({"model": str(other)}, "model_digest"),
        ({"dtype": "float16"}, "dtype"),
        ({"shard_size": 3}, "shard_size"),
        ({"precision": "bfloat16"}, "precision"),
    ]
    for change, named in changes:
        with pytest.raises(ValueError, match=f"{named}: recorded"):
            embed_dataset(data, out, **{**job, **change})  # type: ignore[arg-type]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # untouched
    # the single-file job keeps the same rules
    e = str(tmp_path / "e.npy")
    image = str(tmp_path / "data" / "A.JPG")
    assert main(["embed", image, "--out", e, "--model", vit_file, "--workers", "0"]) == 0
    assert main(["embed", image, "--out", e, "--model", str(other), "--workers", "0"]) == 1
    assert "another model" in capsys.readouterr().err


def _slow_job(kind: str, inputs: str, out: str, model: str, marker: str) -> subprocess.Popen:
    """A job whose encoder is slow and leaves ``marker`` once it has embedded a batch."""
    script = f"""
import pathlib, sys, time
import clip.distributed, clip.distributed_ranks, clip.pipeline
real = clip.pipeline.encode_images
def slow(*args, **kwargs):
    rows = real(*args, **kwargs)
    pathlib.Path({marker!r}).touch()
    time.sleep(0.5)
    return rows
clip.pipeline.encode_images = clip.distributed_ranks.encode_images = slow
if {kind!r} == "shards":
    clip.distributed.embed_dataset({inputs!r}, {out!r}, model={model!r}, batch_size=1,
                                   shard_size=1, workers=0)
else:
    from clip.cli import main
    sys.exit(main(["embed", {inputs!r}, "--out", {out!r}, "--model", {model!r},
                   "--workers", "0", "--batch-size", "1", "--quiet"]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-c", script], env=env)


def _kill_when(process: subprocess.Popen, ready: Callable[[], bool], wait: float) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(wait)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_sharded_job_killed_mid_run_resumes_to_every_input_once(
    vit_file: str, vit_model: torch.nn.Module, tmp_path: Path
) -> None:
    folder, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "started"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(smooth_image(30 + i, 40, i)).save(folder / f"{i}.jpg")
    process = _slow_job("shards", str(folder), str(out), vit_file, str(marker))
    _kill_when(process, lambda: any(out.glob("*.parquet")), wait=0.2)  # the next in flight
    assert process.returncode == -signal.SIGKILL
    done_before = sorted(p.name for p in out.glob("*.parquet"))
    assert 0 < len(done_before) < 6
    summary = embed_dataset(str(folder), out, model=vit_file, batch_size=1, shard_size=1, workers=0)
    assert sorted(summary.skipped) == [n.removesuffix(".parquet") for n in done_before]
    ids, rows = all_rows(out)
    expected = embed_images(vit_model, find_images(folder), batch_size=1)
    assert ids == expected.paths  # every input once, in order
    assert (rows - expected.embeddings).abs().max() < 1e-5
    assert json.loads((out / "plan.json").read_text())["settings"]["shard_size"] == 1


def test_a_single_file_job_killed_mid_run_keeps_its_output_and_resumes(
    vit_file: str, tmp_path: Path
) -> None:
    folder, out, marker = tmp_path / "in", tmp_path / "e.npy", tmp_path / "started"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(smooth_image(30 + i, 40, i)).save(folder / f"{i}.jpg")
    first = str(folder / "0.jpg")
    assert main(["embed", first, "--out", str(out), "--model", vit_file, "--workers", "0"]) == 0
    before = load_embeddings(out)
    process = _slow_job("file", str(folder), str(out), vit_file, str(marker))
    _kill_when(process, marker.exists, wait=0.6)
    assert process.returncode == -signal.SIGKILL
    keys, rows = load_embeddings(out)  # still whole: the first run's rows
    assert keys == before[0] and torch.equal(rows, before[1])
    assert (
        main(["embed", str(folder), "--out", str(out), "--model", vit_file, "--workers", "0"]) == 0
    )
    keys = load_embeddings(out)[0]
    assert sorted(keys) == sorted(str(folder / f"{i}.jpg") for i in range(5))
    assert len(keys) == len(set(keys))
