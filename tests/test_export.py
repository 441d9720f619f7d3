"""clip.export_onnx: both towers, dynamic batch, parity with torch within 1e-4 via onnxruntime."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from checkpoints import TINY, make_state_dict
from conftest import sample_images, sample_text

import clip
from clip.model import build_from_state_dict, convert_weights

ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'clip-torch[onnx]')"
)
pytest.importorskip("onnxscript", reason="onnxscript is not installed (the onnx extra)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    """Each tiny arch exported once; tiny-rn from a mixed-fp16 model in training mode, so the
    export has to work on an fp32 eval copy and leave the caller's model as it was."""
    out = {}
    for name, arch in TINY.items():
        model = build_from_state_dict(make_state_dict(arch))
        if name == "tiny-rn":
            convert_weights(model)
            model.train()
        before = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
        files = clip.export_onnx(model, tmp_path_factory.mktemp(name) / "onnx")
        assert model.training == (name == "tiny-rn")
        after = model.state_dict()
        assert all(after[k].dtype == d and torch.equal(after[k], v) for k, (d, v) in before.items())
        out[name] = files
    return out


def run(path: Path, name: str, array: object) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {name: array})[0])


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch(exported: dict, arch_name: str, batch: int) -> None:
    arch = TINY[arch_name]
    files = exported[arch_name]
    reference = build_from_state_dict(make_state_dict(arch))  # fp32 equivalent of either model
    images, text = sample_images(arch, batch, seed=7), sample_text(batch).long()
    with torch.no_grad():
        want_image, want_text = reference.encode_image(images), reference.encode_text(text)
    got_image = run(files.visual, "image", images.numpy())
    got_text = run(files.textual, "text", text.numpy())  # trimmed in torch, full length in ONNX
    assert got_image.shape == (batch, arch.embed_dim) and got_text.shape == (batch, arch.embed_dim)
    torch.testing.assert_close(got_image, want_image, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_text, want_text, rtol=1e-4, atol=1e-4)


def test_export_writes_exactly_two_files(exported: dict, arch_name: str) -> None:
    files = exported[arch_name]
    assert files.visual.name == "visual.onnx" and files.textual.name == "textual.onnx"
    assert sorted(p.name for p in files.visual.parent.iterdir()) == ["textual.onnx", "visual.onnx"]
    import onnx

    for path in files:
        graph = onnx.load(str(path)).graph
        dims = graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch size


def test_missing_exporter_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxscript" else real(name, *a),
    )
    model = build_from_state_dict(make_state_dict(TINY["tiny-vit"]))
    with pytest.raises(ImportError, match=r"onnxscript.*pip install 'clip-torch\[onnx\]'"):
        clip.export_onnx(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_traced_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="jit=False"):
        clip.export_onnx(torch.nn.Linear(2, 2), tmp_path)  # type: ignore[arg-type]


def test_export_files_reach_the_disk_before_their_names(tmp_path: Path, fsynced: list[str]) -> None:
    model = build_from_state_dict(make_state_dict(TINY["tiny-vit"]))
    files = clip.export_onnx(model, tmp_path / "onnx")
    names = [Path(p).name for p in fsynced]
    for path in files:
        assert Path(path).name in names  # fsync'ed (in staging), then renamed
    assert str(tmp_path / "onnx") in fsynced  # and the renames made durable
