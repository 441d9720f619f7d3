"""The implementations the suite compares, each built from the same OpenAI-format state dict.

* ``clip`` — this package (``clip.model.build_from_state_dict``, what ``clip.load`` runs);
* ``reference`` — OpenAI's code from the ``clip-anytorch`` wheel, pip-installed into a temporary
  directory and imported as ``ref_clip`` (see ``bench_tokenizer.load_reference``);
* ``open_clip`` — ``ViT-B-32-quickgelu`` / ``RN50-quickgelu``, which take OpenAI's keys unchanged;
* ``hf`` — transformers' ``CLIPModel`` with the same configuration and SDPA attention, weights
  renamed by :func:`hf_state_dict` (ViT only: transformers has no ModifiedResNet);
* ``onnxruntime`` — our ``clip.export_onnx`` files run in ``onnxruntime.InferenceSession`` with
  default options but intra-op spinning off (CPU fp32 only; skipped when onnxruntime or the
  exporter is missing, see :func:`onnxruntime_missing`). The text file always runs the full
  context, as exported.

Every peer exposes ``encode_image(images)`` and ``encode_text(ids)`` returning unnormalised
embeddings, so the workloads time the same call everywhere.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/checkpoints.py: the weight generator

from checkpoints import PUBLISHED, Arch, make_state_dict  # noqa: E402

OPEN_CLIP_NAMES = {"ViT-B/32": "ViT-B-32-quickgelu", "RN50": "RN50-quickgelu"}


@dataclass
class Peer:
    """One implementation of one model, ready to time."""

    name: str
    module: torch.nn.Module
    encode_image: Callable[[Tensor], Tensor]
    encode_text: Callable[[Tensor], Tensor]


def weights(model_name: str, layout: str = "fp32") -> tuple[Arch, dict[str, Tensor]]:
    """The published architecture of ``model_name`` and random weights in OpenAI's format."""
    arch = PUBLISHED[model_name][0]
    return arch, make_state_dict(arch, layout=layout)


def _copy(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in sd.items()}


def ours(sd: dict[str, Tensor], device: str, half: bool) -> Peer:
    from clip.model import build_from_state_dict, convert_weights

    model = build_from_state_dict(_copy(sd)).float().to(device)
    if half:
        convert_weights(model)  # what clip.load does on CUDA
    return Peer("clip", model, model.encode_image, model.encode_text)


def reference(ref: Any, sd: dict[str, Tensor], device: str, half: bool) -> Peer:
    model = ref.model.build_model(_copy(sd)).to(device)  # fp16 mixed, as released
    if not half:
        model = model.float()  # what the reference's load does on the CPU
    model.eval()
    return Peer("reference", model, model.encode_image, model.encode_text)


def open_clip_peer(model_name: str, sd: dict[str, Tensor], device: str, half: bool) -> Peer:
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(OPEN_CLIP_NAMES[model_name], pretrained=None)
    model.load_state_dict(_copy(sd), strict=True)
    model = model.to(device).eval()
    if half:
        model = model.half()
    return Peer("open_clip", model, model.encode_image, model.encode_text)


def hf_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI ViT-CLIP keys → transformers ``CLIPModel`` keys (q/k/v split, projections .t())."""
    out = {"logit_scale": sd["logit_scale"]}
    for tower, src, dst in (("text", "", "text_model."), ("vision", "visual.", "vision_model.")):
        blocks = {k for k in sd if k.startswith(f"{src}transformer.resblocks.")}
        for i in range(len({k.split(".")[2 + (tower == "vision")] for k in blocks})):
            out.update(_hf_block(sd, f"{src}transformer.resblocks.{i}", f"{dst}encoder.layers.{i}"))
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["text_model.final_layer_norm.weight"] = sd["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = sd["ln_final.bias"]
    out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    emb = "vision_model.embeddings."
    out[emb + "class_embedding"] = sd["visual.class_embedding"]
    out[emb + "patch_embedding.weight"] = sd["visual.conv1.weight"]
    out[emb + "position_embedding.weight"] = sd["visual.positional_embedding"]
    for ours_name, hf_name in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for leaf in ("weight", "bias"):
            out[f"vision_model.{hf_name}.{leaf}"] = sd[f"visual.{ours_name}.{leaf}"]
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    return out


def _hf_block(sd: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    out = {}
    for leaf in ("weight", "bias"):
        q, k, v = sd[f"{src}.attn.in_proj_{leaf}"].chunk(3)
        out.update({f"{dst}.self_attn.{n}_proj.{leaf}": t for n, t in zip("qkv", (q, k, v))})
        pairs = [
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
            ("ln_2", "layer_norm2"),
        ]
        for a, b in pairs:
            out[f"{dst}.{b}.{leaf}"] = sd[f"{src}.{a}.{leaf}"]
    return {k: v.clone() for k, v in out.items()}


def hf_peer(arch: Arch, sd: dict[str, Tensor], device: str, half: bool) -> Optional[Peer]:
    """transformers' CLIPModel for a ViT ``arch``; None for ResNets (transformers has none)."""
    if not arch.is_vit:
        return None
    from transformers import CLIPConfig, CLIPModel

    assert isinstance(arch.vision_layers, int) and arch.vision_patch_size is not None
    text = {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.transformer_width,
        "intermediate_size": 4 * arch.transformer_width,
        "num_hidden_layers": arch.transformer_layers,
        "num_attention_heads": arch.transformer_heads,
        "max_position_embeddings": arch.context_length,
        "hidden_act": "quick_gelu",
        "eos_token_id": 2,  # legacy: pool at the argmax id, as OpenAI does
    }
    vision = {
        "hidden_size": arch.vision_width,
        "intermediate_size": 4 * arch.vision_width,
        "num_hidden_layers": arch.vision_layers,
        "num_attention_heads": arch.vision_width // 64,
        "image_size": arch.image_resolution,
        "patch_size": arch.vision_patch_size,
        "hidden_act": "quick_gelu",
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.embed_dim)
    model = CLIPModel._from_config(config, attn_implementation="sdpa")
    model.load_state_dict(hf_state_dict(sd), strict=False)  # position_ids buffers stay
    model = model.to(device).eval()
    if half:
        model = model.half()

    def encode_image(images: Tensor) -> Tensor:
        return _pooled(model.get_image_features(pixel_values=images))

    def encode_text(ids: Tensor) -> Tensor:
        return _pooled(model.get_text_features(input_ids=ids.long()))

    return Peer("hf", model, encode_image, encode_text)


def _pooled(out: Any) -> Tensor:
    """transformers ≥5 wraps the projected features in an output object; older ones do not."""
    return out if isinstance(out, Tensor) else out.pooler_output


def onnxruntime_missing() -> Optional[str]:
    """Why the onnxruntime peer cannot run here, or None if it can."""
    try:
        import onnxruntime  # noqa: F401

        from clip.export import require_exporter

        require_exporter()
    except ImportError as e:
        return f"onnxruntime peer skipped: {e}"
    return None


def session_options(spinning: bool = False) -> Any:
    """onnxruntime's default session options (level ALL), with ``torch.get_num_threads()``
    intra-op threads and, unless ``spinning``, idle threads that sleep (they would take CPU from
    torch's): ``clip.onnxrt.session_options``."""
    from clip.onnxrt import session_options as options

    return options("all", threads=torch.get_num_threads(), spinning=spinning)


def onnxruntime_peer(model: torch.nn.Module, directory: Path) -> Peer:
    """Our ``clip.export_onnx`` files of ``model`` (written to ``directory``) in onnxruntime."""
    import onnxruntime as ort

    import clip

    files = clip.export_onnx(model, directory)
    cpu = ["CPUExecutionProvider"]
    visual = ort.InferenceSession(str(files.visual), session_options(), providers=cpu)
    textual = ort.InferenceSession(str(files.textual), session_options(), providers=cpu)

    def encode_image(images: Tensor) -> Tensor:
        return torch.from_numpy(visual.run(None, {"image": images.numpy()})[0])

    def encode_text(ids: Tensor) -> Tensor:
        return torch.from_numpy(textual.run(None, {"text": ids.long().numpy()})[0])

    return Peer("onnxruntime", model, encode_image, encode_text)


def build_all(
    model_name: str,
    sd: dict[str, Tensor],
    ref: Any,
    device: str = "cpu",
    half: bool = False,
    tmp: Optional[Path] = None,
) -> list[Peer]:
    """Every available implementation of ``model_name`` with weights ``sd``, ours first; the
    onnxruntime peer on the CPU in fp32 when ``tmp`` (a folder for its files) is given."""
    arch = PUBLISHED[model_name][0]
    peers = [ours(sd, device, half), reference(ref, sd, device, half)]
    peers.append(open_clip_peer(model_name, sd, device, half))
    hf = hf_peer(arch, sd, device, half)
    if hf is not None:
        peers.append(hf)
    if tmp is not None and device == "cpu" and not half and onnxruntime_missing() is None:
        folder = tmp / f"onnx-{model_name.replace('/', '-')}"
        peers.append(onnxruntime_peer(ours(sd, device, half).module, folder))
    return peers
