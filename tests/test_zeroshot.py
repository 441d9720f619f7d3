"""clip.zero_shot_classifier and the published ImageNet class names and templates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close

import clip

CLASSES = ["dog", "cat", "a very long name for a diagram of a bicycle wheel", "car", "tree"]
TEMPLATES = ["a photo of a {}.", "{}", "a blurry drawing of the big {} in a museum.", "art of {}."]


@pytest.fixture(scope="module")
def model(tiny_files: dict[str, dict[str, Path]]) -> torch.nn.Module:
    loaded, _ = clip.load(tiny_files["tiny-vit"]["state_dict"], device="cpu")
    return loaded


def manual_classifier(model: torch.nn.Module, classes: list[str], templates: list) -> torch.Tensor:
    """The textbook computation, one class and one prompt at a time, at full context length."""
    columns = []
    with torch.no_grad():
        for name in classes:
            prompts = [t(name) if callable(t) else t.format(name) for t in templates]
            embs = torch.cat([model.encode_text(clip.tokenize(p)) for p in prompts])  # [T, E]
            embs = embs / embs.norm(dim=-1, keepdim=True)
            mean = embs.mean(dim=0)
            columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)  # [E, C]


def test_shape_and_unit_columns(model: torch.nn.Module) -> None:
    weights = clip.zero_shot_classifier(model, CLASSES, TEMPLATES)
    assert weights.shape == (model.text_projection.shape[1], len(CLASSES))
    assert weights.dtype == torch.float32
    assert not weights.requires_grad
    norms = weights.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_equals_manual_ensemble_average(model: torch.nn.Module) -> None:
    weights = clip.zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=3)
    assert_rel_close(weights, manual_classifier(model, CLASSES, TEMPLATES))


def test_columns_differ_between_classes(model: torch.nn.Module) -> None:
    weights = clip.zero_shot_classifier(model, CLASSES, TEMPLATES)
    similarity = weights.t() @ weights  # [C, C]
    off_diagonal = similarity[~torch.eye(len(CLASSES), dtype=torch.bool)]
    assert off_diagonal.max() < 0.9999, "columns must not collapse onto one vector"


def test_single_template_is_the_normalised_prompt_embedding(model: torch.nn.Module) -> None:
    weights = clip.zero_shot_classifier(model, ["dog", "cat"], ["a photo of a {}."])
    with torch.no_grad():
        emb = model.encode_text(clip.tokenize(["a photo of a dog.", "a photo of a cat."]))
    assert_rel_close(weights, (emb / emb.norm(dim=-1, keepdim=True)).t())


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batch_size_does_not_change_the_result(model: torch.nn.Module, batch_size: int) -> None:
    reference = clip.zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=20)
    weights = clip.zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=batch_size)
    assert_rel_close(weights, reference)


def test_callable_templates_equal_format_strings(model: torch.nn.Module) -> None:
    as_callables = [lambda c, t=t: t.format(c) for t in TEMPLATES]
    assert_rel_close(
        clip.zero_shot_classifier(model, CLASSES, as_callables),
        clip.zero_shot_classifier(model, CLASSES, TEMPLATES),
    )


def test_template_order_does_not_matter_but_class_order_does(model: torch.nn.Module) -> None:
    weights = clip.zero_shot_classifier(model, CLASSES, TEMPLATES)
    shuffled = clip.zero_shot_classifier(model, CLASSES, TEMPLATES[::-1])
    assert_rel_close(shuffled, weights)
    reversed_classes = clip.zero_shot_classifier(model, CLASSES[::-1], TEMPLATES)
    assert_rel_close(reversed_classes, weights.flip(1))


def test_duplicate_class_names_give_identical_columns(model: torch.nn.Module) -> None:
    # OpenAI's ImageNet list names two classes "missile" and two "sunglasses".
    weights = clip.zero_shot_classifier(model, ["cat", "dog", "cat"], TEMPLATES)
    assert torch.equal(weights[:, 0], weights[:, 2])


def test_calls_encode_text_once_per_batch_with_all_prompts(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    original = model.encode_text

    def spy(text: torch.Tensor) -> torch.Tensor:
        seen.append(text)
        return original(text)

    monkeypatch.setattr(model, "encode_text", spy)
    clip.zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=8)
    assert [len(t) for t in seen] == [8, 8, 4]  # 20 prompts, batches span classes
    rows = torch.cat(seen)
    expected = clip.tokenize([t.format(c) for c in CLASSES for t in TEMPLATES])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, expected.tolist()))
    lengths = rows.argmax(dim=-1)
    assert torch.equal(lengths, lengths.sort().values), "prompts go shortest first"


def test_progress_bar_only_when_asked(
    model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    clip.zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=4)
    assert capsys.readouterr().err == ""
    clip.zero_shot_classifier(model, CLASSES, TEMPLATES, batch_size=4, progress=True)
    assert "zero-shot classifier" in capsys.readouterr().err


def test_half_precision_model_returns_its_dtype(tiny_files: dict[str, dict[str, Path]]) -> None:
    model, _ = clip.load(tiny_files["tiny-vit"]["state_dict"], device="cpu")
    model.half()
    weights = clip.zero_shot_classifier(model, CLASSES, TEMPLATES)
    assert weights.dtype == torch.float16
    assert torch.allclose(weights.float().norm(dim=0), torch.ones(len(CLASSES)), atol=2e-3)


def test_jit_model(tiny_files: dict[str, dict[str, Path]], model: torch.nn.Module) -> None:
    traced, _ = clip.load(tiny_files["tiny-vit"]["archive"], device="cpu", jit=True)
    assert_rel_close(
        clip.zero_shot_classifier(traced, CLASSES, TEMPLATES),
        clip.zero_shot_classifier(model, CLASSES, TEMPLATES),
    )


@pytest.mark.parametrize(
    ("classnames", "templates", "error", "message"),
    [
        ([], ["a {}"], ValueError, "classnames is empty"),
        (["dog"], [], ValueError, "templates is empty"),
        ("dog", ["a {}"], TypeError, "single string"),
        (["dog"], "a photo of a {}.", TypeError, "single string"),
        (["dog", 3], ["a {}"], TypeError, r"classnames\[1\]"),
        (["dog", "  "], ["a {}"], ValueError, r"classnames\[1\] is blank"),
        (["dog"], ["a {}", "a photo"], ValueError, r"templates\[1\] = 'a photo' has no '\{\}'"),
        (["dog"], ["a {} of {}"], ValueError, "cannot be formatted"),
        (["dog"], ["{} {x}"], ValueError, "cannot be formatted"),
        (["dog"], [3], TypeError, r"templates\[0\] must be a str"),
        (["dog"], [lambda c: None], TypeError, "must return a str"),
        (["dog " * 80], ["a {}"], RuntimeError, "too long"),
    ],
)
def test_bad_input_is_refused_with_the_reason(
    model: torch.nn.Module, classnames: object, templates: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        clip.zero_shot_classifier(model, classnames, templates)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size(model: torch.nn.Module, batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        clip.zero_shot_classifier(model, ["dog"], ["a {}"], batch_size=batch_size)  # type: ignore[arg-type]


# ---- published data --------------------------------------------------------------------------


def test_imagenet_lists_have_the_published_sizes_and_entries() -> None:
    classes, templates, short = (
        clip.imagenet_classes,
        clip.imagenet_templates,
        clip.imagenet_templates_short,
    )
    assert len(classes) == 1000 and len(templates) == 80 and len(short) == 7
    assert classes[:3] == ["tench", "goldfish", "great white shark"]
    assert classes[-1] == "toilet paper"
    assert templates[0] == "a bad photo of a {}."
    assert set(short) <= set(templates)
    assert all(t.count("{}") == 1 for t in templates)
    assert all(c == c.strip() and c for c in classes)


def test_imagenet_lists_are_fresh_copies() -> None:
    clip.imagenet_classes.append("not a class")
    assert len(clip.imagenet_classes) == 1000


def test_imagenet_lists_match_open_clip() -> None:
    # open_clip (the `parity` extra) carries the same published lists; an independent check.
    meta = pytest.importorskip(
        "open_clip.zero_shot_metadata", reason="open_clip is not installed (the parity extra)"
    )

    assert clip.imagenet_classes == list(meta.IMAGENET_CLASSNAMES)
    assert clip.imagenet_templates == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    assert clip.imagenet_templates_short == [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]


def test_unknown_attribute_still_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'imagenet_labels'"):
        clip.imagenet_labels  # noqa: B018


def test_import_does_not_read_the_data_files() -> None:
    code = (
        "import pathlib\n"
        "read = []\n"
        "original = pathlib.Path.read_text\n"
        "def spy(self, *a, **k):\n"
        "    read.append(self.name)\n"
        "    return original(self, *a, **k)\n"
        "pathlib.Path.read_text = spy\n"
        "import clip\n"
        "assert not [f for f in read if f.startswith('imagenet_')], read\n"
        "assert len(clip.imagenet_templates) == 80\n"
        "assert 'imagenet_templates.txt' in read, read\n"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
