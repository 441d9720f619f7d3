"""The README stays true: its python blocks run, its model table and its test command are right.

Every fenced ```python block of README.md is executed, each in a fresh namespace (a reader copies
one block, not the page), in a temporary directory holding the image files the block names.
Registry names such as "ViT-B/32" resolve to a tiny random checkpoint in OpenAI's format.
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoints import PUBLISHED
from PIL import Image

import clip
import clip.clip
import clip.download
import clip.hub
import clip.model
import clip.registry
import clip.sources

README = Path(__file__).resolve().parent.parent / "README.md"
LANGUAGES = {"python", "bash", "sh", "text", "console"}
IMAGE_NAME = re.compile(r"""["']([\w./-]+\.(?:jpe?g|png))["']""")


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # 1-based line of the first line of code
    source: str


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with its language and where its code starts."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[i])
        if match:
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
            if end is None:
                raise AssertionError(f"README.md line {i + 1}: code fence is never closed")
            blocks.append(Block(match.group(1), i + 2, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [b for b in BLOCKS if b.language == "python"]


@pytest.fixture
def registry_is_tiny(
    monkeypatch: pytest.MonkeyPatch,
    tiny_files: dict[str, dict[str, Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Make every released model name load the tiny ViT archive instead of downloading, and every
    hub name (registry or ``hf-hub:``) a tiny GELU folder in the hub layout."""
    archive = str(tiny_files["tiny-vit"]["archive"])
    released = set(clip.download.MODELS.values())
    original = clip.sources.download

    def download(url: str, root: object = None) -> str:
        return archive if url in released else original(url, root)  # type: ignore[arg-type]

    monkeypatch.setattr(clip.sources, "download", download)

    model, _ = clip.load(str(tiny_files["tiny-vit"]["state_dict"]), device="cpu")
    config = model.config.replace(activation="gelu")
    folder = tmp_path_factory.mktemp("hub") / "snapshot"
    clip.save(clip.model.CLIP.from_config(config), folder)
    fetched = clip.hub.HubFolder(
        str(folder),
        str(folder / "open_clip_config.json"),
        str(folder / "open_clip_model.safetensors"),
        "0" * 40,
    )
    monkeypatch.setattr(clip.hub, "fetch", lambda *a, **k: fetched)
    monkeypatch.setattr(clip.hub, "download_folder", lambda *a, **k: str(folder))
    real_get = clip.registry.get

    def get(name: str) -> clip.registry.PretrainedWeights:
        entry = real_get(name)
        return entry if entry.is_openai else dataclasses.replace(entry, config=config)

    monkeypatch.setattr(clip.registry, "get", get)


def write_named_images(source: str, directory: Path) -> None:
    """Create each image file the block names, with distinct content per name."""
    for i, name in enumerate(sorted(set(IMAGE_NAME.findall(source)))):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (48 + 8 * i, 64, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line{b.line}" for b in PYTHON_BLOCKS])
def test_python_block_runs(
    block: Block, registry_is_tiny: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_named_images(block.source, tmp_path)
    # Leading newlines make tracebacks point at README.md's own line numbers.
    code = compile("\n" * (block.line - 1) + block.source, str(README), "exec")
    try:
        exec(code, {"__name__": "__readme__"})
    except Exception:
        pytest.fail(
            f"README.md: the python block starting at line {block.line} failed:\n"
            + traceback.format_exc(),
            pytrace=False,
        )


def test_readme_has_python_blocks_and_only_known_fences() -> None:
    assert len(PYTHON_BLOCKS) >= 2, "quickstart and zero-shot examples"
    unknown = [(b.line - 1, b.language) for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"fences without a known language (line, language): {unknown}"


def test_first_block_installs_and_tests_as_ci_does() -> None:
    first = BLOCKS[0]
    assert first.language == "bash" and first.line <= 4, "the commands come first"
    assert 'pip install -e ".[test]"' in first.source
    assert "python -m pytest -q" in first.source


def test_model_table_matches_the_published_architectures() -> None:
    rows = re.findall(
        r"^\| `([^`]+)` \| (\d+) \| (\d+) \| ([\d,]+) \|$",
        README.read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    table = {
        name: (int(res), int(dim), int(params.replace(",", ""))) for name, res, dim, params in rows
    }
    assert list(table) == clip.available_models()
    for name, (arch, n_params) in PUBLISHED.items():
        assert table[name] == (arch.image_resolution, arch.embed_dim, n_params), name


def test_linked_files_exist() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", text)
    assert links, "the README links the notebooks"
    missing = [link for link in links if not (README.parent / link).exists()]
    assert not missing, missing


def test_zoo_table_matches_the_registry() -> None:
    rows = re.findall(
        r"^\| `([^`]+/[^`]+)`[^|]* \| ([\d.]+)M \| (\d+) \| ([\d.]+) \|$",
        README.read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    assert len(rows) >= 10
    for name, params, resolution, top1 in rows:
        entry = clip.registry.get(name)
        assert entry.name == name
        assert float(params) == round(entry.num_parameters / 1e6, 1), name
        assert int(resolution) == entry.config.image_resolution, name
        assert float(top1) == round(entry.top1 or -1, 1), name
    assert f"all {len(clip.available_weights())} names" in README.read_text(encoding="utf-8")
