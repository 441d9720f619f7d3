"""The data path on models that are not OpenAI's: a model folder's own mean, std and resize are
used by embed_images, clip embed, clip classify and embed_dataset, and folders work as --model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from folder_models import ZOO, save_folder
from PIL import Image
from test_pipeline import smooth_image

import clip
from clip import distributed, pipeline
from clip.cli import main
from clip.data.embed import preprocess_config
from clip.data.resume import model_digest, weights_digest
from clip.preprocess import PreprocessConfig, transform
from clip.shards import read_shard


@pytest.fixture(scope="module", params=sorted(ZOO))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_folder(ZOO[request.param], tmp_path_factory.mktemp("zoo") / request.param)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_folder(ZOO["zoo-vit"], tmp_path_factory.mktemp("zoo") / "zoo-vit")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Five images far from square (a squash and a center crop see different pixels)."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (h, w) in enumerate([(40, 90), (96, 37), (50, 70), (33, 80), (75, 41)]):
        path = root / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(smooth_image(h, w, seed=i)).save(path)
        paths.append(str(path))
    return paths


def by_hand(model: torch.nn.Module, preprocess: Any, paths: list[str]) -> torch.Tensor:
    """What a user writes: preprocess each image, encode, normalise."""
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        features = model.encode_image(images)
    return features / features.norm(dim=-1, keepdim=True)


def test_embed_images_uses_the_models_own_preprocessing(folder: Path, photos: list[str]) -> None:
    model, preprocess = clip.load(folder, device="cpu")
    got = pipeline.embed_images(model, photos, batch_size=2, num_workers=1)
    assert got.paths == photos
    torch.testing.assert_close(got.embeddings, by_hand(model, preprocess, photos))
    # OpenAI's mean, std and center crop would give other embeddings
    openai = by_hand(model, transform(model.visual.input_resolution), photos)
    assert (got.embeddings - openai).abs().max() > 1e-2


def test_a_jit_model_from_a_folder_keeps_its_preprocessing(
    vit_folder: Path, photos: list[str]
) -> None:
    eager, preprocess = clip.load(vit_folder, device="cpu")
    traced, _ = clip.load(vit_folder, device="cpu", jit=True)
    assert preprocess_config(traced) == ZOO["zoo-vit"].preprocess
    got = pipeline.embed_images(traced, photos, batch_size=5)
    torch.testing.assert_close(got.embeddings, by_hand(eager, preprocess, photos))


def test_models_that_do_not_say_get_openais_preprocessing(tiny_files: dict) -> None:
    archive = torch.jit.load(str(tiny_files["tiny-vit"]["archive"]), map_location="cpu")
    assert preprocess_config(archive) == PreprocessConfig()
    assert preprocess_config(torch.nn.Linear(2, 2)) == PreprocessConfig()


def test_fast_decode_of_a_squash_model_stays_close(vit_folder: Path, tmp_path: Path) -> None:
    model, preprocess = clip.load(vit_folder, device="cpu")
    path = tmp_path / "wide.jpg"
    Image.fromarray(smooth_image(200, 520, seed=9)).save(path, quality=95)
    fast = pipeline.embed_images(model, [str(path)], fast_decode=True).embeddings
    exact = by_hand(model, preprocess, [str(path)])
    assert (fast @ exact.t()).item() > 0.99


def test_clip_embed_with_a_model_folder_equals_the_library_and_resumes(
    vit_folder: Path, photos: list[str], tmp_path: Path, capsys: Any
) -> None:
    model, preprocess = clip.load(vit_folder, device="cpu")
    out = tmp_path / "e.npy"
    argv = ["embed", *photos[:3], "--out", str(out), "--model", str(vit_folder)]
    argv += ["--device", "cpu", "--workers", "0"]
    assert main(argv) == 0
    keys, rows = pipeline.load_embeddings(out)
    assert keys == photos[:3]
    torch.testing.assert_close(rows, by_hand(model, preprocess, photos[:3]))
    assert model_digest(str(vit_folder)) is None  # a folder: its loaded weights tell
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["model_digest"] == weights_digest(model)

    argv[1:4] = photos  # a rerun adds only the new images
    assert main(argv) == 0
    assert "(3 already there)" in capsys.readouterr().err
    keys, rows = pipeline.load_embeddings(out)
    assert keys == photos
    torch.testing.assert_close(rows, by_hand(model, preprocess, photos))


def test_clip_embed_refuses_to_extend_an_output_after_the_folders_config_changed(
    vit_folder: Path, photos: list[str], tmp_path: Path, capsys: Any
) -> None:
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        (changed / name).write_bytes((vit_folder / name).read_bytes())
    out = tmp_path / "e.npy"
    argv = ["embed", photos[0], "--out", str(out), "--device", "cpu", "--workers", "0"]
    assert main([*argv, "--model", str(changed)]) == 0
    config = json.loads((changed / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.4, 0.4, 0.4]  # the same weights, another model
    (changed / "open_clip_config.json").write_text(json.dumps(config))
    argv[1] = photos[1]
    assert main([*argv, "--model", str(changed)]) != 0
    assert "another model" in capsys.readouterr().err


def test_weights_digest_tells_configs_apart_and_keeps_openais(tiny_files: dict) -> None:
    base, _ = clip.load(tiny_files["tiny-vit"]["state_dict"], device="cpu")
    h = hashlib.sha256()
    for name, tensor in base.state_dict().items():  # the digest before configs existed
        t = tensor.detach().contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    assert weights_digest(base) == f"weights-sha256:{h.hexdigest()}"
    gelu, _ = clip.load(
        tiny_files["tiny-vit"]["state_dict"],
        device="cpu",
        config=base.config.replace(activation="gelu"),
    )
    assert weights_digest(gelu) != weights_digest(base)


def test_clip_classify_with_a_model_folder(
    vit_folder: Path, photos: list[str], capsys: Any
) -> None:
    labels = ["a dog", "a cat", "a bird"]
    argv = ["classify", *photos[:2], "--labels", ",".join(labels), "--model", str(vit_folder)]
    assert main([*argv, "--device", "cpu", "--workers", "0", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model, preprocess = clip.load(vit_folder, device="cpu")
    with torch.no_grad():
        text = model.encode_text(clip.tokenize(labels))
        text = text / text.norm(dim=-1, keepdim=True)
        image = by_hand(model, preprocess, photos[:2])
        probs = (model.logit_scale.exp() * image @ text.t()).softmax(dim=-1)
    assert len(lines) == 2
    for line, path, row in zip(lines, photos, probs):
        top = row.topk(3)
        assert line == f"{path}: " + ", ".join(
            f"{labels[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist())
        )


def test_embed_dataset_with_a_relative_model_folder(
    vit_folder: Path, photos: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, preprocess = clip.load(vit_folder, device="cpu")
    monkeypatch.chdir(vit_folder.parent)
    out = tmp_path / "shards"
    kwargs: dict[str, Any] = dict(model=vit_folder.name, batch_size=2, shard_size=3, workers=0)
    summary = distributed.embed_dataset(photos, out, **kwargs)
    assert summary.embedded == 5 and len(summary.written) == 2
    rows = [read_shard(str(p)) for p in sorted(out.glob("*.parquet"))]
    ids = [i for shard_ids, _ in rows for i in shard_ids]
    embeddings = torch.cat([e for _, e in rows])
    assert ids == photos
    torch.testing.assert_close(embeddings, by_hand(model, preprocess, photos))
    stats = json.loads(next(out.glob("*.stats.json")).read_text())
    assert stats["model_digest"] == weights_digest(model)
    again = distributed.embed_dataset(photos, out, **kwargs)
    assert again.written == [] and len(again.skipped) == 2
