"""Zero-shot classifiers from class names and prompt templates, and the published ImageNet data.

A zero-shot classifier is one text embedding per class: each class name is put into every
template ("a photo of a {}."), each prompt is embedded and normalised, the prompts of a class are
averaged, and the average is normalised again. Image features normalised the same way, multiplied
by the classifier, give cosine similarities per class.

``imagenet_classes``, ``imagenet_templates`` (80) and ``imagenet_templates_short`` (the 7-template
subset) are OpenAI's published lists from the CLIP paper's prompt-engineering notebook. They are
package data, read on first access.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from typing import Callable, Optional, TypeVar, Union, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from clip.data.embed import model_device
from clip.tokenizer import tokenize

# Also ``imagenet_classes``, ``imagenet_templates``, ``imagenet_templates_short`` (lazy, below).
__all__ = ["Template", "zero_shot_classifier"]

Template = Union[str, Callable[[str], str]]
Device = Union[str, torch.device]
_T = TypeVar("_T")

_DATA_FILES = {
    "imagenet_classes": "imagenet_classes.txt",
    "imagenet_templates": "imagenet_templates.txt",
    "imagenet_templates_short": "imagenet_templates_short.txt",
}


@functools.cache
def _read_lines(filename: str) -> tuple[str, ...]:
    """The non-empty lines of a packaged text file, read once."""
    text = resources.files("clip").joinpath(filename).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def __getattr__(name: str) -> list[str]:
    """``imagenet_classes`` and friends, read from package data on first access (a fresh list)."""
    if name in _DATA_FILES:
        return list(_read_lines(_DATA_FILES[name]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def zero_shot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
    device: Optional[Device] = None,
    progress: bool = False,
) -> Tensor:
    """Build zero-shot classification weights from class names and prompt templates.

    Column ``c`` is ``normalise(mean over t of normalise(encode_text(t.format(classnames[c]))))``.
    All prompts are tokenized in one call and embedded in batches that span classes, sorted by
    length so each batch runs only as many text positions as its longest prompt needs.

    Args:
        model: a CLIP model (or a TorchScript one from ``clip.load(..., jit=True)``).
        classnames: one name per class; column order follows this order.
        templates: format strings with one ``{}`` ("a photo of a {}."), or callables mapping a
            class name to a prompt.
        batch_size: prompts per ``encode_text`` call.
        device: where to run the text tower's inputs (default: the model's device).
        progress: show a tqdm bar over the batches.

    Returns:
        Weights [embed_dim, len(classnames)], each column of unit L2 norm, in the dtype
        ``encode_text`` returns (fp16 for a CUDA-loaded model; averaged in fp32). Multiply
        normalised image features [B, embed_dim] by it to get cosine similarities [B, C].

    Raises:
        TypeError: if ``classnames`` or ``templates`` is a single string or holds a wrong type,
            or a callable template does not return a string.
        ValueError: if a list is empty, a string template has no ``{}`` or cannot be
            formatted, or ``batch_size`` is not positive.
        RuntimeError: if a prompt is longer than the model's context (from ``clip.tokenize``).
    """
    classnames = _check_classnames(classnames)
    templates = _check_templates(templates)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    prompts = [_fill(t, name) for name in classnames for t in templates]  # class-major
    context_length = int(getattr(model, "context_length", 77))
    tokens = tokenize(prompts, context_length=context_length)  # [C*T, L]
    device = torch.device(device) if device is not None else model_device(model)
    with torch.no_grad():
        sums, dtype = _summed_unit_embeddings(
            model, tokens, len(templates), batch_size, device, progress
        )  # [C, E]
    weights = sums / sums.norm(dim=-1, keepdim=True)  # [C, E]
    return weights.t().to(dtype)  # [E, C]


def _summed_unit_embeddings(
    model: nn.Module,
    tokens: Tensor,
    n_templates: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> tuple[Tensor, torch.dtype]:
    """Sum over each class's prompts of the normalised prompt embeddings [C, E] (fp32)."""
    order = torch.sort(tokens.argmax(dim=-1), stable=True).indices  # shortest prompts first
    owner = order // n_templates  # class index of each sorted prompt
    n_classes = tokens.shape[0] // n_templates
    encode_text = cast(Callable[[Tensor], Tensor], model.encode_text)
    sums: Optional[Tensor] = None
    dtype = torch.float32
    for start in tqdm(
        range(0, len(order), batch_size),
        disable=not progress,
        unit="batch",
        desc="zero-shot classifier",
    ):
        rows = order[start : start + batch_size]
        features = encode_text(tokens[rows].to(device))  # [b, E]
        dtype = features.dtype
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True)
        if sums is None:
            sums = features.new_zeros(n_classes, features.shape[-1])
        sums.index_add_(0, owner[start : start + batch_size].to(features.device), features)
    assert sums is not None  # at least one prompt: classnames and templates are non-empty
    return sums, dtype


def _listed(items: Sequence[_T], what: str, noun: str, if_empty: str) -> list[_T]:
    """``items`` as a list; refuses a single string (a sequence of characters) and no items."""
    if isinstance(items, str):
        raise TypeError(
            f"{what} must be a list of {noun}, got the single string {items!r}; wrap it in a list"
        )
    listed = list(items)
    if not listed:
        raise ValueError(f"{what} is empty; {if_empty}")
    return listed


def _check_classnames(classnames: Sequence[str]) -> list[str]:
    names = _listed(classnames, "classnames", "class names", "pass at least one class name")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"classnames[{i}] must be a str, got {type(name).__name__}")
        if not name.strip():
            raise ValueError(f"classnames[{i}] is blank; every class needs a name")
    return names


def _check_templates(templates: Sequence[Template]) -> list[Template]:
    checked = _listed(
        templates,
        "templates",
        "templates",
        "pass at least one, e.g. ['a photo of a {}.'] or clip.imagenet_templates",
    )
    for i, template in enumerate(checked):
        if isinstance(template, str):
            if "{}" not in template:
                raise ValueError(
                    f"templates[{i}] = {template!r} has no '{{}}' where the class name goes; "
                    "write it like 'a photo of a {}.'"
                )
        elif not callable(template):
            raise TypeError(
                f"templates[{i}] must be a str with '{{}}' or a callable str -> str, "
                f"got {type(template).__name__}"
            )
    return checked


def _fill(template: Template, name: str) -> str:
    """The prompt for class ``name`` from one template."""
    if callable(template):
        prompt = template(name)
        if not isinstance(prompt, str):
            raise TypeError(
                f"template {template!r} returned {type(prompt).__name__} for {name!r}; "
                "a callable template must return a str"
            )
        return prompt
    try:
        return template.format(name)
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(
            f"template {template!r} cannot be formatted with one class name ({e}); use a single "
            "'{}' and double any literal braces ('{{' and '}}')"
        ) from None
