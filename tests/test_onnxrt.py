"""clip.optimize(model, onnxruntime=True): outputs equal the default model's within 1e-5, for
OpenAI's tiny ViT and ResNet and for the zoo's GELU models (heads of 80, MLP ratios 3 and 2.5);
what runs in torch instead (gradients, hooks, training mode, edited weights, feature methods,
copies), with one warning; and ``clip embed --onnxruntime``.

Deviations are relative to the largest magnitude of the default output
(``conftest.assert_rel_close``). Speed is measured by ``benchmarks/onnxruntime_speed.py``.
"""

from __future__ import annotations

import copy
import gc
import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import TINY, make_state_dict
from conftest import assert_rel_close, sample_images, sample_text
from folder_models import ZOO, random_model
from test_pipeline import write_images

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the onnx extra)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (the onnx extra)")

import clip
from clip.cli import main
from clip.model import CLIP, build_from_state_dict, convert_weights
from clip.onnxrt import OnnxRuntimeFallbackWarning, TowerSession, use_onnxruntime
from clip.optimize import compile_model

NAMES = [*sorted(TINY), *sorted(ZOO)]


def fresh(name: str) -> CLIP:
    """The model called ``name``, fp32, eval, with the same weights at every call."""
    if name in TINY:
        return build_from_state_dict(make_state_dict(TINY[name])).float()
    return random_model(ZOO[name]).eval()


def images_for(model: CLIP, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = model.visual.input_resolution
    return torch.randn(n, 3, side, side, generator=g)


def sessions(model: CLIP) -> tuple[TowerSession, TowerSession]:
    visual, text = model.visual._compiled_call_impl, model.transformer._compiled_call_impl
    assert isinstance(visual, TowerSession) and isinstance(text, TowerSession)
    return visual, text


def runs(model: CLIP) -> tuple[int, int]:
    visual, text = sessions(model)
    return visual.runs, text.runs


@pytest.fixture(scope="module", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module's own ONNX Runtime export cache ($CLIP_CACHE_DIR/onnxruntime)."""
    root = tmp_path_factory.mktemp("clip-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIP_CACHE_DIR", str(root))
        yield root / "onnxruntime"


@pytest.fixture(scope="module")
def optimized() -> dict[str, CLIP]:
    """Each model optimised once (an export takes seconds); tests that change one use their own."""
    return {name: clip.optimize(fresh(name), onnxruntime=True) for name in NAMES}


@pytest.fixture
def no_fallback() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", OnnxRuntimeFallbackWarning)
        yield


@pytest.mark.parametrize("name", NAMES)
def test_opt_in_matches_default(optimized: dict, name: str, no_fallback: None) -> None:
    model, default = optimized[name], fresh(name)
    images = images_for(default)
    long_row = torch.zeros(1, 77, dtype=torch.int)
    long_row[0, :76], long_row[0, 76] = 400, 49407  # end-of-text in the last column
    texts = [sample_text(3), sample_text(5), sample_text(1), long_row]  # 4 trimmed lengths
    before = runs(model)
    with torch.no_grad():
        for batch in (images, images[:1]):
            got, want = model.encode_image(batch), default.encode_image(batch)
            assert got.dtype == want.dtype == torch.float32
            assert_rel_close(got, want, rel=1e-5)
        for ids in texts:
            assert_rel_close(model.encode_text(ids), default.encode_text(ids), rel=1e-5)
        for got, want in zip(model(images, texts[0]), default(images, texts[0])):
            assert_rel_close(got, want, rel=1e-5)
    with torch.inference_mode():
        assert_rel_close(model.encode_image(images), default.encode_image(images), rel=1e-5)
    assert runs(model) == (before[0] + 4, before[1] + len(texts) + 1)


def test_opt_in_keeps_the_model_a_clip(optimized: dict) -> None:
    model, default = optimized["tiny-vit"], fresh("tiny-vit")
    assert type(model) is CLIP and type(model.visual) is type(default.visual)
    assert type(model.transformer) is type(default.transformer)
    assert list(model.state_dict()) == list(default.state_dict())
    assert model.config == default.config


@pytest.mark.parametrize("name", ["tiny-vit", "zoo-rn"])
def test_feature_methods_match_default(optimized: dict, name: str, no_fallback: None) -> None:
    model, default = optimized[name], fresh(name)
    images, ids = images_for(default, 2), sample_text(2)
    calls = [
        lambda m: m.encode_image_tokens(images),
        lambda m: m.encode_image_tokens(images, project=True),
        lambda m: m.encode_image_layers(images)[0],
        lambda m: m.image_attention(images)[-1],
        lambda m: m.encode_text_tokens(ids).tokens,
        lambda m: m.encode_text_layers(ids)[-1],
        lambda m: m.text_attention(ids)[0],
    ]
    with torch.no_grad():
        pairs = [(call(model), call(default)) for call in calls]
    for got, want in pairs:
        assert_rel_close(got, want, rel=1e-5)


def test_fallbacks_run_in_torch_with_one_warning() -> None:
    model, default = clip.optimize(fresh("tiny-vit"), onnxruntime=True), fresh("tiny-vit")
    images, ids = sample_images(TINY["tiny-vit"], 2), sample_text(3)
    with pytest.warns(OnnxRuntimeFallbackWarning, match="gradients are on") as record:
        got = model.encode_image(images)  # gradients on: torch, differentiable
    assert record[0].filename == __file__  # the warning points at the caller
    assert_rel_close(got.detach(), default.encode_image(images).detach(), rel=1e-5)
    got.sum().backward()
    assert model.visual.proj.grad is not None and model.visual.proj.grad.abs().sum() > 0
    assert runs(model) == (0, 0)
    seen: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", OnnxRuntimeFallbackWarning)  # warned once already
        model.encode_text(ids)  # gradients again
        block = model.transformer.resblocks[0]
        handle = block.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
        with torch.no_grad():
            got = model.encode_text(ids)
        assert seen == [77]  # the hook saw every column, as in the default model
        assert_rel_close(got, default.encode_text(ids).detach(), rel=1e-5)
        handle.remove()
        handle = model.visual.transformer.resblocks[1].mlp.register_forward_pre_hook(
            lambda m, i: seen.append(-1)
        )
        with torch.no_grad():
            model.encode_image(images)
        handle.remove()
        model.train()
        with torch.no_grad():
            model.encode_image(images)
        model.eval()
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model.encode_image(images)
        assert flops.get_total_flops() > 0  # counted in torch
        assert seen == [77, -1] and runs(model) == (0, 0)
        with torch.no_grad():  # nothing in the way any more
            model.encode_image(images), model.encode_text(ids)
    assert runs(model) == (1, 1)


def test_frozen_parameters_need_no_fallback(optimized: dict, no_fallback: None) -> None:
    model = optimized["tiny-rn"].requires_grad_(False)
    before = runs(model)
    try:
        out = model.encode_image(images_for(model, 2))  # gradients on, none needed
    finally:
        model.requires_grad_(True)
    assert not out.requires_grad and runs(model) == (before[0] + 1, before[1])


def test_edited_weights_run_in_torch_until_optimized_again() -> None:
    model = clip.optimize(fresh("tiny-vit"), onnxruntime=True)
    images = sample_images(TINY["tiny-vit"], 2)
    with torch.no_grad():
        before = model.encode_image(images)
        model.visual.proj.mul_(2)  # e.g. an optimizer step
        with pytest.warns(OnnxRuntimeFallbackWarning, match="again to rebuild"):
            after = model.encode_image(images)
        assert_rel_close(after, 2 * before, rel=1e-5)
        assert runs(model) == (1, 0)
        clip.optimize(model, onnxruntime=True)  # rebuilt from the edited weights
        assert_rel_close(model.encode_image(images), 2 * before, rel=1e-5)
        assert runs(model) == (1, 0)  # the new sessions' first run
        model.visual.proj = torch.nn.Parameter(model.visual.proj.detach().clone())
        with pytest.warns(
            OnnxRuntimeFallbackWarning, match=r"weights \(or input resolution\) changed"
        ):
            model.encode_image(images)  # a replaced parameter is another tensor
        model.resize_input(64)  # a new positional embedding, a new input shape
        larger = torch.randn(2, 3, 64, 64)
        want = copy.deepcopy(model).encode_image(larger)  # a copy runs in torch
        assert_rel_close(model.encode_image(larger), want, rel=1e-5)
        assert runs(model) == (1, 0)


def test_sessions_follow_torch_thread_count(optimized: dict, no_fallback: None) -> None:
    model = optimized["tiny-rn"]
    visual, _ = sessions(model)
    threads = torch.get_num_threads()
    images = images_for(model, 2)
    with torch.no_grad():
        want = model.encode_image(images)
        torch.set_num_threads(1)
        try:
            got = model.encode_image(images)
            assert visual.threads == 1
        finally:
            torch.set_num_threads(threads)
        model.encode_image(images)
    assert visual.threads == threads
    assert_rel_close(got, want, rel=1e-6)


def test_copies_run_in_torch(optimized: dict, no_fallback: None) -> None:
    model = optimized["tiny-vit"]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    images = sample_images(TINY["tiny-vit"], 2)
    with torch.no_grad():
        want = model.encode_image(images)
        for other in (copy.deepcopy(model), loaded):
            assert other.visual._compiled_call_impl is None
            assert other.transformer._compiled_call_impl is None
            assert_rel_close(other.encode_image(images), want, rel=1e-5)
    assert isinstance(model.visual._compiled_call_impl, TowerSession)  # the original keeps it


def test_empty_batches_run_in_torch_silently(optimized: dict, no_fallback: None) -> None:
    model = optimized["tiny-vit"]
    before = runs(model)
    with torch.no_grad():
        assert model.encode_image(sample_images(TINY["tiny-vit"], 0)).shape == (0, 32)
        assert model.encode_text(torch.zeros(0, 77, dtype=torch.long)).shape == (0, 32)
    assert runs(model) == before


def test_uncached_exports_are_removed_with_the_model() -> None:
    model = use_onnxruntime(fresh("tiny-rn"), text=False, fusions=False, cache=False)
    folder = model.visual._compiled_call_impl.path.parent
    assert [p.name for p in folder.iterdir()] == ["visual.onnx"]
    assert model.transformer._compiled_call_impl is None
    del model
    gc.collect()
    assert not folder.exists()


def test_towers_over_the_protobuf_limit_keep_their_weights_beside_the_graph(
    monkeypatch: pytest.MonkeyPatch, no_fallback: None
) -> None:
    import clip.export

    monkeypatch.setattr(clip.export, "_EXTERNAL_DATA_BYTES", 0)  # as if over 1.5 GB
    model = use_onnxruntime(fresh("tiny-vit"), text=False, cache=False)
    folder = model.visual._compiled_call_impl.path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["visual.onnx", "visual.onnx.data"]
    images = sample_images(TINY["tiny-vit"], 2)
    with torch.no_grad():
        assert_rel_close(model.encode_image(images), fresh("tiny-vit").encode_image(images))
    assert model.visual._compiled_call_impl.runs == 1


def test_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    half = fresh("tiny-vit")
    convert_weights(half)
    with pytest.raises(ValueError, match="fp32"):
        clip.optimize(half, onnxruntime=True)
    with pytest.raises(ValueError, match="onnxruntime=True alone"):
        clip.optimize(fresh("tiny-vit"), onnxruntime=True, int8=True)
    with pytest.raises(ValueError, match="int8-quantized"):
        use_onnxruntime(clip.optimize(fresh("tiny-vit"), int8=True))
    with pytest.raises(ValueError, match="compiled"):
        use_onnxruntime(compile_model(fresh("tiny-vit"), backend="eager"))
    with pytest.raises(ValueError, match="level"):
        use_onnxruntime(fresh("tiny-vit"), level="max")
    with pytest.raises(TypeError, match="CLIP"):
        use_onnxruntime(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"clip-torch\[onnx\]"):
        clip.optimize(fresh("tiny-vit"), onnxruntime=True)


# ---- clip embed --onnxruntime ---------------------------------------------------------------


def embed(checkpoint: str, *args: str) -> int:
    return main(["embed", *args, "--model", checkpoint, "--workers", "0"])


def test_embed_onnxruntime_equals_default(tiny_files: dict, tmp_path: Path) -> None:
    checkpoint = str(tiny_files["tiny-vit"]["archive"])
    write_images(tmp_path / "imgs")
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\na photo of a cat on a mat\n")
    for inputs in ([str(tmp_path / "imgs")], ["--text", str(captions)]):
        plain, fast = tmp_path / "plain.npy", tmp_path / "ort.npy"
        assert embed(checkpoint, *inputs, "--out", str(plain), "--device", "cpu") == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", OnnxRuntimeFallbackWarning)
            assert embed(checkpoint, *inputs, "--out", str(fast), "--onnxruntime") == 0
        want, got = np.load(plain), np.load(fast)
        assert got.shape == want.shape and got.shape[0] >= 2
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        for path in tmp_path.glob("*.npy*"):
            path.unlink()


def test_embed_onnxruntime_usage_errors(
    tiny_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = str(tiny_files["tiny-vit"]["archive"])
    write_images(tmp_path / "imgs")
    imgs, out = str(tmp_path / "imgs"), str(tmp_path / "e.npy")
    cases = [
        ([imgs, "--out", str(tmp_path / "shards"), "--onnxruntime"], "one output file"),
        ([imgs, "--out", out, "--onnxruntime", "--device", "cuda"], "CPU in float32"),
        ([imgs, "--out", out, "--onnxruntime", "--precision", "float16"], "CPU in float32"),
    ]
    for args, message in cases:
        assert embed(checkpoint, *args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not Path(out).exists() and not (tmp_path / "shards").exists()


def test_fusions_leave_residual_adds_out_of_layer_norms(optimized: dict) -> None:
    visual, text = sessions(optimized["tiny-vit"])
    for fused in (visual.owner.fused["visual"], text.owner.fused["textual"]):
        assert fused["LayerNormalization"] > 0 and fused["QuickGelu"] > 0
        assert fused.get("SkipLayerNormalization", 0) == 0
