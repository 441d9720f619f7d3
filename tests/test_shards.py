"""clip.shards and the rank path of clip.distributed: planning, decoding, assembling, writing.

No Ray here: ``embed_dataset(..., ray=False)`` runs the same shard code in this process (and in
DataLoader workers), and is checked bit-for-bit against :func:`clip.pipeline.embed_images`.
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from flaky_server import FlakyServer
from PIL import Image
from test_pipeline import smooth_image, write_images

from clip import shards
from clip.distributed import embed_dataset
from clip.pipeline import embed_images, find_images
from clip.preprocess import transform
from clip.shards import Shard, ShardAssembler, finished, iter_chunks, plan_shards, read_shard

R = 32  # tiny-vit_model's input resolution
META = {"model": "m", "dtype": "float32", "decode": "exact"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Ten image files, sorted: eight readable, a corrupt JPEG (f) and a truncated one (g)."""
    folder = tmp_path_factory.mktemp("photos")
    write_images(folder)
    for i, name in enumerate(["h.jpg", "i.png", "j.jpg"]):
        Image.fromarray(smooth_image(30 + 7 * i, 44, seed=10 + i)).save(folder / name)
    return find_images([folder])


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def jpeg(seed: int, height: int = 24, width: int = 30) -> bytes:
    out = io.BytesIO()
    Image.fromarray(smooth_image(height, width, seed)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of ``(name, data)`` members; a name ending in "/" is a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_parquet(where: Path, **columns: list) -> Path:
    where.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()}), where)
    return where


def decoded(source: object) -> torch.Tensor:
    """What the pixels of one image must be: the standard transform of ``Image.open``."""
    with Image.open(source) as image:  # type: ignore[arg-type]
        return transform(R)(image)


def chunks_of(shard: Shard, batch_size: int = 3) -> list[shards.Chunk]:
    return list(iter_chunks(shard, transform(R), batch_size))


def joined(chunks: list[shards.Chunk]) -> tuple[list[str], torch.Tensor, list[str]]:
    """(ids, pixels, failed ids) of a whole shard."""
    pixels = torch.cat([torch.empty(0, 3, R, R), *(c.pixels for c in chunks if c.pixels.numel())])
    return [k for c in chunks for k in c.ids], pixels, [k for c in chunks for k, _ in c.failed]


# ---- planning -------------------------------------------------------------------------------


def test_plan_pools_images_folders_and_globs_sorted(tmp_path: Path, photos: list[str]) -> None:
    folder = os.path.dirname(photos[0])
    Image.new("RGB", (8, 8)).save(tmp_path / "zz.webp")
    Image.new("RGB", (8, 8)).save(tmp_path / "aa.bmp")
    planned = plan_shards([str(tmp_path / "*.webp"), folder, str(tmp_path / "aa.bmp")], 5)
    assert [s.name for s in planned] == ["images-00000", "images-00001", "images-00002"]
    assert [len(s.members) for s in planned] == [5, 5, 2]
    assert {(s.kind, s.source) for s in planned} == {("files", "")}
    everything = sorted([*photos, str(tmp_path / "zz.webp"), str(tmp_path / "aa.bmp")])
    assert [p for s in planned for p in s.members] == everything
    assert [s.name for s in plan_shards([folder], 10)] == ["images-00000"]


def test_plan_file_list_resolves_against_its_folder(tmp_path: Path, photos: list[str]) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    relative = os.path.relpath(photos[0], lists)
    text = f"# a comment\n{relative}\n\n  {photos[1]}  \n#{photos[2]}\n{photos[3]}\nnew.jpg\n"
    (lists / "batch.txt").write_text(text)
    planned = plan_shards([str(lists / "batch.txt")], shard_size=2)
    assert [s.name for s in planned] == ["batch-00000", "batch-00001"]
    assert [s.members for s in planned] == [  # one spelling: normalised absolute paths
        (os.path.normpath(lists / relative), photos[1]),
        (photos[3], str(lists / "new.jpg")),
    ]
    assert all(s.kind == "files" and s.source == str(lists / "batch.txt") for s in planned)
    assert os.path.samefile(planned[0].members[0], photos[0])


def test_plan_parquet_columns_and_rows(tmp_path: Path) -> None:
    rows = [f"x{i}.jpg" for i in range(5)]
    by_path = write_parquet(tmp_path / "meta.parquet", path=rows, caption=rows)
    cut = plan_shards([str(by_path)], shard_size=2)
    assert [(s.name, s.start, s.stop) for s in cut] == [
        ("meta-00000", 0, 2),
        ("meta-00001", 2, 4),
        ("meta-00002", 4, 5),
    ]
    assert {(s.kind, s.source, s.column) for s in cut} == {("parquet", str(by_path), "path")}
    whole = plan_shards([str(by_path)], shard_size=5)
    assert [(s.name, s.start, s.stop) for s in whole] == [("meta-00000", 0, 5)]
    by_url = write_parquet(tmp_path / "urls.parquet", url=rows)
    assert [s.column for s in plan_shards([str(by_url)])] == ["url"]
    both = write_parquet(tmp_path / "both.parquet", url=rows, path=rows)
    assert [s.column for s in plan_shards([str(both)])] == ["path"]
    assert [s.column for s in plan_shards([str(by_path)], column="caption")] == ["caption"]
    with pytest.raises(ValueError, match=r"no column 'file'.*'path', 'caption'"):
        plan_shards([str(by_path)], column="file")
    bare = write_parquet(tmp_path / "bare.parquet", caption=rows)
    with pytest.raises(ValueError, match=r"'path' or 'url'.*'caption'"):
        plan_shards([str(bare)])


def test_plan_tars_and_tar_globs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("b.tar", "a.tar", "c.tar.gz"):
        write_tar(data / name, [("0.jpg", jpeg(0))])
    planned = plan_shards([str(data / "*.tar")], shard_size=1)
    assert planned == [
        Shard("a", "tar", str(data / "a.tar")),
        Shard("b", "tar", str(data / "b.tar")),
    ]
    assert [s.name for s in plan_shards([str(data / "c.tar.gz"), str(data / "a.tar")])] == [
        "c",
        "a",
    ]


def test_plan_refuses_bad_inputs(tmp_path: Path, photos: list[str]) -> None:
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "part.txt").write_text(photos[0])
        write_tar(tmp_path / folder / "t.tar", [("0.jpg", jpeg(0))])
    with pytest.raises(ValueError, match="two inputs give shard name 'part-00000'"):
        plan_shards([str(tmp_path / "one" / "part.txt"), str(tmp_path / "two" / "part.txt")])
    with pytest.raises(ValueError, match="shard name 't'"):
        plan_shards([str(tmp_path / "*" / "t.tar")])
    (tmp_path / "images.txt").write_text(photos[0])
    with pytest.raises(ValueError, match="shard name 'images-00000'"):
        plan_shards([str(tmp_path / "images.txt"), photos[1]])
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards([photos[0]], shard_size=0)
    for missing in ("gone.jpg", "gone.txt", "gone.parquet", "gone.tar", "nowhere/*.tar"):
        with pytest.raises(FileNotFoundError):
            plan_shards([str(tmp_path / missing)])


def test_shard_json_round_trip_and_fingerprint(tmp_path: Path, photos: list[str]) -> None:
    tar = write_tar(tmp_path / "t.tar", [("0.jpg", jpeg(0))])
    table = write_parquet(tmp_path / "p.parquet", path=["a.jpg", "b.jpg"])
    planned = plan_shards([photos[0], photos[1], str(tar), str(table)], shard_size=1)
    assert {s.kind for s in planned} == {"files", "tar", "parquet"}
    for shard in planned:
        again = Shard.from_json(shard.to_json())
        assert again == shard and again.fingerprint() == shard.fingerprint()
    files, other = planned[-2], Shard("images-00000", "files", "", (photos[2],))
    assert files.name == other.name and files.fingerprint() != other.fingerprint()
    tar_shard, table_shard = planned[0], planned[1]
    before = (tar_shard.fingerprint(), table_shard.fingerprint())
    write_tar(tar, [("0.jpg", jpeg(0)), ("1.jpg", jpeg(1) * 20)])  # same name, more data
    write_parquet(table, path=["a.jpg", "a much longer path than before.jpg"])
    assert tar_shard.fingerprint() != before[0]
    assert table_shard.fingerprint() != before[1]


# ---- reading and decoding -------------------------------------------------------------------


def test_chunks_of_files_keep_order_and_report_bad_images(photos: list[str]) -> None:
    shard = Shard("s", "files", "", tuple(photos))
    chunks = chunks_of(shard, batch_size=3)
    assert [(c.shard, c.number, c.last) for c in chunks] == [
        ("s", 0, False),
        ("s", 1, False),
        ("s", 2, False),
        ("s", 3, True),
    ]
    assert [len(c.ids) + len(c.failed) for c in chunks] == [3, 3, 3, 1]
    bad = [p for p in photos if os.path.basename(p) in ("f.jpg", "g.jpg")]
    ids, pixels, failed = joined(chunks)
    assert failed == bad and ids == [p for p in photos if p not in bad]
    assert all(
        reason.startswith(("OSError", "Unidentified")) for c in chunks for _, reason in c.failed
    )
    assert all(c.pixels.shape == (len(c.ids), 3, R, R) for c in chunks)
    assert torch.equal(pixels, torch.stack([decoded(p) for p in ids]))


def test_empty_and_unreadable_shards_never_raise(tmp_path: Path) -> None:
    (chunk,) = chunks_of(Shard("e", "files"))
    assert (chunk.number, chunk.last, chunk.ids, chunk.failed) == (0, True, [], [])
    assert chunk.pixels.numel() == 0
    missing = (str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))
    (chunk,) = chunks_of(Shard("m", "files", "", missing), batch_size=2)
    assert chunk.last and chunk.ids == [] and [k for k, _ in chunk.failed] == list(missing)
    assert chunk.pixels.numel() == 0


def test_webdataset_tar_keys_first_image_and_skips(tmp_path: Path) -> None:
    first, dup, second = jpeg(1), jpeg(2), jpeg(3, 40, 20)
    tar = write_tar(
        tmp_path / "wds.tar",
        [
            ("sub/", b""),
            ("sub/000123.jpg", first),
            ("sub/000123.txt", b"a caption"),
            ("sub/000123.png", dup),  # a second image of the same sample: ignored
            ("000124.json", b"{}"),  # no image: no sample
            ("000125.seg.JPG", second),  # key up to the basename's first dot; case-blind ext
            ("000126.jpg", b"not a jpeg"),
        ],
    )
    chunks = chunks_of(Shard("wds", "tar", str(tar)), batch_size=2)
    assert [(c.number, c.last) for c in chunks] == [(0, False), (1, True)]
    ids, pixels, failed = joined(chunks)
    assert ids == ["sub/000123", "000125"] and failed == ["000126"]
    assert torch.equal(
        pixels, torch.stack([decoded(io.BytesIO(first)), decoded(io.BytesIO(second))])
    )


def damaged_tar(tmp_path: Path, damage: str) -> Path:
    """A four-sample tar (000..003) cut inside sample 002, just before it, or gzipped and halved."""
    whole = write_tar(tmp_path / "whole.tar", [(f"{i:03d}.jpg", jpeg(i)) for i in range(4)])
    with tarfile.open(whole) as tar:
        third = tar.getmembers()[2].offset  # its 512-byte header, then about 1 KB of JPEG
    data = whole.read_bytes()
    if damage == "gzip-halved":
        packed = gzip.compress(data)
        (tmp_path / "t.tar.gz").write_bytes(packed[: len(packed) // 2])
        return tmp_path / "t.tar.gz"
    (tmp_path / "t.tar").write_bytes(data[: third + 700 if damage == "mid-member" else third])
    return tmp_path / "t.tar"


@pytest.mark.parametrize("damage", ["mid-member", "member-boundary", "gzip-halved"])
def test_truncated_tar_ends_the_shard_with_a_failure(tmp_path: Path, damage: str) -> None:
    path = damaged_tar(tmp_path, damage)
    chunks = chunks_of(Shard("t", "tar", str(path)), batch_size=3)
    assert chunks[-1].last and [c.number for c in chunks] == list(range(len(chunks)))
    ids, pixels, failed = joined(chunks)
    assert failed == [str(path)]  # the shard's own entry, after what could be read
    assert chunks[-1].failed[-1][1].startswith("ReadError")
    if damage == "gzip-halved":
        assert ids == ["000", "001", "002"][: len(ids)]
    else:
        assert ids == ["000", "001"]
    assert pixels.shape[0] == len(ids)


def test_parquet_paths_are_relative_to_the_file(tmp_path: Path, photos: list[str]) -> None:
    meta = tmp_path / "meta"
    rows = [os.path.relpath(p, meta) for p in photos[:5]]
    table = write_parquet(meta / "m.parquet", path=[*rows, None])
    planned = plan_shards([str(table)], shard_size=4)
    second = chunks_of(planned[1])
    assert [c.ids for c in second] == [[rows[4]]]
    assert [(k, r.split(":")[0]) for c in second for k, r in c.failed] == [
        ("", "FileNotFoundError")
    ]
    ids, pixels, _ = joined(chunks_of(planned[0]))
    assert ids == rows[:4]  # ids as written in the table
    assert torch.equal(pixels, torch.stack([decoded(p) for p in photos[:4]]))


def test_parquet_shards_read_the_right_rows_across_row_groups(tmp_path: Path) -> None:
    rows = [f"img{i:02d}.jpg" for i in range(23)]
    table = tmp_path / "many.parquet"
    pq.write_table(pa.table({"path": rows}), table, row_group_size=5)
    assert pq.ParquetFile(table).num_row_groups == 5
    planned = plan_shards([str(table)], shard_size=7)
    got = [[k for k, _ in shards.iter_items(s)] for s in planned]
    assert got == [rows[i : i + 7] for i in range(0, 23, 7)]


def test_parquet_urls_over_http(tmp_path: Path, photos: list[str]) -> None:
    with FlakyServer() as server:
        server.files["/a.jpg"] = Path(photos[0]).read_bytes()
        server.files["/b.png"] = Path(photos[1]).read_bytes()
        urls = [f"{server.url}/a.jpg", f"{server.url}/gone.jpg", f"{server.url}/b.png"]
        table = write_parquet(tmp_path / "u.parquet", url=urls)
        (shard,) = plan_shards([str(table)])
        chunks = chunks_of(shard, batch_size=2)
    ids, pixels, _ = joined(chunks)
    assert ids == [urls[0], urls[2]]
    ((url, reason),) = [f for c in chunks for f in c.failed]
    assert url == urls[1] and reason.startswith("FetchError: permanent: HTTP 404")
    assert torch.equal(pixels, torch.stack([decoded(photos[0]), decoded(photos[1])]))


def test_url_fetches_of_a_chunk_overlap(tmp_path: Path, photos: list[str]) -> None:
    """Three URLs answer only once all three requests are in: fetched one by one, all fail."""
    body = Path(photos[0]).read_bytes()
    everyone_in = threading.Barrier(3, timeout=10)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                everyone_in.wait()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except threading.BrokenBarrierError:
                self.send_error(503)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{httpd.server_address[1]}/{i}.jpg" for i in range(3)]
        (shard,) = plan_shards([str(write_parquet(tmp_path / "u.parquet", url=urls))])
        (chunk,) = chunks_of(shard, batch_size=3)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert chunk.failed == [] and chunk.ids == urls


# ---- assembling and writing -----------------------------------------------------------------


def test_assembler_orders_chunks_and_keeps_each_once() -> None:
    assembler = ShardAssembler(width=2)
    rows = {i: torch.full((2, 2), float(i)) for i in range(3)}

    def add(shard: str, index: int, value: Optional[torch.Tensor] = None) -> object:
        ids = [f"{shard}{index}a", f"{shard}{index}b"]
        embeddings = rows[index] if value is None else value
        return assembler.add(shard, index, index == 2, ids, embeddings, [(f"{shard}{index}", "x")])

    assert add("s", 2) is None and assembler.open_shards == ["s"]
    assert add("t", 1) is None and add("s", 0, torch.zeros(2, 2) - 1) is None
    assert assembler.open_shards == ["s", "t"]
    assert add("s", 0) is None  # a retried chunk replaces its first copy
    done = add("s", 1)
    assert isinstance(done, shards.FinishedShard) and done.name == "s"
    assert done.ids == ["s0a", "s0b", "s1a", "s1b", "s2a", "s2b"]
    assert torch.equal(done.embeddings, torch.cat([rows[0], rows[1], rows[2]]))
    assert done.failed == [("s0", "x"), ("s1", "x"), ("s2", "x")]
    assert assembler.open_shards == ["t"]
    assert add("s", 1) is None and assembler.open_shards == ["t"]  # late duplicate: ignored
    empty = assembler.add("e", 0, True, [], torch.empty(0), [("e.tar", "ReadError")])
    assert empty is not None and empty.embeddings.shape == (0, 2)


def test_write_read_and_finished(tmp_path: Path) -> None:
    shard = Shard("part", "files", "", ("a", "b", "c", "d"))
    embeddings = torch.randn(3, 5)
    result = shards.FinishedShard("part", ["a", "b", "d"], embeddings, [("c", "OSError: bad")])
    out = str(tmp_path / "out")
    assert not finished(out, shard, META)
    for dtype, arrow_type in ((torch.float16, pa.float16()), (torch.float32, pa.float32())):
        stats = shards.write_shard(out, shard, result, META, dtype)
        assert sorted(os.listdir(out)) == ["part.parquet", "part.stats.json"]  # no temp files
        assert json.loads((tmp_path / "out" / "part.stats.json").read_text()) == stats
        assert stats == {
            "shard": "part",
            "fingerprint": shard.fingerprint(),
            **META,
            "embedded": 3,
            "failed": 1,
            "failures": [{"id": "c", "reason": "OSError: bad"}],
        }
        assert (
            pq.read_schema(f"{out}/part.parquet").field("embedding").type.value_type == arrow_type
        )
        ids, back = read_shard(f"{out}/part.parquet")
        assert ids == ["a", "b", "d"] and back.dtype == torch.float32
        assert torch.equal(back, embeddings.to(dtype).float())
    assert not torch.equal(embeddings.half().float(), embeddings)  # the fp16 check had teeth
    assert finished(out, shard, META)
    for key in ("model", "dtype"):
        with pytest.raises(ValueError, match=f"other {key} \\({key}="):
            finished(out, shard, {**META, key: "other"})
    with pytest.raises(ValueError, match="other fingerprint"):
        finished(out, Shard("part", "files", "", ("a", "b")), META)
    (tmp_path / "out" / "part.stats.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert not finished(out, shard, META)  # redone, not trusted
    (tmp_path / "out" / "part.stats.json").unlink()
    with pytest.warns(UserWarning, match="unreadable"):
        assert not finished(out, shard, META)
    shards.write_shard(out, shard, result, META, torch.float32)
    (tmp_path / "out" / "part.parquet").unlink()  # stats alone: the shard is not done
    assert not finished(out, shard, META)


def test_empty_shard_writes_and_reads_back(tmp_path: Path) -> None:
    shard = Shard("e", "files", "", ("gone.jpg",))
    result = shards.FinishedShard("e", [], torch.empty(0, 4), [("gone.jpg", "OSError")])
    shards.write_shard(str(tmp_path), shard, result, META, torch.float16)
    ids, back = read_shard(str(tmp_path / "e.parquet"))
    assert ids == [] and back.shape == (0, 4)


# ---- embed_dataset, ranks (no Ray) ----------------------------------------------------------


def outputs(out: Path) -> dict[str, tuple[list[str], torch.Tensor]]:
    return {p.stem: read_shard(str(p)) for p in sorted(out.glob("*.parquet"))}


def concat(found: dict[str, tuple[list[str], torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    parts = [found[name] for name in sorted(found)]
    return [k for ids, _ in parts for k in ids], torch.cat([e for _, e in parts])


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_equal_embed_images_bit_for_bit(
    tmp_path: Path, photos: list[str], vit_model: torch.nn.Module, vit_file: str, workers: int
) -> None:
    folder = os.path.dirname(photos[0])
    summary = embed_dataset(
        [folder], tmp_path, model=vit_file, batch_size=2, shard_size=4, workers=workers
    )
    assert summary.shards == 3 and summary.skipped == []
    assert sorted(summary.written) == ["images-00000", "images-00001", "images-00002"]
    assert (summary.embedded, summary.failed) == (8, 2)
    expected = embed_images(vit_model, photos, batch_size=2)
    ids, embeddings = concat(outputs(tmp_path))
    assert ids == expected.paths
    assert torch.equal(embeddings, expected.embeddings)
    stats = json.loads((tmp_path / "images-00001.stats.json").read_text())
    assert [f["id"] for f in stats["failures"]] == [p for p, _ in expected.failed]
    assert stats["model"] == vit_file and stats["dtype"] == "float32"


def test_two_ranks_split_the_shards_and_reruns_skip(
    tmp_path: Path, photos: list[str], vit_file: str
) -> None:
    folder, one, two = os.path.dirname(photos[0]), tmp_path / "one", tmp_path / "two"
    job = {"model": vit_file, "batch_size": 2, "shard_size": 2, "workers": 0}
    single = embed_dataset([folder], one, **job)
    ranks = [embed_dataset([folder], two, rank=r, world_size=2, **job) for r in (0, 1)]
    assert [s.shards for s in ranks] == [3, 2]
    written = [name for s in ranks for name in s.written]
    assert sorted(written) == sorted(single.written) and len(set(written)) == 5
    assert set(ranks[0].written).isdisjoint(ranks[1].written)
    mine, theirs = outputs(one), outputs(two)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name][0] == theirs[name][0] and torch.equal(mine[name][1], theirs[name][1])
    stamps = {p.name: p.stat().st_mtime_ns for p in two.iterdir()}
    again = embed_dataset([folder], two, **job)
    assert again.written == [] and sorted(again.skipped) == sorted(single.written)
    assert (again.embedded, again.failed) == (0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in two.iterdir()} == stamps


def test_rank_and_world_are_checked(
    tmp_path: Path, photos: list[str], vit_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank"):
            embed_dataset(photos, tmp_path, model=vit_file, rank=rank, world_size=world)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="rank 1, world_size 1"):
        embed_dataset(photos, tmp_path, model=vit_file)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_float16_output_and_dtype_mismatch(
    tmp_path: Path, photos: list[str], vit_model: torch.nn.Module, vit_file: str
) -> None:
    summary = embed_dataset(
        photos[:4], tmp_path, model=vit_file, batch_size=2, shard_size=4, dtype="float16"
    )
    assert summary.written == ["images-00000"]
    schema = pq.read_schema(tmp_path / "images-00000.parquet")
    assert schema.field("embedding").type.value_type == pa.float16()
    ids, embeddings = read_shard(str(tmp_path / "images-00000.parquet"))
    expected = embed_images(vit_model, photos[:4], batch_size=2)
    assert ids == expected.paths
    assert torch.equal(embeddings, expected.embeddings.half().float())
    with pytest.raises(ValueError, match="dtype: recorded 'float16', this run 'float32'"):
        embed_dataset(photos[:4], tmp_path, model=vit_file, batch_size=2, shard_size=4)


def test_tar_and_parquet_inputs_end_to_end(
    tmp_path: Path, photos: list[str], vit_model: torch.nn.Module, vit_file: str
) -> None:
    good = [p for p in photos if os.path.basename(p) not in ("f.jpg", "g.jpg")]
    folder = tmp_path / "in"
    rows = [os.path.relpath(p, folder) for p in good]
    table = write_parquet(folder / "table.parquet", path=rows)
    samples = [
        (f"000{i}{os.path.splitext(p)[1]}", Path(p).read_bytes()) for i, p in enumerate(good)
    ]
    tar = write_tar(folder / "wds.tar", samples[:3])  # 0000.jpg, 0001.png, 0002.png
    out = tmp_path / "out"
    summary = embed_dataset([str(tar), str(table)], out, model=vit_file, batch_size=3, shard_size=6)
    assert sorted(summary.written) == ["table-00000", "table-00001", "wds"]
    found = outputs(out)
    assert found["wds"][0] == ["0000", "0001", "0002"]
    assert torch.equal(found["wds"][1], embed_images(vit_model, good[:3], batch_size=3).embeddings)
    assert found["table-00000"][0] + found["table-00001"][0] == rows
    expected = embed_images(vit_model, good, batch_size=3).embeddings
    assert torch.equal(torch.cat([found["table-00000"][1], found["table-00001"][1]]), expected)


# ---- hardening: every input planned, crash safety, recorded plans, reruns ------------------


def test_plan_takes_every_input_in_a_mixed_folder_any_case(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(smooth_image(20, 30)).save(mixed / "A.JPG")
    Image.fromarray(smooth_image(20, 30, 1)).save(mixed / "b.png")
    write_tar(mixed / "C.TAR", [("0.jpg", jpeg(0))])
    write_parquet(mixed / "rows.parquet", path=["A.JPG"])
    planned = plan_shards(str(mixed), shard_size=10)  # one str: one input
    assert [(s.name, s.kind) for s in planned] == [
        ("C", "tar"),
        ("rows-00000", "parquet"),
        ("images-00000", "files"),
    ]
    assert planned[2].members == (str(mixed / "A.JPG"), str(mixed / "b.png"))
    assert [s.name for s in plan_shards(str(mixed / "*"), 10)] == [s.name for s in planned]


def test_plan_refuses_files_it_cannot_read_by_name(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.md").write_text("not an input")
    with pytest.raises(ValueError, match=r"notes\.md.*glob that matches only inputs"):
        plan_shards([tmp_path])
    assert [len(s.members) for s in plan_shards([str(tmp_path / "*.jpg")])] == [1]


def test_find_images_refuses_shard_files_instead_of_dropping_them(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    write_tar(tmp_path / "more.tar", [("0.jpg", jpeg(0))])
    with pytest.raises(ValueError, match=r"more\.tar.*embed_dataset"):
        find_images(tmp_path)


def test_outputs_are_fsynced_files_and_folder(tmp_path: Path, fsynced: list[str]) -> None:
    synced = fsynced
    shard = Shard("part", "files", "", ("a",))
    result = shards.FinishedShard("part", ["a"], torch.randn(1, 4), [])
    shards.write_shard(str(tmp_path), shard, result, META, torch.float32)
    assert any("part.parquet" in p for p in synced)  # the data, before its rename
    assert any("part.stats.json" in p for p in synced)
    assert str(tmp_path) in synced  # the renames themselves


@pytest.mark.parametrize("damage", ["empty", "corrupt", "fewer rows"])
def test_damaged_parquet_is_redone_not_trusted(tmp_path: Path, damage: str) -> None:
    shard = Shard("part", "files", "", ("a", "b"))
    result = shards.FinishedShard("part", ["a", "b"], torch.randn(2, 4), [])
    shards.write_shard(str(tmp_path), shard, result, META, torch.float32)
    assert finished(str(tmp_path), shard, META)
    target = tmp_path / "part.parquet"
    if damage == "empty":  # what a power loss before the data reached the disk leaves
        target.write_bytes(b"")
    elif damage == "corrupt":
        target.write_bytes(target.read_bytes()[:-20])
    else:
        pq.write_table(pa.table({"id": ["a"], "embedding": [[0.0] * 4]}), target)
    with pytest.warns(UserWarning, match="redoing shard part"):
        assert not finished(str(tmp_path), shard, META)


def test_skipping_finished_shards_reads_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linear, not quadratic: one folder listing, one stats read and one footer per shard."""
    from clip.data import fs, resume

    planned = [Shard(f"s{i:04d}", "files", "", (f"{i}.jpg",)) for i in range(300)]
    for shard in planned:
        result = shards.FinishedShard(shard.name, [shard.members[0]], torch.zeros(1, 2), [])
        shards.write_shard(str(tmp_path), shard, result, META, torch.float32)
    calls = {"glob": 0, "read_bytes": 0, "footer": 0}

    def counted(name: str, fn: object) -> object:
        def wrapper(*args: object, **kw: object) -> object:
            calls[name] += 1
            return fn(*args, **kw)  # type: ignore[operator]

        return wrapper

    monkeypatch.setattr(fs, "glob", counted("glob", fs.glob))
    monkeypatch.setattr(fs, "read_bytes", counted("read_bytes", fs.read_bytes))
    monkeypatch.setattr(resume, "parquet_row_count", counted("footer", resume.parquet_row_count))
    todo, done = resume.pending(str(tmp_path), planned, META)
    assert todo == [] and len(done) == 300
    assert calls == {"glob": 1, "read_bytes": 300, "footer": 300}


def test_shard_size_change_is_refused_by_the_recorded_plan(
    tmp_path: Path, photos: list[str], vit_file: str
) -> None:
    folder = os.path.dirname(photos[0])
    embed_dataset(folder, tmp_path, model=vit_file, shard_size=4, workers=0)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["settings"]["shard_size"] == 4 and len(plan["shards"]) == 3
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"shard_size: recorded 4, this run 5.*--shard-size"):
        embed_dataset(folder, tmp_path, model=vit_file, shard_size=5, workers=0)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written twice


def test_precision_and_model_are_recorded_and_checked(
    tmp_path: Path, photos: list[str], vit_file: str
) -> None:
    from checkpoints import TINY, make_state_dict

    embed_dataset(photos[:2], tmp_path, model=vit_file, shard_size=4, workers=0)
    stats = json.loads((tmp_path / "images-00000.stats.json").read_text())
    assert stats["precision"] == "float32" and stats["model_digest"].startswith("sha256:")
    with pytest.raises(ValueError, match=r"precision: recorded 'float32', this run 'bfloat16'"):
        embed_dataset(photos[:2], tmp_path, model=vit_file, precision="bfloat16", workers=0)
    other = tmp_path.parent / f"{tmp_path.name}-other.pt"  # same width, other weights
    torch.save(make_state_dict(TINY["tiny-vit"], salt=1), other)
    with pytest.raises(ValueError, match=r"model_digest: recorded 'sha256:.*--model"):
        embed_dataset(photos[:2], tmp_path, model=str(other), shard_size=4, workers=0)


def test_retry_failed_merges_rows_that_now_succeed(
    tmp_path: Path, photos: list[str], vit_model: torch.nn.Module, vit_file: str
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [p for p in photos if os.path.basename(p) not in ("f.jpg", "g.jpg")][:4]
    late = inputs / "late.jpg"
    (inputs / "list.txt").write_text("\n".join([*good[:2], str(late), *good[2:]]))
    out = tmp_path / "out"
    first = embed_dataset(str(inputs / "list.txt"), out, model=vit_file, batch_size=2, workers=0)
    assert (first.embedded, first.failed) == (4, 1)
    Image.fromarray(smooth_image(40, 40, 7)).save(late)  # the missing file arrives
    again = embed_dataset(inputs / "list.txt", out, model=vit_file, batch_size=2, workers=0)
    assert again.retried == [] and again.embedded == 0  # a plain rerun leaves failures alone
    retry = embed_dataset(
        inputs / "list.txt", out, model=vit_file, batch_size=2, workers=0, retry_failed=True
    )
    assert retry.retried == ["list-00000"] and (retry.embedded, retry.failed) == (1, 0)
    ids, embeddings = read_shard(str(out / "list-00000.parquet"))
    assert ids == [*good, str(late)]  # each input once
    expected = embed_images(vit_model, ids, batch_size=1).embeddings
    assert (embeddings - expected).abs().max() < 1e-5
    stats = json.loads((out / "list-00000.stats.json").read_text())
    assert (stats["embedded"], stats["failed"], stats["failures"]) == (5, 0, [])
    assert finished(str(out), plan_shards(inputs / "list.txt")[0], {
        k: stats[k] for k in ("model_digest", "precision", "dtype", "decode")
    })  # fmt: skip


def test_weights_digest_tells_same_width_models_apart(vit_file: str, tmp_path: Path) -> None:
    from checkpoints import TINY, make_state_dict

    import clip
    from clip.data.resume import model_digest, weights_digest

    one, _ = clip.load(vit_file, device="cpu")
    again, _ = clip.load(vit_file, device="cpu")
    other_file = tmp_path / "other.pt"
    torch.save(make_state_dict(TINY["tiny-vit"], salt=1), other_file)
    other, _ = clip.load(str(other_file), device="cpu")
    assert weights_digest(one) == weights_digest(again) != weights_digest(other)
    assert model_digest(vit_file) != model_digest(str(other_file))
    assert model_digest(vit_file).startswith("sha256:")  # type: ignore[union-attr]
    from clip.download import MODELS

    sha = MODELS["ViT-B/32"].split("/")[-2]  # a released name: its URL's SHA256, nothing read
    assert model_digest("ViT-B/32") == f"sha256:{sha}"
