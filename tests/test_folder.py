"""Model folders in open_clip's hub layout: which configs are OpenAI's architecture, which are
refused by name, and what a config that does not describe its weights, a malformed one, or a
folder missing a file gives.

Saving, saving over and interrupted saves are in ``test_folder_saves.py``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from folder_models import TINY, tiny_model

import clip
from clip.checkpoint import CheckpointError
from clip.config import CLIPConfig, UnsupportedModelError
from clip.folder import CONFIG_NAME, SAFETENSORS_NAME, config_from_open_clip, open_clip_document
from clip.model import CLIP
from clip.preprocess import STD

pytest.importorskip("safetensors", reason="clip.save writes safetensors (the safetensors extra)")
pytestmark = pytest.mark.usefixtures("one_thread")


def features(model: torch.nn.Module) -> torch.Tensor:
    """Both encoders' outputs on fixed inputs, concatenated."""
    side = model.visual.input_resolution
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(clip.tokenize(["a", "b"]))])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The tiny model saved with ``clip.save(model, folder)``."""
    path = tmp_path / "model"
    clip.save(tiny_model(), path)
    return path


def edit_config(folder: Path, change: Any) -> None:
    doc = json.loads((folder / CONFIG_NAME).read_text())
    change(doc)
    (folder / CONFIG_NAME).write_text(json.dumps(doc))


# --------------------------------------------------------------------------------------------
# Every config open_clip ships: OpenAI's architecture (built like open_clip's) or refused by name
# --------------------------------------------------------------------------------------------


def _open_clip_configs() -> list[Path]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(Path(spec.submodule_search_locations[0], "model_configs").glob("*.json"))


OPEN_CLIP_CONFIGS = {path.stem: path for path in _open_clip_configs()}

# Families that are not OpenAI's architecture: file-name pattern → what the refusal must name.
# The first matching pattern applies; every other config must be accepted.
REFUSED = (
    ("convnext_*", "ConvNeXt"),
    ("EVA*", "EVA"),
    ("coca_*", "CoCa"),
    ("*SigLIP*", "SigLIP"),
    ("nllb-clip-*-siglip", "SigLIP"),
    ("*CLIPA*", "CLIPA"),
    ("MobileCLIP2-L-14", r"timm image tower \(vit_large_patch14_clip_224\)"),  # says no more
    ("MobileCLIP*", "MobileCLIP"),
    ("*worldwide*", "MetaCLIP 2"),
    ("xlm-roberta-*", "xlm-roberta"),
    ("roberta-*", "roberta-base"),
    ("mt5-*", "mt5"),
    ("nllb-clip-*", "nllb"),
    ("ViTamin-*", "ViTamin"),
    ("PE-Core-*", "PE-Core"),
    ("swin_*", r"timm image tower \(swin"),
    ("vit_*", r"timm image tower \(vit_"),
    ("ViT-M-16-alt", "ls_init_value"),  # layer scale
)


def expected_refusal(name: str) -> str | None:
    return next((why for pattern, why in REFUSED if fnmatch.fnmatchcase(name, pattern)), None)


def test_open_clip_ships_configs_of_both_kinds() -> None:
    if not OPEN_CLIP_CONFIGS:
        pytest.skip("open_clip is not installed")
    accepted = [name for name in OPEN_CLIP_CONFIGS if expected_refusal(name) is None]
    assert {"RN50", "ViT-B-32", "ViT-H-14-378", "ViT-g-14", "ViT-bigG-14"} <= set(accepted)
    assert len(accepted) < len(OPEN_CLIP_CONFIGS) - 50


def _architecture(model: torch.nn.Module) -> dict[str, Any]:
    """Key → shape of the persistent state, attention heads and MLP activations of a model."""
    heads = [m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    acts = [type(m).__name__ for name, m in model.named_modules() if name.endswith("mlp.gelu")]
    return {
        "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
        "heads": heads,
        "activations": acts,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_CONFIGS))
def test_open_clip_config_is_refused_by_name_or_built_as_open_clip_builds_it(name: str) -> None:
    doc = json.loads(OPEN_CLIP_CONFIGS[name].read_text())
    why = expected_refusal(name)
    if why is not None:
        with pytest.raises(UnsupportedModelError, match=why) as refused:
            config_from_open_clip(doc)
        assert "not OpenAI's CLIP architecture" in str(refused.value) or "settings" in str(
            refused.value
        )
        assert "load these weights with open_clip" in str(refused.value)
        return
    open_clip = pytest.importorskip("open_clip")
    config = config_from_open_clip(doc)
    with torch.device("meta"):  # both built without memory or initialisation
        ours = CLIP.from_config(config)
        theirs = open_clip.create_model(name, device="meta")
    # open_clip's MLP activation module is named "gelu" whichever it is, as ours is.
    mine, oracle = _architecture(ours), _architecture(theirs)
    assert mine["shapes"] == oracle["shapes"]
    assert mine["parameters"] == oracle["parameters"]
    assert mine["heads"] == oracle["heads"]
    assert [a.replace("GELU", "Gelu") for a in mine["activations"]] == [
        a.replace("GELU", "Gelu") for a in oracle["activations"]
    ]


def test_a_refused_family_is_refused_before_its_weights_are_read(tmp_path: Path) -> None:
    configs = {p: OPEN_CLIP_CONFIGS[p] for p in ("ViT-B-16-SigLIP",) if p in OPEN_CLIP_CONFIGS}
    if not configs:
        pytest.skip("open_clip is not installed")
    doc = {"model_cfg": json.loads(configs["ViT-B-16-SigLIP"].read_text()), "preprocess_cfg": {}}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(doc))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsupportedModelError, match=r"SigLIP.*open_clip") as refused:
        clip.load(tmp_path, device="cpu")
    assert str(tmp_path / CONFIG_NAME) in str(refused.value)


# --------------------------------------------------------------------------------------------
# Weights of other families
# --------------------------------------------------------------------------------------------

FAMILY_KEYS = {
    "logit_bias": ("SigLIP", torch.zeros(1)),
    "text_decoder.ln_final.weight": ("CoCa", torch.ones(64)),
    "visual.trunk.stem.0.weight": ("timm image tower", torch.ones(8, 3, 4, 4)),
}


@pytest.mark.parametrize("key", sorted(FAMILY_KEYS))
def test_state_dicts_with_another_familys_keys_are_refused(tmp_path: Path, key: str) -> None:
    family, tensor = FAMILY_KEYS[key]
    sd = {**tiny_model().state_dict(), key: tensor}
    torch.save(sd, tmp_path / "weights.pt")
    with pytest.raises(UnsupportedModelError, match=f"{family}.*open_clip"):
        clip.load(tmp_path / "weights.pt", device="cpu")
    # In a folder, with a config of OpenAI's architecture: the weights still tell.
    import safetensors.torch

    (tmp_path / "folder").mkdir()
    safetensors.torch.save_file(sd, tmp_path / "folder" / SAFETENSORS_NAME)
    doc = open_clip_document(TINY)
    (tmp_path / "folder" / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(UnsupportedModelError, match=family):
        clip.load(tmp_path / "folder", device="cpu")


# --------------------------------------------------------------------------------------------
# A config that does not describe its weights, or is malformed
# --------------------------------------------------------------------------------------------

DISAGREEMENTS = {
    "vision width": (("vision_cfg", "width"), 768, "vision_width: config 768, weights 128"),
    "text width": (("text_cfg", "width"), 768, "transformer_width: config 768, weights 64"),
    "text depth": (("text_cfg", "layers"), 12, "transformer_layers: config 12, weights 2"),
    "vision depth": (("vision_cfg", "layers"), 12, "vision_layers: config 12, weights 2"),
    "patch size": (("vision_cfg", "patch_size"), 16, "vision_patch_size: config 16, weights 8"),
    "image size": (("vision_cfg", "image_size"), 224, "image_resolution: config 224, weights 32"),
    "embed dim": (("embed_dim",), 512, "embed_dim: config 512, weights 32"),
    "mlp ratio": (("vision_cfg", "mlp_ratio"), 4.3637, "vision_mlp_ratio: config 4.3637"),
    "context": (("text_cfg", "context_length"), 64, "context_length: config 64, weights 77"),
    "resnet": (("vision_cfg", "layers"), [3, 4, 6, 3], r"vision_layers: config \(3, 4, 6, 3\)"),
}


@pytest.mark.parametrize("case", sorted(DISAGREEMENTS))
def test_a_config_for_other_weights_is_refused_naming_the_field(folder: Path, case: str) -> None:
    where, value, message = DISAGREEMENTS[case]

    def change(doc: dict) -> None:
        section = doc["model_cfg"]
        for key in where[:-1]:
            section = section[key]
        section[where[-1]] = value

    edit_config(folder, change)
    with pytest.raises(ValueError, match=f"does not describe these weights.*{message}"):
        clip.load(folder, device="cpu")


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("text_cfg", "heads", 12, "text width 64 is not divisible into 12 heads"),
        ("vision_cfg", "head_width", 80, "width 128 is not a multiple of the head width 80"),
    ],
)
def test_heads_that_do_not_divide_the_width_name_the_config_file(
    folder: Path, section: str, key: str, value: int, message: str
) -> None:
    edit_config(folder, lambda doc: doc["model_cfg"][section].update({key: value}))
    with pytest.raises(ValueError, match=message) as refused:
        clip.load(folder, device="cpu")
    assert str(folder / CONFIG_NAME) in str(refused.value)


MALFORMED = {
    "truncated": (b'{"model_cfg": {', "not valid JSON"),
    "binary": (b"\xff\xfe\x00\x01garbage", "not valid JSON"),
    "a list": (b"[1, 2]", "holds a JSON list"),
    "no vision_cfg": (b'{"model_cfg": {"embed_dim": 32}}', "not an open_clip config"),
    "no embed_dim": (
        b'{"model_cfg": {"vision_cfg": {}, "text_cfg": {}}}',
        "malformed open_clip model config.*embed_dim",
    ),
    "layers not a number": (
        b'{"model_cfg": {"embed_dim": 32, "vision_cfg": {"layers": "many"}, "text_cfg": {}}}',
        "malformed open_clip model config",
    ),
    "non-square image": (
        b'{"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": [32, 64]}}}',
        "square images only",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_config_is_refused_naming_the_file(folder: Path, case: str) -> None:
    content, message = MALFORMED[case]
    (folder / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=message) as refused:
        clip.load(folder, device="cpu")
    assert CONFIG_NAME in str(refused.value)


def test_letterbox_resizing_is_refused_naming_it(folder: Path) -> None:
    edit_config(folder, lambda doc: doc["preprocess_cfg"].update(resize_mode="longest"))
    with pytest.raises(ValueError, match="resize_mode 'longest'"):
        clip.load(folder, device="cpu")


def test_preprocess_values_are_read_as_open_clip_reads_them(folder: Path) -> None:
    """A single mean or std is every channel's; null or missing values are the defaults."""
    edit_config(folder, lambda doc: doc.update(preprocess_cfg={"mean": 0.5, "std": None}))
    model, preprocess = clip.load(folder, device="cpu")
    assert model.config.preprocess.mean == (0.5, 0.5, 0.5)
    assert model.config.preprocess.std == STD
    assert preprocess.transforms[-1].mean == (0.5, 0.5, 0.5)


def test_a_square_image_size_pair_is_one_side(folder: Path) -> None:
    edit_config(folder, lambda doc: doc["model_cfg"]["vision_cfg"].update(image_size=[32, 32]))
    model, _ = clip.load(folder, device="cpu")
    assert model.config == TINY


# --------------------------------------------------------------------------------------------
# Folders missing a file
# --------------------------------------------------------------------------------------------


def test_weights_without_a_config_ask_for_config(tmp_path: Path) -> None:
    model = tiny_model()
    clip.save(model, tmp_path / "single.safetensors")  # no save id: not an interrupted save
    (tmp_path / "folder").mkdir()
    (tmp_path / "single.safetensors").rename(tmp_path / "folder" / SAFETENSORS_NAME)
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_NAME}.*config="):
        clip.load(tmp_path / "folder", device="cpu")
    loaded, _ = clip.load(tmp_path / "folder", device="cpu", config=TINY)
    assert loaded.config == TINY
    assert torch.equal(features(loaded), features(model))


def test_torch_save_weights_without_a_config_ask_for_config(tmp_path: Path) -> None:
    torch.save(tiny_model().state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="config="):
        clip.load(tmp_path, device="cpu")


def test_a_config_without_weights_names_the_expected_files(folder: Path) -> None:
    (folder / SAFETENSORS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{SAFETENSORS_NAME} or open_clip_pytorch_model"):
        clip.load(folder, device="cpu")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        clip.load(folder, device="cpu", config=TINY)


def test_an_empty_folder_says_it_holds_no_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"holds no weights.*found \[\]"):
        clip.load(str(tmp_path), device="cpu")


def test_a_torn_save_is_refused(folder: Path) -> None:
    """Weights from a newer save than the config (a save killed between the two files)."""
    old_config = (folder / CONFIG_NAME).read_bytes()
    clip.save(tiny_model(seed=1), folder)
    (folder / CONFIG_NAME).write_bytes(old_config)
    with pytest.raises(CheckpointError, match=r"different saves.*save the model again"):
        clip.load(folder, device="cpu")


def test_a_config_without_our_save_id_describing_the_saved_model_is_trusted(
    folder: Path,
) -> None:
    """As published on the hub: clip.save's files, the config stripped of our key."""
    edit_config(folder, lambda doc: doc.pop("clip_torch"))
    model, _ = clip.load(folder, device="cpu")
    assert model.config == TINY


def test_a_config_without_our_save_id_describing_another_model_is_refused(folder: Path) -> None:
    def other(doc: dict) -> None:
        doc.pop("clip_torch")
        doc["model_cfg"]["quick_gelu"] = True

    edit_config(folder, other)
    with pytest.raises(CheckpointError, match=r"describes another model.*config="):
        clip.load(folder, device="cpu")
    quick = TINY.replace(activation="quick_gelu")
    model, _ = clip.load(folder, device="cpu", config=folder / CONFIG_NAME)
    assert model.config == quick


def test_the_weights_of_an_unfinished_first_save_are_refused(folder: Path) -> None:
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"unfinished clip\.save"):
        clip.load(folder, device="cpu")


# --------------------------------------------------------------------------------------------
# config= for weights without their config, or instead of it
# --------------------------------------------------------------------------------------------

HEAD_80 = CLIPConfig(
    32, 32, 2, 160, 8, 77, 49408, 64, 4, 2, activation="gelu", vision_head_width=80
)


def test_a_bare_state_dict_loads_with_an_open_clip_config_file(tmp_path: Path) -> None:
    model = tiny_model(HEAD_80)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(open_clip_document(HEAD_80)))
    with pytest.raises(ValueError, match=r"head width 64.*config="):
        clip.load(str(tmp_path / "weights.pt"), device="cpu")  # OpenAI's heads of 64
    for config in (tmp_path / "cfg.json", str(tmp_path / "cfg.json"), open_clip_document(HEAD_80)):
        loaded, _ = clip.load(tmp_path / "weights.pt", device="cpu", config=config)
        assert loaded.config == HEAD_80
        assert torch.equal(features(loaded), features(model))


def test_a_bare_model_config_from_open_clips_configs_is_a_config(tmp_path: Path) -> None:
    """open_clip's model_configs/*.json hold the model config alone, without "model_cfg"."""
    torch.save(tiny_model(HEAD_80).state_dict(), tmp_path / "weights.pt")
    (tmp_path / "bare.json").write_text(json.dumps(open_clip_document(HEAD_80)["model_cfg"]))
    loaded, _ = clip.load(tmp_path / "weights.pt", device="cpu", config=tmp_path / "bare.json")
    assert loaded.config == HEAD_80


def test_a_published_config_for_tiny_weights_names_what_differs(tmp_path: Path) -> None:
    if "ViT-B-32" not in OPEN_CLIP_CONFIGS:
        pytest.skip("open_clip is not installed")
    torch.save(tiny_model().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="vision_width: config 768, weights 128"):
        clip.load(tmp_path / "weights.pt", device="cpu", config=OPEN_CLIP_CONFIGS["ViT-B-32"])


def test_config_replaces_the_folders_own(folder: Path, tmp_path: Path) -> None:
    quick = TINY.replace(activation="quick_gelu")
    own, _ = clip.load(folder, device="cpu")
    (tmp_path / "quick.json").write_text(json.dumps(open_clip_document(quick)))
    for config in (quick, tmp_path / "quick.json", open_clip_document(quick)):
        loaded, _ = clip.load(folder, device="cpu", config=config)
        assert loaded.config.activation == "quick_gelu"
        assert not torch.allclose(features(loaded), features(own))
    other = tmp_path / "other"
    clip.save(tiny_model(quick, seed=3), other)
    loaded, _ = clip.load(folder, device="cpu", config=other)  # another folder's config
    assert loaded.config == quick
    assert torch.equal(loaded.ln_final.weight, own.ln_final.weight)


def test_a_clipconfig_of_other_sizes_is_refused_naming_the_field(folder: Path) -> None:
    with pytest.raises(ValueError, match="vision_width: config 160, weights 128"):
        clip.load(folder, device="cpu", config=HEAD_80)


def test_a_config_that_is_none_of_the_kinds_says_what_it_takes(folder: Path) -> None:
    with pytest.raises(ValueError, match="neither a registry name"):
        clip.load(folder, device="cpu", config="no-such.json")
    with pytest.raises(TypeError, match="config must be"):
        clip.load(folder, device="cpu", config=3)  # type: ignore[arg-type]
