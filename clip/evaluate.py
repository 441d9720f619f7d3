"""Evaluate a CLIP model: zero-shot accuracy, image–text retrieval and a linear probe.

The numbers to read before and after fine-tuning, and what ``clip evaluate`` prints. Every image
goes through one helper, :func:`clip.data.extract.image_features` (the data path's decoder in
DataLoader workers, the model's own preprocessing, :func:`clip.data.embed.encode_images`,
L2-normalised). Images that cannot be read or decoded are left out of every metric and listed in
the result's ``failed``.

Definitions:

* zero-shot: the classifier is :func:`clip.zero_shot_classifier` of the class names and
  templates; an image's prediction is the class of highest cosine similarity. top-1 counts the
  images whose class is first, top-5 (reported with at least 5 classes) those whose class is
  among the first five; per-class accuracy is top-1 over the images of that class.
* retrieval: caption ``t`` belongs to the image on its row; an image named on several rows of a
  table has all of those captions, and finding any of them counts (:mod:`clip.metrics`: the
  COCO/Flickr30k protocol). An image that cannot be decoded is dropped with its captions.
* linear probe: logistic regression (:func:`clip.linear_probe`) on the frozen, normalised image
  features of the training folder, scored on the test folder's (classes matched by folder name).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from clip.data.discover import PathLike
from clip.data.extract import (
    ExtractKeywords,
    ExtractOptions,
    ImageFeatures,
    extract_options,
    image_features,
)
from clip.data.imagefolder import ImageFolder, read_image_folder
from clip.data.pairs import CAPTION_COLUMN, IMAGE_COLUMN, Pairs, read_pairs
from clip.metrics import RECALL_KS, recall_at_k, topk_correct
from clip.pipeline import embed_texts
from clip.tokenizer import tokenize
from clip.zeroshot import Template, zero_shot_classifier

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "RECALL_KS",
    "ExtractOptions",
    "ImageFeatures",
    "LinearProbeResult",
    "ProbeKeywords",
    "RetrievalResult",
    "ZeroShotResult",
    "check_probe_folders",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "image_features",
    "recall_at_k",
    "topk_correct",
]

Device = Union[str, torch.device]


# ---- zero-shot -------------------------------------------------------------------------------


@dataclass
class ZeroShotResult:
    """What :func:`evaluate_zeroshot` returns. Accuracies are fractions in [0, 1].

    Attributes:
        classes: the class names, in class order.
        templates: how many prompt templates the classifier averages.
        images: images evaluated (readable ones).
        top1, top5: accuracies; ``top5`` is None with fewer than 5 classes.
        per_class: ``(images, top-1)`` per class; top-1 None for a class without images.
        failed: ``(path, reason)`` for unreadable images.
    """

    classes: list[str]
    templates: int
    images: int
    top1: float
    top5: Optional[float]
    per_class: list[tuple[int, Optional[float]]]
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return {
            "task": "zeroshot",
            "images": self.images,
            "classes": len(self.classes),
            "templates": self.templates,
            "top1": self.top1,
            "top5": self.top5,
            "per_class": [
                {"class": name, "images": n, "top1": acc}
                for name, (n, acc) in zip(self.classes, self.per_class)
            ],
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
        }


def evaluate_zeroshot(
    model: torch.nn.Module,
    folder: Union[PathLike, ImageFolder],
    *,
    classnames: Optional[Sequence[str]] = None,
    templates: Optional[Sequence[Template]] = None,
    options: Optional[ExtractOptions] = None,
    **keywords: Unpack[ExtractKeywords],
) -> ZeroShotResult:
    """Zero-shot accuracy on an ImageFolder (see the module docstring).

    Args:
        model: a CLIP model, on its device.
        folder: an ImageFolder (:mod:`clip.data.imagefolder`) or its listing.
        classnames: one name per class folder, in sorted folder order; default the folder
            names with ``_`` as spaces.
        templates: prompt templates; default ``clip.imagenet_templates`` (80).
        options, keywords: batch size, decoding workers, device and progress bars, as
            :func:`clip.data.extract.image_features` takes them; prompts are embedded in
            batches of the same size.

    Returns:
        :class:`ZeroShotResult`.

    Raises:
        ValueError: if ``classnames`` does not give one name per class folder, or no image can
            be decoded; and as :func:`read_image_folder` and :func:`clip.zero_shot_classifier`.
    """
    listing = folder if isinstance(folder, ImageFolder) else read_image_folder(folder)
    names = _classnames(listing, classnames)
    if templates is None:
        import clip  # the published templates live in the package root

        templates = clip.imagenet_templates
    opts = extract_options(options, **keywords)
    size, device, progress = opts.batch_size, opts.device, opts.progress
    weights = zero_shot_classifier(
        model, names, templates, batch_size=size, device=device, progress=progress
    )  # [D, C]
    found = _features_of(model, listing, opts)
    labels = torch.tensor([listing.labels[i] for i in found.kept], dtype=torch.long)
    scores = found.features @ weights.float().cpu()  # [N, C]
    top1 = topk_correct(scores, labels, 1)
    per_class = []
    for c in range(len(names)):
        mine = labels == c
        n = int(mine.sum())
        per_class.append((n, int(top1[mine].sum()) / n if n else None))
    return ZeroShotResult(
        names,
        len(templates),
        len(labels),
        int(top1.sum()) / len(labels),
        int(topk_correct(scores, labels, 5).sum()) / len(labels) if len(names) >= 5 else None,
        per_class,
        [(listing.paths[i], reason) for i, reason in found.failed],
    )


def _classnames(listing: ImageFolder, classnames: Optional[Sequence[str]]) -> list[str]:
    if classnames is None:
        return [name.replace("_", " ") for name in listing.classes]
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list of names, one per class folder, not a str")
    names = list(classnames)
    if len(names) != len(listing.classes):
        raise ValueError(
            f"{len(names)} class names for the {len(listing.classes)} class folders of "
            f"{listing.root}; give one name per folder, in sorted folder order"
        )
    return names


def _features_of(
    model: torch.nn.Module, listing: ImageFolder, options: ExtractOptions
) -> ImageFeatures:
    """The features of an ImageFolder's images; refuses a folder with no decodable image."""
    found = image_features(model, listing.paths, options=options)
    if not found.kept:
        why = f" (e.g. {listing.paths[found.failed[0][0]]}: {found.failed[0][1]})"
        raise ValueError(
            f"no image of {listing.root} could be decoded{why if found.failed else ''}"
        )
    return found


# ---- retrieval -------------------------------------------------------------------------------


@dataclass
class RetrievalResult:
    """What :func:`evaluate_retrieval` returns. Recalls are fractions in [0, 1].

    Attributes:
        images, captions: how many were evaluated (readable images and their captions).
        image_to_text, text_to_image: ``{k: recall@k}``.
        failed: ``(image, reason)`` for unreadable images (left out, with their captions).
        skipped: ``(sample, why)`` for tar samples without an image or a caption.
    """

    images: int
    captions: int
    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return {
            "task": "retrieval",
            "images": self.images,
            "captions": self.captions,
            "image_to_text": {f"R@{k}": v for k, v in self.image_to_text.items()},
            "text_to_image": {f"R@{k}": v for k, v in self.text_to_image.items()},
            "failed": [{"image": p, "reason": r} for p, r in self.failed],
            "skipped": [{"sample": s, "reason": r} for s, r in self.skipped],
        }


def evaluate_retrieval(
    model: torch.nn.Module,
    source: Union[Pairs, PathLike, Iterable[PathLike]],
    *,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    ks: Iterable[int] = RECALL_KS,
    truncate: bool = False,
    options: Optional[ExtractOptions] = None,
    **keywords: Unpack[ExtractKeywords],
) -> RetrievalResult:
    """Image→text and text→image recall@k on image–caption pairs (see the module docstring).

    Args:
        model: a CLIP model, on its device.
        source: :class:`clip.data.pairs.Pairs`, or what :func:`clip.data.pairs.read_pairs` reads.
        image_column, caption_column: the table columns.
        ks: the k's of recall@k.
        truncate: cut captions longer than the model's context instead of refusing them.
        options, keywords: as :func:`clip.data.extract.image_features` takes them; captions
            too are embedded ``batch_size`` at a time.

    Returns:
        :class:`RetrievalResult`.

    Raises:
        ValueError: a caption too long for the context (without ``truncate``), no decodable
            image; and as :func:`clip.data.pairs.read_pairs`.
    """
    opts = extract_options(options, **keywords)
    pairs = (
        source
        if isinstance(source, Pairs)
        else read_pairs(source, image_column=image_column, caption_column=caption_column)
    )
    if not truncate:  # before any image is decoded
        try:
            tokenize(pairs.captions, context_length=int(getattr(model, "context_length", 77)))
        except RuntimeError as e:
            raise ValueError(f"{e} (truncate=True, or --truncate, cuts long captions)") from None
    found = image_features(model, pairs.images, options=opts)
    if not found.kept:
        raise ValueError(
            f"none of the {len(pairs.images)} images could be decoded "
            f"(e.g. {pairs.images[found.failed[0][0]]}: {found.failed[0][1]})"
        )
    new_index = {old: new for new, old in enumerate(found.kept)}
    rows = [t for t, image in enumerate(pairs.image_of) if image in new_index]
    captions = [pairs.captions[t] for t in rows]
    size, device, progress = opts.batch_size, opts.device, opts.progress
    texts = embed_texts(
        model, captions, batch_size=size, device=device, truncate=truncate, progress=progress
    )
    image_of = [new_index[pairs.image_of[t]] for t in rows]
    i2t, t2i = recall_at_k(found.features, texts, image_of, ks)
    return RetrievalResult(
        len(found.kept),
        len(captions),
        i2t,
        t2i,
        [(str(pairs.images[i]), reason) for i, reason in found.failed],
        list(pairs.skipped),
    )


# ---- linear probe ----------------------------------------------------------------------------


class ProbeKeywords(ExtractKeywords, total=False):
    """The keywords :func:`evaluate_linear_probe` takes: :class:`ExtractOptions` fields, and
    :func:`clip.linear_probe`'s options."""

    C: Optional[float]
    val_fraction: float
    seed: int
    max_iter: int
    tol: float


_EXTRACT_FIELDS = frozenset(f.name for f in fields(ExtractOptions))


@dataclass
class LinearProbeResult:
    """What :func:`evaluate_linear_probe` returns.

    Attributes:
        classes: the class names (training folder names).
        train_images, test_images: readable images used.
        accuracy: test top-1, a fraction in [0, 1].
        C: the inverse regularisation strength the probe chose (None if it does not say).
        failed: ``(path, reason)`` for unreadable images of either folder.
    """

    classes: list[str]
    train_images: int
    test_images: int
    accuracy: float
    C: Optional[float]
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return {
            "task": "linear-probe",
            "classes": len(self.classes),
            "train_images": self.train_images,
            "test_images": self.test_images,
            "accuracy": self.accuracy,
            "C": self.C,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
        }


def evaluate_linear_probe(
    model: torch.nn.Module,
    train_folder: Union[PathLike, ImageFolder],
    test_folder: Union[PathLike, ImageFolder],
    *,
    options: Optional[ExtractOptions] = None,
    **keywords: Unpack[ProbeKeywords],
) -> LinearProbeResult:
    """Test accuracy of :func:`clip.linear_probe` on frozen image features of two ImageFolders.

    Args:
        model: a CLIP model, on its device.
        train_folder, test_folder: ImageFolders; the test folder's classes must be among the
            training folder's (matched by folder name).
        options: as :func:`clip.data.extract.image_features` takes it.
        keywords: the fields of :class:`ExtractOptions`, overriding ``options``; the others are
            passed to :func:`clip.linear_probe` (``C=`` fixes C instead of sweeping it on a split
            of the training features).

    Returns:
        :class:`LinearProbeResult`.

    Raises:
        ValueError: a test class the training folder lacks, a training class without images,
            no decodable image; and as :func:`read_image_folder`.
    """
    train = (
        train_folder if isinstance(train_folder, ImageFolder) else read_image_folder(train_folder)
    )
    test = test_folder if isinstance(test_folder, ImageFolder) else read_image_folder(test_folder)
    check_probe_folders(train, test)
    extract: dict[str, Any] = {k: v for k, v in keywords.items() if k in _EXTRACT_FIELDS}
    probe_options = {k: v for k, v in keywords.items() if k not in _EXTRACT_FIELDS}
    opts = extract_options(options, **extract)
    train_found = _features_of(model, train, opts)
    test_found = _features_of(model, test, opts)
    train_labels = torch.tensor([train.labels[i] for i in train_found.kept], dtype=torch.long)
    to_train = [train.classes.index(c) for c in test.classes]
    test_labels = torch.tensor([to_train[test.labels[i]] for i in test_found.kept])
    probe = _linear_probe()(train_found.features, train_labels, **probe_options)
    accuracy = float(probe.score(test_found.features, test_labels))
    chosen = getattr(probe, "C", None)
    failed = [(train.paths[i], r) for i, r in train_found.failed]
    failed += [(test.paths[i], r) for i, r in test_found.failed]
    return LinearProbeResult(
        list(train.classes),
        len(train_labels),
        len(test_labels),
        accuracy,
        None if chosen is None else float(chosen),
        failed,
    )


def check_probe_folders(train: ImageFolder, test: ImageFolder) -> None:
    """Refuse folders a probe cannot be scored on.

    Raises:
        ValueError: a test class without a training folder, or a training class without images.
    """
    unknown = [c for c in test.classes if c not in train.classes]
    if unknown:
        raise ValueError(
            f"test classes {unknown[:5]} have no folder in the training set {train.root}; the "
            "probe can only predict classes it was trained on"
        )
    empty_classes = [c for c, n in zip(train.classes, train.counts()) if n == 0]
    if empty_classes:
        raise ValueError(f"training classes without images in {train.root}: {empty_classes[:5]}")


def _linear_probe() -> Any:
    """``clip.linear_probe``, looked up when called."""
    import clip

    probe = getattr(clip, "linear_probe", None)
    if probe is None:
        raise ImportError("this version of clip has no clip.linear_probe; upgrade clip-torch")
    return probe
