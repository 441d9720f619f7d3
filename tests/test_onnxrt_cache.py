"""The on-disk cache of ``clip.optimize(model, onnxruntime=True)``'s exports: a second model with
the same weights skips the export; other weights, code or settings get their own entry; a killed
export leaves no entry; a damaged entry is exported again; hooked towers are not cached; files
deleted under a live model make it fall back to torch with a warning."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from checkpoints import TINY, make_state_dict
from conftest import assert_rel_close, sample_images, sample_text

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the onnx extra)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (the onnx extra)")

import clip
import clip.onnxrt
from clip.export import export_tower, fuse
from clip.layers import ResidualAttentionBlock
from clip.model import CLIP, build_from_state_dict
from clip.onnxrt import OnnxRuntimeFallbackWarning, TowerSession, use_onnxruntime
from clip.onnxrt_cache import STALE_SECONDS, ExportCache, tower_key


def fresh(name: str = "tiny-vit") -> CLIP:
    return build_from_state_dict(make_state_dict(TINY[name])).float().eval()


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnxruntime"


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The towers exported (by file name) while the test runs."""
    done: list[str] = []
    real = clip.onnxrt.export_tower

    def counting(module: torch.nn.Module, example: torch.Tensor, dims: dict, path: Path, **kw):
        done.append(Path(path).name)
        return real(module, example, dims, path, **kw)

    monkeypatch.setattr(clip.onnxrt, "export_tower", counting)
    yield done


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def session_of(model: CLIP) -> TowerSession:
    impl = model.visual._compiled_call_impl
    assert isinstance(impl, TowerSession)
    return impl


def test_same_weights_load_the_cached_export(cache_root: Path, exports: list[str]) -> None:
    first = clip.optimize(fresh(), onnxruntime=True)
    assert exports == ["visual.onnx", "textual.onnx"]
    assert len(entries(cache_root)) == 2
    second = clip.optimize(fresh(), onnxruntime=True)
    assert exports == ["visual.onnx", "textual.onnx"]  # nothing exported again
    assert session_of(second).path == session_of(first).path
    images, text = sample_images(TINY["tiny-vit"], 2), sample_text(3)
    with torch.no_grad():
        assert_rel_close(second.encode_image(images), fresh().encode_image(images))
        assert_rel_close(second.encode_text(text), fresh().encode_text(text))
    assert session_of(second).runs == 1


def test_other_weights_get_their_own_entry(cache_root: Path, exports: list[str]) -> None:
    use_onnxruntime(fresh(), text=False)
    edited = fresh()
    with torch.no_grad():
        edited.visual.proj.mul_(2)
    model = use_onnxruntime(edited, text=False)
    assert exports == ["visual.onnx", "visual.onnx"]
    assert len(entries(cache_root)) == 2
    images = sample_images(TINY["tiny-vit"], 2)
    with torch.no_grad():
        assert_rel_close(model.encode_image(images), edited.visual._call_impl(images))


def test_key_follows_weights_attributes_code_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    key = tower_key(fresh().visual, {"fusions": True})
    assert key is not None and key == tower_key(fresh().visual, {"fusions": True})
    assert tower_key(fresh().visual, {"fusions": False}) != key
    other = fresh()
    other.visual.transformer.resblocks[0].ln_1.eps = 1e-6
    assert tower_key(other.visual, {"fusions": True}) != key
    with torch.no_grad():
        other = fresh()
        other.visual.conv1.weight[0, 0, 0, 0] += 1e-3
    assert tower_key(other.visual, {"fusions": True}) != key

    def forward(self: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.ln_1(x))

    monkeypatch.setattr(ResidualAttentionBlock, "forward", forward)
    assert tower_key(fresh().visual, {"fusions": True}) != key


def test_key_is_the_same_after_the_exporter_has_run(tmp_path: Path) -> None:
    model = fresh()
    key = tower_key(model.visual, {})
    path = export_tower(
        model.visual, sample_images(TINY["tiny-vit"], 2), {0: "batch"}, tmp_path / "v.onnx"
    )
    fuse(path)  # running it changes what marshal.dumps says of its code
    assert tower_key(fresh().visual, {}) == key


def test_hooked_or_instance_patched_towers_are_not_cached() -> None:
    model = fresh()
    handle = model.visual.ln_post.register_forward_hook(lambda m, i, o: None)
    assert tower_key(model.visual, {}) is None
    handle.remove()
    assert tower_key(model.visual, {}) is not None
    block = model.visual.transformer.resblocks[0]
    block.forward = lambda x: x  # type: ignore[method-assign]
    assert tower_key(model.visual, {}) is None


def test_no_cache_writes_nothing(cache_root: Path) -> None:
    model = use_onnxruntime(fresh(), text=False, cache=False)
    assert not cache_root.exists()
    assert session_of(model).path.parent != cache_root


def test_cache_given_as_a_folder(tmp_path: Path, cache_root: Path) -> None:
    model = use_onnxruntime(fresh(), text=False, cache=tmp_path / "mine")
    assert session_of(model).path.parent.parent == tmp_path / "mine"
    assert not cache_root.exists()


def test_killed_export_leaves_no_entry(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch, exports: list[str]
) -> None:
    real = clip.onnxrt.export_tower

    def killed(module: torch.nn.Module, example: torch.Tensor, dims: dict, path: Path, **kw):
        Path(path).write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(clip.onnxrt, "export_tower", killed)
    with pytest.raises(KeyboardInterrupt):
        use_onnxruntime(fresh(), text=False)
    assert list(cache_root.iterdir()) == []
    monkeypatch.setattr(clip.onnxrt, "export_tower", real)
    model = use_onnxruntime(fresh(), text=False)
    images = sample_images(TINY["tiny-vit"], 2)
    with torch.no_grad():
        assert_rel_close(model.encode_image(images), fresh().encode_image(images))


def test_stale_leftovers_are_removed(cache_root: Path) -> None:
    cache_root.mkdir(parents=True)
    old, new = cache_root / ".abc.x.tmp", cache_root / ".def.y.tmp"
    for folder in (old, new):
        folder.mkdir()
        (folder / "visual.onnx").write_bytes(b"partial")
    then = time.time() - STALE_SECONDS - 60
    os.utime(old, (then, then))
    use_onnxruntime(fresh(), text=False)
    assert not old.exists() and new.exists()  # a recent one may be another process's export


def test_damaged_entry_is_exported_again(
    cache_root: Path, exports: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    use_onnxruntime(fresh(), text=False)
    (entry,) = entries(cache_root)
    graph = entry / "visual.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: a weight, silently wrong if used
    graph.write_bytes(bytes(data))
    model = use_onnxruntime(fresh(), text=False)
    assert "damaged" in caplog.text
    assert exports == ["visual.onnx", "visual.onnx"]
    images = sample_images(TINY["tiny-vit"], 2)
    with torch.no_grad():
        assert_rel_close(model.encode_image(images), fresh().encode_image(images))


def test_entry_published_by_another_process_is_used(cache_root: Path) -> None:
    store = ExportCache(cache_root)

    def theirs(folder: Path) -> dict:
        (folder / "a.bin").write_bytes(b"theirs")
        return {}

    def ours(folder: Path) -> dict:
        store.get("k", theirs)  # another process publishes while this one is still writing
        (folder / "a.bin").write_bytes(b"ours")
        return {}

    folder, info = store.get("k", ours)
    assert (folder / "a.bin").read_bytes() == b"theirs"
    assert list(info["files"]) == ["a.bin"]
    assert [p.name for p in cache_root.iterdir()] == ["k"]


def test_deleted_files_fall_back_to_torch_with_a_warning(cache_root: Path) -> None:
    model = use_onnxruntime(fresh(), text=False)
    for f in session_of(model).path.parent.iterdir():
        f.unlink()
    threads = torch.get_num_threads()
    images = sample_images(TINY["tiny-vit"], 2)
    torch.set_num_threads(1 if threads > 1 else 2)  # forces the session to be rebuilt
    try:
        with torch.no_grad(), pytest.warns(OnnxRuntimeFallbackWarning, match="rebuilt"):
            got = model.encode_image(images)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        assert_rel_close(got, fresh().encode_image(images))
