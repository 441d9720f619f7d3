"""clip: a clean-room, drop-in successor to OpenAI's CLIP package.

import clip
model, preprocess = clip.load("ViT-B/32")
image = preprocess(Image.open("cat.png")).unsqueeze(0)
text = clip.tokenize(["a cat", "a dog"])
logits_per_image, logits_per_text = model(image, text)
"""

from clip import zeroshot as _zeroshot
from clip.checkpoint import save
from clip.clip import available_models, load, tokenize
from clip.export import export_onnx
from clip.linear_probe import LinearProbe, linear_probe
from clip.loss import contrastive_loss
from clip.model import attention_heatmap
from clip.optimize import optimize
from clip.registry import available_weights
from clip.wise_ft import wise_ft
from clip.zeroshot import zero_shot_classifier

__all__ = [
    "LinearProbe",
    "attention_heatmap",
    "available_models",
    "available_weights",
    "contrastive_loss",
    "export_onnx",
    "imagenet_classes",
    "imagenet_templates",
    "imagenet_templates_short",
    "linear_probe",
    "load",
    "optimize",
    "save",
    "tokenize",
    "wise_ft",
    "zero_shot_classifier",
]
__version__ = "0.1.0"

_LAZY_DATA = ("imagenet_classes", "imagenet_templates", "imagenet_templates_short")


def __getattr__(name: str) -> list[str]:
    """Published data (``imagenet_classes`` ...), read from package data on first access."""
    if name in _LAZY_DATA:
        return getattr(_zeroshot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
