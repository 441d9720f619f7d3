"""The registry of named weights (clip.registry) and the ``clip models`` table.

open_clip 3.3 is the oracle: every full-size architecture built from our config on the meta device
has exactly open_clip's parameters, heads and activation, and every entry's activation and
preprocessing are those of open_clip's pretrained entry for the same model and tag.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import PUBLISHED, meta_state_dict

import clip
from clip import registry
from clip.cli import main
from clip.config import CLIPConfig
from clip.download import MODELS
from clip.layers import mlp_width
from clip.model import CLIP

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "data" / "openclip_results_imagenet.csv"
ENTRIES = registry.all_weights()
ARCHITECTURES = sorted({entry.architecture for entry in ENTRIES})

# Where the registry deliberately differs from open_clip 3.3: its e32 entry points at the e31 repo.
HUB_FIXES = {"ViT-B-16-plus-240/laion400m_e32": "timm/vit_base_patch16_plus_clip_240.laion400m_e32"}


def open_clip_module() -> Any:
    return pytest.importorskip(
        "open_clip", reason="open_clip is the oracle; install the 'parity' extra"
    )


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def heads(model: torch.nn.Module) -> dict[str, int]:
    return {n: m.num_heads for n, m in model.named_modules() if hasattr(m, "num_heads")}


def activations(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.gelu")}


# ---- published shapes: our configs against open_clip's models, on the meta device ------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_builds_open_clips_model_on_meta(arch: str) -> None:
    open_clip = open_clip_module()
    by_activation = {e.config.activation: e for e in ENTRIES if e.architecture == arch}
    for activation, entry in by_activation.items():
        with torch.device("meta"):
            ours = CLIP.from_config(entry.config)
            theirs = open_clip.create_model(
                arch, device="meta", force_quick_gelu=activation == "quick_gelu"
            )
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in theirs.parameters()) == entry.num_parameters
        assert shapes(ours) == shapes(theirs)
        assert heads(ours) == heads(theirs)
        assert activations(ours) == activations(theirs)
        assert activations(ours) == {"QuickGELU" if activation == "quick_gelu" else "GELU"}
        size = theirs.visual.image_size
        assert ours.visual.input_resolution == (size if isinstance(size, int) else size[0])


def test_head_width_and_mlp_ratio_of_the_large_vits() -> None:
    h, g, big = (registry.get(n).config for n in ("ViT-H-14/dfn5b", "ViT-g-14/laion2b_s34b_b88k",
                                                   "ViT-bigG-14/laion2b_s39b_b160k"))  # fmt: skip
    assert (h.vision_head_width, h.vision_heads, h.vision_mlp_ratio) == (80, 16, 4.0)
    # open_clip's ratios 4.3637 and 4.9231 build MLPs of 6144 and 8192; the config keeps the
    # ratio that names those widths exactly.
    assert (g.vision_head_width, g.vision_heads, mlp_width(1408, g.vision_mlp_ratio)) == (
        88,
        16,
        6144,
    )
    assert (big.vision_head_width, big.vision_heads, mlp_width(1664, big.vision_mlp_ratio)) == (
        104,
        16,
        8192,
    )
    assert round(g.vision_mlp_ratio, 3) == 4.364 and round(big.vision_mlp_ratio, 3) == 4.923


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_openai_entry_is_the_config_read_from_openais_state_dict(name: str) -> None:
    entry = registry.get(name)
    assert entry.is_openai and entry.openai_name == name and entry.tag == "openai"
    assert entry.hub_repo is None and entry.filenames == ()
    assert entry.config == CLIPConfig.from_state_dict(meta_state_dict(PUBLISHED[name][0]))
    assert entry.num_parameters == PUBLISHED[name][1]


# ---- facts from open_clip's pretrained entries ------------------------------------------------


def test_registry_lists_every_open_clip_tag_of_these_architectures_in_order() -> None:
    open_clip = open_clip_module()
    for arch in ARCHITECTURES:
        tags = [e.tag for e in ENTRIES if e.architecture == arch]
        assert tags == open_clip.list_pretrained_tags_by_model(arch)
    assert len(ENTRIES) == 70


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_entry_follows_open_clips_pretrained_cfg(entry: registry.PretrainedWeights) -> None:
    open_clip = open_clip_module()
    cfg = open_clip.get_pretrained_cfg(entry.architecture, entry.tag)
    want = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    assert entry.config.activation == want
    pre = entry.config.preprocess
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert (pre.interpolation, pre.resize_mode) == (cfg["interpolation"], cfg["resize_mode"])
    size = open_clip.get_model_config(entry.architecture)["vision_cfg"]["image_size"]
    assert entry.config.image_resolution == size
    assert entry.name == f"{entry.architecture}/{entry.tag}"
    if entry.is_openai:
        assert MODELS[entry.openai_name] == cfg["url"]
    else:
        assert entry.hub_repo == HUB_FIXES.get(entry.name, cfg["hf_hub"].rstrip("/"))
        assert entry.filenames == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@pytest.mark.parametrize(
    ("name", "activation", "resolution", "resize_mode", "mean"),
    [
        ("ViT-B-32/laion400m_e32", "quick_gelu", 224, "shortest", 0.48145466),
        ("ViT-B-32/laion2b_s34b_b79k", "gelu", 224, "shortest", 0.48145466),
        ("ViT-B-32-256/datacomp_s34b_b86k", "gelu", 256, "shortest", 0.48145466),
        ("ViT-L-14/laion2b_s32b_b82k", "gelu", 224, "shortest", 0.5),
        ("ViT-H-14/metaclip_altogether", "gelu", 224, "shortest", 0.48145466),
        ("ViT-H-14-378/dfn5b", "quick_gelu", 378, "squash", 0.48145466),
        ("RN50/cc12m", "quick_gelu", 224, "shortest", 0.48145466),
    ],
)
def test_issue_examples(
    name: str, activation: str, resolution: int, resize_mode: str, mean: float
) -> None:
    config = registry.get(name).config
    assert (config.activation, config.image_resolution) == (activation, resolution)
    assert (config.preprocess.resize_mode, config.preprocess.mean[0]) == (resize_mode, mean)


# ---- published top-1 --------------------------------------------------------------------------


def results() -> dict[tuple[str, str], tuple[float, float]]:
    lines = [line for line in RESULTS.read_text().splitlines() if not line.startswith("#")]
    return {
        (r["name"], r["pretrained"]): (float(r["params (M)"]), float(r["ImageNet 1k"]))
        for r in csv.DictReader(lines)
    }


@pytest.mark.parametrize(
    ("name", "top1"),
    [
        ("ViT-B-32/openai", 63.32),
        ("ViT-B-32/laion400m_e32", 62.93),  # the QuickGELU row, not 60.24 evaluated with GELU
        ("ViT-B-32-256/datacomp_s34b_b86k", 72.81),
        ("ViT-B-16/dfn2b", 76.24),
        ("ViT-L-14/dfn2b", 81.41),
        ("ViT-L-14/datacomp_xl_s13b_b90k", 79.21),
        ("ViT-H-14-378/dfn5b", 84.37),
        ("RN50/yfcc15m", 32.75),
        ("ViT-bigG-14/metaclip_fullcc", None),
    ],
)
def test_published_top1(name: str, top1: float) -> None:
    assert registry.get(name).top1 == top1


def test_top1_rows_evaluated_the_entrys_activation_and_size() -> None:
    rows = results()
    for entry in ENTRIES:
        quick = entry.config.activation == "quick_gelu"
        names = [entry.architecture + "-quickgelu"] * quick + [entry.architecture]
        row = next((rows[n, entry.tag] for n in names if (n, entry.tag) in rows), None)
        assert entry.top1 == (None if row is None else round(row[1] * 100, 2)), entry.name
        if row is not None:
            assert round(entry.num_parameters / 1e6, 2) == row[0], entry.name


# ---- names --------------------------------------------------------------------------------------


def test_available_weights_and_models() -> None:
    names = clip.available_weights()
    assert names == registry.available_weights() == [e.name for e in ENTRIES]
    assert clip.available_models() == list(PUBLISHED)
    assert [n for n in names if n.endswith("/openai")] == [
        registry.get(m).name for m in clip.available_models()
    ]
    assert "ViT-L-14-336/openai" in names and "ViT-B-32-quickgelu/openai" not in names


def test_aliases() -> None:
    quick = registry.get("ViT-B-32-quickgelu/laion400m_e32")
    assert quick is registry.get("ViT-B-32/laion400m_e32")
    assert quick.config.activation == "quick_gelu"
    assert registry.get("ViT-H-14-378-quickgelu/dfn5b").name == "ViT-H-14-378/dfn5b"
    assert registry.get("ViT-L/14@336px").name == "ViT-L-14-336/openai"
    assert registry.get("RN50x4").name == "RN50x4/openai"
    assert registry.get("ViT-B-32/LAION2B-S34B-B79K").name == "ViT-B-32/laion2b_s34b_b79k"
    assert registry.is_registered("ViT-B/32") and registry.is_registered("ViT-L-14/dfn2b")


def test_quickgelu_alias_of_gelu_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"trained with GELU.*'ViT-B-32/laion2b_s34b_b79k'"):
        registry.get("ViT-B-32-quickgelu/laion2b_s34b_b79k")
    assert not registry.is_registered("ViT-B-32-quickgelu/laion2b_s34b_b79k")


def test_unknown_name_names_close_matches() -> None:
    with pytest.raises(ValueError, match=r"'ViT-B-32/laion2b_s34b_b79k'.*available_weights\(\)"):
        registry.get("ViT-B-32/laion2b_s34b_b79")
    with pytest.raises(ValueError, match="ViT-L-14 has: openai, laion400m_e31"):
        registry.get("ViT-L-14/laion5b")
    with pytest.raises(ValueError, match="unknown weights 'nothing'"):
        registry.get("nothing")
    assert not registry.is_registered("ViT-B-32/laion2b_s34b_b79")
    assert not registry.is_registered("ViT-B-32")  # an architecture alone names no weights


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("convnext_base_w/laion2b_s13b_b82k", "ConvNeXt"),
        ("ViT-B-16-SigLIP/webli", "SigLIP"),
        ("EVA02-L-14/merged2b_s4b_b131k", "EVA"),
        ("coca_ViT-L-14/laion2b_s13b_b90k", "CoCa"),
        ("ViT-H-14-worldwide/metaclip2_worldwide", "MetaCLIP 2"),
    ],
)
def test_other_families_are_named_and_sent_to_open_clip(name: str, family: str) -> None:
    with pytest.raises(ValueError, match=f"{family}.*open_clip"):
        registry.get(name)


def test_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="str"):
        registry.get(Path("ViT-B-32/openai"))  # type: ignore[arg-type]
    assert not registry.is_registered(None)  # type: ignore[arg-type]


def test_entries_are_frozen() -> None:
    with pytest.raises(AttributeError):
        ENTRIES[0].top1 = 99.0  # type: ignore[misc]


# ---- clip models ------------------------------------------------------------------------------


def fake_hub_file(hub: Path, repo: str, filename: str, revision: str = "abc123") -> Path:
    """A file in huggingface_hub's cache layout, as a download leaves it."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    path = folder / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


@pytest.fixture
def caches(tmp_path: Path) -> tuple[Path, Path, dict[str, Path]]:
    pytest.importorskip("huggingface_hub")
    cache, hub = tmp_path / "clip", tmp_path / "hub"
    cache.mkdir()
    (cache / "ViT-B-32.pt").write_bytes(b"weights")
    (cache / "RN50.pt.partial").write_bytes(b"half")  # an unfinished download is not cached
    laion = registry.get("ViT-B-32/laion2b_s34b_b79k").hub_repo
    dfn = registry.get("ViT-H-14-378/dfn5b").hub_repo
    assert laion and dfn
    found = {
        "ViT-B-32/openai": cache / "ViT-B-32.pt",
        "ViT-B-32/laion2b_s34b_b79k": fake_hub_file(hub, laion, "open_clip_model.safetensors"),
        # only the .bin is there; the hub recorded that the .safetensors does not exist
        "ViT-H-14-378/dfn5b": fake_hub_file(hub, dfn, "open_clip_pytorch_model.bin"),
    }
    no_exist = hub / ("models--" + dfn.replace("/", "--")) / ".no_exist" / "abc123"
    no_exist.mkdir(parents=True)
    (no_exist / "open_clip_model.safetensors").write_bytes(b"")
    fake_hub_file(hub, "laion/not-in-the-registry", "open_clip_model.safetensors")
    return cache, hub, found


def test_clip_models_table(caches: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cache, hub, found = caches
    assert main(["models", "--cache-dir", str(cache), "--hub-cache-dir", str(hub)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "params", "res", "top-1", "cached"]
    rows = {line.split()[0]: line.split()[1:] for line in lines}
    assert list(rows) == clip.available_weights()
    assert rows["ViT-H-14-378/dfn5b"] == ["986.7M", "378", "84.4", "yes"]
    assert rows["ViT-B-32/openai"] == ["151.3M", "224", "63.3", "yes"]
    assert rows["ViT-bigG-14/metaclip_fullcc"] == ["2539.6M", "224", "-", "no"]
    assert {name for name, row in rows.items() if row[-1] == "yes"} == set(found)
    assert all(row[-1] == "no" for name, row in rows.items() if name not in found)


def test_clip_models_json(caches: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cache, hub, found = caches
    argv = ["models", "--json", "--cache-dir", str(cache), "--hub-cache-dir", str(hub)]
    assert main(argv) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == clip.available_weights()
    assert {n: Path(r["path"]) for n, r in rows.items() if r["cached"]} == found
    dfn = rows["ViT-H-14-378/dfn5b"]
    assert (dfn["num_parameters"], dfn["resolution"], dfn["top1"]) == (986714881, 378, 84.37)
    assert dfn["hub_repo"] == "apple/DFN5B-CLIP-ViT-H-14-378" and dfn["openai_name"] is None
    assert rows["RN50/openai"]["cached"] is False and rows["RN50/openai"]["path"] is None


def test_clip_models_default_hub_cache_is_huggingface_hubs(
    caches: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    cache, hub, found = caches
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("CLIP_CACHE_DIR", str(cache))
    assert main(["models"]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()}
    assert {name for name, cached in rows.items() if cached == "yes"} == set(found)


def test_clip_models_without_huggingface_hub(
    caches: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, hub, _ = caches
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    assert main(["models", "--cache-dir", str(cache), "--hub-cache-dir", str(hub)]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()}
    assert rows["ViT-B-32/openai"] == "yes" and rows["RN50/openai"] == "no"
    assert rows["ViT-B-32/laion2b_s34b_b79k"] == "-" and rows["ViT-L-14/dfn2b"] == "-"
