"""The rest of the library on models that are not OpenAI's (GELU, heads of 80, MLP ratios other
than 4, mean/std 0.5 with a squash resize), loaded from folders: zero-shot weights, ONNX,
optimize, resolution=, jit=True, half precisions and the feature methods."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from folder_models import ZOO, save_folder
from torch import nn

import clip
import clip.model
from clip.features import FeatureMethods
from clip.model import CLIP, convert_weights
from clip.preprocess import transform


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: save_folder(config, root / name) for name, config in ZOO.items()}


@pytest.fixture(params=sorted(ZOO))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def inputs(model: CLIP, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    side = model.visual.input_resolution
    images = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(3))
    text = clip.tokenize(["a photo of a cat", "a dog on a skateboard at night", "x"][:n])
    return images, text


def as_quick_gelu(model: CLIP) -> CLIP:
    """The same weights with OpenAI's activation: what a library ignoring the config computes."""
    other = CLIP.from_config(model.config.replace(activation="quick_gelu"))
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_zero_shot_classifier_of_a_folder_model(folders: dict[str, Path], name: str) -> None:
    model, _ = clip.load(folders[name], device="cpu")
    classes, templates = ["cat", "dog", "bird"], ["a photo of a {}.", "a {} in the snow"]
    weights = clip.zero_shot_classifier(model, classes, templates, batch_size=4)
    with torch.no_grad():
        columns = []
        for c in classes:
            text = model.encode_text(clip.tokenize([t.format(c) for t in templates]))
            mean = (text / text.norm(dim=-1, keepdim=True)).mean(dim=0)
            columns.append(mean / mean.norm())
    torch.testing.assert_close(weights, torch.stack(columns, dim=1))


def test_onnx_export_of_a_gelu_model_matches_onnxruntime(
    folders: dict[str, Path], name: str, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    model, _ = clip.load(folders[name], device="cpu")
    files = clip.export_onnx(model, tmp_path / "onnx")
    images, text = inputs(model)

    def run(path: Path, input_name: str, array: torch.Tensor) -> torch.Tensor:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {input_name: array.numpy()})[0])

    got_image = run(files.visual, "image", images)
    got_text = run(files.textual, "text", text.long())
    with torch.no_grad():
        want_image, want_text = model.encode_image(images), model.encode_text(text)
        quick_text = as_quick_gelu(model).encode_text(text)
    torch.testing.assert_close(got_image, want_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_text, want_text, rtol=1e-4, atol=1e-5)
    assert (got_text - quick_text).abs().max() > 1e-3  # the activation is not QuickGELU's


def test_optimize_int8_and_compile_on_a_gelu_model(folders: dict[str, Path]) -> None:
    model, _ = clip.load(folders["zoo-vit"], device="cpu")
    images, text = inputs(model)
    with torch.no_grad():
        want_image, want_text = model.encode_image(images), model.encode_text(text)
        compiled = clip.optimize(copy.deepcopy(model), compile=True)
        torch.testing.assert_close(compiled.encode_image(images), want_image, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.encode_text(text), want_text, rtol=1e-4, atol=1e-5)
        quantized = clip.optimize(copy.deepcopy(model), int8=True)
        assert isinstance(quantized.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
        got = quantized.encode_image(images)
    cosine = torch.nn.functional.cosine_similarity(got, want_image)
    assert bool((cosine > 0.99).all())


def test_load_at_another_resolution_keeps_the_folders_preprocessing(
    folders: dict[str, Path], name: str, tmp_path: Path
) -> None:
    config = ZOO[name]
    side = config.image_resolution * 3 // 2
    model, preprocess = clip.load(folders[name], device="cpu", resolution=side)
    assert model.config == config.replace(image_resolution=side)
    assert repr(preprocess) == repr(transform(side, config.preprocess))
    assert f"size=({side}, {side}), interpolation=bilinear" in repr(preprocess)
    images, _ = inputs(model)
    clip.save(model, tmp_path / "resized")
    again, again_preprocess = clip.load(tmp_path / "resized", device="cpu")
    assert again.config == model.config
    assert repr(again_preprocess) == repr(preprocess)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images))


def test_resize_input_updates_the_config_and_nothing_else(folders: dict[str, Path]) -> None:
    model, _ = clip.load(folders["zoo-vit"], device="cpu")
    model.resize_input(48)
    assert model.config == ZOO["zoo-vit"].replace(image_resolution=48)


def test_jit_load_of_a_folder_matches_eager(folders: dict[str, Path], name: str) -> None:
    eager, preprocess = clip.load(folders[name], device="cpu")
    traced, traced_preprocess = clip.load(folders[name], device="cpu", jit=True)
    assert isinstance(traced, torch.jit.ScriptModule)
    assert traced.config == eager.config == ZOO[name]
    assert repr(traced_preprocess) == repr(preprocess)
    images, text = inputs(eager)
    with torch.no_grad():
        torch.testing.assert_close(traced.encode_image(images), eager.encode_image(images))
        full = eager.encode_text_unchecked(text.long(), trim=False)  # a trace runs every column
        torch.testing.assert_close(traced.encode_text(text), full)
        assert (full - as_quick_gelu(eager).encode_text(text)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_on_the_cpu_for_a_gelu_model(
    folders: dict[str, Path], name: str, dtype: torch.dtype
) -> None:
    exact, _ = clip.load(folders[name], device="cpu")
    half, _ = clip.load(folders[name], device="cpu", dtype=dtype)
    assert half.dtype == dtype and half.config == exact.config
    images, text = inputs(exact)
    with torch.no_grad():
        for got, want in (
            (half.encode_image(images), exact.encode_image(images)),
            (half.encode_text(text), exact.encode_text(text)),
        ):
            assert got.dtype == dtype
            cosine = torch.nn.functional.cosine_similarity(got.float(), want)
            assert bool((cosine > 0.995).all()), cosine


def test_convert_weights_equals_loading_in_fp16(folders: dict[str, Path]) -> None:
    converted, _ = clip.load(folders["zoo-vit"], device="cpu")
    convert_weights(converted)
    loaded, _ = clip.load(folders["zoo-vit"], device="cpu", dtype=torch.float16)
    images, text = inputs(loaded)
    with torch.no_grad():
        assert torch.equal(converted.encode_image(images), loaded.encode_image(images))
        assert torch.equal(converted.encode_text(text), loaded.encode_text(text))


# ---- features -------------------------------------------------------------------------------


def test_image_attention_has_one_map_per_head_of_80(folders: dict[str, Path]) -> None:
    model, _ = clip.load(folders["zoo-vit"], device="cpu")
    images, _ = inputs(model)
    config = ZOO["zoo-vit"]
    heads = config.vision_width // config.vision_head_width  # 4 heads of 80, not 5 of 64
    grid = config.image_resolution // (config.vision_patch_size or 1)
    with torch.no_grad():
        maps = model.image_attention(images)
        block = model.visual.transformer.resblocks[-1]
        x = model.encode_image_layers(images, layers=[-2])[0].transpose(0, 1)  # [T, B, D]
        y = block.ln_1(x)
        _, want = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
    assert len(maps) == 2 and maps[-1].shape == (2, heads, 1 + grid * grid, 1 + grid * grid)
    torch.testing.assert_close(maps[-1], want)
    assert clip.attention_heatmap(maps[-1:]).shape == (2, grid, grid)


def test_feature_methods_of_the_zoo_models_pool_to_the_embeddings(
    folders: dict[str, Path], name: str
) -> None:
    model, _ = clip.load(folders[name], device="cpu")
    images, text = inputs(model)
    with torch.no_grad():
        tokens = model.encode_image_tokens(images, project=True)
        torch.testing.assert_close(tokens[:, 0], model.encode_image(images))
        projected, eot = model.encode_text_tokens(text, project=True)
        torch.testing.assert_close(
            projected[torch.arange(len(text)), eot], model.encode_text(text), rtol=1e-5, atol=1e-6
        )
        text_maps = model.text_attention(text, layers=[0])
    assert text_maps[0].shape == (2, ZOO[name].transformer_heads, 77, 77)
    if name == "zoo-rn":  # the attention pool: 256 channels in 2 heads of 128
        pool_maps = model.image_attention(images)
        assert len(pool_maps) == 1 and pool_maps[0].shape[:2] == (2, 2)


# ---- clip.model after the split --------------------------------------------------------------

# What clip.model exported before the feature methods moved to clip.features.
EXPORTED_BEFORE = [
    "ARCHIVE_EXTRA_KEYS", "CLIP", "AttentionPool2d", "Bottleneck", "CLIPConfig", "LayerNorm",
    "ModifiedResNet", "QuickGELU", "ResidualAttentionBlock", "TextTokens", "Transformer",
    "VisionTransformer", "any_hooked", "attention_heatmap", "build_from_state_dict",
    "build_model", "causal_mask", "convert_weights", "global_hooks_active", "is_hooked",
    "layer_indices", "load_weights",
]  # fmt: skip
FEATURES = [
    "encode_image_tokens", "encode_image_layers", "image_attention",
    "encode_text_tokens", "encode_text_layers", "text_attention",
]  # fmt: skip


def test_clip_model_still_exports_every_name() -> None:
    assert set(EXPORTED_BEFORE) <= set(clip.model.__all__)
    for exported in clip.model.__all__:
        assert getattr(clip.model, exported) is not None


def test_feature_methods_patched_on_clip_reach_every_model(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = clip.load(folders["zoo-vit"], device="cpu")
    assert issubclass(CLIP, FeatureMethods)
    for method in FEATURES:
        assert getattr(CLIP, method) is getattr(FeatureMethods, method)
    monkeypatch.setattr(CLIP, "image_attention", lambda self, image, layers=None: ["patched"])
    assert model.image_attention(torch.zeros(1)) == ["patched"]
