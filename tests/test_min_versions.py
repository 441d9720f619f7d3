"""What the code refuses below the versions that pyproject.toml's optional extras ask for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import TINY, make_state_dict
from torch.torch_version import TorchVersion

import clip
from clip.model import build_from_state_dict


def test_export_onnx_refuses_torch_older_than_2_9(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_from_state_dict(make_state_dict(TINY["tiny-vit"]))
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0"))
    with pytest.raises(ImportError, match=r"torch>=2\.9.*torch 2\.8\.0.*clip-torch\[onnx\]"):
        clip.export_onnx(model, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
