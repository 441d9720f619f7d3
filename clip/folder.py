"""Model folders in open_clip's hub layout: ``open_clip_config.json`` beside
``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``).

This is how the strongest CLIP weights of OpenAI's architecture (LAION, DataComp, MetaCLIP, DFN) are
published, and what :func:`write_folder` (``clip.save(model, folder)``) writes, so a folder saved
here loads in open_clip (``local-dir:``) and can be pushed to the hub as it is.

The config tells what tensor shapes cannot: the MLP activation, the image tower's head width and the
preprocessing. :func:`config_from_open_clip` reads it, refuses, by name, the model families that are
not OpenAI's architecture (ConvNeXt, EVA, SigLIP, CoCa, CLIPA, MobileCLIP, multilingual towers...),
and checks it against the shapes of the weights.

A save writes the weights, then the config, each atomically; both carry the same ``save_id``, so a
folder whose config and weights come from different saves (a save killed between the two) is
refused instead of loaded with the wrong config.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any, Optional, Union

from torch import Tensor

from clip.atomic import atomic_write
from clip.config import CLIPConfig, UnsupportedModelError, shape_fields
from clip.layers import mlp_width
from clip.preprocess import PreprocessConfig

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "check_describes",
    "config_from_open_clip",
    "find_weights",
    "is_model_folder",
    "new_save_id",
    "open_clip_document",
    "read_config_file",
    "save_id_of",
    "write_config",
]

CONFIG_NAME = "open_clip_config.json"
SAFETENSORS_NAME = "open_clip_model.safetensors"
BIN_NAME = "open_clip_pytorch_model.bin"
WEIGHT_NAMES = (SAFETENSORS_NAME, BIN_NAME)

# Where our saves put their id: a key of the config document open_clip ignores, and the
# safetensors metadata of the weights.
SAVE_KEY = "clip_torch"

PathLike = Union[str, "os.PathLike[str]"]


def is_model_folder(path: PathLike) -> bool:
    """Whether ``path`` is a directory holding an open_clip config or weights file."""
    path = os.fspath(path)
    names = (CONFIG_NAME, *WEIGHT_NAMES)
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def find_weights(folder: PathLike) -> str:
    """The weights file of a model folder: the safetensors file if present, else the ``.bin``.

    Raises:
        FileNotFoundError: if the folder has neither, naming what it holds.
    """
    folder = os.fspath(folder)
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(folder))[:10] if os.path.isdir(folder) else []
    raise FileNotFoundError(
        f"{folder!r} holds no weights: expected {SAFETENSORS_NAME} or {BIN_NAME} (open_clip's hub "
        f"layout), found {present}. Pass the path of a checkpoint file instead, or a folder "
        "written by clip.save(model, folder)"
    )


def read_config_file(path: PathLike) -> dict[str, Any]:
    """The JSON document of an ``open_clip_config.json`` (or an open_clip model-config file).

    Raises:
        ValueError: if the file is not a JSON object.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON ({e}); expected an open_clip config") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path!r} holds a JSON {type(doc).__name__}, not an open_clip config")
    return doc


def save_id_of(doc: Mapping[str, Any]) -> Optional[str]:
    """The id of the save that wrote a config document (None if not written by clip.save)."""
    ours = doc.get(SAVE_KEY)
    return ours.get("save_id") if isinstance(ours, Mapping) else None


def new_save_id() -> str:
    """A fresh id tying a saved config to the weights written with it."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------
# open_clip's config document → CLIPConfig
# --------------------------------------------------------------------------------------------

_SUGGEST = "clip loads OpenAI's CLIP architecture only; load these weights with open_clip"


def _family(model_cfg: Mapping[str, Any]) -> Optional[str]:
    """The name of a model family the config describes, if it is not OpenAI's architecture."""
    vision = model_cfg.get("vision_cfg") or {}
    text = model_cfg.get("text_cfg") or {}
    timm_name = str(vision.get("timm_model_name") or "").lower()
    hf_text = str(text.get("hf_model_name") or "")
    tokenizer = str(text.get("hf_tokenizer_name") or "")
    # MetaCLIP 2 "worldwide": OpenAI's towers with a multilingual tokenizer (XLM-V, vocabulary
    # 901,629; or mT5's) and end-of-sequence pooling.
    worldwide = text.get("vocab_size") == 901629 or "xlm-v" in tokenizer
    worldwide |= bool(tokenizer) and not hf_text and text.get("pool_type") == "eos"
    checks = [
        (model_cfg.get("multimodal_cfg"), "CoCa (contrastive captioner)"),
        (model_cfg.get("init_logit_bias") is not None, "SigLIP (sigmoid loss)"),
        ("convnext" in timm_name, "ConvNeXt"),
        ("eva" in timm_name, "EVA"),
        (any(n in timm_name for n in ("fastvit", "mobileclip", "_mci")), "MobileCLIP"),
        ("vitamin" in timm_name, "ViTamin"),
        ("pe_core" in timm_name, "PE-Core (Meta's Perception Encoder)"),
        ("siglip" in timm_name, "SigLIP"),
        (timm_name, f"a timm image tower ({timm_name})"),
        (worldwide, f"MetaCLIP 2 (multilingual, the {tokenizer or 'XLM-V'} tokenizer)"),
        (hf_text, f"a Hugging Face text tower ({hf_text})"),
        (vision.get("pool_type") == "avg" or vision.get("no_ln_pre"), "CLIPA"),
        (tokenizer, f"a model with the {tokenizer} tokenizer"),
        (model_cfg.get("custom_text"), "open_clip's CustomTextCLIP layout"),
    ]
    for hit, family in checks:
        if hit:
            return family
    return None


# Settings that change the computation, with the only value OpenAI's architecture has. Absent or
# equal is fine; anything else is refused by name.
_VISION_FIXED = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "act_kwargs": None,
    "norm_kwargs": None,
    "input_patchnorm": False,
    "global_average_pool": False,
}
_TEXT_FIXED = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "act_kwargs": None,
    "norm_kwargs": None,
    "tokenizer_kwargs": None,
    "attn_mask": True,
}
# Settings without effect on inference, or taken from the shapes.
_VISION_KNOWN = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"}
_VISION_KNOWN |= {"patch_dropout", "output_tokens", "timm_model_pretrained", "timm_pool"}
_VISION_KNOWN |= {"timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "timm_model_name"}
_TEXT_KNOWN = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TEXT_KNOWN |= {"output_tokens", "pad_id", "hf_model_name", "hf_tokenizer_name"}
_TEXT_KNOWN |= {"hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_MODEL_KNOWN = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "cast_dtype", "custom_text"}
_MODEL_KNOWN |= {"init_logit_scale", "init_logit_bias", "multimodal_cfg", "output_dict"}


def _unsupported_settings(model_cfg: Mapping[str, Any]) -> list[str]:
    found = []
    for section, fixed, known in (
        ("vision_cfg", _VISION_FIXED, _VISION_KNOWN),
        ("text_cfg", _TEXT_FIXED, _TEXT_KNOWN),
    ):
        cfg = model_cfg.get(section) or {}
        for key, value in cfg.items():
            if key in fixed:
                if value not in (fixed[key], None) and not (value == {} and fixed[key] is None):
                    found.append(f"{section}.{key}={value!r}")
            elif key not in known:
                found.append(f"{section}.{key}={value!r}")
    found += [f"{key}={model_cfg[key]!r}" for key in model_cfg if key not in _MODEL_KNOWN]
    return found


def config_from_open_clip(
    doc: Mapping[str, Any], state_dict: Optional[Mapping[str, Tensor]] = None
) -> CLIPConfig:
    """Read open_clip's config document, checked against the weights' shapes.

    Args:
        doc: the content of ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg":
            ...}``), or a bare model config (open_clip's ``model_configs/*.json``).
        state_dict: the weights; when given, every size the shapes tell must agree with the
            document, and the shapes fill what the document leaves out.

    Returns:
        The configuration.

    Raises:
        UnsupportedModelError: for another model family, or a setting OpenAI's architecture
            does not have.
        ValueError: if the document and the weights disagree, or the document is malformed.
    """
    model_cfg = doc.get("model_cfg", doc)
    if not isinstance(model_cfg, Mapping) or "vision_cfg" not in model_cfg:
        raise ValueError(
            "not an open_clip config: expected {'model_cfg': {'embed_dim', 'vision_cfg', "
            f"'text_cfg', ...}}, got keys {sorted(doc)[:8]}"
        )
    family = _family(model_cfg)
    if family is not None:
        raise UnsupportedModelError(
            f"this config describes {family}, not OpenAI's CLIP architecture; {_SUGGEST}"
        )
    unsupported = _unsupported_settings(model_cfg)
    if unsupported:
        raise UnsupportedModelError(
            f"this config has settings OpenAI's CLIP architecture does not: {unsupported}; "
            f"{_SUGGEST}"
        )
    stated = _stated_fields(model_cfg)
    stated["preprocess"] = _preprocess_from(doc.get("preprocess_cfg") or {})
    if state_dict is not None:
        # Shapes first, unchecked: a config for other weights is named as such, not as heads
        # that do not divide a width.
        shapes = shape_fields(state_dict)
        _check_agrees(stated, shapes)
        stated.update(shapes)
    try:
        return CLIPConfig(**stated)
    except ValueError as e:
        problem = "impossible" if state_dict is None else "the weights do not fit the"
        raise ValueError(f"{problem} open_clip model config ({e}): {dict(model_cfg)}") from e


_SHAPE_FIELDS = (
    "embed_dim",
    "image_resolution",
    "vision_layers",
    "vision_width",
    "vision_patch_size",
    "context_length",
    "vocab_size",
    "transformer_width",
    "transformer_layers",
    "vision_mlp_ratio",
    "text_mlp_ratio",
)


def _stated_fields(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPConfig fields from an open_clip model config, with open_clip's defaults."""
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    layers = vision.get("layers", 12)
    is_vit = not isinstance(layers, (list, tuple))
    text_width = text.get("width", 512)
    try:
        return dict(
            embed_dim=int(model_cfg["embed_dim"]),
            image_resolution=_side(vision.get("image_size", 224)),
            vision_layers=int(layers) if is_vit else tuple(int(n) for n in layers),
            vision_width=int(vision.get("width", 768)),
            vision_patch_size=int(vision.get("patch_size", 16)) if is_vit else None,
            context_length=int(text.get("context_length", 77)),
            vocab_size=int(text.get("vocab_size", 49408)),
            transformer_width=int(text_width),
            transformer_heads=int(text.get("heads", 8)),
            transformer_layers=int(text.get("layers", 12)),
            activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
            vision_head_width=int(vision.get("head_width", 64)),
            vision_mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
            text_mlp_ratio=float(text.get("mlp_ratio", 4.0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed open_clip model config ({e!r}): {dict(model_cfg)}") from e


def _side(image_size: Any) -> int:
    """The input side of ``image_size``: an int, or a square ``[side, side]`` as open_clip
    also accepts."""
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"image_size {image_size!r}: clip's models take square images only")
        image_size = image_size[0]
    return int(image_size)


def _preprocess_from(cfg: Mapping[str, Any]) -> PreprocessConfig:
    """The preprocessing of an open_clip ``preprocess_cfg``; missing or null values are
    open_clip's defaults (OpenAI's), and a single mean or std applies to all three channels as
    in open_clip."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"malformed open_clip preprocess_cfg: {cfg!r} is not a JSON object")
    defaults = PreprocessConfig()

    def value(key: str) -> Any:
        found = cfg.get(key)
        if found is None:
            return getattr(defaults, key)
        if key in ("mean", "std") and not isinstance(found, (list, tuple)):
            return (found,) * 3
        return found

    try:
        return PreprocessConfig(
            mean=value("mean"),
            std=value("std"),
            interpolation=value("interpolation"),
            resize_mode=value("resize_mode"),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"open_clip preprocess_cfg {dict(cfg)}: {e}") from e


def check_describes(config: CLIPConfig, state_dict: Mapping[str, Tensor]) -> None:
    """Check that ``config`` has the sizes the shapes of ``state_dict`` tell.

    Raises:
        ValueError: naming each size that differs.
        UnsupportedModelError: for the keys of another model family.
    """
    stated = {name: getattr(config, name) for name in _SHAPE_FIELDS}
    _check_agrees(stated, shape_fields(state_dict), what="the config")


def _check_agrees(
    stated: Mapping[str, Any], shapes: Mapping[str, Any], what: str = "the open_clip config"
) -> None:
    """Raise if the sizes a config states differ from those the weights' shapes tell."""
    wrong = []
    for name in _SHAPE_FIELDS:
        if name not in shapes:  # a ResNet has no vision_mlp_ratio
            continue
        said, found = stated[name], shapes[name]
        if name.endswith("mlp_ratio"):
            width = shapes["vision_width" if name.startswith("vision") else "transformer_width"]
            same = mlp_width(width, said) == mlp_width(width, found)
        else:
            same = said == found
        if not same:
            wrong.append(f"{name}: config {said!r}, weights {found!r}")
    if wrong:
        raise ValueError(
            f"{what} does not describe these weights: "
            + "; ".join(wrong)
            + ". Use the config file that came with the weights"
        )


# --------------------------------------------------------------------------------------------
# CLIPConfig → open_clip's config document
# --------------------------------------------------------------------------------------------


def open_clip_document(config: CLIPConfig, save_id: Optional[str] = None) -> dict[str, Any]:
    """The ``open_clip_config.json`` content describing ``config`` (open_clip reads it back as
    the same model and preprocessing).

    Args:
        config: the model's configuration.
        save_id: written under ``"clip_torch"`` (a key open_clip ignores) to tie the document to
            the weights saved with it.

    Returns:
        A JSON-serialisable dict.
    """
    if config.is_vit:
        vision: dict[str, Any] = {
            "image_size": config.image_resolution,
            "layers": config.vision_layers,
            "width": config.vision_width,
            "patch_size": config.vision_patch_size,
            "head_width": config.vision_head_width,
            "mlp_ratio": config.vision_mlp_ratio,
        }
    else:
        vision = {
            "image_size": config.image_resolution,
            "layers": list(config.vision_layers),  # type: ignore[arg-type]
            "width": config.vision_width,
            "patch_size": None,
            "head_width": config.vision_head_width,
        }
    pre = config.preprocess
    doc: dict[str, Any] = {
        "model_cfg": {
            "embed_dim": config.embed_dim,
            "quick_gelu": config.activation == "quick_gelu",
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": config.context_length,
                "vocab_size": config.vocab_size,
                "width": config.transformer_width,
                "heads": config.transformer_heads,
                "layers": config.transformer_layers,
                "mlp_ratio": config.text_mlp_ratio,
            },
        },
        "preprocess_cfg": {
            "mean": list(pre.mean),
            "std": list(pre.std),
            "interpolation": pre.interpolation,
            "resize_mode": pre.resize_mode,
        },
    }
    if save_id is not None:
        doc[SAVE_KEY] = {"save_id": save_id, "weights": SAFETENSORS_NAME}
    return doc


def write_config(folder: PathLike, doc: Mapping[str, Any]) -> None:
    """Write ``open_clip_config.json`` into ``folder``, atomically."""
    text = json.dumps(doc, indent=2) + "\n"
    atomic_write(os.path.join(os.fspath(folder), CONFIG_NAME), text.encode())
