"""Deterministic test images for preprocessing parity.

Every image is computed from numpy formulas or a seeded generator, except ``jpeg_photo``, which is
decoded from a small committed file. The same module is imported by
``scripts/record_reference_outputs.py`` (to feed OpenAI's reference implementation) and by the
parity tests (to feed ours), so both see identical pixels; :func:`image_digest` proves it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

JPEG_PATH = Path(__file__).resolve().parent.parent / "data" / "images" / "photo.jpg"


def _ramp(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [0, 1], shaped (height, width)."""
    x = np.linspace(0.0, 1.0, width)[None, :].repeat(height, axis=0)
    y = np.linspace(0.0, 1.0, height)[:, None].repeat(width, axis=1)
    return x, y


def _to_u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def rgb_pattern(width: int, height: int) -> np.ndarray:
    """Smooth colour gradient with sinusoidal detail, uint8 (height, width, 3)."""
    x, y = _ramp(width, height)
    r = x
    g = y
    b = 0.5 + 0.5 * np.sin(12.0 * x + 7.0 * y) * np.cos(9.0 * x * y)
    return _to_u8(np.stack([r, g, b], axis=-1))


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _rgb(width: int, height: int) -> Image.Image:
    return Image.fromarray(rgb_pattern(width, height), "RGB")


def _rgb_noise() -> Image.Image:
    return Image.fromarray(_noise((240, 320, 3), seed=1), "RGB")


def _rgba() -> Image.Image:
    """Colour pattern whose alpha sweeps from fully transparent to opaque, with noisy patches."""
    rgb = rgb_pattern(200, 150)
    x, y = _ramp(200, 150)
    alpha = _to_u8(x * y)
    alpha[40:80, 60:120] = _noise((40, 60), seed=2)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def _gray(width: int, height: int) -> np.ndarray:
    x, y = _ramp(width, height)
    return _to_u8(0.5 + 0.5 * np.sin(10.0 * x) * np.cos(6.0 * y))


def _l_image() -> Image.Image:
    return Image.fromarray(_gray(180, 240), "L")


def _la_image() -> Image.Image:
    x, _ = _ramp(180, 240)
    return Image.fromarray(np.dstack([_gray(180, 240), _to_u8(1.0 - x)]), "LA")


def _palette_image(width: int, height: int) -> Image.Image:
    """Palette image with a seeded 256-colour palette and smooth index ramps."""
    x, y = _ramp(width, height)
    indices = (np.floor(x * 15.99) * 16 + np.floor(y * 15.99)).astype(np.uint8)
    img = Image.fromarray(indices, "L").convert("P")
    img.putpalette(_noise((256 * 3,), seed=3).tobytes())
    return img


def _palette() -> Image.Image:
    return _palette_image(150, 120)


def _palette_transparent() -> Image.Image:
    img = _palette_image(150, 120)
    img.info["transparency"] = 17
    return img


def _bilevel() -> Image.Image:
    x, y = _ramp(130, 90)
    on = (np.sin(40.0 * x) * np.sin(30.0 * y) > 0) ^ (x > 0.5)
    return Image.fromarray(on.astype(np.uint8) * 255, "L").convert("1", dither=Image.Dither.NONE)


def _cmyk() -> Image.Image:
    x, y = _ramp(160, 100)
    planes = [x, y, 1.0 - x * y, 0.2 * (1.0 - y)]
    return Image.frombytes("CMYK", (160, 100), _to_u8(np.stack(planes, axis=-1)).tobytes())


def _i16() -> Image.Image:
    x, y = _ramp(128, 96)
    values = np.rint(x * 65535.0 * (0.25 + 0.75 * y)).astype("<u2")
    return Image.frombytes("I;16", (128, 96), values.tobytes())


def _i32() -> Image.Image:
    x, y = _ramp(128, 96)
    values = np.rint(-100.0 + 500.0 * x * y).astype(np.int32)
    return Image.fromarray(values, "I")


def _float() -> Image.Image:
    x, y = _ramp(128, 96)
    return Image.fromarray((300.0 * x * y - 20.0).astype(np.float32), "F")


def _ycbcr() -> Image.Image:
    return _rgb(140, 110).convert("YCbCr")


def _hsv() -> Image.Image:
    return _rgb(140, 110).convert("HSV")


def _lab() -> Image.Image:
    return _rgb(140, 110).convert("LAB")


def _i16_big_endian() -> Image.Image:
    x, y = _ramp(64, 48)
    values = np.rint(65535.0 * x * (1.0 - y)).astype(">u2")
    return Image.frombytes("I;16B", (64, 48), values.tobytes())


def _palette_alpha() -> Image.Image:
    """``PA``: palette indices plus an alpha ramp."""
    x, _ = _ramp(150, 120)
    palette = _palette_image(150, 120)
    indices = np.asarray(palette)
    img = Image.frombytes("PA", (150, 120), np.dstack([indices, _to_u8(x)]).tobytes())
    img.putpalette(palette.getpalette() or [])
    return img


def _la_premultiplied() -> Image.Image:
    """``La`` (premultiplied alpha): the reference cannot convert it to RGB and raises."""
    x, y = _ramp(40, 30)
    return Image.frombytes("La", (40, 30), np.dstack([_to_u8(x), _to_u8(y)]).tobytes())


def _jpeg() -> Image.Image:
    """A JPEG-decoded image, left lazily loaded as a user's ``Image.open`` would be."""
    return Image.open(JPEG_PATH)


_IMAGES: dict[str, Callable[[], Image.Image]] = {
    "rgb_gradient": lambda: _rgb(257, 193),
    "rgb_noise": _rgb_noise,
    "rgb_big": lambda: _rgb(1920, 1080),
    "rgb_square_224": lambda: _rgb(224, 224),
    "rgb_1x1": lambda: _rgb(1, 1),
    "rgb_3x5": lambda: _rgb(3, 5),
    "rgb_wide": lambda: _rgb(500, 10),
    "rgb_tall": lambda: _rgb(10, 500),
    "rgba_alpha": _rgba,
    "l_gray": _l_image,
    "la_gray_alpha": _la_image,
    "p_palette": _palette,
    "p_transparent": _palette_transparent,
    "bilevel_1": _bilevel,
    "cmyk": _cmyk,
    "i16": _i16,
    "i32": _i32,
    "f32": _float,
    "ycbcr": _ycbcr,
    "hsv": _hsv,
    "lab": _lab,
    "i16_big_endian": _i16_big_endian,
    "pa_palette_alpha": _palette_alpha,
    "la_premultiplied": _la_premultiplied,
    "jpeg_photo": _jpeg,
}

IMAGE_NAMES: tuple[str, ...] = tuple(_IMAGES)


def make_image(name: str) -> Image.Image:
    """A fresh copy of the named test image."""
    return _IMAGES[name]()


def image_digest(img: Image.Image) -> str:
    """SHA256 over mode, size, palette, transparency and pixel bytes."""
    h = hashlib.sha256(f"{img.mode}|{img.size}|{img.info.get('transparency')}|".encode())
    if img.mode in ("P", "PA"):
        h.update(bytes(img.getpalette() or []))
    h.update(img.tobytes())
    return h.hexdigest()
