#!/usr/bin/env python
"""Record the registry of named weights, ``clip/registry.json``, from open_clip's own tables.

The registry lists every open_clip pretrained entry whose architecture is OpenAI's CLIP
(ModifiedResNet or ViT image tower, OpenAI's text transformer, same key names): the model names
in :data:`ARCHITECTURES` and all their tags. For each it records what tensor shapes cannot tell:

- shapes, head width and MLP ratios from the model's ``model_configs/<name>.json``;
- the activation from the *pretrained* entry's ``quick_gelu`` flag. open_clip builds
  ``create_model("ViT-B-32", pretrained="laion400m_e32")`` with GELU and only warns that the
  weights were trained with QuickGELU; the registry takes the flag from the weights;
- mean, std, interpolation and resize mode from the pretrained entry;
- the Hugging Face hub repository, or, for OpenAI's weights, their name in
  :data:`clip.download.MODELS` (those load from OpenAI's URLs);
- the parameter count of the model built on the meta device (checked against open_clip's);
- the published ImageNet zero-shot top-1 from a saved extract of open_clip's
  ``docs/openclip_results.csv`` (``scripts/data/openclip_results_imagenet.csv``). Rows named
  ``<model>-quickgelu`` were evaluated with QuickGELU: a QuickGELU entry takes that row when there
  is one (ViT-B-32 laion400m_e32: 62.93, against 60.24 evaluated with the wrong GELU), a GELU
  entry never does.

open_clip is a data source here only; ``clip`` never imports it. Not run by CI; the tests check
the recorded file against the installed open_clip. Usage::

    python scripts/record_registry.py
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "clip" / "registry.json"
RESULTS = ROOT / "scripts" / "data" / "openclip_results_imagenet.csv"

# open_clip model names of OpenAI's architecture, in the order the registry lists them.
ARCHITECTURES = (
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B-32",
    "ViT-B-32-256",
    "ViT-B-16",
    "ViT-B-16-plus-240",
    "ViT-L-14",
    "ViT-L-14-336",
    "ViT-H-14",
    "ViT-H-14-378",
    "ViT-g-14",
    "ViT-bigG-14",
)

# open_clip model name -> name in clip.download.MODELS, for the ``openai`` tag.
OPENAI_NAMES = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B-32": "ViT-B/32",
    "ViT-B-16": "ViT-B/16",
    "ViT-L-14": "ViT-L/14",
    "ViT-L-14-336": "ViT-L/14@336px",
}

# Where open_clip 3.3's hub repository is wrong. Its ViT-B-16-plus-240 laion400m_e32 entry points
# at the e31 repository (its URL names the e32 file); timm publishes the e32 weights, in open_clip's
# layout, under their own name.
HUB_FIXES = {
    ("ViT-B-16-plus-240", "laion400m_e32"): "timm/vit_base_patch16_plus_clip_240.laion400m_e32",
}

HUB_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}


def shapes_of(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """CLIPConfig's shape fields from an open_clip model config, refusing any key we don't
    model (it would change the architecture)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    unknown = (
        (set(model_cfg) - _MODEL_KEYS) | (set(vision) - _VISION_KEYS) | (set(text) - _TEXT_KEYS)
    )
    assert not unknown, f"model config keys not modelled by clip: {sorted(unknown)}"
    layers = vision["layers"]
    return {
        "embed_dim": model_cfg["embed_dim"],
        "image_resolution": vision["image_size"],
        "vision_layers": list(layers) if isinstance(layers, (list, tuple)) else layers,
        "vision_width": vision["width"],
        "vision_patch_size": vision.get("patch_size"),
        "context_length": text["context_length"],
        "vocab_size": text["vocab_size"],
        "transformer_width": text["width"],
        "transformer_heads": text["heads"],
        "transformer_layers": text["layers"],
        "vision_head_width": vision.get("head_width", 64),
        "vision_mlp_ratio": float(vision.get("mlp_ratio", 4.0)),
        "text_mlp_ratio": float(text.get("mlp_ratio", 4.0)),
    }


def read_results(path: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """(model name, tag) -> (params in millions, ImageNet top-1 as a fraction)."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    rows = {}
    for row in csv.DictReader(lines):
        key = (row["name"], row["pretrained"])
        assert key not in rows, f"duplicate row {key}"
        rows[key] = (float(row["params (M)"]), float(row["ImageNet 1k"]))
    return rows


def top1_row(
    rows: dict[tuple[str, str], tuple[float, float]], arch: str, tag: str, quick_gelu: bool
) -> Optional[tuple[str, str]]:
    """The results row that evaluated these weights with their own activation, if any."""
    candidates = [(arch + "-quickgelu", tag), (arch, tag)] if quick_gelu else [(arch, tag)]
    return next((key for key in candidates if key in rows), None)


def count_parameters(arch: str, shapes: dict[str, Any]) -> int:
    """Parameters of our model and of open_clip's, both built on the meta device (they must
    agree)."""
    import open_clip
    import torch

    from clip.config import CLIPConfig
    from clip.model import CLIP

    with torch.device("meta"):
        ours = CLIP.from_config(CLIPConfig(**shapes))
        theirs = open_clip.create_model(arch, pretrained=None, device="meta")
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()), arch
    return count


def record() -> dict[str, Any]:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    from clip.download import MODELS

    rows = read_results(RESULTS)
    architectures: dict[str, Any] = {}
    num_parameters: dict[str, int] = {}
    weights: list[dict[str, Any]] = []
    for arch in ARCHITECTURES:
        model_cfg = open_clip.get_model_config(arch)
        assert "quick_gelu" not in model_cfg, f"{arch}: activation belongs to the weights"
        architectures[arch] = shapes_of(model_cfg)
        num_parameters[arch] = count_parameters(arch, architectures[arch])
        for tag in list_pretrained_tags_by_model(arch):
            cfg = get_pretrained_cfg(arch, tag)
            quick_gelu = bool(cfg.get("quick_gelu", False))
            openai_name = OPENAI_NAMES.get(arch) if tag == "openai" else None
            hub_repo: Optional[str] = None
            if openai_name is not None:
                assert quick_gelu and cfg["url"] == MODELS[openai_name], (arch, cfg["url"])
            else:
                org, repo, filename = cfg["hf_hub"].split("/")
                assert not filename, f"{arch}/{tag}: hub entry names a file: {cfg['hf_hub']}"
                hub_repo = HUB_FIXES.get((arch, tag), f"{org}/{repo}")
            row = top1_row(rows, arch, tag, quick_gelu)
            if row is not None and round(num_parameters[arch] / 1e6, 2) != rows[row][0]:
                count, published = num_parameters[arch], rows[row][0]
                print(f"{arch}: {count} parameters, results say {published}M", file=sys.stderr)
            weights.append(
                {
                    "name": f"{arch}/{tag}",
                    "architecture": arch,
                    "tag": tag,
                    "activation": "quick_gelu" if quick_gelu else "gelu",
                    "preprocess": {
                        "mean": list(cfg["mean"]),
                        "std": list(cfg["std"]),
                        "interpolation": cfg["interpolation"],
                        "resize_mode": cfg["resize_mode"],
                    },
                    "hub_repo": hub_repo,
                    "filenames": [] if hub_repo is None else list(HUB_FILENAMES),
                    "openai_name": openai_name,
                    "top1": None if row is None else round(rows[row][1] * 100, 2),
                }
            )
            print(f"{arch}/{tag:36} top-1 from {row}", file=sys.stderr)
    aliases = {arch + "-quickgelu" for arch in ARCHITECTURES}
    unlisted = sorted({m for m, _ in open_clip.list_pretrained()} - set(ARCHITECTURES) - aliases)
    print(f"not OpenAI's architecture, left out: {unlisted}", file=sys.stderr)
    return {
        "source": f"open_clip {open_clip.__version__}; top-1: {RESULTS.relative_to(ROOT)}",
        "architectures": architectures,
        "num_parameters": num_parameters,
        "weights": weights,
    }


def dumps(data: dict[str, Any]) -> str:
    """JSON with one line per architecture and per weights entry (readable diffs)."""
    archs = ",\n".join(
        f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data["architectures"].items()
    )
    weights = ",\n".join(f"  {json.dumps(w)}" for w in data["weights"])
    return (
        f'{{\n "source": {json.dumps(data["source"])},\n'
        f' "architectures": {{\n{archs}\n }},\n'
        f' "num_parameters": {json.dumps(data["num_parameters"])},\n'
        f' "weights": [\n{weights}\n ]\n}}\n'
    )


def main() -> None:
    data = record()
    text = dumps(data)
    assert json.loads(text) == data
    tmp = OUTPUT.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(OUTPUT)
    print(f"wrote {len(data['weights'])} weights to {OUTPUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
