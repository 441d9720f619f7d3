#!/usr/bin/env python
"""Record the published ImageNet class names and prompt templates as package data.

The data are OpenAI's: the 1000 class names and the 80 prompt templates of the CLIP paper's
ImageNet prompt-engineering notebook, and the 7-template subset chosen there. This script reads
them from an installed ``open_clip`` (``open_clip.zero_shot_metadata``), used only as a data
source, and writes one entry per line:

- ``clip/imagenet_classes.txt``: 1000 class names, in class-index order;
- ``clip/imagenet_templates.txt``: 80 templates as ``str.format`` strings with one ``{}``;
- ``clip/imagenet_templates_short.txt``: the 7-template subset.

Not run by CI. Usage::

    python scripts/record_imagenet_metadata.py
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clip"


def as_format_string(template: object) -> str:
    """Turn a ``str -> str`` template into a format string, checking it round-trips."""
    assert callable(template)
    text = template("{}")
    assert text.count("{}") == 1, text
    for probe in ("tench", "toilet paper", "a {b}"):
        assert text.format(probe) == template(probe), (text, probe)
    return text


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path`` atomically (temporary file, then rename)."""
    for line in lines:
        assert line and line == line.strip() and "\n" not in line, repr(line)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    print(f"wrote {len(lines)} lines to {path}")


def main() -> None:
    from open_clip import zero_shot_metadata as meta

    classes = list(meta.IMAGENET_CLASSNAMES)
    templates = [as_format_string(t) for t in meta.OPENAI_IMAGENET_TEMPLATES]
    short = [as_format_string(t) for t in meta.SIMPLE_IMAGENET_TEMPLATES]
    assert len(classes) == 1000 and len(templates) == 80 and len(short) == 7
    assert set(short) <= set(templates), "the 7 templates are a subset of the 80"
    write_lines(PACKAGE / "imagenet_classes.txt", classes)
    write_lines(PACKAGE / "imagenet_templates.txt", templates)
    write_lines(PACKAGE / "imagenet_templates_short.txt", short)


if __name__ == "__main__":
    main()
