"""clip.checkpoint: safetensors, clip.save, wrappers, owned memory, refusing code in pickles."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import pickle
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from checkpoints import TINY, make_state_dict, write_openai_archive
from conftest import sample_images, sample_text

import clip
from clip import checkpoint
from clip.checkpoint import CheckpointError, read_checkpoint
from clip.clip import settle_dtype
from clip.model import build_from_state_dict

# clip.save writes safetensors: without the optional extra (e.g. the minimum-versions venv of
# scripts/test_min_torch.sh) these tests are skipped, not failed.
needs_safetensors = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None,
    reason="safetensors is not installed (the safetensors extra)",
)

REPO = Path(__file__).resolve().parents[1]


def outputs(model: torch.nn.Module, arch_name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_images(TINY[arch_name]), sample_text())[0]


@needs_safetensors
def test_safetensors_round_trip_gives_equal_outputs(
    tiny_files: dict, arch_name: str, tmp_path: Path
) -> None:
    original, _ = clip.load(str(tiny_files[arch_name]["archive"]), device="cpu")
    clip.save(original, tmp_path / "model.safetensors")
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left
    loaded, preprocess = clip.load(str(tmp_path / "model.safetensors"), device="cpu")
    assert torch.equal(outputs(loaded, arch_name), outputs(original, arch_name))
    assert preprocess.transforms[1].size == (TINY[arch_name].image_resolution,) * 2


@needs_safetensors
def test_save_keeps_openai_keys_and_the_models_dtypes(tmp_path: Path) -> None:
    sd = make_state_dict(TINY["tiny-rn"])
    model = settle_dtype(build_from_state_dict(sd), torch.device("cuda"))  # OpenAI's fp16 mix
    clip.save(model, tmp_path / "mixed.safetensors")
    read, is_archive = read_checkpoint(tmp_path / "mixed.safetensors")
    assert not is_archive and set(read) == set(model.state_dict())
    assert {k: v.dtype for k, v in read.items()} == {
        k: v.dtype for k, v in model.state_dict().items()
    }
    assert torch.float16 in {v.dtype for v in read.values()}


@needs_safetensors
def test_save_accepts_state_dicts_and_data_parallel_and_replaces_atomically(
    tmp_path: Path,
) -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    path = tmp_path / "w.pt"  # recognised by content, whatever the extension
    path.write_bytes(b"old contents")
    clip.save(torch.nn.DataParallel(build_from_state_dict(sd)), path)
    read, _ = read_checkpoint(path)
    assert set(read) == set(sd) and all(torch.equal(read[k], sd[k]) for k in sd)
    clip.save(sd, path)
    assert os.listdir(tmp_path) == ["w.pt"]
    with pytest.raises(TypeError, match="a model or a state dict"):
        clip.save({"visual.proj": "not a tensor"}, tmp_path / "bad.safetensors")  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == ["w.pt"]


@needs_safetensors
def test_missing_safetensors_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    clip.save(sd, tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for action in (lambda: clip.save(sd, tmp_path / "x.safetensors"),
                   lambda: read_checkpoint(tmp_path / "w.safetensors")):  # fmt: skip
        with pytest.raises(ImportError, match=r"pip install 'clip-torch\[safetensors\]'"):
            action()


@needs_safetensors
def test_a_truncated_safetensors_file(tmp_path: Path) -> None:
    clip.save(make_state_dict(TINY["tiny-vit"]), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*clip\.save"):
        read_checkpoint(tmp_path / "w.safetensors")


# ---- what training scripts save -------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1, "step": [1, 2]}},
        lambda sd: {"model": sd, "step": 10},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1},
    ],
    ids=["state_dict", "model", "module-prefix", "both"],
)
def test_training_wrappers_are_unwrapped(tmp_path: Path, wrap: object) -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    torch.save(wrap(sd), tmp_path / "ckpt.pt")  # type: ignore[operator]
    model, _ = clip.load(str(tmp_path / "ckpt.pt"), device="cpu")
    assert torch.equal(outputs(model, "tiny-vit"), outputs(build_from_state_dict(sd), "tiny-vit"))


def test_a_torch_save_file_named_safetensors_is_read_by_content(tmp_path: Path) -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    torch.save(sd, tmp_path / "ft.safetensors")
    read, is_archive = read_checkpoint(tmp_path / "ft.safetensors")
    assert not is_archive and all(torch.equal(read[k], sd[k]) for k in sd)


def test_a_dict_without_weights_names_its_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": torch.tensor(0.1), "notes": "x"}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"\['epoch', 'lr', 'notes'\].*clip\.save"):
        read_checkpoint(tmp_path / "meta.pt")


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload",
    [
        lambda sd: {**sd, "visual.proj": _RunsCode()},
        lambda sd: {"state_dict": sd, "args": argparse.Namespace(lr=0.1)},
    ],
    ids=["runs-code", "namespace-in-wrapper"],
)
def test_pickles_carrying_objects_are_refused(tmp_path: Path, payload: object) -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    torch.save(payload(sd), tmp_path / "evil.pt", pickle_module=pickle)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=r"(\.system|Namespace).*refused"):
        read_checkpoint(tmp_path / "evil.pt")


# ---- memory -----------------------------------------------------------------------------------


def test_state_dicts_are_read_into_memory_not_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    sd16 = make_state_dict(TINY["tiny-vit"], layout="openai")
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd16, tmp_path / "zip16.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    seen: list[dict] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw) or real_load(*a, **kw))
    for name, expected in (("zip.pt", sd), ("zip16.pt", sd16), ("legacy.pt", sd)):
        read, _ = read_checkpoint(tmp_path / name)
        assert all(torch.equal(read[k], expected[k]) for k in expected)
        assert all(read[k].dtype == expected[k].dtype for k in expected)
    # One read per file, never mapped: a mapped tensor would alias the file (see below).
    assert len(seen) == 3 and not any(kw.get("mmap") for kw in seen)
    assert all(kw["weights_only"] for kw in seen)


# What a fine-tuning loop does: load, then save over the file the weights came from. A parameter
# that still maps the file reads it while torch.save truncates it: SIGBUS, and a truncated file.
# One child process for every kind of file (starting torch is the slow part).
_SAVE_OVER = """
import sys, torch, clip
for path in sys.argv[1:]:
    model, _ = clip.load(path, device="cpu")
    torch.save(model.state_dict(), path)
    print("saved over", path, flush=True)
"""

KINDS = ("state-dict-fp32", "state-dict-fp16", "state-dict-legacy", "archive", "safetensors")
# without the safetensors extra (the minimum-versions venv) the other kinds are still checked
KINDS_HERE = KINDS if importlib.util.find_spec("safetensors") else KINDS[:-1]


def _kinds(tmp_path: Path) -> dict[str, Path]:
    """One file of each kind clip.load reads, all holding the tiny ViT's weights."""
    arch = TINY["tiny-vit"]
    names = ("sd32.pt", "sd16.pt", "legacy.pt", "archive.pt", "st.bin")  # by content
    paths = {kind: tmp_path / name for kind, name in zip(KINDS, names) if kind in KINDS_HERE}
    torch.save(make_state_dict(arch), paths["state-dict-fp32"])
    torch.save(make_state_dict(arch, layout="openai"), paths["state-dict-fp16"])
    torch.save(
        make_state_dict(arch), paths["state-dict-legacy"], _use_new_zipfile_serialization=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        write_openai_archive(arch, make_state_dict(arch, layout="openai"), str(paths["archive"]))
    if "safetensors" in paths:
        clip.save(make_state_dict(arch), paths["safetensors"])
    return paths


def test_saving_over_the_loaded_file_keeps_the_weights(tmp_path: Path) -> None:
    paths = _kinds(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", _SAVE_OVER, *map(str, paths.values())],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert run.returncode == 0, (
        f"exit {run.returncode} (-7 is SIGBUS) after:\n{run.stdout}{run.stderr[-2000:]}"
    )
    expected = make_state_dict(TINY["tiny-vit"])  # what every kind holds, as fp32
    for kind, path in paths.items():
        saved = torch.load(path, weights_only=True)
        assert set(saved) == set(expected), kind
        assert all(torch.equal(saved[k], expected[k]) for k in expected), kind


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
@pytest.mark.parametrize("kind", KINDS_HERE)
def test_no_loaded_tensor_maps_the_file(tmp_path: Path, kind: str) -> None:
    path = _kinds(tmp_path)[kind]
    model, _ = clip.load(str(path), device="cpu")
    gc.collect()
    assert str(path.resolve()) not in Path("/proc/self/maps").read_text()
    assert isinstance(model, torch.nn.Module)


@needs_safetensors
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
def test_safetensors_before_the_pread_backend_are_copied_out_of_the_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch as st

    sd = make_state_dict(TINY["tiny-vit"])
    clip.save(sd, tmp_path / "w.safetensors")
    real = st.load_file
    calls: list[str] = []

    def load_file(filename: str, device: str = "cpu") -> dict[str, torch.Tensor]:  # < 0.8
        calls.append(filename)
        return real(filename, device=device)

    monkeypatch.setattr(st, "load_file", load_file)
    read, _ = read_checkpoint(tmp_path / "w.safetensors")
    gc.collect()
    assert calls == []  # the backend-less load_file would return views of the map
    assert str((tmp_path / "w.safetensors").resolve()) not in Path("/proc/self/maps").read_text()
    assert set(read) == set(sd) and all(torch.equal(read[k], sd[k]) for k in sd)


def test_no_reference_to_the_torchscript_module_is_kept(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs: list[weakref.ref] = []
    real_load = torch.jit.load

    def spy(*args: object, **kwargs: object) -> torch.jit.ScriptModule:
        module = real_load(*args, **kwargs)  # type: ignore[arg-type]
        refs.append(weakref.ref(module))
        return module

    monkeypatch.setattr(torch.jit, "load", spy)
    state_dict, is_archive = read_checkpoint(tiny_files["tiny-vit"]["archive"])
    gc.collect()
    assert is_archive and len(refs) == 1 and refs[0]() is None
    assert "visual.proj" in state_dict


def test_checkpoint_module_has_no_safetensors_import_at_import_time() -> None:
    assert "safetensors" not in checkpoint.__dict__
