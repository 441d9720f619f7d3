"""clip.distributed on a local Ray instance: same numbers as one process, faults, reruns.

One Ray instance (2 CPUs, no dashboard) serves the module. Shards hold a multiple of the batch
size, so each shard's batches are the single-process pipeline's batches and embeddings must be
bit-identical.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from folder_models import ZOO, save_folder
from PIL import Image

import clip
from clip import distributed, distributed_ray, pipeline
from clip.cli import main
from clip.shards import read_shard

BATCH, SHARD = 8, 24


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 small images of varied sizes in two folders, plus two unreadable files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(200):
        folder = root / ("a" if i % 3 else "b")
        folder.mkdir(exist_ok=True)
        h, w = rng.integers(20, 70, size=2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.{'png' if i % 7 == 0 else 'jpg'}")
    (root / "a" / "0500.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "b" / "0501.png").write_bytes(b"")
    return root


def shard_rows(out: Path) -> dict[str, tuple[list[str], torch.Tensor]]:
    return {p.stem: read_shard(str(p)) for p in sorted(out.glob("*.parquet"))}


def joined(out: Path) -> tuple[list[str], torch.Tensor]:
    rows = shard_rows(out).values()
    return [k for ids, _ in rows for k in ids], torch.cat([e for _, e in rows])


def single_process(vit_model: torch.nn.Module, images: Path) -> pipeline.EmbeddedImages:
    """The one-process pipeline, on one thread like the job's CPU actor (GEMM results can
    differ in the last bit between thread counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pipeline.embed_images(vit_model, pipeline.find_images([images]), batch_size=BATCH)
    finally:
        torch.set_num_threads(threads)


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_ray_job_equals_the_single_process_pipeline(
    local_ray: None, vit_file: str, vit_model: torch.nn.Module, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = distributed.embed_dataset(
        [str(images)], str(out), model=vit_file, ray=True, batch_size=BATCH, shard_size=SHARD
    )
    expected = single_process(vit_model, images)
    ids, embeddings = joined(out)
    assert summary.shards == 9 and len(summary.written) == 9 and not summary.skipped
    assert summary.embedded == 200 and summary.failed == 2
    assert ids == expected.paths
    assert torch.equal(embeddings, expected.embeddings)
    failed = {f for stats in out.glob("*.stats.json") for f in _failures(stats)}
    assert failed == {p for p, _ in expected.failed}

    before = mtimes(out)
    again = distributed.embed_dataset(
        [str(images)], str(out), model=vit_file, ray=True, batch_size=BATCH, shard_size=SHARD
    )
    assert again.written == [] and len(again.skipped) == 9
    assert mtimes(out) == before


def _failures(stats: Path) -> list[str]:
    import json

    return [f["id"] for f in json.loads(stats.read_text())["failures"]]


# ---- faults -------------------------------------------------------------------------------


def _first_time(marker: Path) -> bool:
    """True for exactly one caller across processes (the one that creates ``marker``)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class DiesOnce:
    """A preprocess that kills its worker process the first time it sees ``victim``."""

    def __init__(self, resolution: int, victim: str, marker: Path) -> None:
        self.inner = clip.clip._transform(resolution)
        self.victim, self.marker = victim, marker

    def __call__(self, image: Image.Image) -> torch.Tensor:
        (self.marker.parent / f"decoded-in-{os.getpid()}").touch()
        seen = os.path.basename(getattr(image, "filename", ""))
        if seen == self.victim and _first_time(self.marker):
            os._exit(17)  # the decode task's worker dies mid-shard
        return self.inner(image)


class ModelThatDiesOnce:
    """A model factory whose model kills its actor on its third batch, once per job."""

    def __init__(self, checkpoint: str, marker: Path) -> None:
        self.checkpoint, self.marker = checkpoint, marker

    def __call__(self) -> torch.nn.Module:
        loaded, _ = clip.load(self.checkpoint, device="cpu")
        calls = {"n": 0}
        encode = loaded.encode_image

        def encode_image(x: torch.Tensor) -> Any:
            (self.marker.parent / f"embedded-in-{os.getpid()}").touch()
            calls["n"] += 1
            if calls["n"] == 3 and _first_time(self.marker):
                os._exit(18)  # the embedding actor dies with a chunk in hand
            return encode(x)

        loaded.encode_image = encode_image  # type: ignore[method-assign]
        return loaded


def test_dead_decode_worker_and_dead_actor_are_retried(
    local_ray: None, vit_file: str, vit_model: torch.nn.Module, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    decode_marker, actor_marker = tmp_path / "decode-died", tmp_path / "actor-died"
    job = dict(
        model=ModelThatDiesOnce(vit_file, actor_marker),
        preprocess=DiesOnce(vit_model.visual.input_resolution, "0100.jpg", decode_marker),
        ray=True,
        batch_size=BATCH,
        shard_size=SHARD,
    )
    summary = distributed.embed_dataset([str(images)], str(out), **job)  # type: ignore[arg-type]
    assert decode_marker.exists() and actor_marker.exists()  # both faults happened
    decoders = {p.name.split("-")[-1] for p in tmp_path.glob("decoded-in-*")}
    embedders = {p.name.split("-")[-1] for p in tmp_path.glob("embedded-in-*")}
    assert len(embedders) == 2  # the actor, and the actor restarted after its death
    assert decoders and not decoders & embedders  # decoding ran in tasks, not in the actors
    assert str(os.getpid()) not in decoders | embedders
    expected = single_process(vit_model, images)
    rows = shard_rows(out)
    assert sorted(rows) == sorted(summary.written) and len(rows) == 9
    ids, embeddings = joined(out)
    assert ids == expected.paths  # every image once, in order: no chunk lost or doubled
    assert torch.equal(embeddings, expected.embeddings)

    before = mtimes(out)
    again = distributed.embed_dataset([str(images)], str(out), **job)  # type: ignore[arg-type]
    assert again.written == [] and mtimes(out) == before


# ---- inputs other than folders ----------------------------------------------------------


def test_tar_and_parquet_shards_on_ray(
    local_ray: None, vit_file: str, vit_model: torch.nn.Module, images: Path, tmp_path: Path
) -> None:
    paths = pipeline.find_images([images])[:40]
    tar_path = tmp_path / "web-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, p in enumerate(paths[:20]):
            for name, data in ((f"{i:06d}.jpg", Path(p).read_bytes()), (f"{i:06d}.txt", b"x")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = pa.table({"path": [os.path.relpath(p, tmp_path) for p in paths[20:]]})
    pq.write_table(table, tmp_path / "rows.parquet")
    out = tmp_path / "out"
    summary = distributed.embed_dataset(
        [str(tar_path), str(tmp_path / "rows.parquet")],
        str(out),
        model=vit_file,
        ray=True,
        batch_size=BATCH,
        dtype="float16",
    )
    assert sorted(summary.written) == ["rows-00000", "web-000"]
    rows = shard_rows(out)
    assert rows["web-000"][0] == [f"{i:06d}" for i in range(20)]
    assert rows["rows-00000"][0] == table.column("path").to_pylist()
    for name, chunk in (("web-000", paths[:20]), ("rows-00000", paths[20:])):
        expected = pipeline.embed_images(vit_model, chunk, batch_size=BATCH).embeddings
        torch.testing.assert_close(rows[name][1], expected.half().float(), rtol=0, atol=1e-3)
    schema = pq.read_schema(out / "rows-00000.parquet")
    width = pipeline.embedding_width(vit_model)
    assert str(schema.field("embedding").type) == f"fixed_size_list<element: halffloat>[{width}]"


def test_ray_job_with_a_relative_model_folder_uses_its_preprocessing(
    local_ray: None, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = save_folder(ZOO["zoo-vit"], tmp_path / "zoo-vit")  # GELU, mean/std 0.5, squash
    model, _ = clip.load(folder, device="cpu")
    paths = pipeline.find_images([images])[: 2 * SHARD]
    monkeypatch.chdir(tmp_path)  # the actors load "zoo-vit" wherever they run
    summary = distributed.embed_dataset(
        paths, str(tmp_path / "out"), model="zoo-vit", ray=True, batch_size=BATCH, shard_size=SHARD
    )
    assert summary.embedded == 2 * SHARD and len(summary.written) == 2
    ids, embeddings = joined(tmp_path / "out")
    assert ids == paths
    expected = pipeline.embed_images(model, paths, batch_size=BATCH).embeddings
    torch.testing.assert_close(embeddings, expected)


def ray_log_lines(err: str) -> list[str]:
    """Ray's Python log lines (``… INFO file.py:12 -- …``) and C++ info/warning lines."""
    return [
        line
        for line in err.splitlines()
        if re.search(r"\t(INFO|WARNING|DEBUG) \S+\.py:\d+ -- |^\[[^\]]* [IW] \d+ \d+\]", line)
    ]


def test_cli_runs_the_job_on_ray_and_reports(
    local_ray: None,
    vit_file: str,
    vit_model: torch.nn.Module,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = ["embed", str(images), "--out", str(out), "--model", vit_file, "--ray"]
    argv += ["--batch-size", str(BATCH), "--shard-size", "96"]
    assert main(argv) == 0
    assert "wrote 3 of 3 shards" in capsys.readouterr().err
    ids, embeddings = joined(out)
    expected = single_process(vit_model, images)
    assert ids == expected.paths and torch.equal(embeddings, expected.embeddings)
    assert main(argv) == 0
    assert "wrote 0 of 3 shards (3 already done)" in capsys.readouterr().err
    assert main([*argv, "--dtype", "float16"]) == 1  # other settings into the same folder
    assert "dtype" in capsys.readouterr().err


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_cli_on_ray_keeps_rays_logs_for_verbose(
    local_ray: None, vit_file: str, images: Path, tmp_path: Path, verbose: bool
) -> None:
    """A separate process (Ray's console handlers write to the stderr they were created with,
    which pytest has replaced), joining the test's cluster."""
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "clip", "embed", str(images), "--out", str(tmp_path / "o")]
    command += ["--model", vit_file, "--ray", address, "--shard-size", "300"]
    done = subprocess.run(
        command + ["--verbose"] * verbose, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "clip: wrote 1 of 1 shards" in done.stderr
    started = [line for line in ray_log_lines(done.stderr) if "Starting execution" in line]
    assert bool(started) == verbose
    if not verbose:
        assert ray_log_lines(done.stderr) == [], done.stderr


def test_ray_progress_bar_counts_shards_and_images(
    local_ray: None, vit_file: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = distributed.embed_dataset(
        [str(images)],
        str(tmp_path / "out"),
        model=vit_file,
        ray=True,
        shard_size=101,
        progress=True,
    )
    assert len(summary.written) == 2
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"embedding: 100%.* 2/2 .*, 200 images, [\d.]+ img/s", final), final


# ---- asking for what the cluster does not have -------------------------------------------


class FakeRay:
    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


@pytest.mark.parametrize(
    "resources, actors, device, message",
    [
        ({"CPU": 16, "GPU": 1}, 2, None, "asked for 2 GPU actors but the Ray cluster has 1 GPUs"),
        ({"CPU": 16, "GPU": 4}, 5, "cuda", "asked for 5 GPU actors but the Ray cluster has 4"),
        ({"CPU": 16}, None, "cuda", "asked for 1 GPU actors but the Ray cluster has 0 GPUs"),
        ({"CPU": 2}, 5, None, "asked for 5 CPU actors but the Ray cluster has 2 CPUs"),
    ],
)
def test_actor_plan_refuses_what_the_cluster_cannot_place(
    resources: dict[str, float], actors: Optional[int], device: Optional[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        distributed_ray.actor_plan(FakeRay(resources), actors, device)


@pytest.mark.parametrize(
    "resources, actors, device, plan",
    [
        ({"CPU": 16, "GPU": 4}, None, None, (4, {"num_gpus": 1, "num_cpus": 1}, 1)),
        ({"CPU": 16, "GPU": 4}, 2, "cpu", (2, {"num_cpus": 7.5}, 7)),
        ({"CPU": 2}, 4, None, (4, {"num_cpus": 0.25}, 1)),
    ],
)
def test_actor_plan_places_what_fits(
    resources: dict[str, float], actors: Optional[int], device: Optional[str], plan: tuple
) -> None:
    assert distributed_ray.actor_plan(FakeRay(resources), actors, device) == plan


def test_gpu_actors_on_a_cpu_only_cluster_fail_fast(
    local_ray: None, vit_file: str, images: Path, tmp_path: Path
) -> None:
    assert "GPU" not in ray.cluster_resources()
    with pytest.raises(ValueError, match="asked for 2 GPU actors but the Ray cluster has 0 GPUs"):
        distributed.embed_dataset(
            [str(images)], str(tmp_path / "out"), model=vit_file, ray=True, device="cuda", actors=2
        )
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ray": True, "workers": 2}, "workers= is an option of torchrun ranks"),
        ({"ray": True, "rank": 0}, "rank= is an option of torchrun ranks"),
        ({"ray": True, "world_size": 2}, "world_size= is an option of torchrun ranks"),
        ({"ray": True, "device": "cuda:1"}, "on Ray, device must be 'cuda'"),
        ({"actors": 2}, "actors= is an option of the Ray engine"),
        ({"verbose": True}, "verbose= is an option of the Ray engine"),
    ],
)
def test_options_the_engine_ignores_are_refused(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.embed_dataset(["nothing/"], str(tmp_path / "out"), **options)


# ---- without Ray: torchrun ranks, and the command line's checks ----------------------------


def test_torchrun_ranks_share_the_shards(
    vit_file: str, vit_model: torch.nn.Module, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command = [*torchrun, "-m", "clip", "embed", str(images), "--out", str(out)]
    command += ["--model", vit_file, "--batch-size", str(BATCH), "--shard-size", str(SHARD)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rank 0/2: wrote 5 of 5 shards" in done.stderr  # shards 0, 2, 4, 6, 8
    assert "rank 1/2: wrote 4 of 4 shards" in done.stderr  # shards 1, 3, 5, 7
    ids, embeddings = joined(out)
    expected = single_process(vit_model, images)  # torchrun gives each rank one thread
    assert ids == expected.paths and torch.equal(embeddings, expected.embeddings)


def test_nothing_left_to_do_loads_no_model(
    vit_file: str, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    distributed.embed_dataset([str(images)], str(out), model=vit_file, shard_size=100)

    def no_loading(*args: object) -> None:
        raise AssertionError("a model was loaded for a finished job")

    monkeypatch.setattr(distributed, "load_model", no_loading)
    again = distributed.embed_dataset([str(images)], str(out), model=vit_file, shard_size=100)
    assert again.written == [] and again.skipped == ["images-00000", "images-00001", "images-00002"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "x.npy", "--ray"], "--ray writes a folder of shards"),
        (["--out", "shards", "--text", "captions.txt"], "--text writes one file"),
        (["data.tar", "--out", "x.npy"], "read shard by shard: give --out FOLDER"),
        (["--out", "x.csv"], "or name a folder"),
        (["--out", "shards", "--ray", "--workers", "2"], "--workers sets local decoding"),
        (["--out", "shards", "--actors", "2"], "--actors sets the number of Ray model"),
        (["--out", "x.npy", "--verbose"], "--verbose shows Ray's own logs: add --ray"),
    ],
)
def test_cli_rejects_sharded_misuse(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = [] if "--text" in extra or extra[0] == "data.tar" else ["photos/"]
    assert main(["embed", *inputs, *extra]) == 2
    assert message in capsys.readouterr().err


def _rank_process(rank: int, images: Path, out: Path, vit_file: str) -> subprocess.Popen:
    code = (
        "import sys; from clip.distributed import embed_dataset; "
        "s = embed_dataset(sys.argv[1], sys.argv[2], model=sys.argv[3], batch_size=8, "
        "shard_size=24, workers=0, plan_wait_s=120); print(sorted(s.written))"
    )
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "PYTHONPATH": str(Path.cwd())}
    command = [sys.executable, "-c", code, str(images), str(out), vit_file]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_ranks_started_together_share_one_recorded_plan(
    vit_file: str, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    late = _rank_process(1, images, out, vit_file)  # rank 1 first: it must wait for rank 0
    first = _rank_process(0, images, out, vit_file)
    results = [p.communicate(timeout=300) for p in (first, late)]
    assert [p.returncode for p in (first, late)] == [0, 0], [r[1][-2000:] for r in results]
    plan = json.loads((out / "plan.json").read_text())
    names = [s["name"] for s in plan["shards"]]
    written = [eval(r[0].decode().strip().splitlines()[-1]) for r in results]
    assert sorted(written[0] + written[1]) == sorted(names) and not set(written[0]) & set(
        written[1]
    )
    ids = [k for p in sorted(out.glob("*.parquet")) for k in read_shard(str(p))[0]]
    expected = [p for p in pipeline.find_images(images) if not p.endswith(("0500.jpg", "0501.png"))]
    assert sorted(ids) == sorted(expected)  # every image once


def test_other_ranks_use_the_recorded_plan_not_their_own_listing(
    vit_file: str, tmp_path: Path
) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8 + i, 8)).save(folder / f"{i}.png")
    job = {"model": vit_file, "shard_size": 2, "workers": 0, "world_size": 2}
    zero = distributed.embed_dataset(folder, out, rank=0, **job)
    Image.new("RGB", (9, 9)).save(folder / "0a.png")  # a listing now would shift every shard
    one = distributed.embed_dataset(folder, out, rank=1, **job)
    assert (zero.written, one.written) == (["images-00000"], ["images-00001"])
    ids = [k for p in sorted(out.glob("*.parquet")) for k in read_shard(str(p))[0]]
    assert ids == [str(folder / f"{i}.png") for i in range(4)]  # each once, as planned
    with pytest.raises(ValueError, match="new shards: images-00002"):
        distributed.embed_dataset(folder, out, rank=0, **job)  # rank 0 sees the change


def test_a_rank_without_rank_zero_times_out_clearly(vit_file: str, tmp_path: Path) -> None:
    with pytest.raises(TimeoutError, match="rank 0 to write"):
        distributed.embed_dataset(
            tmp_path, tmp_path / "out", model=vit_file, rank=1, world_size=2, plan_wait_s=0.3
        )
