"""Synthetic checkpoints in OpenAI's exact format, written from the published architecture.

This module is deliberately independent of ``clip.model``: it spells out every key and shape of
OpenAI's released state dicts from the published hyperparameters, so that tests can check our
model against the format rather than against itself.

Used by the test-suite and by ``scripts/record_reference_outputs.py`` (which feeds the same weights
to OpenAI's reference implementation to record golden outputs).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Arch:
    """Hyperparameters in the order of ``clip.model.CLIP.__init__``."""

    embed_dim: int
    image_resolution: int
    vision_layers: Union[int, tuple[int, int, int, int]]
    vision_width: int
    vision_patch_size: Union[int, None]
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int

    @property
    def is_vit(self) -> bool:
        return not isinstance(self.vision_layers, tuple)


# Published configurations of the nine released models, with their published parameter counts.
PUBLISHED: dict[str, tuple[Arch, int]] = {
    "RN50": (Arch(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12), 102_007_137),
    "RN101": (Arch(512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12), 119_688_033),
    "RN50x4": (Arch(640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12), 178_300_601),
    "RN50x16": (Arch(768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12), 290_979_217),
    "RN50x64": (Arch(1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12), 623_258_305),
    "ViT-B/32": (Arch(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12), 151_277_313),
    "ViT-B/16": (Arch(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12), 149_620_737),
    "ViT-L/14": (Arch(768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12), 427_616_513),
    "ViT-L/14@336px": (Arch(768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12), 427_944_193),
}

# Small models in the same format, for fast tests. Widths are multiples of 64 so that head counts
# (width // 64) are above one and head-splitting bugs show up.
TINY: dict[str, Arch] = {
    "tiny-vit": Arch(32, 32, 2, 128, 8, 77, 49408, 128, 2, 2),
    "tiny-rn": Arch(32, 64, (1, 1, 1, 1), 8, None, 77, 49408, 128, 2, 2),
}


def _block_shapes(prefix: str, width: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.attn.in_proj_weight", (3 * width, width)
    yield f"{prefix}.attn.in_proj_bias", (3 * width,)
    yield f"{prefix}.attn.out_proj.weight", (width, width)
    yield f"{prefix}.attn.out_proj.bias", (width,)
    yield f"{prefix}.ln_1.weight", (width,)
    yield f"{prefix}.ln_1.bias", (width,)
    yield f"{prefix}.mlp.c_fc.weight", (4 * width, width)
    yield f"{prefix}.mlp.c_fc.bias", (4 * width,)
    yield f"{prefix}.mlp.c_proj.weight", (width, 4 * width)
    yield f"{prefix}.mlp.c_proj.bias", (width,)
    yield f"{prefix}.ln_2.weight", (width,)
    yield f"{prefix}.ln_2.bias", (width,)


def _norm_shapes(prefix: str, width: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (width,)
    yield f"{prefix}.bias", (width,)


def _bn_shapes(prefix: str, width: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm_shapes(prefix, width)
    yield f"{prefix}.running_mean", (width,)
    yield f"{prefix}.running_var", (width,)
    yield f"{prefix}.num_batches_tracked", ()


def _vit_shapes(a: Arch) -> Iterator[tuple[str, Shape]]:
    assert isinstance(a.vision_layers, int) and a.vision_patch_size is not None
    w, grid = a.vision_width, a.image_resolution // a.vision_patch_size
    yield "visual.class_embedding", (w,)
    yield "visual.positional_embedding", (grid * grid + 1, w)
    yield "visual.proj", (w, a.embed_dim)
    yield "visual.conv1.weight", (w, 3, a.vision_patch_size, a.vision_patch_size)
    yield from _norm_shapes("visual.ln_pre", w)
    for i in range(a.vision_layers):
        yield from _block_shapes(f"visual.transformer.resblocks.{i}", w)
    yield from _norm_shapes("visual.ln_post", w)


def _bottleneck_shapes(prefix: str, inplanes: int, planes: int, downsample: bool):
    yield f"{prefix}.conv1.weight", (planes, inplanes, 1, 1)
    yield from _bn_shapes(f"{prefix}.bn1", planes)
    yield f"{prefix}.conv2.weight", (planes, planes, 3, 3)
    yield from _bn_shapes(f"{prefix}.bn2", planes)
    yield f"{prefix}.conv3.weight", (4 * planes, planes, 1, 1)
    yield from _bn_shapes(f"{prefix}.bn3", 4 * planes)
    if downsample:
        yield f"{prefix}.downsample.0.weight", (4 * planes, inplanes, 1, 1)
        yield from _bn_shapes(f"{prefix}.downsample.1", 4 * planes)


def _resnet_shapes(a: Arch) -> Iterator[tuple[str, Shape]]:
    assert isinstance(a.vision_layers, tuple)
    w = a.vision_width
    yield "visual.conv1.weight", (w // 2, 3, 3, 3)
    yield from _bn_shapes("visual.bn1", w // 2)
    yield "visual.conv2.weight", (w // 2, w // 2, 3, 3)
    yield from _bn_shapes("visual.bn2", w // 2)
    yield "visual.conv3.weight", (w, w // 2, 3, 3)
    yield from _bn_shapes("visual.bn3", w)
    inplanes = w
    for stage, blocks in enumerate(a.vision_layers):
        planes = w * 2**stage
        for j in range(blocks):
            first = j == 0  # stride 2 for stages 2-4, or a width change in stage 1
            yield from _bottleneck_shapes(f"visual.layer{stage + 1}.{j}", inplanes, planes, first)
            inplanes = 4 * planes
    d, spatial = 32 * w, a.image_resolution // 32
    yield "visual.attnpool.positional_embedding", (spatial * spatial + 1, d)
    for name in ("k_proj", "q_proj", "v_proj"):
        yield f"visual.attnpool.{name}.weight", (d, d)
        yield f"visual.attnpool.{name}.bias", (d,)
    yield "visual.attnpool.c_proj.weight", (a.embed_dim, d)
    yield "visual.attnpool.c_proj.bias", (a.embed_dim,)


def _text_shapes(a: Arch) -> Iterator[tuple[str, Shape]]:
    tw = a.transformer_width
    yield "positional_embedding", (a.context_length, tw)
    yield "text_projection", (tw, a.embed_dim)
    yield "logit_scale", ()
    yield "token_embedding.weight", (a.vocab_size, tw)
    for i in range(a.transformer_layers):
        yield from _block_shapes(f"transformer.resblocks.{i}", tw)
    yield from _norm_shapes("ln_final", tw)


def state_dict_shapes(a: Arch) -> dict[str, Shape]:
    """Every key of an OpenAI state dict for ``a``, with its shape."""
    vision = _vit_shapes(a) if a.is_vit else _resnet_shapes(a)
    return dict([*vision, *_text_shapes(a)])


def parameter_count(a: Arch) -> int:
    """Number of learnable parameters (BatchNorm running statistics excluded)."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    shapes = state_dict_shapes(a)
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(stats))


def is_half_in_release(key: str, shape: Shape) -> bool:
    """Whether OpenAI's ``convert_weights`` stores this tensor in fp16.

    Conv and Linear weights and biases, attention projections, ``text_projection`` and ``proj``
    are fp16; LayerNorm, BatchNorm, embeddings, positional and class embeddings and
    ``logit_scale`` stay fp32.
    """
    leaf = key.rsplit(".", 1)[-1]
    if key in ("text_projection", "visual.proj") or leaf.startswith("in_proj_"):
        return True
    if ".bn" in key or ".downsample.1." in key or ".ln_" in key or key.startswith("ln_final"):
        return False
    if "embedding" in key or key == "logit_scale":
        return False
    return leaf in ("weight", "bias")


def _seed(key: str, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "little")


def _fill(key: str, shape: Shape, salt: int) -> torch.Tensor:
    """Deterministic, well-scaled random values for one tensor."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.long)
    if key == "logit_scale":
        return torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
    g = torch.Generator().manual_seed(_seed(key, salt))
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("running_var"):
        return 1.0 + noise.abs() * 0.1
    if leaf in ("weight", "bias") and (".ln_" in key or ".bn" in key or "ln_final" in key):
        return (1.0 if leaf == "weight" else 0.0) + noise * 0.1
    if ".downsample.1." in key:
        return (1.0 if leaf == "weight" else 0.0) + noise * 0.1
    if leaf.endswith("bias") or key.endswith("running_mean"):
        return noise * 0.02
    if "embedding" in key:
        return noise * 0.02 if "token" in key else noise * 0.1
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return noise / math.sqrt(fan_in)


def make_state_dict(a: Arch, *, layout: str = "fp32", salt: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict for ``a`` in OpenAI's format.

    Args:
        a: architecture.
        layout: ``"openai"`` stores tensors in the released mixed precision (fp16 where
            ``convert_weights`` puts it); ``"fp32"`` stores everything as float32. Either way the
            fp16-stored tensors hold fp16-representable values, so both layouts describe exactly
            the same model.
        salt: changes every value; use it to get a second, different model.
    """
    out: dict[str, torch.Tensor] = {}
    for key, shape in state_dict_shapes(a).items():
        t = _fill(key, shape, salt)
        if is_half_in_release(key, shape):
            t = t.half() if layout == "openai" else t.half().float()
        out[key] = t
    return out


def meta_state_dict(a: Arch) -> dict[str, torch.Tensor]:
    """The same keys and shapes as :func:`make_state_dict`, as meta tensors (no memory)."""
    out = {}
    for key, shape in state_dict_shapes(a).items():
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float16
        out[key] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def state_dict_digest(sd: dict[str, torch.Tensor]) -> str:
    """SHA256 over keys, dtypes, shapes and bytes, to prove two runs used identical weights."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(
            t.view(torch.uint8).numpy().tobytes()
            if t.dim()
            else t.reshape(1).view(torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()


class _Holder(torch.nn.Module):
    """A bare module tree that holds tensors under dotted names (no CLIP code involved)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _holder_for(sd: dict[str, torch.Tensor]) -> _Holder:
    root = _Holder()
    for key, tensor in sd.items():
        *path, leaf = key.split(".")
        node: torch.nn.Module = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, _Holder())
            node = node._modules[part]  # type: ignore[assignment]
        if tensor.is_floating_point() and "running_" not in leaf:
            node.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            node.register_buffer(leaf, tensor)
    return root


def write_openai_archive(a: Arch, sd: dict[str, torch.Tensor], path: str) -> None:
    """Write ``sd`` as a TorchScript archive in the layout of OpenAI's released files.

    The archive is a traced module whose state dict holds the weights (in the given dtypes) plus
    the ``input_resolution``, ``context_length`` and ``vocab_size`` tensors the releases carry.
    """
    extras = {
        "input_resolution": torch.tensor(a.image_resolution),
        "context_length": torch.tensor(a.context_length),
        "vocab_size": torch.tensor(a.vocab_size),
    }
    holder = _holder_for({**sd, **extras})
    traced = torch.jit.trace(holder, torch.zeros(1))
    torch.jit.save(traced, path)
