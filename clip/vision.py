"""CLIP's image towers: the ViT and the modified ResNet with attention pooling.

Shape legend: B batch, D width, C channels, R image resolution, G grid side (R // patch),
E embed dim.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip.checkpointing import checkpointed
from clip.layers import LayerNorm, Transformer, layer_indices

__all__ = ["AttentionPool2d", "Bottleneck", "ModifiedResNet", "VisionTransformer"]


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
        mlp_ratio: MLP hidden width over D (4 in OpenAI's models).
        activation: the MLP activation (see :data:`clip.layers.ACTIVATIONS`).
    """

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        *,
        mlp_ratio: float = 4.0,
        activation: str = "quick_gelu",
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
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio=mlp_ratio, activation=activation
        )
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

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them."""
        self.transformer.grad_checkpointing = enabled

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
        self.grad_checkpointing = False  # see set_grad_checkpointing
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
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        if getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled():
            for stage in stages:
                x = checkpointed(stage, x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.contiguous()  # the usual NCHW layout for callers that .view() it

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each stage's activations in backward instead of keeping them."""
        self.grad_checkpointing = enabled

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
