"""Folders in open_clip's layout from the Hugging Face hub, checked against the hub's SHA256.

``hf-hub:ORG/REPO[@REVISION]`` names a hub repository holding ``open_clip_config.json`` and
``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``). :func:`download_folder`
fetches them with :func:`huggingface_hub.hf_hub_download` (its cache, resume and locking; the
cache is shared with open_clip and transformers) and returns the snapshot folder that holds them.
Getting and checking one file at a time is :mod:`clip.hub_cache`.

Verification: the hub names a large (LFS) file by its SHA256 (the ``X-Linked-Etag`` of a
``HEAD``), and huggingface_hub stores it in its cache as ``blobs/<sha256>`` with the snapshot
entry a symlink to it. Every file so named is hashed (constant memory) before it is returned,
once: a ``<blob>.verified`` marker (:mod:`clip.verified`) vouches for it until its size or
modification time changes. A file whose bytes do not match is deleted and downloaded once more;
if the new bytes do not match either, or the cache is offline, :class:`clip.download.DownloadError`
names the file and the fix. Where the cache cannot use symlinks (Windows without developer mode)
the snapshot holds the file itself: its SHA256 then comes from a ``HEAD`` to the hub, or offline
from the marker written when it was last verified. Small files kept in git (the config) have
no SHA256 from the hub and are not checked.

Environment variables, read at each call:

- ``CLIP_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: use the cache only, reading it the way
  ``local_files_only`` does (:func:`huggingface_hub.try_to_load_from_cache`), so that no
  request at all is made; a file not in the cache is an error saying how to get it.
- ``HF_ENDPOINT``: the hub to ask (a mirror); huggingface_hub itself reads it only at import.
- ``CLIP_QUIET=1``: no progress bar (huggingface_hub's own otherwise, on a terminal).
- huggingface_hub's own: ``HF_TOKEN`` (private and gated repos), ``HF_HUB_CACHE`` / ``HF_HOME``
  (the default cache, read when huggingface_hub is imported).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional, TypedDict, Union

from clip.download import DownloadError
from clip.hub_cache import ABSENT, NOT_CACHED, HubRepo, at_revision, commit_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "CONFIG_NAME",
    "HUB_PREFIX",
    "WEIGHTS_NAMES",
    "FetchKeywords",
    "HubFolder",
    "download_folder",
    "fetch",
    "parse_hub_name",
]

HUB_PREFIX = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
# What open_clip writes and reads, in the order it prefers them.
WEIGHTS_NAMES: tuple[str, ...] = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_REPO_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_EXAMPLE = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"

PathLike = Union[str, "os.PathLike[str]"]


class FetchKeywords(TypedDict, total=False):
    """The keywords of :func:`fetch`, which :func:`download_folder` passes on."""

    revision: Optional[str]
    cache_dir: Optional[PathLike]
    weights: Sequence[str]
    config_required: bool


@dataclasses.dataclass(frozen=True)
class HubFolder:
    """What :func:`fetch` found.

    Attributes:
        folder: the snapshot folder in the hub cache (``.../snapshots/<commit>``).
        config: path of ``open_clip_config.json`` in it, or None if the repo has none.
        weights: path of the weights file in it (the first of ``weights`` the repo has).
        commit: the commit hash the files are from.
    """

    folder: str
    config: Optional[str]
    weights: str
    commit: str


def parse_hub_name(name: str) -> tuple[str, Optional[str]]:
    """Split ``"hf-hub:ORG/REPO"`` or ``"hf-hub:ORG/REPO@REVISION"``.

    Args:
        name: a model name starting with ``"hf-hub:"``.

    Returns:
        ``(repo_id, revision)``, revision None when the name has no ``@``.

    Raises:
        ValueError: the name does not start with ``"hf-hub:"``, the repo id is not ``ORG/REPO``
            with the hub's characters, or the revision after ``@`` is empty or has spaces.
    """
    if not isinstance(name, str) or not name.startswith(HUB_PREFIX):
        raise ValueError(f"{name!r} is not a hub name: write {HUB_PREFIX}ORG/REPO, e.g. {_EXAMPLE}")
    repo_id, at, revision = name[len(HUB_PREFIX) :].partition("@")
    _check_repo_id(repo_id, name)
    if at and (not revision or revision != revision.strip() or " " in revision):
        raise ValueError(
            f"{name!r} has {'an empty' if not revision else 'a malformed'} revision after '@': "
            f"write {HUB_PREFIX}ORG/REPO@REVISION (a branch, tag or commit hash), or leave out "
            "'@' for the default branch"
        )
    return repo_id, (revision or None)


def _check_repo_id(repo_id: str, shown: str) -> None:
    parts = repo_id.split("/")
    bad = (
        len(parts) != 2
        or any(not _REPO_PART.fullmatch(p) or len(p) > 96 for p in parts)
        or any(p.endswith((".", "-")) or "--" in p or ".." in p for p in parts)
        or repo_id.endswith(".git")
    )
    if bad:
        raise ValueError(
            f"{shown!r} does not name a hub repository: it must be {HUB_PREFIX}ORG/REPO, with ORG "
            "and REPO made of letters, digits, '-', '_' and '.' (not starting with '-' or '.', "
            f"no '--' or '..'), e.g. {_EXAMPLE}"
        )


def download_folder(repo_id: str, **options: Unpack[FetchKeywords]) -> str:
    """A local folder with a hub repo's ``open_clip_config.json`` and weights, verified.

    :func:`fetch`'s folder. It may also hold files of the same commit cached before (the other
    weights format): ``fetch(...).weights`` names the one verified.

    Args:
        repo_id: ``"ORG/REPO"`` (or a whole ``"hf-hub:ORG/REPO[@REVISION]"`` name).
        options: :func:`fetch`'s keywords (``revision``, ``cache_dir``, ``weights``: the first
            the repo has is downloaded, ``config_required``).

    Returns:
        The snapshot folder (``<cache>/models--ORG--REPO/snapshots/<commit>``).

    Raises:
        ImportError: huggingface_hub is not installed.
        ValueError: a malformed repo id, or empty or malformed ``weights``.
        DownloadError: see :func:`fetch`.
    """
    return fetch(repo_id, **options).folder


def fetch(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    weights: Sequence[str] = WEIGHTS_NAMES,
    config_required: bool = True,
) -> HubFolder:
    """Download (or find in the cache) a repo's config and weights, verified against the hub.

    The config is fetched first, at ``revision``; the weights then at the commit it came from,
    so both are from one commit. Of ``weights``, the next name is tried only when the hub says
    the previous one does not exist (HTTP 404); any other failure is an error. Offline, the
    first of ``weights`` that is in the cache is used.

    Args:
        repo_id: ``"ORG/REPO"`` (or a whole ``"hf-hub:ORG/REPO[@REVISION]"`` name).
        revision: branch, tag or commit hash (default: the repo's default branch).
        cache_dir: the hub cache (default: huggingface_hub's, ``$HF_HUB_CACHE``).
        weights: file names to try, in order (a single string is one name).
        config_required: refuse a repo without ``open_clip_config.json``.

    Returns:
        The snapshot folder, the config and weights paths in it, and the commit.

    Raises:
        ImportError: huggingface_hub is not installed (the ``hub`` extra).
        ValueError: a malformed repo id, conflicting revisions, or empty or malformed
            ``weights``.
        DownloadError: the repo, revision or files cannot be had: not on the hub (or private
            or gated without a token), not in the cache when offline, the hub unreachable, the
            repo has no config (with ``config_required``) or none of ``weights``, or a file's
            bytes do not match the SHA256 the hub gives even after downloading it again.
    """
    repo_id, revision = _resolve_name(repo_id, revision)
    names = _weights_names(weights)
    hub = HubRepo(repo_id, cache_dir)
    config = hub.get(CONFIG_NAME, revision)
    if config is ABSENT:
        if config_required:
            raise DownloadError(
                f"hub repo {repo_id!r}{at_revision(revision)} has no {CONFIG_NAME}, so its "
                "architecture and preprocessing are unknown: pass config= (a dict or an "
                "open_clip config file) with the hub weights, or use a repo in open_clip's layout"
            )
    elif config is NOT_CACHED:
        raise DownloadError(hub.offline_message([CONFIG_NAME], revision))
    config_path = config if isinstance(config, str) else None
    at = commit_of(config_path) if config_path else revision
    not_cached: list[str] = []
    for name in names:
        found = hub.get(name, at)
        if isinstance(found, str):
            return HubFolder(os.path.dirname(found), config_path, found, commit_of(found))
        if found is NOT_CACHED:
            not_cached.append(name)
    if not_cached:
        raise DownloadError(hub.offline_message(not_cached, at))
    raise DownloadError(
        f"hub repo {repo_id!r}{at_revision(at)} has none of {', '.join(names)}: it is not in "
        "open_clip's layout; pass weights= with the file names it has"
    )


def _resolve_name(repo_id: str, revision: Optional[str]) -> tuple[str, Optional[str]]:
    if not isinstance(repo_id, str):
        raise ValueError(f"repo_id must be a string 'ORG/REPO', got {type(repo_id).__name__}")
    if repo_id.startswith(HUB_PREFIX):
        repo_id, named = parse_hub_name(repo_id)
        if named and revision and named != revision:
            raise ValueError(
                f"two revisions given: {named!r} in the name and revision={revision!r}; keep one"
            )
        revision = revision or named
    else:
        _check_repo_id(repo_id, repo_id)
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision must be a branch, tag or commit hash, got {revision!r}")
    return repo_id, revision


def _weights_names(weights: Sequence[str]) -> tuple[str, ...]:
    names = (weights,) if isinstance(weights, str) else tuple(weights)
    if not names:
        raise ValueError(f"weights must name at least one file, e.g. {WEIGHTS_NAMES}")
    for n in names:
        if not isinstance(n, str) or not n or n in (".", "..") or "/" in n or "\\" in n:
            raise ValueError(
                f"weights must be file names at the repo's top level, got {n!r} in {names!r}"
            )
    return names
