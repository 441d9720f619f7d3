"""Loading weights strictly, and OpenAI's mixed fp16 precision. (:class:`CLIPConfig`, which
reads hyperparameters from checkpoint shapes, lives in :mod:`clip.config` and is importable here
too.)"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from clip.config import CLIPConfig

__all__ = ["ARCHIVE_EXTRA_KEYS", "CLIPConfig", "convert_weights", "load_weights"]

# Keys that OpenAI's TorchScript archives carry beside the weights.
ARCHIVE_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


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
