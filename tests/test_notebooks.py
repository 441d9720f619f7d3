"""Execute the notebooks in notebooks/ top to bottom against a tiny random checkpoint.

The kernel is this interpreter (``sys.executable``), through a kernel spec written to a temporary
directory, so the test needs no installed kernel spec and cannot pick up another Python's. The
notebooks read the model from ``CLIP_MODEL`` and the evaluation folder from ``IMAGENET_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from PIL import Image

import clip

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
KERNEL_NAME = "clip-tests-python"
NOTEBOOK_NAMES = [
    "Interacting_with_CLIP.ipynb",
    "Prompt_Engineering_for_ImageNet.ipynb",
    "Fine_tuning_CLIP.ipynb",
]


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A kernel spec that starts ipykernel in this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec_dir = root / KERNEL_NAME
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "clip tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(root)])


@pytest.fixture
def notebook_env(
    monkeypatch: pytest.MonkeyPatch, tiny_files: dict[str, dict[str, Path]], tmp_path: Path
) -> Path:
    """Environment the kernel inherits: the tiny checkpoint, this checkout's clip, inline plots."""
    monkeypatch.setenv("CLIP_MODEL", str(tiny_files["tiny-vit"]["archive"]))
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes PNGs
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.delenv("CLIP_FINETUNE_DATA", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return tmp_path


def execute(path: Path, specs: KernelSpecManager, cwd: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    client = NotebookClient(
        notebook, km=manager, timeout=300, resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}")
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def figure_count(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs(notebook))


def text_of(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for out in outputs(notebook):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def write_imagenet_v2_folder(root: Path) -> Path:
    """A tiny ImageNetV2-style folder: subfolders named by class index, a few images each."""
    colours = {"0": (200, 40, 40), "1": (40, 200, 40), "281": (40, 40, 200)}
    for label, colour in colours.items():
        (root / label).mkdir(parents=True)
        for i in range(2):
            shade = tuple(min(255, c + 30 * i) for c in colour)
            Image.new("RGB", (48 + 8 * i, 40), shade).save(root / label / f"{i}.jpeg")
    return root


def test_interacting_with_clip(kernel_specs: KernelSpecManager, notebook_env: Path) -> None:
    notebook = execute(NOTEBOOKS / NOTEBOOK_NAMES[0], kernel_specs, notebook_env)
    assert figure_count(notebook) >= 3, "sample images, similarity heatmap, top-5 bars"
    text = text_of(notebook)
    assert "ViT-B/32" in text  # available_models() was shown
    assert "input resolution: 32 x 32" in text  # the tiny checkpoint was the one loaded


def test_prompt_engineering_for_imagenet(
    kernel_specs: KernelSpecManager, notebook_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_imagenet_v2_folder(notebook_env / "imagenetv2")
    monkeypatch.setenv("IMAGENET_DIR", str(folder))
    monkeypatch.setenv("CLIP_TEMPLATE_SET", "7")  # the 80-template build is the slow part
    notebook = execute(NOTEBOOKS / NOTEBOOK_NAMES[1], kernel_specs, notebook_env)
    assert figure_count(notebook) >= 1
    text = text_of(notebook)
    assert "1000 classes" in text and "80 templates" in text
    assert "evaluated 6 images" in text
    assert "top-1" in text and "top-5" in text


def test_fine_tuning_clip(kernel_specs: KernelSpecManager, notebook_env: Path) -> None:
    notebook = execute(NOTEBOOKS / NOTEBOOK_NAMES[2], kernel_specs, notebook_env)
    assert figure_count(notebook) >= 2, "the training loss and the WiSE-FT sweep"
    text = text_of(notebook)
    assert "64 training and 32 test images" in text  # the synthetic data set
    assert "zero-shot top-1 before fine-tuning" in text
    assert "zero-shot top-1 after fine-tuning" in text
    assert "WiSE-FT alpha=0.50" in text and "linear probe top-1" in text
    run = notebook_env / "fine_tuning_clip" / "finetuned"
    assert clip.load(str(run), device="cpu")[0].visual.input_resolution == 32


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_committed_notebooks_have_no_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def notebook_cell(name: str, marker: str) -> str:
    """The source of the one code cell of a committed notebook that contains ``marker``."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    found = [c.source for c in notebook.cells if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, f"{name}: {len(found)} code cells contain {marker!r}"
    return found[0]


def test_evaluation_is_skipped_with_a_message_without_imagenet_dir(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    source = notebook_cell(NOTEBOOK_NAMES[1], 'os.environ.get("IMAGENET_DIR")')
    exec(source, {"os": os})  # the skip branch needs nothing the earlier cells define
    assert "Skipping the evaluation: set IMAGENET_DIR" in capsys.readouterr().out


def test_evaluation_maps_both_folder_layouts_to_class_indices() -> None:
    namespace = {"classnames": clip.imagenet_classes, "os": os, "torch": torch}
    exec(notebook_cell(NOTEBOOK_NAMES[1], "def class_indices"), namespace)
    class_indices = namespace["class_indices"]
    assert class_indices(["0", "1", "281"]).tolist() == [0, 1, 281]
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert class_indices(wnids).tolist() == list(range(1000))
    with pytest.raises(ValueError, match="needs all 1000"):
        class_indices(["n01440764", "n01443537"])
    with pytest.raises(ValueError, match="not a class index"):
        class_indices(["0", "1000"])
