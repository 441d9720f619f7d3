"""clip.preprocess: the pipeline's structure, input checks and picklability."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

from clip.clip import _transform
from clip.preprocess import (
    MEAN,
    STD,
    ConvertToRGB,
    normalize_uint8,
    transform,
    transform_uint8,
)


def test_structure_matches_openai() -> None:
    pipeline = _transform(224)
    assert isinstance(pipeline, Compose)
    kinds = [Resize, CenterCrop, ConvertToRGB, ToTensor, Normalize]
    assert [type(t) for t in pipeline.transforms] == kinds
    resize, normalize = pipeline.transforms[0], pipeline.transforms[-1]
    assert resize.size == 224 and resize.interpolation.value == "bicubic"
    assert tuple(normalize.mean) == MEAN and tuple(normalize.std) == STD


def test_output_shape_and_dtype() -> None:
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    out = _transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_pickle_round_trip_gives_the_same_pixels() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    pipeline = _transform(32)
    clone = pickle.loads(pickle.dumps(pipeline))
    assert torch.equal(clone(image), pipeline(image))


@pytest.mark.parametrize("bad", [torch.zeros(3, 32, 32), np.zeros((32, 32, 3)), "cat.png"])
def test_non_images_are_refused_with_a_hint(bad: object) -> None:
    with pytest.raises(TypeError, match=r"PIL\.Image"):
        _transform(32)(bad)


@pytest.mark.parametrize("n_px", [0, -3, 22.5])
def test_bad_sizes(n_px: object) -> None:
    with pytest.raises(ValueError, match="positive int"):
        _transform(n_px)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_uint8_halves_give_the_full_transform_bit_for_bit(mode: str) -> None:
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        for h, w in [(40, 50), (300, 200), (32, 32), (17, 90)]
    ]
    full = torch.stack([transform(32)(image) for image in images])
    halves = torch.stack([transform_uint8(32)(image) for image in images])
    assert halves.dtype == torch.uint8 and halves.shape == (4, 3, 32, 32)
    assert torch.equal(normalize_uint8(halves), full)  # batched: same as one at a time
    assert torch.equal(normalize_uint8(halves[1]), full[1])
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(full)
