"""A CLIP's hyperparameters: :class:`CLIPConfig`, read from checkpoint shapes and, for what shapes
cannot tell, from open_clip's ``open_clip_config.json`` (or our registry).

Shapes tell widths, depths, resolution, context, vocabulary and MLP widths. They do not tell the
MLP activation (QuickGELU or GELU), the image tower's head width (64 in OpenAI's models, 80 in
ViT-H/14, 88 in ViT-g/14, 104 in ViT-bigG/14) or how images are preprocessed; loading weights
with the wrong one gives no error, only worse numbers. Those come from the weights' config, with
OpenAI's values as defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import Tensor

from clip.layers import ACTIVATIONS, mlp_width
from clip.preprocess import PreprocessConfig

__all__ = ["CLIPConfig", "UnsupportedModelError", "family_of_keys", "ratio_for", "shape_fields"]


class UnsupportedModelError(ValueError):
    """Weights of a model family that is not OpenAI's CLIP architecture."""


def _count_prefixes(keys: list[str], prefix: str, depth: int) -> int:
    """Distinct values of the dotted component at ``depth`` among keys starting with ``prefix``."""
    return len({k.split(".")[depth] for k in keys if k.startswith(prefix)})


@dataclass(frozen=True)
class CLIPConfig:
    """Hyperparameters of a CLIP model.

    The first ten fields are those of :class:`clip.model.CLIP`'s constructor, in its order; the
    rest are what OpenAI's shapes-only loader assumed, with OpenAI's values as defaults.

    Args:
        embed_dim: E, the joint embedding size.
        image_resolution: R, the input side in pixels.
        vision_layers: ViT depth, or the four ResNet stage depths.
        vision_width: ViT width, or ResNet stem width.
        vision_patch_size: ViT patch size (None for a ResNet).
        context_length: text length in tokens.
        vocab_size: token vocabulary size.
        transformer_width: text transformer width.
        transformer_heads: text transformer heads.
        transformer_layers: text transformer depth.
        activation: MLP activation of both towers, ``"quick_gelu"`` or ``"gelu"``.
        vision_head_width: width of one image-tower attention head (ViT blocks, ResNet pool).
        vision_mlp_ratio: ViT MLP hidden width over its width.
        text_mlp_ratio: text MLP hidden width over its width.
        preprocess: image preprocessing beyond the input side.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: Union[int, tuple[int, int, int, int]]
    vision_width: int
    vision_patch_size: Optional[int]
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    activation: str = "quick_gelu"
    vision_head_width: int = 64
    vision_mlp_ratio: float = 4.0
    text_mlp_ratio: float = 4.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if isinstance(self.vision_layers, list):
            object.__setattr__(self, "vision_layers", tuple(self.vision_layers))
        # Canonical MLP ratios: two ratios that build the same hidden width are one config.
        for name, width in (
            ("vision_mlp_ratio", self.vision_width),
            ("text_mlp_ratio", self.transformer_width),
        ):
            ratio = float(getattr(self, name))
            if ratio <= 0 or mlp_width(width, ratio) <= 0:
                raise ValueError(f"{name} must give a positive MLP width, got {ratio}")
            object.__setattr__(self, name, ratio_for(width, mlp_width(width, ratio)))
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}"
            )
        if self.is_vit and self.vision_patch_size is None:
            raise ValueError("a ViT image tower needs vision_patch_size")
        heads_of = self.vision_width * (32 if not self.is_vit else 1)
        if self.vision_head_width <= 0 or heads_of % self.vision_head_width:
            raise ValueError(
                f"image tower width {heads_of} is not a multiple of the head width "
                f"{self.vision_head_width}"
            )
        if self.transformer_heads <= 0 or self.transformer_width % self.transformer_heads:
            raise ValueError(
                f"text width {self.transformer_width} is not divisible into "
                f"{self.transformer_heads} heads"
            )

    @property
    def is_vit(self) -> bool:
        """Whether the image tower is a ViT (else a ModifiedResNet)."""
        return isinstance(self.vision_layers, int)

    @property
    def vision_heads(self) -> int:
        """Attention heads of the image tower (ViT blocks, or the ResNet's attention pool)."""
        width = self.vision_width if self.is_vit else self.vision_width * 32
        return width // self.vision_head_width

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`clip.model.CLIP`'s constructor (all but ``preprocess``)."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del kwargs["preprocess"]
        return kwargs

    def replace(self, **changes: Any) -> CLIPConfig:
        """A copy with ``changes`` applied (e.g. ``image_resolution=336``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], **known: Any) -> CLIPConfig:
        """Read every hyperparameter the shapes of an OpenAI-format state dict tell.

        Args:
            state_dict: OpenAI-format weights (tensors may be on the meta device).
            **known: fields the shapes cannot tell (``activation``, ``vision_head_width``,
                ``transformer_heads``, ``preprocess``), from the weights' config; OpenAI's
                values otherwise.

        Returns:
            The configuration.

        Raises:
            ValueError: if a key the format requires is missing.
            UnsupportedModelError: for the keys of another model family.
        """
        shapes = shape_fields(state_dict)
        width = shapes["transformer_width"]
        return cls(**{"transformer_heads": width // 64, **shapes, **known})


def shape_fields(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The :class:`CLIPConfig` fields an OpenAI-format state dict's shapes tell, unchecked.

    Every field but ``transformer_heads``, ``activation``, ``vision_head_width`` and
    ``preprocess`` (and ``vision_mlp_ratio`` for a ResNet, which has no such MLP).

    Raises:
        ValueError: if a key the format requires is missing.
        UnsupportedModelError: for the keys of another model family.
    """
    family = family_of_keys(state_dict)
    if family is not None:
        raise UnsupportedModelError(family)
    required = ["text_projection", "positional_embedding", "token_embedding.weight"]
    required += ["ln_final.weight", "visual.conv1.weight"]
    required += ["transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(
            f"not a CLIP state dict in OpenAI's format: missing {missing} "
            f"(found {len(state_dict)} keys, e.g. {list(state_dict)[:3]})"
        )
    keys = list(state_dict)
    try:
        vision = (
            _vit_config(state_dict)
            if "visual.proj" in state_dict
            else _resnet_config(keys, state_dict)
        )
    except KeyError as e:
        raise ValueError(f"not a CLIP state dict in OpenAI's format: missing {e}") from None
    width = state_dict["ln_final.weight"].shape[0]
    text_hidden = state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        **vision,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=width,
        transformer_layers=_count_prefixes(keys, "transformer.resblocks.", 2),
        text_mlp_ratio=ratio_for(width, text_hidden),
    )


def ratio_for(width: int, hidden: int) -> float:
    """An MLP ratio r with ``int(width * r) == hidden`` (the hidden width read from a shape).

    ``hidden / width`` itself when it rounds back exactly (6144 / 1408 does); otherwise the next
    float above it, so that open_clip, which builds ``int(width * mlp_ratio)``, agrees.
    """
    ratio = hidden / width
    while mlp_width(width, ratio) < hidden:
        ratio = float.__add__(ratio, ratio * 2**-52)
    return 4.0 if hidden == 4 * width else ratio


def _vit_config(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    conv = sd["visual.conv1.weight"]  # [D, 3, P, P]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = _count_prefixes(list(sd), "visual.transformer.resblocks.", 3)
    hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return {
        "image_resolution": conv.shape[-1] * grid,
        "vision_layers": layers,
        "vision_width": conv.shape[0],
        "vision_patch_size": conv.shape[-1],
        "vision_mlp_ratio": ratio_for(conv.shape[0], hidden),
    }


def _resnet_config(keys: list[str], sd: Mapping[str, Tensor]) -> dict[str, Any]:
    if "visual.attnpool.positional_embedding" not in sd:
        raise ValueError("not a CLIP state dict: neither visual.proj (ViT) nor visual.attnpool")
    stages = tuple(_count_prefixes(keys, f"visual.layer{i}.", 2) for i in range(1, 5))
    grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "image_resolution": grid * 32,
        "vision_layers": stages,
        "vision_width": sd["visual.layer1.0.conv1.weight"].shape[0],
        "vision_patch_size": None,
    }


# --------------------------------------------------------------------------------------------
# Other model families, recognised to refuse them by name
# --------------------------------------------------------------------------------------------

_SUGGEST = "clip loads OpenAI's CLIP architecture only; load these weights with open_clip"

# Key prefixes that only other families' state dicts have.
_FAMILY_KEYS = (
    ("text_decoder.", "CoCa (a captioning decoder on top of CLIP)"),
    ("logit_bias", "SigLIP (sigmoid loss, with a logit bias)"),
    ("visual.trunk.", "a timm image tower (ConvNeXt, EVA, SigLIP, MobileCLIP, ViTamin...)"),
    ("text.transformer.", "a Hugging Face text tower (RoBERTa, XLM-R, mT5...)"),
    ("text.", "open_clip's CustomTextCLIP layout (text tower under text.)"),
    ("visual.transformer.resblocks.0.ls_1.", "a ViT with layer scale"),
)


def family_of_keys(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Why a state dict's keys are not OpenAI's CLIP layout, when they belong to a known family;
    None otherwise."""
    for prefix, family in _FAMILY_KEYS:
        if any(k.startswith(prefix) for k in state_dict):
            return f"these weights are {family}, not OpenAI's CLIP architecture; {_SUGGEST}"
    return None
