"""`clip finetune` on 32 synthetic pairs and a tiny ViT: the loss falls, the output loads in
clip and open_clip, a killed run resumes onto the uninterrupted loss curve, torchrun ranks train
as one process on the concatenated batch, and reruns with other settings are refused."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import clip.finetune
from clip.cli import main
from clip.config import CLIPConfig
from clip.finetune import (
    EXIT_AFTER_STEP_ENV,
    FinetuneOptions,
    FinetuneOptionsError,
    RunMismatchError,
    finetune,
)
from clip.finetune_data import EpochBatches, epoch_order, tokenize_captions
from clip.model import CLIP, convert_weights
from clip.training import batch_loss

REPO = Path(__file__).resolve().parent.parent
VIT = CLIPConfig(16, 32, 2, 64, 16, 77, 49408, 64, 1, 2)
WORDS = ["red", "green", "blue", "cat", "dog", "bird", "car", "tree", "house", "boat", "sun"]
ACCEPTANCE = ["--epochs", "10", "--batch-size", "16", "--lr", "1e-4", "--warmup", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 pairs: distinct random 32x32 images and distinct captions, in train.csv."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    with open(root / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(32):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{i:02d}.png")
            writer.writerow([f"{i:02d}.png", f"{' '.join(rng.choice(WORDS, 4))} number {i}"])
    return root / "train.csv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny ViT in the hub layout."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    clip.save(CLIP.from_config(VIT), folder)
    return folder


@pytest.fixture(scope="module")
def trained(data: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The acceptance run, with the training pairs as --val too."""
    out = tmp_path_factory.mktemp("runs") / "acceptance"
    args = [str(data), "--model", str(tiny), "--out", str(out), *ACCEPTANCE, "--workers", "0"]
    assert main(["finetune", *args, "--val", str(data)]) == 0
    return out


def pair_tensors(data: Path, model: torch.nn.Module, preprocess: Any) -> tuple[Any, Any]:
    with open(data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images = torch.stack([preprocess(Image.open(data.parent / r["filepath"])) for r in rows])
    return images, clip.tokenize([r["title"] for r in rows])


def loss_of(folder: Path, data: Path) -> float:
    model, preprocess = clip.load(str(folder), device="cpu")
    return batch_loss(model, *pair_tensors(data, model, preprocess))


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in metrics(out) if "loss" in r]


def options(data: Path, tiny: Path, out: Path, **changes: Any) -> FinetuneOptions:
    """A short run: 4 steps of 8 pairs, a checkpoint every 2."""
    values: dict[str, Any] = {"epochs": 1, "batch_size": 8, "lr": 1e-4, "warmup": 1}
    values.update(workers=0, checkpoint_every=2)
    return FinetuneOptions(str(data), str(tiny), str(out), **{**values, **changes})


# ---- the acceptance run ----------------------------------------------------------------------


def test_ten_epochs_lower_the_loss_on_the_pairs_to_at_most_three_quarters(
    trained: Path, tiny: Path, data: Path
) -> None:
    start, end = loss_of(tiny, data), loss_of(trained, data)
    print(f"contrastive loss on the 32 pairs: {start:.4f} -> {end:.4f} ({end / start:.3f}x)")
    assert end <= 0.75 * start


def test_output_loads_in_clip_and_open_clip_with_the_same_weights(trained: Path) -> None:
    import open_clip

    ours, _ = clip.load(str(trained), device="cpu")
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{trained}")
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, theirs_state[key]), key


def test_metrics_have_a_line_per_step_and_eval_lines_before_and_after_each_epoch(
    trained: Path,
) -> None:
    records = metrics(trained)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert {"epoch", "lr", "images_per_s", "logit_scale"} <= set(steps[0])
    assert steps[0]["lr"] == 1e-4 and steps[-1]["lr"] < 1e-6  # no warmup, cosine to ~0
    evals = [r for r in records if r.get("eval") == "val"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(2 * e, e) for e in range(11)]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 <= evals[-1]["image_to_text_R@1"] <= evals[-1]["image_to_text_R@5"] <= 1


def test_a_finished_run_leaves_no_checkpoint_and_a_rerun_does_nothing(
    trained: Path, tiny: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not (trained / "checkpoint").exists()
    assert json.loads((trained / "finetune.json").read_text())["status"] == "finished"
    before = (trained / "metrics.jsonl").read_bytes()
    args = [str(data), "--model", str(tiny), "--out", str(trained), *ACCEPTANCE]
    assert main(["finetune", *args, "--val", str(data), "--workers", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (trained / "metrics.jsonl").read_bytes() == before


def test_a_rerun_with_other_settings_is_refused_naming_them(
    trained: Path, tiny: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    args = [str(data), "--model", str(tiny), "--out", str(trained), *ACCEPTANCE, "--seed", "1"]
    assert main(["finetune", *args, "--lr", "2e-4"]) == 2
    message = capsys.readouterr().err
    assert "--lr: 0.0002 now, 0.0001 in the folder" in message
    assert "--seed: 1 now, 0 in the folder" in message
    assert "--val: null now" in message and "another --out" in message
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_an_out_folder_with_other_files_or_a_file_is_refused(
    tmp_path: Path, tiny: Path, data: Path
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatchError, match=r"holds no finetune\.json"):
        finetune(options(data, tiny, tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(RunMismatchError, match="is a file; give a folder"):
        finetune(options(data, tiny, tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- resume ----------------------------------------------------------------------------------


class Killed(Exception):
    pass


class KillingOs:
    """``os`` for clip.finetune alone, whose ``_exit`` raises (DataLoader workers keep theirs)."""

    def _exit(self, code: int) -> None:
        raise Killed

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    finetune(options(data, tiny, out))
    return out


@pytest.mark.parametrize(("killed_workers", "resumed_workers"), [(0, 0), (1, 0)])
def test_a_run_killed_after_step_3_resumes_onto_the_uninterrupted_curve(
    uninterrupted: Path,
    data: Path,
    tiny: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    killed_workers: int,
    resumed_workers: int,
) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv(EXIT_AFTER_STEP_ENV, "3")
    monkeypatch.setattr(clip.finetune, "os", KillingOs())
    with pytest.raises(Killed):
        finetune(options(data, tiny, out, workers=killed_workers))
    assert [s for s, _, _ in step_losses(out)] == [1, 2, 3]  # step 3 is after the checkpoint
    monkeypatch.delenv(EXIT_AFTER_STEP_ENV)
    result = finetune(options(data, tiny, out, workers=resumed_workers))
    assert result.resumed_from == 2
    assert step_losses(out) == step_losses(uninterrupted)  # exactly, steps 1-4 once each
    ours, _ = clip.load(str(out), device="cpu")
    reference, _ = clip.load(str(uninterrupted), device="cpu")
    for (key, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_process_killed_hard_resumes_onto_the_uninterrupted_curve(
    uninterrupted: Path, data: Path, tiny: Path, tmp_path: Path
) -> None:
    threads = str(torch.get_num_threads())  # the uninterrupted run's: same sums, same bits
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads}
    args = [sys.executable, "-m", "clip", "finetune", str(data), "--model", str(tiny)]
    args += ["--epochs", "1", "--batch-size", "8", "--lr", "1e-4", "--warmup", "1", "-q"]
    args += ["--checkpoint-every", "2", "--workers", "0"]
    out = tmp_path / "run"
    killed = {**env, EXIT_AFTER_STEP_ENV: "3"}
    done = subprocess.run([*args, "--out", str(out)], env=killed, capture_output=True, text=True)
    assert done.returncode == 75, done.stderr
    assert (out / "checkpoint" / "last.pt").is_file()
    done = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert step_losses(out) == step_losses(uninterrupted)


def test_a_resume_with_other_weights_in_the_model_file_is_refused(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    clip.save(CLIP.from_config(VIT), tmp_path / "model")
    monkeypatch.setenv(EXIT_AFTER_STEP_ENV, "1")
    monkeypatch.setattr(clip.finetune, "os", KillingOs())
    with pytest.raises(Killed):
        finetune(options(data, tmp_path / "model", tmp_path / "run"))
    torch.manual_seed(2)
    clip.save(CLIP.from_config(VIT), tmp_path / "model")
    with pytest.raises(RunMismatchError, match="now holds other weights than when the run"):
        finetune(options(data, tmp_path / "model", tmp_path / "run"))


def test_a_resume_on_a_table_with_other_captions_is_refused(
    data: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "train.csv"
    rows = data.read_text().splitlines()  # image paths made absolute: the table moves
    rows = [rows[0]] + [f"{data.parent}/{row}" for row in rows[1:]]
    table.write_text("\n".join(rows) + "\n")
    monkeypatch.setenv(EXIT_AFTER_STEP_ENV, "1")
    monkeypatch.setattr(clip.finetune, "os", KillingOs())
    with pytest.raises(Killed):
        finetune(options(table, tiny, tmp_path / "run"))
    table.write_text(table.read_text().replace("number 7", "number seven"))
    with pytest.raises(RunMismatchError, match=r"TRAIN's pairs \(image paths and captions\)"):
        finetune(options(table, tiny, tmp_path / "run"))


# ---- torchrun --------------------------------------------------------------------------------


def test_two_torchrun_ranks_train_as_one_process_on_the_concatenated_batch(
    data: Path, tiny: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*torchrun, "--nproc-per-node", "2", "-m", "clip", "finetune", str(data)]
    command += ["--model", str(tiny), "--out", str(tmp_path / "ranks"), "--device", "cpu"]
    command += ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--warmup", "0"]
    done = subprocess.run([*command, "--workers", "0"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 processes" in done.stdout
    one = options(data, tiny, tmp_path / "one", batch_size=16, lr=1e-3, warmup=0)
    finetune(one)
    ranks, single = step_losses(tmp_path / "ranks"), step_losses(tmp_path / "one")
    assert [s for s, _, _ in ranks] == [1, 2]
    for (_, a, _), (_, b, _) in zip(ranks, single):  # the second loss follows one update
        assert a == pytest.approx(b, abs=1e-5)
    tuned, _ = clip.load(str(tmp_path / "ranks"), device="cpu")
    assert tuned.config == VIT


# ---- what is trained, and how ----------------------------------------------------------------


def test_an_fp16_layout_model_trains_without_nan_under_fp16(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = CLIP.from_config(VIT)
    convert_weights(model)
    clip.save(model, tmp_path / "half")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "half" / "open_clip_model.safetensors"), "pt") as f:
        assert f.get_tensor("text_projection").dtype == torch.float16
    args = ["finetune", str(data), "--model", str(tmp_path / "half"), "--out", str(tmp_path / "o")]
    assert main([*args, "--precision", "fp16", "--epochs", "2", "--batch-size", "16"]) == 0
    assert all(math.isfinite(loss) for _, loss, _ in step_losses(tmp_path / "o"))
    tuned, _ = clip.load(str(tmp_path / "o"), device="cpu")
    assert all(torch.isfinite(p).all() for p in tuned.parameters())
    assert not torch.equal(tuned.text_projection, model.text_projection.float())


def test_lock_image_leaves_the_image_tower_unchanged(
    data: Path, tiny: Path, tmp_path: Path
) -> None:
    finetune(options(data, tiny, tmp_path / "o", lock_image=True, lr=1e-3, epochs=1))
    start, _ = clip.load(str(tiny), device="cpu")
    tuned, _ = clip.load(str(tmp_path / "o"), device="cpu")
    before, after = start.state_dict(), tuned.state_dict()
    image = [k for k in before if k.startswith("visual.")]
    assert image and all(torch.equal(before[k], after[k]) for k in image)
    assert not torch.equal(before["text_projection"], after["text_projection"])


def test_grad_checkpointing_is_turned_on_on_the_model(
    data: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[type, bool]] = []

    def set_grad_checkpointing(self: CLIP, enabled: bool = True) -> None:
        calls.append((type(self), enabled))

    monkeypatch.setattr(CLIP, "set_grad_checkpointing", set_grad_checkpointing, raising=False)
    finetune(options(data, tiny, tmp_path / "o", grad_checkpointing=True, batch_size=16))
    assert calls == [(CLIP, True)]


def test_grad_checkpointing_on_a_model_without_it_is_refused_before_training(
    data: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if hasattr(CLIP, "set_grad_checkpointing"):
        monkeypatch.delattr(CLIP, "set_grad_checkpointing")
    with pytest.raises(RuntimeError, match=r"no set_grad_checkpointing\(\).*--grad-checkpointing"):
        finetune(options(data, tiny, tmp_path / "o", grad_checkpointing=True))
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 40}, "32 pairs, fewer than one batch of 40"),
        ({"warmup": 5}, "warmup (5 steps) is longer than the whole run (4 steps"),
        ({"caption_column": "caption"}, "no column 'caption'"),
        ({"epochs": 0}, "epochs must be an int >= 1"),
    ],
)
def test_options_that_cannot_run_are_refused_by_name(
    data: Path, tiny: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(FinetuneOptionsError, match=re.escape(message)):
        finetune(options(data, tiny, tmp_path / "o", **changes))


def test_a_missing_input_is_a_usage_error(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["finetune", str(tmp_path / "nope.csv"), "--model", str(tiny), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "nope.csv" in capsys.readouterr().err


# ---- data ------------------------------------------------------------------------------------


def test_ranks_batches_concatenated_are_the_one_process_batches() -> None:
    one = list(EpochBatches(50, 8, seed=3, epoch=2))
    ranks = [list(EpochBatches(50, 4, seed=3, epoch=2, rank=r, world_size=2)) for r in (0, 1)]
    assert len(one) == 6 and [a + b for a, b in zip(*ranks)] == one
    assert list(EpochBatches(50, 8, seed=3, epoch=2, start=4)) == one[4:]


def test_epoch_orders_depend_on_seed_and_epoch_only() -> None:
    assert torch.equal(epoch_order(20, 0, 1), epoch_order(20, 0, 1))
    assert not torch.equal(epoch_order(20, 0, 1), epoch_order(20, 0, 2))
    assert not torch.equal(epoch_order(20, 0, 1), epoch_order(20, 1, 1))


def test_long_captions_are_cut_as_tokenize_cuts_them_with_a_warning() -> None:
    captions = ["a cat", "word " * 80, "b " * 75, "dog " * 76]  # 77 tokens fit, 78 do not
    with pytest.warns(UserWarning, match="2 of 4 captions are longer than the model's 77"):
        tokens = tokenize_captions(captions, 77)
    assert torch.equal(tokens, clip.tokenize(captions, truncate=True))
