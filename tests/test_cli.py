"""The command line, end to end on a tiny checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip.cli import main


def test_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == [
        "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
        "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px",
    ]  # fmt: skip


def test_classify(tiny_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 50, 4), 120, dtype=np.uint8)).save(image)
    args = ["classify", str(image), "--labels", "a dog, a cat", "--model"]
    code = main([*args, str(tiny_files["tiny-vit"]["archive"]), "--device", "cpu", "--top-k", "5"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ")
    probs = [float(part.rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split(", ")]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 2e-3


def test_errors_exit_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "x.png", "--labels", "a", "--model", "NoSuchModel"]) == 1
    assert "available models" in capsys.readouterr().err
    assert main(["classify", "x.png", "--labels", " , "]) == 2


def test_python_dash_m() -> None:
    run = subprocess.run([sys.executable, "-m", "clip", "models"], capture_output=True, text=True)
    assert run.returncode == 0 and "ViT-B/32" in run.stdout
