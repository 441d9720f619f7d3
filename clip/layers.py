"""CLIP's building blocks: fp32 LayerNorm, QuickGELU, the causal mask, the residual attention
block and the transformer stack, with OpenAI's module names.

Also what decides whether a block may take its fast paths: whether user code hooks or patches a
module (:func:`is_hooked`, :func:`any_hooked`, :func:`global_hooks_active`).

Shape legend: L sequence length, N batch (sequence-first layout), D width, H heads.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from clip.checkpointing import checkpointed

__all__ = [
    "ACTIVATIONS",
    "LayerNorm",
    "QuickGELU",
    "ResidualAttentionBlock",
    "Transformer",
    "activation_layer",
    "any_hooked",
    "causal_mask",
    "global_hooks_active",
    "is_hooked",
    "layer_indices",
    "mlp_width",
]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Inference: the same products in one buffer instead of three (same bits, ~18% faster).
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


# The MLP activations CLIP weights were trained with, by config name: OpenAI's (and MetaCLIP's,
# DFN's...) QuickGELU, or the exact GELU of LAION's and DataComp's later runs.
ACTIVATIONS = ("quick_gelu", "gelu")


def activation_layer(name: str) -> nn.Module:
    """The MLP activation module called ``name`` (one of :data:`ACTIVATIONS`).

    Raises:
        ValueError: for any other name.
    """
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def mlp_width(width: int, mlp_ratio: float) -> int:
    """Hidden width of a block's MLP: ``int(width * mlp_ratio)``, as open_clip computes it."""
    return int(width * mlp_ratio)


def causal_mask(length: int) -> Tensor:
    """Additive causal mask [length, length]: 0 on and below the diagonal, -inf above.

    Always built on the CPU (also under a ``torch.device("meta")`` context), so a model built on
    the meta device still carries a real mask; :func:`build_from_state_dict` then moves it to the
    device of the weights.
    """
    mask = torch.full((length, length), float("-inf"), device="cpu")
    return mask.triu_(1)


def _is_causal(mask: Optional[Tensor]) -> bool:
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.is_meta:
        return False
    return bool(torch.equal(mask.cpu().float(), causal_mask(mask.shape[0])))


def _tensor_state(tensor: Tensor) -> Optional[tuple[int, int, int]]:
    """Identity of a tensor's current contents (object, storage, in-place edits), or None if
    torch does not track it (inference-mode tensors have no version counter)."""
    try:
        return (id(tensor), tensor.data_ptr(), tensor._version)
    except RuntimeError:
        return None


# torch's registries of global module hooks (dicts it fills and empties in place).
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, {})
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
)


def global_hooks_active() -> bool:
    """Whether a global module hook (``torch.nn.modules.module.register_module_forward_hook``
    and friends) is registered: every module call then goes to user code."""
    return any(_GLOBAL_HOOKS)


def is_hooked(module: nn.Module) -> bool:
    """Whether user code hooks ``module`` (forward, pre-forward or backward hooks) or replaced
    its ``forward`` on the instance (``module.forward = f``)."""
    return (
        bool(
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
        )
        or "forward" in module.__dict__
    )


def any_hooked(root: nn.Module) -> bool:
    """Whether :func:`is_hooked` holds for ``root`` or any module inside it."""
    stack = [root]
    while stack:
        module = stack.pop()
        if is_hooked(module):
            return True
        stack.extend(m for m in module._modules.values() if m is not None)
    return False


# ``nn.MultiheadAttention.forward`` as imported: a class-level patch made later is detected.
_MHA_FORWARD = nn.MultiheadAttention.forward


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Input and output are sequence-first, [L, N, D], as in OpenAI's package. The weights live in an
    ``nn.MultiheadAttention`` (``attn``) so their names and shapes are OpenAI's; the computation
    uses ``F.scaled_dot_product_attention`` with the fused in-projection.

    The fused computation runs only while ``attn`` is a plain ``nn.MultiheadAttention`` that user
    code has not hooked or patched (see :meth:`fused_attention`); otherwise ``attn`` itself is
    called, as in OpenAI's package, so hooks and patches see what they expect.

    Args:
        d_model: width D.
        n_head: number of attention heads.
        attn_mask: optional additive mask [L, L]; kept as a non-persistent buffer. A causal mask
            is recognised and run as ``is_causal`` attention, so shorter inputs need no slicing.
        mlp_ratio: MLP hidden width over D (4 in OpenAI's models).
        activation: the MLP activation, one of :data:`ACTIVATIONS`; the module is always named
            ``mlp.gelu``, as in OpenAI's models.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        attn_mask: Optional[Tensor] = None,
        *,
        mlp_ratio: float = 4.0,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        hidden = mlp_width(d_model, mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, hidden)),
                    ("gelu", activation_layer(activation)),
                    ("c_proj", nn.Linear(hidden, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def __setattr__(self, name: str, value: Any) -> None:
        # Keep the mask a non-persistent buffer however it is set.
        if name == "attn_mask" and (value is None or isinstance(value, Tensor)):
            self.register_buffer(name, value, persistent=False)
            self.mask_is_causal  # noqa: B018 (answer now, so compiled code has it to read)
            return
        super().__setattr__(name, value)

    @property
    def mask_is_causal(self) -> bool:
        """Whether ``attn_mask`` is, right now, the additive causal mask of its size.

        Checked against the mask's contents once per change: assigning another tensor, moving
        it (``.to``), or editing it in place (``attn_mask.zero_()``) makes the next call look
        again. A mask on the meta device has no contents: it keeps the answer of the mask it
        replaced (``model.to("meta")`` keeps a causal mask causal). Under ``torch.compile`` the
        last answer is used.
        """
        cached = self.__dict__.get("_causal_answer")
        if torch.compiler.is_compiling():
            return bool(cached is not None and cached[1])
        mask: Optional[Tensor] = self.attn_mask  # a buffer (or, while tracing, a plain attribute)
        state = None if mask is None else _tensor_state(mask)
        if state is not None and cached is not None and cached[0] == state:
            return bool(cached[1])
        if mask is not None and mask.is_meta:
            answer = bool(cached is not None and cached[1]) and mask.shape[-1:] == mask.shape[:1]
        else:
            answer = _is_causal(mask)
        self.__dict__["_causal_answer"] = (state, answer)
        return answer

    def attention(self, x: Tensor) -> Tensor:
        """Self-attention of ``x`` [L, N, D] → [L, N, D]."""
        length, batch, width = x.shape
        if not self.fused_attention():
            mask = self._sliced_mask(length, x.dtype)
            return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        heads = self.attn.num_heads
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)  # [L, N, 3D]
        qkv = qkv.view(length, batch, 3, heads, width // heads).permute(2, 1, 3, 0, 4)
        q, k, v = qkv.unbind(0)  # each [N, H, L, D/H]
        causal = self.mask_is_causal
        mask = None if causal else self._sliced_mask(length, x.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.permute(2, 0, 1, 3).reshape(length, batch, width)  # [L, N, D]
        return self.attn.out_proj(y)

    def fused_attention(self) -> bool:
        """Whether :meth:`attention` may compute with the weights of ``attn`` directly.

        False, so that ``attn`` itself is called, when ``attn`` is not exactly
        ``nn.MultiheadAttention``, is hooked, has its ``forward`` replaced on the instance or on
        the class, or a global module hook is registered.
        """
        attn = self.attn
        return (
            type(attn) is nn.MultiheadAttention
            and nn.MultiheadAttention.forward is _MHA_FORWARD
            and not is_hooked(attn)
            and not global_hooks_active()
        )

    def runs_as_built(self) -> bool:
        """Whether this block computes exactly what its code says, unobserved: no method of it
        patched or overridden, no module in it hooked (see :func:`is_hooked`), ``attn`` fused.

        Together with :attr:`mask_is_causal`, what lets ``CLIP.encode_text`` skip the columns
        after the last end-of-text token.
        """
        cls = type(self)
        return (
            cls.forward is _BLOCK_FORWARD
            and cls.attention is _BLOCK_ATTENTION
            and "attention" not in self.__dict__
            and not is_hooked(self)
            and self.fused_attention()
            and not self._inner_modules_hooked()
        )

    def _inner_modules_hooked(self) -> bool:
        """:func:`any_hooked` over the block's submodules. A clean answer is kept until a hook
        is next registered anywhere (torch numbers every hook handle), so the common case costs
        no walk; a hooked answer is recomputed on each call, so removing the hook is seen.

        Not seen until the next hook registration: a ``forward`` replaced on the instance of an
        inner module (``ln_1``, ``mlp``...) after a clean answer. Those modules act on each
        position alone, so the pooled result is unchanged; only the length they see differs.
        (``attn`` and the block itself are checked on every call.)"""
        serial = getattr(RemovableHandle, "next_id", None)
        if serial is not None and self.__dict__.get("_clean_at_hook_serial") == serial:
            return False
        hooked = any(any_hooked(m) for m in self._modules.values() if m is not None)
        self.__dict__["_clean_at_hook_serial"] = None if hooked else serial
        return hooked

    def _sliced_mask(self, length: int, dtype: torch.dtype) -> Optional[Tensor]:
        """The mask for ``length`` tokens (texts may be shorter than the context), in ``dtype``."""
        if self.attn_mask is None:
            return None
        return self.attn_mask[:length, :length].to(dtype)

    def attention_weights(self, x: Tensor) -> Tensor:
        """Attention probabilities softmax(QK^T / sqrt(d) + mask) of this block, per head.

        Computed separately from :meth:`attention` (which stays fused), in fp32, from the weights
        of ``attn`` (``in_proj_weight``/``in_proj_bias``).

        Args:
            x: the block's input [L, N, D] (before ``ln_1``).

        Returns:
            [N, H, L, L] float32; row i holds the weights query i gives every key, summing to 1.
        """
        length, batch, width = x.shape
        heads = self.attn.num_heads
        qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias).float()
        qkv = qkv.view(length, batch, 3, heads, width // heads).permute(2, 1, 3, 0, 4)
        q, k = qkv[0], qkv[1]  # each [N, H, L, D/H]
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // heads)  # [N, H, L, L]
        mask = self._sliced_mask(length, torch.float32)
        return (scores if mask is None else scores + mask).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """[L, N, D] → [L, N, D]."""
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# The block's own methods: a class-level patch (or a subclass override) is detected.
_BLOCK_FORWARD = ResidualAttentionBlock.forward
_BLOCK_ATTENTION = ResidualAttentionBlock.attention


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock`; sequence-first [L, N, D] in and out.

    Args:
        width: D.
        layers: number of blocks.
        heads: attention heads per block.
        attn_mask: optional additive mask given to every block (the text tower's causal mask).
        mlp_ratio: MLP hidden width over ``width``.
        activation: the MLP activation, one of :data:`ACTIVATIONS`.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        attn_mask: Optional[Tensor] = None,
        *,
        mlp_ratio: float = 4.0,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        blocks = [
            ResidualAttentionBlock(
                width, heads, attn_mask, mlp_ratio=mlp_ratio, activation=activation
            )
            for _ in range(layers)
        ]
        self.resblocks = nn.Sequential(*blocks)
        # Recompute each block's activations in backward (see CLIP.set_grad_checkpointing).
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """[L, N, D] → [L, N, D]."""
        if getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled():
            for block in self.resblocks:
                x = checkpointed(block, x)
            return x
        return self.resblocks(x)

    def is_causal_as_built(self) -> bool:
        """Whether every block is one of ours, with the causal mask, running as built (see
        :meth:`ResidualAttentionBlock.runs_as_built`), and nothing hooks this stack: then each
        output position depends only on the positions up to it, and nobody watches the rest."""
        if global_hooks_active() or type(self).forward is not _TRANSFORMER_FORWARD:
            return False
        if is_hooked(self) or is_hooked(self.resblocks):
            return False
        for block in self.resblocks:
            if not isinstance(block, ResidualAttentionBlock):
                return False
            if not (block.mask_is_causal and block.runs_as_built()):
                return False
        return True

    def forward_layers(self, x: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Outputs of chosen blocks; blocks after the last one asked for are not run.

        Args:
            x: [L, N, D] input of the first block.
            layers: block indices (negative ones count from the end); ``None`` for all.

        Returns:
            One [L, N, D] tensor per requested index, in the order asked.

        Raises:
            ValueError: if an index is out of range.
        """
        indices = layer_indices(layers, self.layers, "transformer")
        outputs: dict[int, Tensor] = {}
        for i, block in enumerate(self.resblocks[: max(indices, default=-1) + 1]):
            x = block(x)
            outputs[i] = x
        return [outputs[i] for i in indices]

    def attention_maps(self, x: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Per-head attention weights of chosen blocks (see ``attention_weights`` of a block).

        Args:
            x: [L, N, D] input of the first block.
            layers: block indices (negative ones count from the end); ``None`` for all.

        Returns:
            One [N, H, L, L] float32 tensor per requested index, in the order asked.

        Raises:
            ValueError: if an index is out of range.
        """
        indices = layer_indices(layers, self.layers, "transformer")
        maps: dict[int, Tensor] = {}
        for i, block in enumerate(self.resblocks[: max(indices, default=-1) + 1]):
            if i in indices:
                maps[i] = cast(ResidualAttentionBlock, block).attention_weights(x)
            x = block(x)
        return [maps[i] for i in indices]


_TRANSFORMER_FORWARD = Transformer.forward


def layer_indices(layers: Optional[Sequence[int]], count: int, what: str) -> list[int]:
    """Validate block indices against ``count`` blocks and make them non-negative.

    Args:
        layers: indices in ``[-count, count)``; ``None`` means every block in order.
        count: number of blocks.
        what: name of the stack, for the error message.

    Returns:
        The indices, non-negative, in the order given.

    Raises:
        TypeError: if ``layers`` is not a sequence of ints.
        ValueError: if it is empty or an index is out of range.
    """
    if layers is None:
        return list(range(count))
    if isinstance(layers, (int, str, bytes)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise TypeError(f"layers must be a sequence of ints such as [-1] or [3, 7], got {layers!r}")
    if len(layers) == 0:
        raise ValueError("layers is empty; pass at least one block index, or None for all")
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ValueError(
            f"layer index {bad[0]} is out of range for the {what} with {count} blocks; "
            f"use 0..{count - 1}, or -{count}..-1 to count from the end"
        )
    return [i % count for i in layers]
