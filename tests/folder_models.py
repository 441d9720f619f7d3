"""Tiny models of the zoo's non-OpenAI configurations, saved as folders in open_clip's hub layout.

Each differs from OpenAI's CLIP in what shapes cannot tell, so code that assumes OpenAI's values
gives other numbers: GELU instead of QuickGELU, image heads 80 wide, MLP ratios other than 4,
mean and std 0.5 with a squash resize and bilinear interpolation. Also the tiny GELU ViT
(``TINY``, ``tiny_model``) the folder tests build, save and load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import clip
from clip.config import CLIPConfig
from clip.model import CLIP
from clip.preprocess import PreprocessConfig

# A tiny GELU ViT: 128 wide (2 heads of 64), text 64 wide in 4 heads of 16.
TINY = CLIPConfig(32, 32, 2, 128, 8, 77, 49408, 64, 4, 2, activation="gelu")

SQUASH_HALF = PreprocessConfig(
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", resize_mode="squash"
)

# The text tower both zoo models share: 2 layers 128 wide in 2 heads, GELU, MLP ratio 2.5.
ZOO_TEXT: dict[str, Any] = {
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 128,
    "transformer_heads": 2,
    "transformer_layers": 2,
    "activation": "gelu",
    "text_mlp_ratio": 2.5,
}

# A ViT with 4 heads of 80 (width 320: 5 heads of 64 would build too, and be wrong), MLP ratios
# 3 and 2.5, GELU, LAION-style preprocessing.
ZOO_VIT = CLIPConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=320,
    vision_patch_size=8,
    vision_head_width=80,
    vision_mlp_ratio=3.0,
    preprocess=SQUASH_HALF,
    **ZOO_TEXT,
)

# A ModifiedResNet with GELU text MLPs, an attention pool of 2 heads of 128, the same preprocessing.
ZOO_RN = CLIPConfig(
    embed_dim=32,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=8,
    vision_patch_size=None,
    vision_head_width=128,
    preprocess=SQUASH_HALF,
    **ZOO_TEXT,
)

ZOO = {"zoo-vit": ZOO_VIT, "zoo-rn": ZOO_RN}


def tiny_model(config: CLIPConfig = TINY, seed: int = 0) -> CLIP:
    """A model of ``config`` as initialised after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return CLIP.from_config(config).eval()


def random_model(config: CLIPConfig, seed: int = 0) -> CLIP:
    """A randomly initialised model, with norm weights and biases perturbed too (so that no
    parameter sits at a value that hides a wrong computation), and BatchNorm statistics measured
    on random images (with the initial ones, activations fade with depth and a ResNet's
    embedding hardly depends on its input)."""
    torch.manual_seed(seed)
    model = CLIP.from_config(config)
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: one batch's statistics
        if norms:
            side = config.image_resolution
            model.train().visual(torch.randn(8, 3, side, side))
        for norm in norms:
            norm.momentum = 0.1
        model.eval()
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.add_(0.02 * torch.randn_like(param))
            elif "ln_" in name or ".bn" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def save_folder(config: CLIPConfig, folder: Path, seed: int = 0) -> Path:
    """Save a random model of ``config`` to ``folder`` (open_clip's hub layout); the folder."""
    clip.save(random_model(config, seed), folder)
    return folder
