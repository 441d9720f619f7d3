"""ImageFolder datasets: one sub-folder per class, as torchvision's ``ImageFolder`` lays them out.

``ROOT/cat/1.jpg``, ``ROOT/dog/x/2.PNG``: the classes are the sub-folders of ``ROOT`` in sorted
order (torchvision's order, so class indices agree), and a class's images are the files below its
folder, recursively, whose extension is in :data:`clip.data.discover.IMAGE_EXTENSIONS` (any
case). Hidden folders and files (``.ipynb_checkpoints``, ``.DS_Store``) are not read. Other files
in a class folder are refused by name rather than dropped; files directly in ``ROOT`` belong to
no class and are not read, except images, which are refused (they were probably meant to be in
a class folder). A class folder without images is a class with no images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from clip.data.discover import PathLike, kind_of

__all__ = ["ImageFolder", "read_image_folder"]


@dataclass
class ImageFolder:
    """What :func:`read_image_folder` finds.

    Attributes:
        root: the folder (absolute).
        classes: the class folder names, sorted.
        paths: the images (absolute), class by class, each class's sorted.
        labels: for each image, the index of its class in ``classes``.
    """

    root: str
    classes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def counts(self) -> list[int]:
        """Images per class, in class order."""
        n = [0] * len(self.classes)
        for label in self.labels:
            n[label] += 1
        return n


def read_image_folder(root: PathLike) -> ImageFolder:
    """List an ImageFolder (see the module docstring).

    Args:
        root: a local folder with one sub-folder per class.

    Returns:
        The classes, image paths and labels.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        ValueError: if it has no class folders, holds images directly, or a class folder holds
            files that are not images (naming them).
    """
    top = os.path.abspath(os.fspath(root))
    if not os.path.isdir(top):
        raise FileNotFoundError(f"no such folder: {os.fspath(root)!r}")
    entries = sorted(os.scandir(top), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if e.is_file() and kind_of(e.name) == "image"]
    if loose:
        raise ValueError(
            f"{top} holds images directly ({loose[0]}{' …' if len(loose) > 1 else ''}); an "
            "ImageFolder has one sub-folder per class: move each image into its class's folder"
        )
    if not classes:
        raise ValueError(f"{top} has no class sub-folders (ROOT/CLASS/IMAGE.jpg)")
    found = ImageFolder(top, classes)
    other: list[str] = []
    for label, name in enumerate(classes):
        for path in _files(os.path.join(top, name)):
            if kind_of(path) == "image":
                found.paths.append(path)
                found.labels.append(label)
            else:
                other.append(path)
    if other:
        shown = ", ".join(other[:5]) + (" …" if len(other) > 5 else "")
        raise ValueError(
            f"{len(other)} files in the class folders of {top} are not images: {shown}; "
            "move them out"
        )
    return found


def _files(folder: str) -> list[str]:
    """Files below ``folder``, recursively, sorted; hidden files and folders left out."""
    out: list[str] = []
    for parent, dirs, files in os.walk(folder, followlinks=True):  # as torchvision
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(parent, f) for f in sorted(files) if not f.startswith("."))
    return out
