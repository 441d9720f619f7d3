"""clip.data.pairs: image–caption pairs from CSV/TSV/Parquet tables and webdataset tar shards."""

from __future__ import annotations

import csv
import io
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import smooth_image
from torch.utils.data import DataLoader

from clip.data.pairs import ImageRefs, PairsDataset, TarMember, read_pairs
from clip.preprocess import transform_uint8

RES = 16
CAPTIONS = [
    "a cat, sitting",  # the delimiter inside a caption
    'a "quoted" dog',
    "two lines\nof caption",
    "plain",
]


def png_bytes(seed: int, size: tuple[int, int] = (20, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(size[1], size[0], seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.{'PNG' if i % 2 else 'jpg'}"
        Image.fromarray(smooth_image(20 + i, 24, i)).save(path, format="PNG" if i % 2 else "JPEG")
        paths.append(path)
    return paths


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pixels_of(path: Path) -> torch.Tensor:
    return transform_uint8(RES)(Image.open(path))


@pytest.fixture
def table_dir(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A folder with images in a sub-folder and a CSV naming them relative to the folder."""
    images = write_images(tmp_path / "data" / "imgs")
    rows = [["filepath", "title", "extra"]]
    rows += [[f"imgs/{p.name}", c, "x"] for p, c in zip(images, CAPTIONS)]
    write_csv(tmp_path / "data" / "pairs.csv", rows)
    return tmp_path / "data", images


def test_csv_reads_quoted_captions_and_resolves_paths_from_the_tables_folder(
    table_dir: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, images = table_dir
    monkeypatch.chdir(tmp_path)  # not the table's folder
    for given in (folder / "pairs.csv", str(folder / "pairs.csv"), [folder / "pairs.csv"]):
        pairs = read_pairs(given)
        assert pairs.captions == CAPTIONS
        assert pairs.images == [str(p) for p in images]
        assert pairs.image_of == [0, 1, 2, 3]
        assert len(pairs) == 4


def test_tsv_and_uppercase_extensions(table_dir: tuple[Path, list[Path]]) -> None:
    folder, images = table_dir
    rows = [["title", "filepath"]] + [[c, f"imgs/{p.name}"] for p, c in zip(images, CAPTIONS)]
    write_csv(folder / "pairs.TSV", rows, delimiter="\t")
    pairs = read_pairs(folder / "pairs.TSV")
    assert pairs.captions == CAPTIONS
    assert pairs.images == [str(p) for p in images]


def test_parquet_with_custom_columns(table_dir: tuple[Path, list[Path]]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder, images = table_dir
    table = pa.table({"img": [f"imgs/{p.name}" for p in images], "text": CAPTIONS})
    pq.write_table(table, folder / "pairs.PARQUET")
    pairs = read_pairs(str(folder / "pairs.PARQUET"), image_column="img", caption_column="text")
    assert pairs.captions == CAPTIONS
    assert pairs.images == [str(p) for p in images]
    with pytest.raises(ValueError, match=r"no column 'filepath' and 'title'.*'img', 'text'"):
        read_pairs(folder / "pairs.PARQUET")


def test_missing_columns_are_named_with_the_columns_found(
    table_dir: tuple[Path, list[Path]],
) -> None:
    folder, _ = table_dir
    with pytest.raises(ValueError, match=r"no column 'caption'.*'filepath', 'title', 'extra'"):
        read_pairs(folder / "pairs.csv", caption_column="caption")


def test_an_image_on_several_rows_is_one_image_with_several_captions(tmp_path: Path) -> None:
    images = write_images(tmp_path, 2)
    rows = [["filepath", "title"], [images[0].name, "a"], [images[1].name, "b"]]
    rows += [[f"./{images[0].name}", "c"]]  # another spelling of the same file
    write_csv(tmp_path / "p.csv", rows)
    pairs = read_pairs(tmp_path / "p.csv")
    assert pairs.images == [str(images[0]), str(images[1])]
    assert pairs.captions == ["a", "b", "c"]
    assert pairs.image_of == [0, 1, 0]


def test_bad_tables_are_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "blank.csv", [["filepath", "title"], ["", "a caption"]])
    with pytest.raises(ValueError, match="row 1 has no image path"):
        read_pairs(tmp_path / "blank.csv")
    write_csv(tmp_path / "short.csv", [["filepath", "title"], ["a.jpg"]])
    with pytest.raises(ValueError, match="record 2 has 1 fields"):
        read_pairs(tmp_path / "short.csv")
    write_csv(tmp_path / "none.csv", [["filepath", "title"]])
    with pytest.raises(ValueError, match="no image–caption pairs"):
        read_pairs(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_pairs(tmp_path / "empty.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_pairs(tmp_path / "missing.csv")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a pairs file"):
        read_pairs(tmp_path / "notes.txt")
    with tarfile.open(tmp_path / "shard.tar.gz", "w:gz") as tar:
        add_member(tar, "0.txt", b"x")
    with pytest.raises(ValueError, match=r"compressed.*gunzip"):
        read_pairs(tmp_path / "shard.tar.gz")


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Two shards: complete samples of several image types and cases, and incomplete ones."""
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "a.tar", "w") as tar:
        add_member(tar, "s/000.JPG", png_bytes(0))  # any case; the decoder reads the bytes
        add_member(tar, "s/000.TXT", b"first caption\n")
        add_member(tar, "s/000.json", b"{}")  # other parts of a sample are not read
        add_member(tar, "s/001.txt", b"caption without an image")
        add_member(tar, "s/002.webp", png_bytes(2))
        add_member(tar, "s/003.png", png_bytes(3))
        add_member(tar, "s/003.txt", "third, ünïcode".encode())
    with tarfile.open(folder / "b.TAR", "w") as tar:
        add_member(tar, "004.txt", b"fourth")  # the caption first
        add_member(tar, "004.jpeg", png_bytes(4))
    (folder / "b.stats.json").write_text("{}")  # beside the shards, not a shard
    return folder


def test_tar_shards_pair_image_and_caption_per_key_and_count_incomplete_samples(
    shards: Path,
) -> None:
    with pytest.warns(UserWarning, match=r"skipped 2 tar samples"):
        pairs = read_pairs(shards)  # a folder: its tars, sorted
    assert pairs.captions == ["first caption", "third, ünïcode", "fourth"]
    keys = [(Path(m.tar).name, m.key) for m in pairs.images if isinstance(m, TarMember)]
    assert keys == [("a.tar", "s/000"), ("a.tar", "s/003"), ("b.TAR", "004")]
    assert sorted(why for _, why in pairs.skipped) == ["no caption (.txt)", "no image"]
    # a glob, a list and a single shard name the same samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_pairs(str(shards / "*.[tT][aA][rR]")).captions == pairs.captions
        assert read_pairs([shards / "a.tar", shards / "b.TAR"]).captions == pairs.captions
    assert read_pairs(shards / "b.TAR").captions == ["fourth"]
    # the member read by seeking is the image written
    dataset = PairsDataset(pairs, transform_uint8(RES))
    expected = transform_uint8(RES)(Image.open(io.BytesIO(png_bytes(3))))
    assert torch.equal(dataset[1][0], expected)


def test_a_folder_without_shards_is_refused(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 1)
    with pytest.raises(FileNotFoundError, match=r"holds no \.tar shards"):
        read_pairs(tmp_path / "imgs")
    with pytest.raises(FileNotFoundError, match=r"holds no \.tar shards"):
        read_pairs(str(tmp_path / "imgs" / "*"))


def test_a_glob_reads_the_tables_it_matches(table_dir: tuple[Path, list[Path]]) -> None:
    folder, _ = table_dir
    write_csv(folder / "more.csv", [["filepath", "title"], ["imgs/img0.jpg", "again"]])
    pairs = read_pairs(str(folder / "*.csv"))  # more.csv, then pairs.csv
    assert pairs.captions == ["again", *CAPTIONS]
    assert pairs.image_of == [0, 0, 1, 2, 3]


def test_dataset_yields_pixels_caption_index_in_order(table_dir: tuple[Path, list[Path]]) -> None:
    folder, images = table_dir
    dataset = PairsDataset(folder / "pairs.csv", transform_uint8(RES))
    assert len(dataset) == 4
    for i, (pixels, caption, index) in enumerate(dataset):
        assert index == i and caption == CAPTIONS[i]
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, pixels_of(images[i]))
    assert dataset[-1][2] == 3
    with pytest.raises(IndexError):
        dataset[4]


def test_unreadable_images_are_replaced_by_the_next_pair_so_batches_stay_full(
    table_dir: tuple[Path, list[Path]],
) -> None:
    folder, images = table_dir
    images[1].write_bytes(b"not an image")
    os.remove(images[3])
    dataset = PairsDataset(folder / "pairs.csv", transform_uint8(RES))
    with pytest.warns(UserWarning, match="img1.PNG: UnidentifiedImageError"):
        assert dataset[1][1:] == (CAPTIONS[2], 2)
    with pytest.warns(UserWarning, match="img3.PNG: FileNotFoundError"):
        assert dataset[3][1:] == (CAPTIONS[0], 0)  # wraps around
    assert set(dataset.failed) == {1, 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known failure is not decoded or warned about again
        assert dataset[1][2] == 2
    loader = DataLoader(dataset, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [2, 2]
    assert [b[2].tolist() for b in batches] == [[0, 2], [2, 0]]
    # evaluation sees the failures instead of replacements
    refs = ImageRefs(dataset.pairs.images, transform_uint8(RES))
    assert [refs[i][2] is None for i in range(4)] == [True, False, True, False]
    assert "FileNotFoundError" in (refs[3][2] or "")


def test_a_dataset_of_unreadable_images_raises(tmp_path: Path) -> None:
    write_csv(tmp_path / "p.csv", [["filepath", "title"], ["gone.jpg", "a"], ["gone2.jpg", "b"]])
    dataset = PairsDataset(tmp_path / "p.csv", transform_uint8(RES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"none of the 2 images.*gone"):
            dataset[0]


def test_a_truncated_shard_is_a_failure_of_its_images(shards: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = read_pairs(shards / "a.tar")
    data = (shards / "a.tar").read_bytes()
    member = pairs.images[1]
    assert isinstance(member, TarMember)
    (shards / "a.tar").write_bytes(data[: member.offset + 10])
    refs = ImageRefs(pairs.images, transform_uint8(RES))
    assert refs[0][1] is not None  # before the cut
    assert "ends inside s/003" in (refs[1][2] or "")


def test_dataset_pickles_and_loads_in_worker_processes(shards: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = PairsDataset(str(shards), transform_uint8(RES))
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.pairs == dataset.pairs
    batches = list(DataLoader(dataset, batch_size=2, num_workers=1))
    assert [list(b[1]) for b in batches] == [["first caption", "third, ünïcode"], ["fourth"]]
    assert torch.equal(batches[0][0][1], dataset[1][0])
    assert np.array_equal(batches[1][2].numpy(), [2])
