"""CLIP's image and text towers, in one readable file.

Module names equal the key prefixes of OpenAI's released state dicts, so a checkpoint loads with no
renaming, and research code that reaches into submodules (``model.transformer.resblocks[i].attn``,
``model.visual.conv1``...) finds what it expects. Hyperparameters are read from tensor shapes by
:class:`CLIPConfig`; nothing here knows about files, URLs or devices beyond the tensors it is given.

Shape legend used in comments: B batch, L sequence length, N batch (sequence-first layout),
D width, H heads, C channels, R image resolution, G grid side (R // patch), E embed dim.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "CLIP",
    "AttentionPool2d",
    "Bottleneck",
    "CLIPConfig",
    "LayerNorm",
    "ModifiedResNet",
    "QuickGELU",
    "ResidualAttentionBlock",
    "TextTokens",
    "Transformer",
    "VisionTransformer",
    "attention_heatmap",
    "build_model",
    "convert_weights",
]

# Keys that OpenAI's TorchScript archives carry beside the weights.
ARCHIVE_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


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
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: Optional[Tensor] = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def __setattr__(self, name: str, value: Any) -> None:
        # Keep the mask a non-persistent buffer however it is set.
        if name == "attn_mask" and (value is None or isinstance(value, Tensor)):
            self.register_buffer(name, value, persistent=False)
            self.__dict__.pop("_causal_answer", None)
            self.mask_is_causal  # noqa: B018 (answer now, so compiled code has it to read)
            return
        super().__setattr__(name, value)

    @property
    def mask_is_causal(self) -> bool:
        """Whether ``attn_mask`` is, right now, the additive causal mask of its size.

        Checked against the mask's contents once per change: assigning another tensor, moving
        it (``.to``), or editing it in place (``attn_mask.zero_()``) makes the next call look
        again. Under ``torch.compile`` the last answer is used.
        """
        mask = self._buffers.get("attn_mask")
        if torch.compiler.is_compiling():
            return bool(self.__dict__.get("_causal_answer", (None, False))[1])
        state = None if mask is None else _tensor_state(mask)
        cached = self.__dict__.get("_causal_answer")
        if state is not None and cached is not None and cached[0] == state:
            return bool(cached[1])
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
        no walk; a hooked answer is recomputed on each call, so removing the hook is seen."""
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
    """

    def __init__(
        self, width: int, layers: int, heads: int, attn_mask: Optional[Tensor] = None
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        blocks = [ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)]
        self.resblocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """[L, N, D] → [L, N, D]."""
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


# --------------------------------------------------------------------------------------------
# Image towers
# --------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT image tower: patchify, class token, transformer, ln_post, projection.

    Args:
        input_resolution: R, the square input side in pixels.
        patch_size: side of a square patch; R must be a multiple of it.
        width: D, the transformer width.
        layers: transformer depth.
        heads: attention heads.
        output_dim: E, the joint embedding size.
    """

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x: Tensor) -> Tensor:
        """Images [B, 3, R, R] → the first block's input [B, 1+G*G, D] (after ``ln_pre``)."""
        x = self.conv1(x)  # [B, D, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+G*G, D]
        return self.ln_pre(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [B, 3, R, R] → all tokens after ``ln_post`` [B, 1+G*G, D], class token first."""
        x = self.embed(x)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)  # [B, 1+G*G, D]
        return self.ln_post(x)

    def forward_head(self, tokens: Tensor) -> Tensor:
        """Tokens [B, 1 + G*G, D] → class token projected [B, E] (or [B, D] if ``proj`` is None)."""
        return self.project(tokens[:, 0, :])

    def project(self, tokens: Tensor) -> Tensor:
        """Tokens [..., D] → [..., E] through ``proj`` (unchanged if ``proj`` is None)."""
        return tokens if self.proj is None else tokens @ self.proj

    def forward_layers(self, x: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Images [B, 3, R, R] → outputs of the chosen blocks, each [B, 1+G*G, D] (no ``ln_post``).

        Raises:
            ValueError: if a block index is out of range.
        """
        outputs = self.transformer.forward_layers(self.embed(x).transpose(0, 1), layers)
        return [y.transpose(0, 1) for y in outputs]

    def attention_maps(self, x: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Images [B, 3, R, R] → attention weights of the chosen blocks, each [B, H, T, T] fp32.

        T = 1 + G*G; token 0 is the class token, then the patches in row-major order.

        Raises:
            ValueError: if a block index is out of range.
        """
        return self.transformer.attention_maps(self.embed(x).transpose(0, 1), layers)

    def resize_input(self, resolution: int) -> None:
        """Adapt, in place, to square inputs of side ``resolution``.

        The patch-grid part of ``positional_embedding`` is resized bicubically (in fp32, then cast
        back); the class-token row is kept. At the current resolution nothing changes.

        Raises:
            ValueError: if ``resolution`` is not a positive multiple of the patch size.
        """
        patch = self.conv1.kernel_size[0]
        _check_resolution(resolution, patch, "the ViT patch size")
        self.positional_embedding = _resized_positions(
            self.positional_embedding, resolution // patch
        )
        self.input_resolution = resolution

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, R, R] → embeddings [B, E]."""
        return self.forward_head(self.forward_features(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided blocks downsample by average pooling, not strided convs.

    Args:
        inplanes: input channels.
        planes: inner channels; the block outputs ``planes * 4``.
        stride: spatial downsampling factor (1 or 2).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Sequential] = None
        self.stride = stride
        if stride > 1 or inplanes != out:
            layers = [
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]
            self.downsample = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        """[B, inplanes, h, w] → [B, 4*planes, h/stride, w/stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        y += identity  # in place: one [B, 4*planes, h, w] buffer fewer (RN50 b16 ~6% faster)
        return self.relu3(y)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean token, prepended to the spatial tokens, attends to all of them.

    Args:
        spacial_dim: side of the input feature map (R // 32). (OpenAI's spelling, kept.)
        embed_dim: channels C of the feature map.
        num_heads: attention heads.
        output_dim: output size (default: ``embed_dim``).
    """

    def __init__(
        self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None
    ) -> None:
        super().__init__()
        pos = torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5
        self.positional_embedding = nn.Parameter(pos)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def tokens(self, x: Tensor) -> Tensor:
        """Feature map [B, C, h, w] → mean token + spatial tokens with positions [B, 1+h*w, C]."""
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+h*w, C]
        return x + self.positional_embedding.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Feature map [B, C, h, w] → pooled embedding [B, output_dim]."""
        x = self.tokens(x)
        return self.attend(x[:, :1], x)[:, 0]

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Feature map [B, C, h, w] → every token used as a query [B, 1+h*w, output_dim].

        Token 0 (the mean token) is the pooled embedding :meth:`forward` returns.
        """
        x = self.tokens(x)
        return self.attend(x, x)

    def attend(self, queries: Tensor, x: Tensor) -> Tensor:
        """Multi-head attention of ``queries`` [B, Q, C] over tokens ``x`` [B, T, C] → [B, Q, E]."""
        batch, length, width = x.shape
        heads, n = self.num_heads, queries.shape[1]
        q = self.q_proj(queries).view(batch, n, heads, -1).transpose(1, 2)  # [B, H, Q, C/H]
        k = self.k_proj(x).view(batch, length, heads, -1).transpose(1, 2)  # [B, H, T, C/H]
        v = self.v_proj(x).view(batch, length, heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, Q, C/H]
        return self.c_proj(y.transpose(1, 2).reshape(batch, n, width))

    def attention_weights(self, x: Tensor) -> Tensor:
        """Feature map [B, C, h, w] → attention weights, every token a query [B, H, T, T] fp32.

        T = 1 + h*w; row 0 is the mean token's query, the one that produces the pooled output.
        """
        x = self.tokens(x)
        batch, length, _ = x.shape
        q = self.q_proj(x).float().view(batch, length, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).float().view(batch, length, self.num_heads, -1).transpose(1, 2)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-conv stem with average pooling, anti-aliased strided bottlenecks, and
    attention pooling instead of global average pooling.

    Args:
        layers: bottleneck count of each of the four stages.
        output_dim: E.
        heads: attention-pool heads.
        input_resolution: R; the final feature map is R // 32 on a side.
        width: stem width; stage widths are 4x, 8x, 16x, 32x this.
    """

    def __init__(
        self,
        layers: Union[tuple[int, ...], list[int]],
        output_dim: int,
        heads: int,
        input_resolution: int = 224,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: Tensor) -> Tensor:
        """[B, 3, R, R] → [B, width, R/4, R/4], channels-last in memory (see :func:`_nhwc`)."""
        x = self.relu1(self.bn1(self.conv1(_nhwc(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [B, 3, R, R] → feature map before attention pooling [B, 32*width, R/32, R/32]."""
        x = self.stem(x.to(self.conv1.weight.dtype))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.contiguous()  # the usual NCHW layout for callers that .view() it

    def forward_head(self, features: Tensor) -> Tensor:
        """Feature map [B, C, R/32, R/32] → attention-pooled embedding [B, E]."""
        return self.attnpool(features)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, R, R] → embeddings [B, E]."""
        return self.forward_head(self.forward_features(x))

    def forward_layers(self, x: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Images [B, 3, R, R] → outputs of the chosen stages (``layer1``..``layer4`` are 0..3).

        Stage i gives [B, 4*width*2^i, R/(4*2^i), R/(4*2^i)]; stages after the last asked are
        not run.

        Raises:
            ValueError: if a stage index is out of range.
        """
        indices = layer_indices(layers, 4, "ResNet (stages layer1..layer4)")
        x = self.stem(x.to(self.conv1.weight.dtype))
        outputs: dict[int, Tensor] = {}
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        for i, stage in enumerate(stages[: max(indices) + 1]):
            x = stage(x)
            outputs[i] = x
        return [outputs[i].contiguous() for i in indices]

    def attention_maps(self, x: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Images → the attention pool's weights, every token a query: [[B, H, T, T]] fp32.

        The pool is the ResNet's only attention layer, so ``layers`` may only name it (0 or -1).

        Raises:
            ValueError: if ``layers`` names another layer.
        """
        indices = layer_indices(layers, 1, "ResNet attention pool (a single layer)")
        weights = self.attnpool.attention_weights(self.forward_features(x))
        return [weights for _ in indices]

    def resize_input(self, resolution: int) -> None:
        """Adapt, in place, to square inputs of side ``resolution``.

        The spatial part of ``attnpool.positional_embedding`` is resized bicubically (in fp32,
        then cast back); the mean-token row is kept. At the current resolution nothing changes.

        Raises:
            ValueError: if ``resolution`` is not a positive multiple of 32.
        """
        _check_resolution(resolution, 32, "the ResNet's total stride")
        pool = self.attnpool
        pool.positional_embedding = _resized_positions(pool.positional_embedding, resolution // 32)
        self.input_resolution = resolution


def _nhwc(x: Tensor) -> Tensor:
    """Images [B, C, H, W] stored channels-last, the layout oneDNN (CPU) and cuDNN (CUDA)
    convolutions run fastest on: RN50 encode_image ~1.25x on a 2-core CPU. Only the memory order
    changes, so the convolutions sum in another order (fp32 relative difference ~4e-7). The
    weights keep their layout, so state dicts are unchanged."""
    if x.device.type not in ("cpu", "cuda"):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _check_resolution(resolution: int, multiple: int, what: str) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if resolution % multiple:
        low = max(multiple, resolution // multiple * multiple)
        raise ValueError(
            f"resolution {resolution} is not a multiple of {multiple} ({what}); "
            f"use e.g. {low} or {low + multiple}"
        )


def _resized_positions(pos: nn.Parameter, grid: int) -> nn.Parameter:
    """[1 + g*g, D] positional embedding → [1 + grid*grid, D]: row 0 kept, the g x g grid
    resized bicubically (align_corners=False) in fp32, then cast back to ``pos``'s dtype."""
    old = math.isqrt(pos.shape[0] - 1)
    with torch.no_grad():
        cells = pos[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, D, g, g]
        cells = F.interpolate(cells, size=(grid, grid), mode="bicubic", align_corners=False)
        cells = cells.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)  # [G*G, D]
        resized = torch.cat([pos[:1], cells])  # [1 + G*G, D]
    return nn.Parameter(resized, requires_grad=pos.requires_grad)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


class CLIP(nn.Module):
    """Contrastive image-text model: an image tower, a causal text transformer, and a shared space.

    The constructor's arguments and their order are OpenAI's, so subclasses written for OpenAI's
    package work unchanged.

    Args:
        embed_dim: E, the joint embedding size.
        image_resolution: R.
        vision_layers: an int (ViT depth) or four ints (ResNet stage depths).
        vision_width: ViT width, or ResNet stem width.
        vision_patch_size: ViT patch size (ignored for ResNets).
        context_length: maximum text length in tokens (77).
        vocab_size: token vocabulary size (49408).
        transformer_width: text transformer width.
        transformer_heads: text transformer heads.
        transformer_layers: text transformer depth.
    """

    def __init__(
        self,
        embed_dim: int,
        image_resolution: int,
        vision_layers: Union[tuple[int, int, int, int], int],
        vision_width: int,
        vision_patch_size: Optional[int],
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.visual: Union[ModifiedResNet, VisionTransformer]
        if isinstance(vision_layers, (tuple, list)):
            heads = vision_width * 32 // 64
            self.visual = ModifiedResNet(
                vision_layers, embed_dim, heads, image_resolution, vision_width
            )
        else:
            if vision_patch_size is None:
                raise ValueError("a ViT image tower needs vision_patch_size")
            heads = vision_width // 64
            self.visual = VisionTransformer(
                image_resolution, vision_patch_size, vision_width, vision_layers, heads, embed_dim
            )
        mask = self.build_attention_mask()
        self.transformer = Transformer(
            transformer_width, transformer_layers, transformer_heads, mask
        )
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Random initialisation as used to train CLIP (for training from scratch)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            self._init_resnet(self.visual)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        stds = {
            "attn.in_proj_weight": attn_std,
            "attn.out_proj.weight": proj_std,
            "mlp.c_fc.weight": fc_std,
            "mlp.c_proj.weight": proj_std,
        }
        for name, param in self.transformer.named_parameters():
            std = stds.get(name.split(".", 2)[-1])
            if std is not None:
                nn.init.normal_(param, std=std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @staticmethod
    def _init_resnet(visual: ModifiedResNet) -> None:
        pool = visual.attnpool
        std = pool.c_proj.in_features**-0.5
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(linear.weight, std=std)
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)

    def build_attention_mask(self) -> Tensor:
        """The text tower's causal mask [context_length, context_length] (additive, -inf above)."""
        return causal_mask(self.context_length)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the image tower's first convolution: the dtype inputs are cast to."""
        return self.visual.conv1.weight.dtype

    # ---- image ------------------------------------------------------------------------------

    def encode_image(self, image: Tensor) -> Tensor:
        """Embed images.

        Args:
            image: float tensor [B, 3, R, R] on the model's device, normalised as ``preprocess``
                does; cast to ``model.dtype``.

        Returns:
            Image embeddings [B, E], not normalised.
        """
        self._check_image(image)
        return self.visual(image.to(self.dtype))

    def encode_image_tokens(self, image: Tensor, *, project: bool = False) -> Tensor:
        """Every token of the image tower, on the path :meth:`encode_image` pools from.

        ViT: all tokens after ``ln_post`` [B, 1+G*G, D] (class token first, then the G x G
        patches row by row); with ``project=True`` multiplied by ``visual.proj`` → [B, 1+G*G, E],
        whose token 0 is ``encode_image(image)``. Nothing is L2-normalised.

        ResNet: the sequence the attention pool attends over [B, 1+h*w, C] (the feature map's
        mean token, then the h x h spatial features row by row, positional embedding added; no
        normalisation); with ``project=True`` the attention pool run with every token as a query
        (then ``c_proj``) → [B, 1+h*w, E], whose token 0 is ``encode_image(image)``. The feature
        map itself is ``model.visual.forward_features(image)``.

        Args:
            image: [B, 3, R, R], as for :meth:`encode_image`.
            project: map the tokens into the joint embedding space.

        Returns:
            Tokens [B, 1+G*G, D or E] (G = R / patch for ViTs, R / 32 for ResNets).
        """
        self._check_image(image)
        image = image.to(self.dtype)
        visual = self.visual
        if isinstance(visual, VisionTransformer):
            tokens = visual.forward_features(image)
            return visual.project(tokens) if project else tokens
        features = visual.forward_features(image)
        return (
            visual.attnpool.forward_tokens(features)
            if project
            else visual.attnpool.tokens(features)
        )

    def encode_image_layers(
        self, image: Tensor, layers: Optional[Sequence[int]] = None
    ) -> list[Tensor]:
        """Outputs of chosen blocks of the image tower (nothing after the last one is run).

        ViT: transformer blocks (``visual.transformer.resblocks``), each output [B, 1+G*G, D],
        before ``ln_post``. ResNet: the four stages ``layer1``..``layer4`` (indices 0..3), each
        a feature map [B, C_i, h_i, w_i].

        Args:
            image: [B, 3, R, R], as for :meth:`encode_image`.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One tensor per index, in the order asked.

        Raises:
            ValueError: if an index is out of range (the message gives the valid range).
        """
        self._check_image(image)
        return self.visual.forward_layers(image.to(self.dtype), layers)

    def image_attention(
        self, image: Tensor, layers: Optional[Sequence[int]] = None
    ) -> list[Tensor]:
        """Per-head attention weights of the image tower, computed only when called.

        ViT: each chosen block's softmax(QK^T / sqrt(d)) [B, H, T, T], T = 1+G*G, token 0 the
        class token. ResNet: the attention pool is the only layer (``layers`` 0 or -1); its
        weights with every token as a query [B, H, T, T], T = 1+h*w, row 0 the pooling query.
        Weights are float32 and each row sums to 1. Turn them into a heat map with
        :func:`attention_heatmap`.

        Args:
            image: [B, 3, R, R], as for :meth:`encode_image`.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One [B, H, T, T] tensor per index, in the order asked.

        Raises:
            ValueError: if an index is out of range.
        """
        self._check_image(image)
        return self.visual.attention_maps(image.to(self.dtype), layers)

    def _check_image(self, image: Tensor) -> None:
        if torch.jit.is_tracing():
            return
        res = self.visual.input_resolution
        expected = f"[B, 3, {res}, {res}]"
        if not isinstance(image, Tensor):
            raise TypeError(f"image must be a torch.Tensor {expected}, got {type(image).__name__}")
        if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (res, res):
            hint = " (add a batch dimension with image.unsqueeze(0))" if image.dim() == 3 else ""
            raise ValueError(
                f"image must have shape {expected}, got {list(image.shape)}{hint}; "
                "use the preprocess returned by clip.load to resize and normalise images"
            )
        if not image.is_floating_point():
            raise TypeError(
                f"image must be a float tensor, got {image.dtype}; "
                "use the preprocess returned by clip.load to convert and normalise images"
            )
        _check_device(image, self.visual.conv1.weight, "image")

    # ---- text -------------------------------------------------------------------------------

    def encode_text(self, text: Tensor) -> Tensor:
        """Embed tokenized texts.

        The text tower is causal and pools at the end-of-text token (the largest id in each row),
        so it runs only on the first ``max EOT position + 1`` columns: the result is the same as
        on the full padded batch, computed faster. It does so only while every text block has the
        causal mask and nothing observes the text tower: with another mask (e.g. ``None`` for a
        bidirectional variant), a hook on a block or its ``attn``, or a patched ``attn.forward``,
        all L columns are run, as in OpenAI's package (see :meth:`text_is_trimmable`).

        Args:
            text: token ids [B, L] with L ≤ ``context_length``, as from ``clip.tokenize``; any
                integer dtype that can hold the vocabulary's ids.

        Returns:
            Text embeddings [B, E], not normalised.

        Raises:
            TypeError: if ``text`` is not an integer tensor, or its dtype cannot hold the ids.
            ValueError: on a wrong shape, device or an id out of the vocabulary.
        """
        text = self._check_text(text)
        trim = not torch.jit.is_tracing() and self.text_is_trimmable()
        return self._pooled_text(text, trim=trim)

    def text_is_trimmable(self) -> bool:
        """Whether :meth:`encode_text` may skip the columns after the batch's last end-of-text
        token: the text blocks are causal and run as built, and nothing hooks the text tower
        (see :meth:`Transformer.is_causal_as_built`)."""
        if is_hooked(self.token_embedding) or is_hooked(self.ln_final):
            return False
        transformer = self.transformer
        return isinstance(transformer, Transformer) and transformer.is_causal_as_built()

    def _pooled_text(self, text: Tensor, trim: bool) -> Tensor:
        """Unchecked :meth:`encode_text`; ``trim=False`` keeps the graph free of data-dependent
        shapes (tracing, ONNX export)."""
        x, eot = self._text_tokens(text, trim)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, D]
        return pooled @ self.text_projection

    def _text_tokens(self, text: Tensor, trim: bool) -> TextTokens:
        """Unchecked text tower up to ``ln_final``: [B, L] ids → ([B, L', D], EOT index [B]).

        With ``trim`` only the first ``max EOT + 1`` columns are run (L' ≤ L): the causal mask
        makes those columns independent of the rest; only pass it when :meth:`text_is_trimmable`.
        Without it (export, per-token outputs, masks other than causal, hooks) L' = L.
        """
        eot = text.argmax(dim=-1)  # [B]
        if trim and text.shape[0] > 0:
            text = text[:, : int(eot.max()) + 1]
        x = self._embed_text(text)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)  # [B, L', D]
        return TextTokens(self.ln_final(x).to(self.dtype), eot)

    def _embed_text(self, text: Tensor) -> Tensor:
        """[B, L] ids → the first block's input [B, L, D] (token + positional embedding)."""
        x = self.token_embedding(text).to(self.dtype)  # [B, L, D]
        return x + self.positional_embedding[: text.shape[1]].to(self.dtype)

    def encode_text_tokens(self, text: Tensor, *, project: bool = False) -> TextTokens:
        """Every token of the text tower, on the path :meth:`encode_text` pools from.

        Runs all L columns given (no trimming), so every position has a feature; positions after
        a row's end-of-text token see only that row's padding and the tokens before it.

        Args:
            text: [B, L] token ids, as for :meth:`encode_text`.
            project: multiply by ``text_projection`` → [B, L, E]; then
                ``tokens[arange(B), eot]`` is ``encode_text(text)``. Nothing is L2-normalised.

        Returns:
            ``TextTokens(tokens, eot)``: features after ``ln_final`` [B, L, D] (or [B, L, E]),
            and the end-of-text position of each row [B] (the argmax of the ids), the token
            :meth:`encode_text` pools.
        """
        text = self._check_text(text)
        tokens, eot = self._text_tokens(text, trim=False)
        return TextTokens(tokens @ self.text_projection if project else tokens, eot)

    def encode_text_layers(
        self, text: Tensor, layers: Optional[Sequence[int]] = None
    ) -> list[Tensor]:
        """Outputs of chosen text transformer blocks, each [B, L, D] (before ``ln_final``).

        Args:
            text: [B, L] token ids, as for :meth:`encode_text`.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One [B, L, D] tensor per index, in the order asked.

        Raises:
            ValueError: if an index is out of range.
        """
        text = self._check_text(text)
        x = self._embed_text(text).transpose(0, 1)  # [L, B, D]
        return [y.transpose(0, 1) for y in self.transformer.forward_layers(x, layers)]

    def text_attention(self, text: Tensor, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """Per-head causal attention weights of chosen text blocks, computed only when called.

        Args:
            text: [B, L] token ids, as for :meth:`encode_text`.
            layers: indices, negative ones counting from the end; ``None`` for all.

        Returns:
            One [B, H, L, L] float32 tensor per index; rows sum to 1, zero above the diagonal.

        Raises:
            ValueError: if an index is out of range.
        """
        text = self._check_text(text)
        x = self._embed_text(text).transpose(0, 1)  # [L, B, D]
        return self.transformer.attention_maps(x, layers)

    def _check_text(self, text: Tensor) -> Tensor:
        """Validate token ids [B, L]; returns them as int32/int64 (other integer dtypes cast)."""
        if torch.jit.is_tracing():
            return text
        if not isinstance(text, Tensor):
            raise TypeError(f"text must be a torch.Tensor of token ids, got {type(text).__name__}")
        if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
            raise TypeError(
                f"text must hold integer token ids, got {text.dtype}; use clip.tokenize"
            )
        _check_id_dtype(text.dtype, self.vocab_size)
        if text.dim() != 2:
            raise ValueError(
                f"text must have shape [B, L] (L ≤ {self.context_length}), got {list(text.shape)}; "
                "for [B, N, L] prompt groups, flatten with text.flatten(0, 1), then reshape"
            )
        if text.shape[1] > self.context_length or text.shape[1] == 0:
            raise ValueError(
                f"text has {text.shape[1]} tokens per row; this model takes 1 to "
                f"{self.context_length}: tokenize with clip.tokenize(..., truncate=True)"
            )
        _check_device(text, self.token_embedding.weight, "text")
        if text.dtype not in (torch.int32, torch.int64):
            text = text.long()  # what nn.Embedding takes
        if text.numel():
            low, high = (int(v) for v in torch.aminmax(text))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {self.vocab_size}), got range [{low}, {high}]; "
                    "use clip.tokenize"
                )
        return text

    # ---- both -------------------------------------------------------------------------------

    def resize_input(self, resolution: int) -> CLIP:
        """Adapt the image tower, in place, to square inputs of side ``resolution``.

        ViT: the patch-grid positional embedding is resized bicubically, the class-token row
        kept; ``resolution`` must be a multiple of the patch size. ResNet: the attention pool's
        positional embedding likewise; ``resolution`` must be a multiple of 32. The other weights
        are untouched, ``visual.input_resolution`` becomes ``resolution``, and at the current
        resolution the model is unchanged. Build the matching preprocessing with
        ``clip.preprocess.transform(resolution)``; ``copy.deepcopy(model)`` first to keep the
        original. The resized embedding is a new ``nn.Parameter``: create optimizers after this.

        Args:
            resolution: the new input side in pixels.

        Returns:
            ``self``, for chaining.

        Raises:
            ValueError: if ``resolution`` is not a valid multiple.
        """
        self.visual.resize_input(resolution)
        return self

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cosine similarities between images and texts.

        Args:
            image: [B, 3, R, R] preprocessed images.
            text: [T, L] token ids.

        Returns:
            ``(logits_per_image [B, T], logits_per_text [T, B])``.
        """
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


class TextTokens(NamedTuple):
    """Per-token text features and the end-of-text position of each row."""

    tokens: Tensor
    """[B, L, D] after ``ln_final`` (or [B, L, E] projected)."""
    eot: Tensor
    """[B] int64: index of each row's end-of-text token (its largest id)."""


def attention_heatmap(attentions: Sequence[Tensor], size: Optional[int] = None) -> Tensor:
    """Class-token attention over the image grid, averaged over layers and heads.

    Args:
        attentions: weights from :meth:`CLIP.image_attention`, each [B, H, 1+G*G, 1+G*G];
            pass the last layers' (e.g. ``layers=[-1]``) for the usual picture.
        size: if given, bilinearly upsample to [B, size, size] (e.g. the input resolution).

    Returns:
        [B, G, G] float32, each map summing to 1 (token 0's weights on the patches,
        renormalised), or [B, size, size] upsampled from it.

    Raises:
        ValueError: if ``attentions`` is empty, of mixed shapes, or not over a square grid.
    """
    if len(attentions) == 0:
        raise ValueError("attentions is empty; pass model.image_attention(image, layers=[-1])")
    shape = attentions[0].shape
    if any(a.shape != shape for a in attentions) or len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(
            f"expected attention weights of one shape [B, H, T, T], got "
            f"{[list(a.shape) for a in attentions]}"
        )
    grid = math.isqrt(shape[-1] - 1)
    if grid * grid != shape[-1] - 1:
        raise ValueError(f"{shape[-1]} tokens are not a class token plus a square grid")
    cls = torch.stack([a.float() for a in attentions])[..., 0, 1:].mean(dim=(0, 2))  # [B, G*G]
    heat = (cls / cls.sum(dim=-1, keepdim=True)).view(-1, grid, grid)  # [B, G, G]
    if size is None:
        return heat
    return F.interpolate(heat[:, None], size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ]


def _check_id_dtype(dtype: torch.dtype, vocab_size: int) -> None:
    """Refuse an integer dtype too narrow for the vocabulary's ids (e.g. uint8 for 49408 ids):
    ids cast into it were already wrapped around, so no answer computed from them is right."""
    if torch.iinfo(dtype).max < vocab_size - 1:
        raise TypeError(
            f"text is {dtype}, which holds ids up to {torch.iinfo(dtype).max}, but this model's "
            f"vocabulary has {vocab_size} ids (the end-of-text id is {vocab_size - 1}): such ids "
            "were corrupted when they were cast. Keep clip.tokenize's output as it is (int32 or "
            "int64), or cast with .long() before narrowing"
        )


def _check_device(x: Tensor, weight: Tensor, what: str) -> None:
    if x.device != weight.device:
        raise ValueError(
            f"{what} is on {x.device} but the model is on {weight.device}; "
            f"move it with {what}.to({str(weight.device)!r})"
        )


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


def build_from_state_dict(state_dict: Mapping[str, Tensor]) -> CLIP:
    """Build a :class:`CLIP` holding exactly the given tensors (dtypes kept), in eval mode.

    The model is constructed on the meta device and the weights assigned, so no random
    initialisation runs and no second copy of the weights is made. The caller's dict is not
    modified.

    Args:
        state_dict: OpenAI-format weights (TorchScript archive extras are ignored).

    Returns:
        The model, on the device of the given tensors (its attention masks too).
    """
    config = CLIPConfig.from_state_dict(state_dict)
    try:
        with torch.device("meta"):
            model = CLIP(**asdict(config))
    except (AssertionError, ValueError, RuntimeError) as e:
        raise ValueError(f"state dict shapes give an impossible CLIP ({config}): {e}") from e
    load_weights(model, state_dict, assign=True)
    _masks_to(model, model.token_embedding.weight.device)
    return model.eval()


def _masks_to(model: CLIP, device: torch.device) -> None:
    """Move the attention masks (non-persistent buffers, built on the CPU) to ``device``."""
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock) and module.attn_mask is not None:
            module.attn_mask = module.attn_mask.to(device)


def build_model(state_dict: dict) -> CLIP:
    """Build a CLIP model from an OpenAI-format state dict, as OpenAI's ``build_model`` does.

    Hyperparameters are inferred from tensor shapes; weights are loaded strictly; the model is
    returned in eval mode with OpenAI's mixed precision (see :func:`convert_weights`). Call
    ``.float()`` on the result for fp32. The caller's dict is not modified.

    Args:
        state_dict: the weights, e.g. ``torch.jit.load(path).state_dict()``.

    Returns:
        The model.
    """
    model = build_from_state_dict({k: v.clone() for k, v in state_dict.items()})
    convert_weights(model)
    return model
