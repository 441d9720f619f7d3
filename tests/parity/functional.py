"""CLIP's forward pass written out with ``torch.nn.functional`` and a state dict: a test oracle.

Independent of ``clip.model``: it reads OpenAI-format weights by key and spells out the published
architecture (pre-norm blocks, QuickGELU, causal text mask, class-token ViT, anti-aliased ResNet
with attention pooling) with plain tensor math, so tests can check our modules against the format
instead of against themselves.

Precision follows OpenAI's mixed layout for ``dtype`` (see ``checkpoints.is_half_in_release``):
convolution, linear and projection weights and all activations in ``dtype``; LayerNorm computed
in fp32 from fp32 weights and cast back; BatchNorm statistics, embeddings and ``logit_scale`` fp32.
Attention scores and softmax are computed in fp32 (a different order from any fused kernel), and
the result cast back to ``dtype``.

Shapes: B batch, L text length, D width, H heads, T image tokens, E embedding size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from checkpoints import is_half_in_release
from torch import Tensor

StateDict = dict[str, Tensor]


@dataclass
class Trace:
    """What a tower computed: the pooled embedding and, for transformers, every block."""

    pooled: Tensor
    """[B, E] the tower's embedding (encode_image / encode_text)."""
    tokens: Optional[Tensor] = None
    """[B, L or T, D] after the final LayerNorm (transformer towers)."""
    layers: list[Tensor] = field(default_factory=list)
    """[B, L or T, D] output of each block (ResNet: each stage's feature map)."""
    attention: list[Tensor] = field(default_factory=list)
    """[B, H, L, L] fp32 attention probabilities of each block."""


def weight(sd: StateDict, key: str, dtype: torch.dtype) -> Tensor:
    """``sd[key]`` in the precision OpenAI's mixed layout gives it for ``dtype``."""
    t = sd[key]
    return t.to(dtype) if is_half_in_release(key, tuple(t.shape)) else t.float()


def layer_norm(sd: StateDict, prefix: str, x: Tensor) -> Tensor:
    """LayerNorm in fp32 with fp32 weights, cast back to ``x``'s dtype."""
    w, b = sd[f"{prefix}.weight"].float(), sd[f"{prefix}.bias"].float()
    return F.layer_norm(x.float(), w.shape, w, b, 1e-5).to(x.dtype)


def block(
    sd: StateDict, prefix: str, x: Tensor, heads: int, mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """One residual attention block, sequence-first as OpenAI's: [L, B, D] → ([L, B, D], probs
    [B, H, L, L])."""
    dtype = x.dtype
    length, batch, width = x.shape
    h = layer_norm(sd, f"{prefix}.ln_1", x)
    qkv = F.linear(
        h,
        weight(sd, f"{prefix}.attn.in_proj_weight", dtype),
        weight(sd, f"{prefix}.attn.in_proj_bias", dtype),
    )  # [L, B, 3D]
    q, k, v = (  # each [B*H, L, D/H]
        t.reshape(length, batch * heads, -1).transpose(0, 1).float() for t in qkv.chunk(3, -1)
    )
    scores = q @ k.transpose(-2, -1) / math.sqrt(width // heads)  # [B*H, L, L]
    if mask is not None:
        scores = scores + mask[:length, :length]
    probs = scores.softmax(-1)  # [B*H, L, L]
    mixed = (probs @ v).transpose(0, 1).reshape(length, batch, width).to(dtype)  # [L, B, D]
    x = x + F.linear(
        mixed,
        weight(sd, f"{prefix}.attn.out_proj.weight", dtype),
        weight(sd, f"{prefix}.attn.out_proj.bias", dtype),
    )
    h = layer_norm(sd, f"{prefix}.ln_2", x)
    h = F.linear(
        h,
        weight(sd, f"{prefix}.mlp.c_fc.weight", dtype),
        weight(sd, f"{prefix}.mlp.c_fc.bias", dtype),
    )
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    h = F.linear(
        h,
        weight(sd, f"{prefix}.mlp.c_proj.weight", dtype),
        weight(sd, f"{prefix}.mlp.c_proj.bias", dtype),
    )
    return x + h, probs.view(batch, heads, length, length)


def _blocks(sd: StateDict, prefix: str, x: Tensor, mask: Optional[Tensor], trace: Trace) -> Tensor:
    count = len({k.split(".")[prefix.count(".") + 1] for k in sd if k.startswith(prefix + ".")})
    heads = x.shape[-1] // 64
    x = x.permute(1, 0, 2)  # [L, B, D], the reference's layout (a view, as there)
    for i in range(count):
        x, probs = block(sd, f"{prefix}.{i}", x, heads, mask)
        trace.layers.append(x.permute(1, 0, 2))
        trace.attention.append(probs)
    return x.permute(1, 0, 2)


def encode_text(
    sd: StateDict,
    text: Tensor,
    dtype: torch.dtype = torch.float32,
    mask: Union[str, Tensor, None] = "causal",
) -> Trace:
    """Text tower over all L positions: ids [B, L] → Trace (pooled at each row's largest id).

    ``mask``: ``"causal"`` (CLIP's), ``None`` (a bidirectional variant), or an additive [L, L]
    tensor given to every block.
    """
    length = text.shape[1]
    x = F.embedding(text.long(), sd["token_embedding.weight"].float()).to(dtype)  # [B, L, D]
    x = x + sd["positional_embedding"][:length].to(dtype)
    if isinstance(mask, str):
        mask = torch.full((length, length), float("-inf")).triu_(1)
    trace = Trace(pooled=x)
    x = _blocks(sd, "transformer.resblocks", x, mask, trace)
    trace.tokens = layer_norm(sd, "ln_final", x)
    eot = trace.tokens[torch.arange(len(text)), text.argmax(-1)]  # [B, D]
    trace.pooled = eot @ weight(sd, "text_projection", dtype)
    return trace


def encode_image(sd: StateDict, images: Tensor, dtype: torch.dtype = torch.float32) -> Trace:
    """Image tower (ViT or ResNet, from the keys): images [B, 3, R, R] → Trace."""
    x = images.to(dtype)
    return _vit(sd, x) if "visual.proj" in sd else _resnet(sd, x)


def _vit(sd: StateDict, x: Tensor) -> Trace:
    dtype = x.dtype
    conv = weight(sd, "visual.conv1.weight", dtype)
    x = F.conv2d(x, conv, stride=conv.shape[-1])  # [B, D, G, G]
    x = x.flatten(2).transpose(1, 2)  # [B, G*G, D]
    cls = sd["visual.class_embedding"].to(dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"].to(dtype)  # [B, T, D]
    x = layer_norm(sd, "visual.ln_pre", x)
    trace = Trace(pooled=x)
    x = _blocks(sd, "visual.transformer.resblocks", x, None, trace)
    trace.tokens = layer_norm(sd, "visual.ln_post", x)
    trace.pooled = trace.tokens[:, 0] @ weight(sd, "visual.proj", dtype)
    return trace


def _conv_bn(sd: StateDict, conv: str, bn: str, x: Tensor, **kw: int) -> Tensor:
    x = F.conv2d(x, weight(sd, f"{conv}.weight", x.dtype), **kw)
    stats = [sd[f"{bn}.{n}"].float() for n in ("running_mean", "running_var", "weight", "bias")]
    return F.batch_norm(x, *stats, training=False, eps=1e-5)


def _bottleneck(sd: StateDict, p: str, x: Tensor, stride: int) -> Tensor:
    y = F.relu(_conv_bn(sd, f"{p}.conv1", f"{p}.bn1", x))
    y = F.relu(_conv_bn(sd, f"{p}.conv2", f"{p}.bn2", y, padding=1))
    if stride > 1:
        y = F.avg_pool2d(y, stride)
    y = _conv_bn(sd, f"{p}.conv3", f"{p}.bn3", y)
    if f"{p}.downsample.0.weight" in sd:
        x = F.avg_pool2d(x, stride) if stride > 1 else x
        x = _conv_bn(sd, f"{p}.downsample.0", f"{p}.downsample.1", x)
    return F.relu(y + x)


def _resnet(sd: StateDict, x: Tensor) -> Trace:
    x = F.relu(_conv_bn(sd, "visual.conv1", "visual.bn1", x, stride=2, padding=1))
    x = F.relu(_conv_bn(sd, "visual.conv2", "visual.bn2", x, padding=1))
    x = F.relu(_conv_bn(sd, "visual.conv3", "visual.bn3", x, padding=1))
    x = F.avg_pool2d(x, 2)
    trace = Trace(pooled=x)
    for stage in range(1, 5):
        blocks = len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{stage}.")})
        for j in range(blocks):
            x = _bottleneck(sd, f"visual.layer{stage}.{j}", x, 2 if stage > 1 and j == 0 else 1)
        trace.layers.append(x)
    trace.pooled = _attention_pool(sd, x)
    return trace


def _attention_pool(sd: StateDict, fmap: Tensor) -> Tensor:
    """Feature map [B, C, h, w] → [B, E]: the mean token attends over mean + spatial tokens."""
    dtype, p = fmap.dtype, "visual.attnpool"
    x = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
    x = torch.cat([x.mean(1, keepdim=True), x], 1) + sd[f"{p}.positional_embedding"].to(dtype)
    batch, _, width = x.shape
    heads = width // 64

    def proj(name: str, t: Tensor) -> Tensor:
        return F.linear(
            t, weight(sd, f"{p}.{name}.weight", dtype), weight(sd, f"{p}.{name}.bias", dtype)
        )

    def split(t: Tensor) -> Tensor:  # [B, n, C] → [B, H, n, C/H] in fp32
        return t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2).float()

    q, k, v = split(proj("q_proj", x[:, :1])), split(proj("k_proj", x)), split(proj("v_proj", x))
    probs = (q @ k.transpose(-2, -1) / math.sqrt(width // heads)).softmax(-1)  # [B, H, 1, T]
    mixed = (probs @ v).transpose(1, 2).reshape(batch, width).to(dtype)  # [B, C]
    return proj("c_proj", mixed)
