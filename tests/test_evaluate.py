"""clip evaluate (zeroshot, retrieval, linear-probe) against hand computations on a tiny model."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import smooth_image

import clip
import clip.evaluate
from clip.cli import main
from clip.config import CLIPConfig
from clip.data.extract import ExtractOptions, ImageFeatures, extract_options, image_features
from clip.metrics import recall_at_k
from clip.preprocess import PreprocessConfig, transform


def normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def hand_image_features(model: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    """preprocess(Image.open(p)) in one batch, encode_image, normalise: what a user writes."""
    preprocess = transform(model.visual.input_resolution, model.config.preprocess)
    return normalised(model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths])))


@torch.no_grad()
def hand_text_features(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    return normalised(model.encode_text(clip.tokenize(texts)))


def save_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    Image.fromarray(smooth_image(size[1], size[0], seed)).save(path, format=fmt)
    return path


def evaluate(model_file: str, *args: str) -> int:
    return main(["evaluate", *args, "--model", model_file, "--device", "cpu", "--workers", "0"])


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[Path], list[int]]:
    """An ImageFolder of 6 classes, images of several extensions and cases, one corrupt file."""
    root = tmp_path / "val"
    paths, labels = [], []
    extensions = [".jpg", ".PNG", ".jpeg", ".webp"]
    for c, name in enumerate(["golden_retriever", "tabby_cat", "car", "tree", "boat", "house"]):
        for k in range(2 + c % 2):
            paths.append(save_image(root / name / f"{k}{extensions[(c + k) % 4]}", 10 * c + k))
            labels.append(c)
    (root / "car" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "README.md").write_text("files at the top belong to no class")
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    return root, paths, labels


def expected_zeroshot(
    model: torch.nn.Module, paths: list[Path], labels: list[int], names: list[str], templates: list
) -> dict[str, Any]:
    weights = clip.zero_shot_classifier(model, names, templates).float()  # [D, C]
    scores = hand_image_features(model, paths) @ weights  # [N, C]
    truth = torch.tensor(labels)
    top1 = scores.argmax(dim=1) == truth
    top5 = (scores.topk(min(5, len(names)), dim=1).indices == truth[:, None]).any(dim=1)
    per_class = [float(top1[truth == c].float().mean()) for c in range(len(names))]
    return {
        "top1": float(top1.float().mean()),
        "top5": float(top5.float().mean()),
        "per": per_class,
    }


def test_zeroshot_agrees_with_zero_shot_classifier_by_hand(
    vit_file: str, vit_model: torch.nn.Module, folder: tuple, tmp_path: Path, capsys: Any
) -> None:
    root, paths, _ = folder
    out = tmp_path / "results" / "zs.json"  # its folder is created
    assert evaluate(vit_file, "zeroshot", str(root), "--json", str(out)) == 0
    names = ["boat", "car", "golden retriever", "house", "tabby cat", "tree"]  # sorted folders
    order = sorted(range(len(paths)), key=lambda i: str(paths[i]))  # class by class, sorted
    folder_of = {p: p.parent.name.replace("_", " ") for p in paths}
    by_name = [names.index(folder_of[paths[i]]) for i in order]
    want = expected_zeroshot(
        vit_model, [paths[i] for i in order], by_name, names, clip.imagenet_templates
    )
    got = json.loads(out.read_text())
    assert got["images"] == len(paths) and got["classes"] == 6 and got["templates"] == 80
    assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
    assert [c["class"] for c in got["per_class"]] == names
    assert [c["top1"] for c in got["per_class"]] == pytest.approx(want["per"])
    assert [c["images"] for c in got["per_class"]] == [by_name.count(c) for c in range(6)]
    assert [f["path"] for f in got["failed"]] == [str(root / "car" / "bad.jpg")]
    printed = capsys.readouterr()
    assert f"top-1  {100 * want['top1']:.2f}%" in printed.out
    assert "golden retriever" in printed.out and "bad.jpg" in printed.err


def test_zeroshot_reads_class_names_and_templates_files(
    vit_file: str, vit_model: torch.nn.Module, tmp_path: Path
) -> None:
    root = tmp_path / "val"
    paths = [save_image(root / "a" / "1.jpg", 1), save_image(root / "a" / "2.png", 2)]
    paths += [save_image(root / "b" / "3.JPG", 3)]
    (tmp_path / "classes.txt").write_text("a red apple\n\nbanana\n")
    templates = ["a photo of {}.", "art of {}, {{drawn}}"]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "zs.json"
    code = evaluate(
        vit_file, "zeroshot", str(root), "--classes", str(tmp_path / "classes.txt"),
        "--templates", str(tmp_path / "templates.txt"), "--json", str(out), "--batch-size", "2",
    )  # fmt: skip
    assert code == 0
    want = expected_zeroshot(vit_model, paths, [0, 0, 1], ["a red apple", "banana"], templates)
    got = json.loads(out.read_text())
    assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] is None  # < 5 classes
    assert [c["class"] for c in got["per_class"]] == ["a red apple", "banana"]
    assert got["templates"] == 2


def test_zeroshot_usage_errors(vit_file: str, folder: tuple, tmp_path: Path, capsys: Any) -> None:
    root = str(folder[0])
    assert evaluate(vit_file, "zeroshot", str(tmp_path / "nowhere")) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "two.txt").write_text("a\nb\n")
    assert evaluate(vit_file, "zeroshot", root, "--classes", str(tmp_path / "two.txt")) == 2
    assert "2 class names for the 6 class folders" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("a photo of a {}.\nno placeholder\n")
    assert evaluate(vit_file, "zeroshot", root, "--templates", str(tmp_path / "t.txt")) == 2
    assert "template 2 ('no placeholder') needs one {}" in capsys.readouterr().err
    assert evaluate(vit_file, "zeroshot", root, "--json", str(tmp_path)) == 2
    assert "--json names a file" in capsys.readouterr().err
    (folder[0] / "car" / "notes.txt").write_text("x")
    assert evaluate(vit_file, "zeroshot", root) == 2
    assert "car/notes.txt" in capsys.readouterr().err
    loose = tmp_path / "loose"
    save_image(loose / "x.jpg", 0)
    assert evaluate(vit_file, "zeroshot", str(loose)) == 2
    assert "holds images directly" in capsys.readouterr().err


def test_zeroshot_of_only_unreadable_images_is_a_runtime_failure(
    vit_file: str, tmp_path: Path, capsys: Any
) -> None:
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "x.jpg").write_bytes(b"no image")
    assert evaluate(vit_file, "zeroshot", str(tmp_path / "val")) == 1
    assert "no image of" in capsys.readouterr().err


# ---- retrieval -------------------------------------------------------------------------------


def hand_recalls(
    images: torch.Tensor, texts: torch.Tensor, image_of: list[int], k: int
) -> tuple[float, float]:
    """Recall@k by sorting every row in Python: ties broken by the lower index."""
    sims = (images @ texts.t()).tolist()  # [I, T]
    t2i = []
    for t, own in enumerate(image_of):
        ranked = sorted(range(len(sims)), key=lambda i: (-sims[i][t], i))
        t2i.append(ranked.index(own) < k)
    i2t = []
    for i, row in enumerate(sims):
        ranked = sorted(range(len(row)), key=lambda t: (-row[t], t))
        i2t.append(min(ranked.index(t) for t, own in enumerate(image_of) if own == i) < k)
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


CAPTIONS = [
    "a red boat, at sea",
    'a "green" tree',
    "a car\non a road",
    "a boat",
    "a house",
    "a dog",
    "a cat",
    "the same boat again",
    "a tree in winter",
    "a bike",
    "another bike",
    "a lake",
]


@pytest.fixture
def pairs_csv(tmp_path: Path) -> tuple[Path, list[Path], list[int]]:
    """12 captions of 9 images (images 0 and 1 have several), paths relative to the table."""
    images = [save_image(tmp_path / "pairs" / "img" / f"{i}.jpg", 100 + i) for i in range(9)]
    image_of = [0, 1, 2, 0, 3, 4, 5, 0, 1, 6, 7, 8]
    with open(tmp_path / "pairs" / "val.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([f"img/{i}.jpg", c] for i, c in zip(image_of, CAPTIONS))
    return tmp_path / "pairs" / "val.csv", images, image_of


def test_retrieval_agrees_with_a_hand_computation(
    vit_file: str, vit_model: torch.nn.Module, pairs_csv: tuple, tmp_path: Path, capsys: Any
) -> None:
    table, images, image_of = pairs_csv
    out = tmp_path / "r.json"
    assert evaluate(vit_file, "retrieval", str(table), "--json", str(out)) == 0
    got = json.loads(out.read_text())
    assert (got["images"], got["captions"]) == (9, 12)
    image_f = hand_image_features(vit_model, images)
    text_f = hand_text_features(vit_model, CAPTIONS)
    for k in (1, 5, 10):
        i2t, t2i = hand_recalls(image_f, text_f, image_of, k)
        assert got["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(t2i)
    assert got["text_to_image"]["R@10"] == 1.0  # 9 images: every one is in the top 10
    printed = capsys.readouterr().out
    assert "image→text" in printed and "R@5" in printed


def test_retrieval_on_tar_shards_equals_the_same_pairs_in_a_table(
    vit_file: str, pairs_csv: tuple, tmp_path: Path
) -> None:
    _, images, image_of = pairs_csv
    first = {}
    for i, caption in zip(image_of, CAPTIONS):
        first.setdefault(i, caption)
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        for i in range(len(images)):
            for name, data in (
                (f"{i:03d}.JPG", images[i].read_bytes()),
                (f"{i:03d}.txt", first[i].encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(tmp_path / "one.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([str(images[i]), first[i]] for i in range(len(images)))
    results = []
    for args in (
        [str(tmp_path / "val.tar")],
        [str(tmp_path / "one.csv"), "--image-column", "image", "--caption-column", "caption"],
    ):
        assert evaluate(vit_file, "retrieval", *args, "--json", str(tmp_path / "r.json")) == 0
        results.append(json.loads((tmp_path / "r.json").read_text()))
    for key in ("images", "captions", "image_to_text", "text_to_image"):
        assert results[0][key] == results[1][key]


def test_retrieval_drops_unreadable_images_with_their_captions(
    vit_file: str, vit_model: torch.nn.Module, pairs_csv: tuple, tmp_path: Path, capsys: Any
) -> None:
    table, images, image_of = pairs_csv
    images[0].unlink()  # three captions
    out = tmp_path / "r.json"
    argv = ["--json", str(out), "--workers", "1", "--batch-size", "4"]  # workers decode 3 batches
    assert evaluate(vit_file, "retrieval", str(table), *argv) == 0
    got = json.loads(out.read_text())
    assert (got["images"], got["captions"]) == (8, 9)
    assert got["failed"][0]["image"] == str(images[0])
    assert "FileNotFoundError" in got["failed"][0]["reason"]
    kept = [t for t, i in enumerate(image_of) if i != 0]
    i2t, t2i = hand_recalls(
        hand_image_features(vit_model, images[1:]),
        hand_text_features(vit_model, [CAPTIONS[t] for t in kept]),
        [image_of[t] - 1 for t in kept],
        1,
    )
    assert got["image_to_text"]["R@1"] == pytest.approx(i2t)
    assert got["text_to_image"]["R@1"] == pytest.approx(t2i)
    assert f"{images[0]}: FileNotFoundError" in capsys.readouterr().err


def test_retrieval_usage_errors(
    vit_file: str, pairs_csv: tuple, tmp_path: Path, capsys: Any
) -> None:
    table = str(pairs_csv[0])
    assert evaluate(vit_file, "retrieval", table, "--caption-column", "caption") == 2
    assert "no column 'caption' (columns: 'filepath', 'title')" in capsys.readouterr().err
    assert evaluate(vit_file, "retrieval", str(tmp_path / "missing.csv")) == 2
    with open(tmp_path / "long.csv", "w", newline="") as f:
        csv.writer(f).writerows([["filepath", "title"], ["a.jpg", "word " * 100]])
    assert evaluate(vit_file, "retrieval", str(tmp_path / "long.csv")) == 1
    assert "--truncate" in capsys.readouterr().err


def test_recall_at_k_counts_any_caption_of_an_image_and_breaks_ties_by_index() -> None:
    images = torch.eye(3)  # image i is axis i
    texts = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])  # all on an axis
    # caption 0 belongs to image 0 but points at image 1; caption 3 (image 1) ties caption 0
    i2t, t2i = recall_at_k(images, texts, [0, 0, 2, 1], ks=(1, 2))
    assert t2i == {1: 0.75, 2: 1.0}  # caption 0 finds image 0 second, after image 1
    # image 0: caption 1 first; image 1: captions 0 and 3 tie, 0 comes first but is not its own
    assert i2t == {1: 2 / 3, 2: 1.0}
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        recall_at_k(images, texts, [0, 0, 0, 1])


# ---- preprocessing and features --------------------------------------------------------------


def test_features_follow_the_models_own_preprocessing(vit_file: str, tmp_path: Path) -> None:
    config = CLIPConfig.from_state_dict(torch.load(vit_file)).replace(
        preprocess=PreprocessConfig(
            mean=(0.5, 0.5, 0.5), std=(0.25, 0.3, 0.2), resize_mode="squash"
        )
    )
    model, preprocess = clip.load(vit_file, device="cpu", config=config)
    paths = [save_image(tmp_path / f"{i}.png", i, size=(60, 20)) for i in range(3)]
    found = image_features(model, [str(p) for p in paths], batch_size=3)
    with torch.no_grad():
        want = normalised(
            model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]))
        )
    assert found.kept == [0, 1, 2] and not found.failed
    torch.testing.assert_close(found.features, want, rtol=0, atol=1e-6)
    one = image_features(model, paths[1])  # a single Path is one image
    torch.testing.assert_close(one.features, want[1:2], rtol=0, atol=1e-6)
    openai = transform(model.visual.input_resolution)
    with torch.no_grad():
        other = normalised(model.encode_image(torch.stack([openai(Image.open(p)) for p in paths])))
    assert not torch.allclose(found.features, other, atol=1e-3)


# ---- linear probe ----------------------------------------------------------------------------


class StandInProbe:
    """Nearest class mean, with the interface the command uses: score(features, labels), C."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        classes = range(int(labels.max()) + 1)
        self.means = torch.stack([features[labels == c].mean(0) for c in classes])
        self.C = 0.316

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = (features @ self.means.t()).argmax(dim=1)
        return float((predicted == labels).float().mean())


def stand_in_linear_probe(features: Any, labels: Any, **_: Any) -> Any:
    return StandInProbe(features, labels)


def colour_folder(root: Path, n: int, seed: int) -> None:
    """Two classes far apart: reddish and bluish noise images."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["blue", "red"]):
        (root / name).mkdir(parents=True)
        for k in range(n):
            pixels = rng.integers(0, 60, (32, 32, 3))
            pixels[..., 2 - 2 * c] += 180  # blue: channel 2; red: channel 0
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{k}.png")


def test_linear_probe_separates_a_separable_dataset(
    vit_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    if not hasattr(clip, "linear_probe"):  # until clip.linear_probe lands
        monkeypatch.setattr(clip, "linear_probe", stand_in_linear_probe, raising=False)
    colour_folder(tmp_path / "train", 8, 0)
    colour_folder(tmp_path / "test", 4, 1)
    out = tmp_path / "lp.json"
    code = evaluate(
        vit_file,
        "linear-probe",
        str(tmp_path / "train"),
        str(tmp_path / "test"),
        "--json",
        str(out),
    )
    assert code == 0
    got = json.loads(out.read_text())
    assert (got["classes"], got["train_images"], got["test_images"]) == (2, 16, 8)
    assert got["accuracy"] == 1.0 and isinstance(got["C"], float)
    assert "accuracy  100.00%" in capsys.readouterr().out


def test_options_and_keywords_reach_the_extraction_and_the_probe(
    vit_model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """options= and the old keywords (which override it) both work; the rest go to the probe."""
    seen: list[tuple[int, dict[str, Any]]] = []
    original = clip.evaluate.image_features

    def recording(model: Any, images: Any, **kw: Any) -> ImageFeatures:
        seen.append((kw["options"].batch_size, {}))
        return original(model, images, **kw)

    def probe(features: Any, labels: Any, **options: Any) -> Any:
        seen.append((0, options))
        return StandInProbe(features, labels)

    monkeypatch.setattr(clip.evaluate, "image_features", recording)
    monkeypatch.setattr(clip, "linear_probe", probe, raising=False)
    colour_folder(tmp_path / "train", 2, 0)
    colour_folder(tmp_path / "test", 1, 1)
    options = ExtractOptions(batch_size=3, device="cpu")
    result = clip.evaluate.evaluate_linear_probe(
        vit_model, tmp_path / "train", tmp_path / "test", options=options, batch_size=2, C=0.5
    )
    assert result.test_images == 2 and seen == [(2, {}), (2, {}), (0, {"C": 0.5})]
    assert extract_options(options, progress=True) == ExtractOptions(3, 0, "cpu", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 1  # type: ignore[misc]


def test_linear_probe_refuses_test_classes_it_cannot_predict(
    vit_file: str, tmp_path: Path, capsys: Any
) -> None:
    colour_folder(tmp_path / "train", 1, 0)
    colour_folder(tmp_path / "test", 1, 1)
    save_image(tmp_path / "test" / "green" / "0.png", 0)
    assert evaluate(vit_file, "linear-probe", str(tmp_path / "train"), str(tmp_path / "test")) == 2
    assert "test classes ['green']" in capsys.readouterr().err


def test_help_lists_the_three_tasks(capsys: Any) -> None:
    assert main(["evaluate", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(task in text for task in ("zeroshot", "retrieval", "linear-probe"))
