"""clip: a clean-room, drop-in successor to OpenAI's CLIP package.

import clip
model, preprocess = clip.load("ViT-B/32")
image = preprocess(Image.open("cat.png")).unsqueeze(0)
text = clip.tokenize(["a cat", "a dog"])
logits_per_image, logits_per_text = model(image, text)
"""

from clip.checkpoint import save
from clip.clip import available_models, load, tokenize
from clip.export import export_onnx
from clip.model import attention_heatmap

__all__ = [
    "attention_heatmap",
    "available_models",
    "export_onnx",
    "load",
    "save",
    "tokenize",
]
__version__ = "0.1.0"
