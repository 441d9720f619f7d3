"""clip.pipeline: files to normalised embeddings, against the plain loop it replaces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import clip.data.extract
from clip.data.embed import decode_workers
from clip.data.extract import image_features
from clip.pipeline import (
    embed_images,
    embed_texts,
    find_images,
    iter_image_batches,
    load_embeddings,
    load_image,
    rows_file,
    save_embeddings,
)
from clip.preprocess import transform


@pytest.fixture(scope="module")
def vit(tiny_files: dict[str, dict[str, Path]]) -> torch.nn.Module:
    model, _ = clip.load(tiny_files["tiny-vit"]["state_dict"], device="cpu")
    return model


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: a few low-frequency waves per channel, uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        waves = [
            np.sin(
                2 * np.pi * (rng.uniform(0.5, 4) * x + rng.uniform(0.5, 4) * y) + rng.uniform(0, 6)
            )
            for _ in range(3)
        ]
        channels.append(sum(waves))
    a = np.stack(channels, -1)
    return ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


def write_images(folder: Path) -> dict[str, Path]:
    """Readable images of several kinds, plus a corrupt JPEG and a truncated one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    files = {
        "jpeg": folder / "a.jpg",
        "alpha": folder / "b.png",
        "gray": folder / "c.png",
        "palette": folder / "d.gif",
        "tall": folder / "e.JPEG",
        "corrupt": folder / "f.jpg",
        "truncated": folder / "g.jpg",
    }
    Image.fromarray(smooth_image(45, 70, 1)).save(files["jpeg"])
    Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)).save(files["alpha"])
    Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8)).save(files["gray"])
    Image.fromarray(smooth_image(33, 37, 2)).convert("P").save(files["palette"])
    Image.fromarray(smooth_image(90, 41, 3)).save(files["tall"])
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    whole = files["jpeg"].read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    return files


def plain_loop(model: torch.nn.Module, paths: list, batch_size: int) -> torch.Tensor:
    """The loop users write: preprocess(Image.open(p)), stack, encode_image, normalise."""
    preprocess = transform(model.visual.input_resolution)
    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = torch.stack(
                [preprocess(Image.open(p)) for p in paths[start : start + batch_size]]
            )
            features = model.encode_image(images)
            rows.append(features / features.norm(dim=-1, keepdim=True))
    return torch.cat(rows)


def test_find_images(tmp_path: Path) -> None:
    files = write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "deep" / "er").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "deep" / "er" / "z.webp")
    webp = str(tmp_path / "imgs" / "deep" / "er" / "z.webp")
    everything = sorted([*map(str, files.values()), webp])
    assert find_images([tmp_path / "imgs"]) == everything
    assert find_images([str(tmp_path / "imgs" / "*.png")]) == [
        str(files["alpha"]),
        str(files["gray"]),
    ]
    assert find_images([str(tmp_path / "**" / "*.webp")]) == [webp]
    # A file named explicitly is kept whatever its extension; duplicates collapse.
    notes = str(tmp_path / "imgs" / "notes.txt")
    assert find_images([notes, files["gray"], files["gray"]]) == sorted([notes, str(files["gray"])])
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_images([tmp_path / "missing.jpg"])
    with pytest.raises(FileNotFoundError, match="no files match"):
        find_images([str(tmp_path / "*.bmp")])


def test_default_path_is_the_plain_loop_bit_for_bit(vit: torch.nn.Module, tmp_path: Path) -> None:
    files = write_images(tmp_path)
    good = [str(files[k]) for k in ("jpeg", "alpha", "gray", "palette", "tall")]
    result = embed_images(vit, good, batch_size=2)
    assert result.paths == good and result.failed == []
    assert result.embeddings.dtype == torch.float32
    assert torch.equal(result.embeddings, plain_loop(vit, good, batch_size=2))
    norms = result.embeddings.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_resnet_model_and_explicit_preprocess(tiny_files: dict, tmp_path: Path) -> None:
    model, preprocess = clip.load(tiny_files["tiny-rn"]["archive"], device="cpu")
    files = write_images(tmp_path)
    good = [str(files[k]) for k in ("jpeg", "alpha", "gray")]
    result = embed_images(model, good, preprocess=preprocess, batch_size=3)
    assert torch.equal(result.embeddings, plain_loop(model, good, batch_size=3))


def test_unreadable_files_are_reported_not_fatal(vit: torch.nn.Module, tmp_path: Path) -> None:
    files = write_images(tmp_path)
    paths = [str(p) for p in files.values()]
    result = embed_images(vit, paths, batch_size=3)
    bad = {str(files["corrupt"]), str(files["truncated"])}
    assert [p for p, _ in result.failed] == sorted(bad)
    assert all(
        reason.startswith(("OSError", "UnidentifiedImageError")) for _, reason in result.failed
    )
    good = [p for p in paths if p not in bad]
    assert result.paths == good
    # Failed files drop out of their batch; the survivors match the plain loop one at a time.
    assert_close_rows(result.embeddings, plain_loop(vit, good, batch_size=1))


def assert_close_rows(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-5


def test_workers_give_the_same_result(vit: torch.nn.Module, tmp_path: Path) -> None:
    paths = [str(p) for p in write_images(tmp_path).values()]
    serial = embed_images(vit, paths, batch_size=2, num_workers=0)
    parallel = embed_images(vit, paths, batch_size=2, num_workers=2)
    assert parallel.paths == serial.paths and parallel.failed == serial.failed
    assert torch.equal(parallel.embeddings, serial.embeddings)


@pytest.mark.parametrize(
    ("requested", "items", "batch_size", "started"),
    [(2, 7, 2, 2), (8, 7, 2, 4), (1, 64, 64, 0), (4, 3, 64, 0), (3, 0, 64, 0), (0, 700, 64, 0)],
)
def test_decode_workers_start_at_most_one_per_batch_and_none_for_one_batch(
    requested: int, items: int, batch_size: int, started: int
) -> None:
    assert decode_workers(requested, items, batch_size) == started


@pytest.mark.parametrize("module", [clip.pipeline, clip.data.extract])
def test_a_single_batch_is_decoded_in_this_process(
    vit: torch.nn.Module, tmp_path: Path, module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = module.DataLoader

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "DataLoader", recording)
    paths = [str(p) for p in write_images(tmp_path).values()]
    if module is clip.pipeline:
        one, two = (embed_images(vit, paths, batch_size=b, num_workers=2) for b in (64, 4))
        assert one.paths == two.paths and torch.equal(one.embeddings, two.embeddings)
    else:
        for b in (64, 4):
            image_features(vit, paths, batch_size=b, num_workers=2)
    assert seen == [0, 2]


def test_batches_stream_in_order(vit: torch.nn.Module, tmp_path: Path) -> None:
    paths = [str(p) for p in write_images(tmp_path).values()]
    batches = list(iter_image_batches(vit, paths, batch_size=3))
    assert [len(b.paths) + len(b.failed) for b in batches] == [3, 3, 1]
    assert [p for b in batches for p in b.paths] == embed_images(vit, paths).paths


def test_empty_and_invalid_arguments(vit: torch.nn.Module) -> None:
    result = embed_images(vit, [])
    assert result.embeddings.shape == (0, vit.text_projection.shape[1]) and result.paths == []
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(vit, ["x.jpg"], batch_size=0)


def test_fast_decode_only_for_large_jpegs(vit: torch.nn.Module, tmp_path: Path) -> None:
    res = vit.visual.input_resolution  # 32
    preprocess = transform(res)
    small, large, png = tmp_path / "small.jpg", tmp_path / "large.jpg", tmp_path / "large.png"
    Image.fromarray(smooth_image(int(1.9 * res), 3 * res)).save(small, quality=90)
    Image.fromarray(smooth_image(480, 640)).save(large, quality=90)
    Image.fromarray(smooth_image(480, 640)).save(png)
    for unaffected in (small, png):  # under 2x the input, or not a JPEG: the exact path
        exact = load_image(str(unaffected), preprocess)
        assert torch.equal(load_image(str(unaffected), preprocess, draft_px=res), exact)
    exact, fast = load_image(str(large), preprocess), load_image(str(large), preprocess, res)
    assert not torch.equal(fast, exact)  # it did kick in
    # One grey level is 1/255/std ≈ 0.015 after normalisation: the reduced decode stays within a
    # few levels (max) and about one level on average of decoding in full and resizing.
    deviation = (fast - exact).abs()
    assert deviation.max().item() < 0.1 and deviation.mean().item() < 0.015
    paths = [str(small), str(large), str(png)]
    default, quick = embed_images(vit, paths), embed_images(vit, paths, fast_decode=True)
    assert torch.equal(quick.embeddings[[0, 2]], default.embeddings[[0, 2]])
    cosine = (quick.embeddings[1] @ default.embeddings[1]).item()
    assert 0.99 < cosine < 1


def test_embed_texts(vit: torch.nn.Module) -> None:
    texts = ["a dog", "a photo of a cat on a mat", "x"]
    with torch.no_grad():
        features = vit.encode_text(clip.tokenize(texts))
    expected = features / features.norm(dim=-1, keepdim=True)
    assert torch.equal(embed_texts(vit, texts, batch_size=2), torch.cat([
        embed_texts(vit, texts[:2]), embed_texts(vit, texts[2:])
    ]))  # fmt: skip
    assert_close_rows(embed_texts(vit, texts), expected)
    with pytest.raises(RuntimeError, match="too long"):
        embed_texts(vit, ["word " * 100])


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_save_and_load_embeddings(tmp_path: Path, suffix: str) -> None:
    keys, embeddings = ["a.jpg", "b c.png", "ünï.gif"], torch.randn(3, 5)
    out = tmp_path / f"e{suffix}"
    save_embeddings(out, keys, embeddings)
    loaded_keys, loaded = load_embeddings(out)
    assert loaded_keys == keys and torch.equal(loaded, embeddings)
    if suffix == ".npy":
        assert np.array_equal(np.load(out), embeddings.numpy())
        assert Path(rows_file(out)).read_text(encoding="utf-8") == "a.jpg\nb c.png\nünï.gif\n"
    else:
        table = pytest.importorskip("pyarrow.parquet").read_table(out)
        assert table.column("path").to_pylist() == keys
        assert np.array_equal(np.array(table.column("embedding").to_pylist()), embeddings.numpy())
    assert set(os.listdir(tmp_path)) <= {out.name, Path(rows_file(out)).name}  # no temp files
    with pytest.raises(ValueError, match=r"\.npy or \.parquet"):
        save_embeddings(tmp_path / "e.csv", keys, embeddings)


def test_npy_rows_file_longer_than_array_is_tolerated(tmp_path: Path) -> None:
    out = tmp_path / "e.npy"
    save_embeddings(out, ["a", "b"], torch.ones(2, 3))
    Path(rows_file(out)).write_text("a\nb\nc\n")  # a save interrupted between its two renames
    assert load_embeddings(out)[0] == ["a", "b"]
    Path(rows_file(out)).write_text("a\n")
    with pytest.raises(ValueError, match="do not belong together"):
        load_embeddings(out)


def test_a_plain_string_or_path_is_one_item(vit: torch.nn.Module, tmp_path: Path) -> None:
    files = write_images(tmp_path / "photos")
    text = embed_texts(vit, "a photo of a cat")
    assert text.shape == (1, vit.text_projection.shape[1])
    assert torch.equal(text, embed_texts(vit, ["a photo of a cat"]))
    for one in (str(files["jpeg"]), files["jpeg"]):
        result = embed_images(vit, one)
        assert result.paths == [str(files["jpeg"])] and result.embeddings.shape[0] == 1
    everything = sorted(str(p) for p in files.values())
    assert find_images(str(tmp_path / "photos")) == everything
    assert find_images(tmp_path / "photos") == everything
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        find_images(b"photos/")  # type: ignore[arg-type]


def test_find_images_gives_one_spelling_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_images(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    found = find_images(["photos/a.jpg", "./photos/a.jpg", "photos//e.JPEG", "photos/"])
    assert found == sorted(str(p) for p in files.values())
    assert find_images("photos/a.jpg") == [str(files["jpeg"])]  # absolute
