"""Parity with open_clip 3.3 on model folders in its hub layout, for every family the zoo serves.

For tiny random models of each family (GELU ViT, QuickGELU ViT, heads of 80, heads of 88 with MLP
ratio 4.3637, mean/std 0.5 with squash resize, ModifiedResNet), in both directions:

* ours → open_clip: built with ``CLIP.from_config``, saved with ``clip.save(model, folder)``, then
  ``clip.load(folder)`` and ``open_clip.create_model_and_transforms("local-dir:" + folder)``;
* open_clip → ours: an open_clip model of the family's published-style ``model_cfg``, written by
  open_clip's own hub writer (``push_to_hf_hub.save_for_hf``: ``torch.save``'d
  ``open_clip_pytorch_model.bin`` and ``open_clip_config.json``), then ``clip.load(folder)``.

Both sides must agree on preprocessed pixels (non-square, RGBA, grayscale, palette... images),
tokens, image and text features and ``logit_scale``, in fp32, within 1e-5 of the largest magnitude
(``conftest.assert_rel_close``). LayerNorm, bias and BatchNorm values are perturbed away from 1 and
0 so that a swapped or dropped parameter shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_rel_close

import clip
from clip.config import CLIPConfig
from clip.model import CLIP
from clip.preprocess import PreprocessConfig

from .images import make_image

open_clip = pytest.importorskip(
    "open_clip",
    reason="open_clip is the live parity oracle; install the 'parity' extra: "
    "pip install -e '.[parity]' (the 'test' extra includes it)",
)
from open_clip.push_to_hf_hub import save_for_hf  # noqa: E402 (after the importorskip)

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
IMAGES = (
    "rgb_gradient",  # 257 x 193
    "rgb_wide",  # 500 x 10
    "rgb_square_224",
    "rgba_alpha",
    "l_gray",
    "p_transparent",
    "cmyk",
    "jpeg_photo",
)
TEXTS = [
    "a photo of a cat",
    "",
    "A DIAGRAM of  Résumé — naïve café 🐱 &amp; <b>tags</b>",
    "  leading and trailing   spaces  ",
    "the quick brown fox " * 40,  # longer than the context: truncated, EOT kept last
]

LAION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
OPENAI_PRE = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}
# Text tower of every family: heads of 16, so that a model assuming 64 (width // 64) breaks.
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
TEXT_ARGS = (77, 49408, 64, 4, 2)


@dataclass(frozen=True)
class Family:
    """One family: its config as we spell it, and as an open_clip hub config spells it."""

    config: CLIPConfig
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]


FAMILIES: dict[str, Family] = {
    # LAION / DataComp ViTs: plain GELU, and hub configs without a quick_gelu key.
    "gelu-vit": Family(
        CLIPConfig(32, 32, 2, 128, 8, *TEXT_ARGS, activation="gelu"),
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
            "text_cfg": TEXT,
        },
        OPENAI_PRE,
    ),
    # OpenAI, MetaCLIP, DFN, laion400m: QuickGELU.
    "quickgelu-vit": Family(
        CLIPConfig(32, 32, 2, 128, 8, *TEXT_ARGS, activation="quick_gelu"),
        {
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
            "text_cfg": TEXT,
        },
        OPENAI_PRE,
    ),
    # ViT-H/14: heads of 80 (here 160 wide: 2 heads, where 64-wide heads cannot even split it).
    "head-width-80": Family(
        CLIPConfig(32, 32, 2, 160, 8, *TEXT_ARGS, activation="gelu", vision_head_width=80),
        {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 160,
                "head_width": 80,
                "patch_size": 8,
            },
            "text_cfg": TEXT,
        },
        OPENAI_PRE,
    ),
    # ViT-g/14: heads of 88, MLP ratio 4.3637 (176 wide: hidden int(176 * 4.3637) = 768).
    "head-width-88-mlp-4.3637": Family(
        CLIPConfig(
            32,
            32,
            2,
            176,
            8,
            *TEXT_ARGS,
            activation="gelu",
            vision_head_width=88,
            vision_mlp_ratio=4.3637,
        ),
        {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 176,
                "head_width": 88,
                "mlp_ratio": 4.3637,
                "patch_size": 8,
            },
            "text_cfg": TEXT,
        },
        OPENAI_PRE,
    ),
    # LAION ViT-L/14 laion2b_s32b_b82k (mean/std 0.5) and DFN ViT-H/14-378 (squash resize);
    # an input side that is not a power of two, and bilinear resampling.
    "mean-std-0.5-squash": Family(
        CLIPConfig(
            32,
            48,
            2,
            128,
            16,
            *TEXT_ARGS,
            activation="gelu",
            preprocess=PreprocessConfig(
                mean=(0.5, 0.5, 0.5),
                std=(0.5, 0.5, 0.5),
                interpolation="bilinear",
                resize_mode="squash",
            ),
        ),
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 48, "layers": 2, "width": 128, "patch_size": 16},
            "text_cfg": TEXT,
        },
        {**LAION, "interpolation": "bilinear", "resize_mode": "squash"},
    ),
    # RN50 yfcc15m / cc12m: ModifiedResNet, QuickGELU text.
    "modified-resnet": Family(
        CLIPConfig(32, 64, (1, 1, 1, 1), 16, None, *TEXT_ARGS, activation="quick_gelu"),
        {
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": 64,
                "layers": [1, 1, 1, 1],
                "width": 16,
                "patch_size": None,
            },
            "text_cfg": TEXT,
        },
        OPENAI_PRE,
    ),
}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move LayerNorm and BatchNorm weights off 1, biases and running means off 0, running
    variances off 1, and ``logit_scale`` off its initial value, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if name == "logit_scale":
                t.fill_(math.log(1 / 0.07) + 0.37)
            elif leaf == "running_var":
                t.copy_(1 + noise.abs())
            elif leaf in ("bias", "running_mean"):
                t.add_(0.1 * noise)
            elif leaf == "weight" and t.ndim == 1:  # LayerNorm, BatchNorm
                t.copy_(1 + 0.2 * noise)


class _NoTokenizerFiles:
    """What ``save_for_hf`` asks of a tokenizer: the BPE tokenizer writes no files."""

    def save_pretrained(self, directory: object) -> None:
        pass


@dataclass
class Pair:
    """Our loaded model and open_clip's, with their preprocessing and tokenizers."""

    family: Family
    ours: torch.nn.Module
    ours_preprocess: Any
    oracle: torch.nn.Module
    oracle_preprocess: Any
    oracle_tokenizer: Any


def _oracle_from_folder(folder: Path) -> tuple[torch.nn.Module, Any, Any]:
    name = "local-dir:" + str(folder)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.float().eval(), preprocess, open_clip.get_tokenizer(name)


def _ours_from_folder(folder: Path) -> tuple[torch.nn.Module, Any]:
    model, preprocess = clip.load(folder, device="cpu")
    assert isinstance(model, CLIP)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    return model, preprocess


def saved_by_us(family: Family, folder: Path) -> Pair:
    """``CLIP.from_config`` → ``clip.save(model, folder)`` → both loaders."""
    torch.manual_seed(0)
    model = CLIP.from_config(family.config)
    perturb(model, seed=1)
    clip.save(model, folder)
    ours, ours_pre = _ours_from_folder(folder)
    oracle, oracle_pre, tokenizer = _oracle_from_folder(folder)
    return Pair(family, ours, ours_pre, oracle, oracle_pre, tokenizer)


def saved_by_open_clip(family: Family, folder: Path) -> Pair:
    """An open_clip model of the family's hub config, written by open_clip's hub writer."""
    doc = {"model_cfg": family.model_cfg, "preprocess_cfg": family.preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(doc))
    torch.manual_seed(2)
    oracle, oracle_pre, tokenizer = _oracle_from_folder(folder)  # config only: random weights
    perturb(oracle, seed=3)
    save_for_hf(
        oracle, _NoTokenizerFiles(), family.model_cfg, str(folder), safe_serialization=False
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "open_clip_config.json",
        "open_clip_pytorch_model.bin",
    ]
    ours, ours_pre = _ours_from_folder(folder)
    return Pair(family, ours, ours_pre, oracle, oracle_pre, tokenizer)


WRITERS = {"saved-by-us": saved_by_us, "saved-by-open-clip": saved_by_open_clip}


@pytest.fixture(
    scope="module",
    params=[(f, w) for f in FAMILIES for w in WRITERS],
    ids=[f"{f}-{w}" for f in FAMILIES for w in WRITERS],
)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    family, writer = request.param
    return WRITERS[writer](FAMILIES[family], tmp_path_factory.mktemp(f"{family}-{writer}"))


def test_loaded_config_is_the_familys(pair: Pair) -> None:
    assert pair.ours.config == pair.family.config


def test_preprocessed_pixels_match(pair: Pair) -> None:
    for name in IMAGES:
        ours = pair.ours_preprocess(make_image(name))
        expected = pair.oracle_preprocess(make_image(name))
        assert ours.dtype == expected.dtype == torch.float32, name
        try:
            assert_rel_close(ours, expected, rel=RTOL)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_tokens_match(pair: Pair) -> None:
    ours = clip.tokenize(TEXTS, truncate=True)
    expected = pair.oracle_tokenizer(TEXTS)
    assert torch.equal(ours.long(), expected)
    assert torch.equal(clip.tokenize(TEXTS[:-1]).long(), pair.oracle_tokenizer(TEXTS[:-1]))


def _pixels(preprocess: Any) -> torch.Tensor:
    return torch.stack([preprocess(make_image(name)) for name in IMAGES])


def test_image_features_match(pair: Pair) -> None:
    with torch.no_grad():
        ours = pair.ours.encode_image(_pixels(pair.ours_preprocess))
        expected = pair.oracle.encode_image(_pixels(pair.oracle_preprocess))
    assert ours.dtype == expected.dtype == torch.float32
    assert_rel_close(ours, expected, rel=RTOL)


def test_text_features_match(pair: Pair) -> None:
    with torch.no_grad():
        ours = pair.ours.encode_text(clip.tokenize(TEXTS, truncate=True))
        expected = pair.oracle.encode_text(pair.oracle_tokenizer(TEXTS))
    assert ours.dtype == expected.dtype == torch.float32
    assert_rel_close(ours, expected, rel=RTOL)


def test_logit_scale_matches(pair: Pair) -> None:
    ours, expected = pair.ours.logit_scale.detach(), pair.oracle.logit_scale.detach()
    assert ours.dtype == expected.dtype == torch.float32
    assert_rel_close(ours.reshape(()), expected.reshape(()), rel=RTOL)
    assert abs(expected.item() - (math.log(1 / 0.07) + 0.37)) < 1e-6  # the perturbed value


def test_open_clip_safetensors_next_to_its_bin_give_the_same_model(
    tmp_path: Path,
) -> None:
    """open_clip's default hub writer puts both files in the folder; both loaders read the
    safetensors one."""
    family = FAMILIES["gelu-vit"]
    doc = {"model_cfg": family.model_cfg, "preprocess_cfg": family.preprocess_cfg}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(doc))
    oracle, _, _ = _oracle_from_folder(tmp_path)
    perturb(oracle, seed=4)
    save_for_hf(oracle, _NoTokenizerFiles(), family.model_cfg, str(tmp_path))
    assert (tmp_path / "open_clip_model.safetensors").is_file()
    ours, _ = _ours_from_folder(tmp_path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_rel_close(ours.encode_image(images), oracle.encode_image(images), rel=RTOL)
