"""Named weights of OpenAI's CLIP architecture: OpenAI's nine and those trained elsewhere.

Each entry is named like open_clip's model and pretrained tag, ``"ViT-B-32/laion2b_s34b_b79k"``,
and records what the weights' tensor shapes cannot tell: the MLP activation (QuickGELU or GELU),
the image tower's head width and MLP ratio, how images are preprocessed, where the file lives
(a Hugging Face hub repository, or OpenAI's URL for the ``openai`` tags) and the published
ImageNet zero-shot top-1. Loading weights with the wrong activation or head width raises no error
and only gives worse numbers, so these facts come from here, never from a guess.

The table is package data, ``clip/registry.json``, recorded from open_clip's own tables by
``scripts/record_registry.py``; open_clip is not needed at runtime.

:func:`clip.available_models` keeps returning exactly OpenAI's nine names;
:func:`available_weights` lists every entry, OpenAI's included as ``"<arch>/openai"``.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from clip.config import CLIPConfig
from clip.preprocess import PreprocessConfig

__all__ = [
    "PretrainedWeights",
    "all_weights",
    "available_weights",
    "get",
    "is_registered",
]

# Suffix of open_clip's model names that build QuickGELU ("ViT-B-32-quickgelu").
QUICKGELU_SUFFIX = "-quickgelu"

# Name fragments of open_clip families that are not OpenAI's architecture, to say so by name.
_OTHER_FAMILIES = (
    ("convnext", "ConvNeXt image tower"),
    ("eva0", "EVA image tower"),
    ("siglip", "SigLIP (sigmoid loss)"),
    ("coca", "CoCa (captioning decoder)"),
    ("clipa", "CLIPA"),
    ("mobileclip", "MobileCLIP"),
    ("worldwide", "multilingual MetaCLIP 2 (vocabulary of 901,629 tokens)"),
    ("roberta", "Hugging Face text tower"),
    ("mt5", "Hugging Face text tower"),
    ("nllb", "NLLB text tower"),
    ("vitamin", "ViTamin image tower"),
    ("pe-core", "Perception Encoder"),
)


@dataclass(frozen=True)
class PretrainedWeights:
    """One set of released weights and everything needed to load and use them.

    Args:
        name: ``"<architecture>/<tag>"``, e.g. ``"ViT-B-32/laion2b_s34b_b79k"``.
        architecture: open_clip's model name, e.g. ``"ViT-B-32"``.
        tag: open_clip's pretrained tag, e.g. ``"laion2b_s34b_b79k"``.
        config: the complete model configuration, preprocessing included.
        hub_repo: Hugging Face hub repository (``"ORG/REPO"``) holding the weights in open_clip's
            layout; None for OpenAI's weights.
        filenames: weight files in ``hub_repo`` to try, in order; empty for OpenAI's weights.
        openai_name: for OpenAI's weights, their name in :data:`clip.download.MODELS`
            (``"ViT-B/32"``); they download from OpenAI's URL. None otherwise.
        top1: published ImageNet zero-shot top-1 accuracy in percent, if published.
        num_parameters: learnable parameters of the model (BatchNorm statistics excluded), as
            counted on ``CLIP.from_config(config)`` built on the meta device. Recorded with the
            table, since building the models takes seconds; the tests rebuild them and check the
            count against open_clip's.
    """

    name: str
    architecture: str
    tag: str
    config: CLIPConfig
    hub_repo: Optional[str]
    filenames: tuple[str, ...]
    openai_name: Optional[str]
    top1: Optional[float]
    num_parameters: int

    @property
    def is_openai(self) -> bool:
        """Whether these are OpenAI's weights (downloaded from OpenAI's URL, not the hub)."""
        return self.openai_name is not None


def _entry(record: dict[str, Any], data: dict[str, Any]) -> PretrainedWeights:
    arch = record["architecture"]
    config = CLIPConfig(
        **data["architectures"][arch],
        activation=record["activation"],
        preprocess=PreprocessConfig(**record["preprocess"]),
    )
    return PretrainedWeights(
        name=record["name"],
        architecture=arch,
        tag=record["tag"],
        config=config,
        hub_repo=record["hub_repo"],
        filenames=tuple(record["filenames"]),
        openai_name=record["openai_name"],
        top1=record["top1"],
        num_parameters=data["num_parameters"][arch],
    )


@functools.cache
def _table() -> dict[str, PretrainedWeights]:
    text = resources.files("clip").joinpath("registry.json").read_text(encoding="utf-8")
    data = json.loads(text)
    entries = [_entry(record, data) for record in data["weights"]]
    table = {entry.name: entry for entry in entries}
    if len(table) != len(entries):
        raise RuntimeError("clip/registry.json lists a name twice; rerun record_registry.py")
    return table


@functools.cache
def _openai_names() -> dict[str, str]:
    return {e.openai_name: e.name for e in _table().values() if e.openai_name is not None}


def all_weights() -> list[PretrainedWeights]:
    """Every registry entry, in the registry's order (by architecture, then open_clip's tags).

    Returns:
        The entries.
    """
    return list(_table().values())


def available_weights() -> list[str]:
    """Names of every registered set of weights, OpenAI's included as ``"<arch>/openai"``.

    :func:`clip.available_models` lists OpenAI's nine only, under OpenAI's names.

    Returns:
        Names such as ``"ViT-B-32/openai"`` and ``"ViT-H-14-378/dfn5b"``, in registry order.
    """
    return list(_table())


def _clean_tag(tag: str) -> str:
    """open_clip's normalisation of pretrained tags: lower case, ``-`` as ``_``."""
    return tag.lower().replace("-", "_")


def _resolve(name: str) -> Optional[str]:
    """The registry name ``name`` refers to, or None. Raises ValueError for a ``-quickgelu``
    alias of weights trained with GELU."""
    table = _table()
    if name in table:
        return name
    if name in _openai_names():
        return _openai_names()[name]
    arch, sep, tag = name.partition("/")
    if not sep:
        return None
    quick = arch.endswith(QUICKGELU_SUFFIX)
    if quick:
        arch = arch[: -len(QUICKGELU_SUFFIX)]
    canonical = f"{arch}/{_clean_tag(tag)}"
    if canonical not in table:
        return None
    if quick and table[canonical].config.activation != "quick_gelu":
        raise ValueError(
            f"{name!r}: the {canonical!r} weights were trained with GELU, not QuickGELU; "
            f"use {canonical!r}"
        )
    return canonical


def is_registered(name: str) -> bool:
    """Whether ``name`` names registered weights (see :func:`get` for the names accepted).

    Args:
        name: a registry name, an alias, or anything else.

    Returns:
        True when :func:`get` would return an entry.
    """
    if not isinstance(name, str):
        return False
    try:
        return _resolve(name) is not None
    except ValueError:
        return False


def get(name: str) -> PretrainedWeights:
    """The registered weights called ``name``.

    Accepted: registry names (``"ViT-B-32/laion2b_s34b_b79k"``); the same with open_clip's
    ``-quickgelu`` model name when the weights use QuickGELU (``"ViT-B-32-quickgelu/laion400m_e32"``
    is ``"ViT-B-32/laion400m_e32"``); tags spelled as open_clip accepts them (any case, ``-`` for
    ``_``); and OpenAI's names (``"ViT-B/32"`` is ``"ViT-B-32/openai"``).

    Args:
        name: the weights' name.

    Returns:
        The entry.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: for an unknown name (naming close matches), a ``-quickgelu`` alias of GELU
            weights, or another model family (suggesting open_clip).
    """
    if not isinstance(name, str):
        raise TypeError(f"weights are named by a str such as 'ViT-B-32/openai', got {name!r}")
    resolved = _resolve(name)
    if resolved is not None:
        return _table()[resolved]
    raise ValueError(_unknown(name))


def _unknown(name: str) -> str:
    lowered = name.lower()
    for fragment, family in _OTHER_FAMILIES:
        if fragment in lowered:
            return (
                f"{name!r} looks like {family} weights, not OpenAI's CLIP architecture: clip "
                "loads OpenAI's architecture only; load these with open_clip"
            )
    names = available_weights()
    arch = name.partition("/")[0].removesuffix(QUICKGELU_SUFFIX)
    tags = [n.partition("/")[2] for n in names if n.partition("/")[0] == arch]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    if tags:
        hint += f" {arch} has: {', '.join(tags)}."
    return (
        f"unknown weights {name!r}.{hint} clip.available_weights() lists all {len(names)} "
        "(`clip models` shows them with size and accuracy)."
    )
