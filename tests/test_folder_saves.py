"""``clip.save(model, folder)``: where it writes, saving over what was loaded, and what a process
killed in the middle of a save leaves (the old model, or a clear refusal; never a wrong model).

Reading folders and configs is in ``test_folder.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Union

import pytest
import torch
from folder_models import TINY, tiny_model

import clip
from clip import checkpoint
from clip.checkpoint import CheckpointError, read_safetensors_metadata
from clip.config import CLIPConfig
from clip.folder import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, open_clip_document
from clip.model import CLIP
from clip.preprocess import PreprocessConfig, transform

pytest.importorskip("safetensors", reason="clip.save writes safetensors (the safetensors extra)")
pytestmark = pytest.mark.usefixtures("one_thread")

# Everything the shapes do not tell, away from OpenAI's values.
UNUSUAL = CLIPConfig(
    32,
    32,
    2,
    160,
    8,
    77,
    49408,
    64,
    4,
    2,
    activation="gelu",
    vision_head_width=80,
    preprocess=PreprocessConfig((0.5,) * 3, (0.5,) * 3, "bilinear", "squash"),
)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------
# Where clip.save writes
# --------------------------------------------------------------------------------------------

FOLDER_TARGETS = ["dir/", "noext", "nested/new/dir", Path("as-path"), "model.safetensors/"]
FILE_TARGETS = ["file.safetensors", "FILE.SAFETENSORS", Path("as-path.safetensors"), "w.pt"]


def _under(tmp_path: Path, target: Union[str, Path]) -> Union[str, Path]:
    return tmp_path / target if isinstance(target, Path) else f"{tmp_path}/{target}"


@pytest.mark.parametrize("target", FOLDER_TARGETS, ids=str)
def test_a_path_without_extension_or_ending_in_a_separator_gets_a_folder(
    tmp_path: Path, target: Union[str, Path]
) -> None:
    model = tiny_model(UNUSUAL)
    path = _under(tmp_path, target)
    clip.save(model, path)
    assert listing(Path(path)) == [CONFIG_NAME, SAFETENSORS_NAME]
    loaded, _ = clip.load(path, device="cpu")
    assert loaded.config == UNUSUAL and same_weights(loaded, model)


@pytest.mark.parametrize("target", FILE_TARGETS, ids=str)
def test_a_path_with_an_extension_gets_one_file_that_keeps_the_config(
    tmp_path: Path, target: Union[str, Path]
) -> None:
    model = tiny_model(UNUSUAL)
    path = _under(tmp_path, target)
    clip.save(model, path)
    assert listing(tmp_path) == [Path(path).name]
    loaded, preprocess = clip.load(path, device="cpu")
    assert loaded.config == UNUSUAL  # activation, head width and preprocessing kept
    assert same_weights(loaded, model)
    assert repr(preprocess) == repr(transform(32, UNUSUAL.preprocess))


def test_an_existing_file_without_extension_is_not_turned_into_a_folder(tmp_path: Path) -> None:
    torch.save(tiny_model().state_dict(), tmp_path / "finetuned")
    with pytest.raises(FileExistsError, match=r"finetuned\.safetensors"):
        clip.save(tiny_model(), tmp_path / "finetuned")
    assert (tmp_path / "finetuned").is_file()


def test_the_saved_config_is_open_clips_document_with_one_save_id(tmp_path: Path) -> None:
    clip.save(tiny_model(UNUSUAL), tmp_path)
    doc = json.loads((tmp_path / CONFIG_NAME).read_text())
    in_weights = json.loads(
        read_safetensors_metadata(tmp_path / SAFETENSORS_NAME)["open_clip_config"]
    )
    assert doc == in_weights
    save_id = doc.pop("clip_torch")["save_id"]
    assert doc == open_clip_document(UNUSUAL)
    clip.save(tiny_model(UNUSUAL), tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["clip_torch"]["save_id"] != save_id


# --------------------------------------------------------------------------------------------
# Saving over what was loaded
# --------------------------------------------------------------------------------------------


def test_saving_over_the_loaded_folder_gives_the_new_values(tmp_path: Path) -> None:
    clip.save(tiny_model(TINY), tmp_path)
    model, _ = clip.load(tmp_path, device="cpu")
    with torch.no_grad():
        model.ln_final.bias.add_(1.0)
        model.logit_scale.fill_(2.5)
    clip.save(model, tmp_path)
    assert listing(tmp_path) == [CONFIG_NAME, SAFETENSORS_NAME]
    again, _ = clip.load(tmp_path, device="cpu")
    assert same_weights(again, model)
    assert again.logit_scale.item() == 2.5


def _open_clip_style_folder(folder: Path, config: CLIPConfig, seed: int) -> CLIP:
    """A folder as open_clip's hub writer leaves it: a torch.save'd .bin and the config without
    our save id."""
    model = tiny_model(config, seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / BIN_NAME)
    doc = open_clip_document(config)
    (folder / CONFIG_NAME).write_text(json.dumps(doc, indent=2))
    return model


def test_saving_over_an_open_clip_folder_replaces_its_bin(tmp_path: Path) -> None:
    """The stale .bin goes: open_clip and we would otherwise read different weights."""
    _open_clip_style_folder(tmp_path, UNUSUAL, seed=1)
    (tmp_path / "README.md").write_text("model card")
    model, _ = clip.load(tmp_path, device="cpu")
    with torch.no_grad():
        model.visual.ln_post.weight.mul_(2)
    clip.save(model, tmp_path)
    assert listing(tmp_path) == sorted([CONFIG_NAME, "README.md", SAFETENSORS_NAME])
    again, _ = clip.load(tmp_path, device="cpu")
    assert again.config == UNUSUAL and same_weights(again, model)


# --------------------------------------------------------------------------------------------
# A process killed while saving
# --------------------------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a saving process")
KILLED = 9


def _in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked process (no second import of torch); its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            work()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _save_killed(model: CLIP, folder: Path, point: str) -> Callable[[], None]:
    """A save of ``model`` into ``folder`` that dies at ``point``, as a SIGKILL would."""

    def work() -> None:
        real_replace = os.replace

        def replace(src: str, dst: str) -> None:
            if point == "before-weights-rename" and str(dst).endswith(SAFETENSORS_NAME):
                os._exit(KILLED)
            real_replace(src, dst)

        def write_config(folder: str, doc: object) -> None:
            os._exit(KILLED)

        os.replace = replace  # type: ignore[assignment]
        if point == "after-weights":
            checkpoint.write_config = write_config  # type: ignore[assignment]
        clip.save(model, folder)

    return work


@needs_fork
def test_a_save_killed_before_its_weights_are_renamed_leaves_the_old_model(
    tmp_path: Path,
) -> None:
    old = tiny_model(TINY, seed=1)
    clip.save(old, tmp_path)
    assert _in_child(_save_killed(tiny_model(UNUSUAL), tmp_path, "before-weights-rename")) == 9
    assert len(listing(tmp_path)) == 3  # the temporary file of the killed save is left
    loaded, _ = clip.load(tmp_path, device="cpu")
    assert loaded.config == TINY and same_weights(loaded, old)


@needs_fork
def test_a_save_killed_between_weights_and_config_is_refused(tmp_path: Path) -> None:
    clip.save(tiny_model(TINY, seed=1), tmp_path)
    assert _in_child(_save_killed(tiny_model(UNUSUAL), tmp_path, "after-weights")) == KILLED
    with pytest.raises(CheckpointError, match="different saves"):
        clip.load(tmp_path, device="cpu")


@needs_fork
def test_a_first_save_killed_before_its_config_is_refused(tmp_path: Path) -> None:
    new = tmp_path / "new"
    assert _in_child(_save_killed(tiny_model(UNUSUAL), new, "after-weights")) == KILLED
    assert listing(new) == [SAFETENSORS_NAME]
    with pytest.raises(CheckpointError, match=r"unfinished clip\.save"):
        clip.load(new, device="cpu")


@needs_fork
def test_a_save_over_an_open_clip_folder_killed_before_its_config_is_refused(
    tmp_path: Path,
) -> None:
    """open_clip's config has no save id to tell the torn save by: its content does."""
    _open_clip_style_folder(tmp_path, TINY, seed=1)
    other = UNUSUAL.replace(vision_width=128, vision_head_width=32)  # TINY's shapes
    assert _in_child(_save_killed(tiny_model(other), tmp_path, "after-weights")) == KILLED
    with pytest.raises(CheckpointError, match="describes another model"):
        clip.load(tmp_path, device="cpu")


@needs_fork
def test_a_save_of_the_same_model_over_an_open_clip_folder_killed_before_its_config_loads(
    tmp_path: Path,
) -> None:
    """Fine-tuned weights of the folder's model: the old config describes them exactly."""
    _open_clip_style_folder(tmp_path, UNUSUAL, seed=1)
    tuned = tiny_model(UNUSUAL, seed=2)
    assert _in_child(_save_killed(tuned, tmp_path, "after-weights")) == KILLED
    loaded, _ = clip.load(tmp_path, device="cpu")
    assert loaded.config == UNUSUAL and same_weights(loaded, tuned)


@needs_fork
@pytest.mark.parametrize("attempt", range(3))
def test_a_save_killed_at_any_moment_never_gives_a_wrong_model(
    tmp_path: Path, attempt: int
) -> None:
    """Two models of the same shapes but different configs, saved in turn until SIGKILL: the
    folder gives one of them whole, or a refusal."""
    configs = [TINY, UNUSUAL.replace(vision_width=128, vision_head_width=32)]
    models = [tiny_model(config, seed) for seed, config in enumerate(configs)]
    clip.save(models[0], tmp_path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            while True:
                clip.save(models[1], tmp_path)
                clip.save(models[0], tmp_path)
        finally:
            os._exit(1)
    time.sleep(random.Random(attempt).uniform(0.01, 0.3))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    try:
        loaded, _ = clip.load(tmp_path, device="cpu")
    except CheckpointError as e:
        assert "save the model again" in str(e)
        return
    which = [i for i, model in enumerate(models) if same_weights(loaded, model)]
    assert len(which) == 1, "the folder's weights are neither model's"
    assert loaded.config == configs[which[0]], "weights of one save with the config of another"
