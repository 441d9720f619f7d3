"""Reading a CLIP's hyperparameters from checkpoint shapes, loading weights strictly, and
OpenAI's mixed fp16 precision."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

__all__ = ["ARCHIVE_EXTRA_KEYS", "CLIPConfig", "convert_weights", "load_weights"]

# Keys that OpenAI's TorchScript archives carry beside the weights.
ARCHIVE_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


# --------------------------------------------------------------------------------------------
# Configuration from checkpoint shapes, and building
# --------------------------------------------------------------------------------------------


def _count_prefixes(keys: list[str], prefix: str, depth: int) -> int:
    """Distinct values of the dotted component at ``depth`` among keys starting with ``prefix``."""
    return len({k.split(".")[depth] for k in keys if k.startswith(prefix)})


@dataclass(frozen=True)
class CLIPConfig:
    """Hyperparameters of a CLIP model, in the order of :class:`CLIP`'s constructor."""

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

    @property
    def is_vit(self) -> bool:
        """Whether the image tower is a ViT (else a ModifiedResNet)."""
        return isinstance(self.vision_layers, int)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> CLIPConfig:
        """Read every hyperparameter from the shapes of an OpenAI-format state dict.

        Args:
            state_dict: OpenAI-format weights (tensors may be on the meta device).

        Returns:
            The configuration.

        Raises:
            ValueError: if a key the format requires is missing.
        """
        required = ["text_projection", "positional_embedding", "token_embedding.weight"]
        required += ["ln_final.weight", "visual.conv1.weight"]
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(
                f"not a CLIP state dict in OpenAI's format: missing {missing} "
                f"(found {len(state_dict)} keys, e.g. {list(state_dict)[:3]})"
            )
        keys = list(state_dict)
        vision = (
            _vit_config(state_dict)
            if "visual.proj" in state_dict
            else _resnet_config(keys, state_dict)
        )
        width = state_dict["ln_final.weight"].shape[0]
        return cls(
            embed_dim=state_dict["text_projection"].shape[1],
            **vision,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=width,
            transformer_heads=width // 64,
            transformer_layers=_count_prefixes(keys, "transformer.resblocks.", 2),
        )


def _vit_config(sd: Mapping[str, Tensor]) -> dict:
    conv = sd["visual.conv1.weight"]  # [D, 3, P, P]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = _count_prefixes(list(sd), "visual.transformer.resblocks.", 3)
    return {
        "image_resolution": conv.shape[-1] * grid,
        "vision_layers": layers,
        "vision_width": conv.shape[0],
        "vision_patch_size": conv.shape[-1],
    }


def _resnet_config(keys: list[str], sd: Mapping[str, Tensor]) -> dict:
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


def convert_weights(model: nn.Module) -> None:
    """Cast, in place, the weights OpenAI keeps in fp16 to fp16.

    Conv and Linear weights and biases, attention projections, ``text_projection`` and ``proj``
    become fp16; LayerNorm, BatchNorm, embeddings and ``logit_scale`` stay as they are.

    Args:
        model: any module tree (typically a :class:`CLIP`).
    """

    def to_half(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            _half_params(module, ["weight", "bias"])
        if isinstance(module, nn.MultiheadAttention):
            names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
            _half_params(module, [*names, "in_proj_bias", "bias_k", "bias_v"])
        _half_params(module, ["text_projection", "proj"])

    model.apply(to_half)


def _half_params(module: nn.Module, names: list[str]) -> None:
    for name in names:
        tensor = getattr(module, name, None)
        if isinstance(tensor, Tensor):
            tensor.data = tensor.data.half()


def _without_archive_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state_dict.items() if k not in ARCHIVE_EXTRA_KEYS}


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], assign: bool = False) -> None:
    """Strictly load OpenAI-format weights, with an error that lists what does not fit.

    Args:
        model: the model to fill.
        state_dict: weights; the extra keys of OpenAI's archives are ignored.
        assign: take the given tensors as the parameters (keeps their dtypes, no copy).

    Raises:
        ValueError: on missing or unexpected keys, or mismatched shapes.
    """
    sd = _without_archive_keys(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(_mismatch_message(missing, unexpected, wrong))
    model.load_state_dict(sd, strict=True, assign=assign)


def _mismatch_message(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    parts = ["state dict does not fit the CLIP architecture inferred from its shapes:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            parts.append(f"{label} keys: {shown}")
    parts.append(
        "expected an unmodified OpenAI CLIP checkpoint (TorchScript archive or state dict)"
    )
    return "\n  ".join(parts)
