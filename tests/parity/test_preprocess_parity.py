"""Parity of our image preprocessing with OpenAI's reference ``_transform``, pixel for pixel.

``tests/data/reference_preprocess.npz`` (recorded by ``scripts/record_reference_outputs.py``)
holds, for each image of :mod:`parity.images`, the reference's exact float32 output at the small
size, and at 224 the uint8 RGB pixels just before ``ToTensor``/``Normalize`` together with a SHA256
of the exact float32 output. The reconstruction of the latter is checked against that hash before
use. Ours must agree to ``PIXEL_ATOL``; where the reference raised, ours must raise the same type.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Normalize, ToTensor

from clip.clip import _transform

from .images import IMAGE_NAMES, image_digest, make_image

GOLDEN_PATH = Path(__file__).resolve().parent.parent / "data" / "reference_preprocess.npz"
SIZES = (64, 224)
PIXEL_ATOL = 1e-6
RERECORD = "re-record with `python scripts/record_reference_outputs.py`"


@cache
def _golden() -> tuple[dict[str, np.ndarray], dict]:
    with np.load(GOLDEN_PATH, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return arrays, json.loads(str(arrays.pop("meta")))


def _check_input(name: str, img: Image.Image) -> None:
    """The image we generate must be the one the reference saw."""
    meta = _golden()[1]
    if image_digest(img) == meta["inputs"][name]["digest"]:
        return
    if name.startswith("jpeg"):
        pytest.skip("this Pillow's JPEG decoder gives different pixels than at recording time")
    pytest.fail(f"test image {name!r} changed since the goldens were recorded; {RERECORD}")


def reference_output(key: str, n_px: int) -> torch.Tensor:
    """The reference's exact float32 output, from the stored array."""
    arrays, meta = _golden()
    if n_px == meta["small_size"]:
        return torch.from_numpy(arrays[key])
    norm = meta["normalize"]
    expected = Normalize(norm["mean"], norm["std"])(ToTensor()(Image.fromarray(arrays[key], "RGB")))
    digest = hashlib.sha256(expected.numpy().tobytes()).hexdigest()
    assert digest == meta["sha256"][key], f"{key}: stored pixels no longer rebuild the output"
    return expected


def _raised_type_matches(exc: BaseException, type_name: str) -> bool:
    return any(cls.__name__ == type_name for cls in type(exc).__mro__)


@pytest.mark.parametrize("n_px", SIZES)
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_preprocess_matches_reference(name: str, n_px: int) -> None:
    arrays, meta = _golden()
    key = f"{name}__{n_px}"
    assert key in arrays or key in meta["errors"], f"no golden for {key}; {RERECORD}"
    img = make_image(name)
    _check_input(name, img)
    if key in meta["errors"]:
        with pytest.raises(Exception) as info:
            _transform(n_px)(img)
        assert _raised_type_matches(info.value, meta["errors"][key]), repr(info.value)
        return
    ours = _transform(n_px)(img)
    expected = reference_output(key, n_px)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (3, n_px, n_px)
    torch.testing.assert_close(ours, expected, rtol=0, atol=PIXEL_ATOL)


def test_goldens_cover_every_test_image() -> None:
    meta = _golden()[1]
    assert meta["names"] == list(IMAGE_NAMES), RERECORD
    assert meta["sizes"] == list(SIZES), RERECORD


PICKLE_IMAGES = ("rgb_gradient", "rgba_alpha", "p_transparent")


@pytest.mark.parametrize("n_px", SIZES)
def test_preprocess_survives_pickle(n_px: int) -> None:
    preprocess = _transform(n_px)
    restored = pickle.loads(pickle.dumps(preprocess))
    for name in PICKLE_IMAGES:
        assert torch.equal(restored(make_image(name)), preprocess(make_image(name))), name


class _ImageDataset(Dataset):
    """Named test images, preprocessed in the worker processes."""

    def __init__(self, names: tuple[str, ...], preprocess) -> None:
        self.names = names
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(make_image(self.names[index]))


def test_preprocess_in_dataloader_workers() -> None:
    preprocess = _transform(64)
    names = ("rgb_gradient", "l_gray", "cmyk", "jpeg_photo")
    loader = DataLoader(_ImageDataset(names, preprocess), batch_size=2, num_workers=2)
    batched = torch.cat(list(loader))
    expected = torch.stack([preprocess(make_image(name)) for name in names])
    assert torch.equal(batched, expected)
