"""Folders in open_clip's layout from the Hugging Face hub, checked against the hub's SHA256.

``hf-hub:ORG/REPO[@REVISION]`` names a hub repository holding ``open_clip_config.json`` and
``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``). :func:`download_folder`
fetches them with :func:`huggingface_hub.hf_hub_download` (its cache, resume and locking; the
cache is shared with open_clip and transformers) and returns the snapshot folder that holds them.

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
import inspect
import logging
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

from clip import verified
from clip.download import DownloadError

__all__ = [
    "CONFIG_NAME",
    "HUB_PREFIX",
    "WEIGHTS_NAMES",
    "HubFolder",
    "download_folder",
    "fetch",
    "parse_hub_name",
]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
# What open_clip writes and reads, in the order it prefers them.
WEIGHTS_NAMES: tuple[str, ...] = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_EXTRA = "pip install 'clip-torch[hub]'"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_EXAMPLE = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"

PathLike = Union[str, "os.PathLike[str]"]


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


def download_folder(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    weights: Sequence[str] = WEIGHTS_NAMES,
    config_required: bool = True,
) -> str:
    """A local folder with a hub repo's ``open_clip_config.json`` and weights, verified.

    :func:`fetch`'s folder. It may also hold files of the same commit cached before (the other
    weights format): ``fetch(...).weights`` names the one verified.

    Args:
        repo_id: ``"ORG/REPO"`` (or a whole ``"hf-hub:ORG/REPO[@REVISION]"`` name).
        revision: branch, tag or commit hash (default: the repo's default branch).
        cache_dir: the hub cache (default: huggingface_hub's, ``$HF_HUB_CACHE``).
        weights: file names to try, in order; the first the repo has is downloaded.
        config_required: refuse a repo without ``open_clip_config.json``.

    Returns:
        The snapshot folder (``<cache>/models--ORG--REPO/snapshots/<commit>``).

    Raises:
        ImportError: huggingface_hub is not installed.
        ValueError: a malformed repo id, or empty or malformed ``weights``.
        DownloadError: see :func:`fetch`.
    """
    return fetch(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        weights=weights,
        config_required=config_required,
    ).folder


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
    hub = _Hub(repo_id, cache_dir)
    config = hub.get(CONFIG_NAME, revision)
    if config is _ABSENT:
        if config_required:
            raise DownloadError(
                f"hub repo {repo_id!r}{_at(revision)} has no {CONFIG_NAME}, so its architecture "
                "and preprocessing are unknown: pass config= (a dict or an open_clip config "
                "file) with the hub weights, or use a repo in open_clip's layout"
            )
    elif config is _NOT_CACHED:
        raise DownloadError(hub.offline_message([CONFIG_NAME], revision))
    config_path = config if isinstance(config, str) else None
    at = _commit_of(config_path) if config_path else revision
    not_cached: list[str] = []
    for name in names:
        found = hub.get(name, at)
        if isinstance(found, str):
            return HubFolder(os.path.dirname(found), config_path, found, _commit_of(found))
        if found is _NOT_CACHED:
            not_cached.append(name)
    if not_cached:
        raise DownloadError(hub.offline_message(not_cached, at))
    raise DownloadError(
        f"hub repo {repo_id!r}{_at(at)} has none of {', '.join(names)}: it is not in "
        "open_clip's layout; pass weights= with the file names it has"
    )


# ---- the pieces ---------------------------------------------------------------------------


class _Missing:
    """Why a file has no local path: one of the two instances below."""


_ABSENT = _Missing()  # the hub says the file does not exist (HTTP 404)
_NOT_CACHED = _Missing()  # offline, and the file is not in the cache


def _at(revision: Optional[str]) -> str:
    return f" at revision {revision!r}" if revision else ""


def _commit_of(path: str) -> str:
    return os.path.basename(os.path.dirname(path))


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


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _import_hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.utils
    except ImportError as e:
        raise ImportError(
            f"loading from the Hugging Face hub needs huggingface_hub: {_EXTRA}"
        ) from e
    return huggingface_hub


def _version() -> str:
    import clip  # the package is imported by the time anything is downloaded

    return str(getattr(clip, "__version__", "unknown"))


def _quiet_tqdm(hf: Any) -> Optional[type]:
    """A progress bar class that shows nothing, if this huggingface_hub accepts one."""
    if "tqdm_class" not in inspect.signature(hf.hf_hub_download).parameters:
        return None  # older huggingface_hub: its bars stay (HF_HUB_DISABLE_PROGRESS_BARS=1)
    base = hf.utils.tqdm

    class Quiet(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


class _Hub:
    """One repo's downloads with the settings of one call (offline, endpoint, cache, bars)."""

    def __init__(self, repo_id: str, cache_dir: Optional[PathLike]) -> None:
        self.hf = _import_hub()
        self.repo_id = repo_id
        self.cache_dir = (
            os.path.abspath(os.path.expanduser(os.fspath(cache_dir))) if cache_dir else None
        )
        hf_offline = bool(getattr(self.hf.constants, "HF_HUB_OFFLINE", False))
        self.offline = _flag("CLIP_OFFLINE") or _flag("HF_HUB_OFFLINE") or hf_offline
        self.endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
        self.options: dict[str, Any] = {
            "cache_dir": self.cache_dir,
            "endpoint": self.endpoint,
            "library_name": "clip-torch",
            "library_version": _version(),
        }
        if _flag("CLIP_QUIET"):
            quiet = _quiet_tqdm(self.hf)
            if quiet is not None:
                self.options["tqdm_class"] = quiet

    def where(self) -> str:
        return self.cache_dir or str(self.hf.constants.HF_HUB_CACHE)

    def offline_message(self, names: list[str], revision: Optional[str]) -> str:
        why = "$CLIP_OFFLINE" if _flag("CLIP_OFFLINE") else "$HF_HUB_OFFLINE"
        return (
            f"offline ({why} is set), and {' / '.join(names)} of hub repo {self.repo_id!r}"
            f"{_at(revision)} is not in the hub cache {self.where()!r}. Run once with network "
            f"access (unset {why}) to download it, or copy a hub cache that has it there "
            "($HF_HUB_CACHE)"
        )

    def get(self, name: str, revision: Optional[str]) -> Union[str, _Missing]:
        """The verified local path of ``name``, or why there is none; deletes corrupt copies."""
        for attempt in range(2):
            found = self._download(name, revision)
            if not isinstance(found, str):
                return found
            check = self._check(found, name)
            if check is None:
                return found
            if self.offline or attempt:
                raise DownloadError(check + self._fix())
            warnings.warn(f"{check}; downloading it again", stacklevel=4)
        raise AssertionError("unreachable")

    def _fix(self) -> str:
        if self.offline:
            return (
                ". Run once with network access (unset $CLIP_OFFLINE / $HF_HUB_OFFLINE) to "
                "download it again"
            )
        return ". Retry later; if it persists, the hub, $HF_ENDPOINT or a proxy serves wrong bytes"

    def _download(self, name: str, revision: Optional[str]) -> Union[str, _Missing]:
        hf, errors = self.hf, self.hf.errors
        if self.offline or (revision and _COMMIT.fullmatch(revision)):
            # Offline, the cache is all there is, read without huggingface_hub's download path
            # (which makes requests of its own, e.g. for its user agent). At a commit, the
            # cache's record that a file is absent is final.
            cached = hf.try_to_load_from_cache(
                self.repo_id, name, cache_dir=self.cache_dir, revision=revision
            )
            if isinstance(cached, str):
                if self.offline:
                    return cached
            elif cached is not None:
                return _ABSENT
            elif self.offline:
                return _NOT_CACHED
        try:
            return str(hf.hf_hub_download(self.repo_id, name, revision=revision, **self.options))
        except errors.RepositoryNotFoundError as e:  # GatedRepoError included
            raise DownloadError(
                f"hub repo {self.repo_id!r} was not found at {self._endpoint()}, or it is "
                "private or gated: check the name; for a private or gated repo, accept its "
                "terms on the hub and log in (`hf auth login`) or set $HF_TOKEN"
            ) from e
        except errors.RevisionNotFoundError as e:
            raise DownloadError(
                f"hub repo {self.repo_id!r} has no revision {revision!r} (branch, tag or commit)"
            ) from e
        except errors.EntryNotFoundError as e:
            if _says_absent(hf, e):
                return _ABSENT
            raise DownloadError(
                f"could not get {name} of hub repo {self.repo_id!r}{_at(revision)} from "
                f"{self._endpoint()}, and it is not in the hub cache {self.where()!r}: "
                f"{_cause(e)}. Check the network and $HF_ENDPOINT, or set CLIP_OFFLINE=1 to "
                "use only what is cached"
            ) from e
        except OSError as e:  # HTTP errors (403, ...), a size mismatch, a full or read-only disk
            raise DownloadError(
                f"could not get {name} of hub repo {self.repo_id!r}{_at(revision)} into "
                f"{self.where()!r}: {e}"
            ) from e

    def _endpoint(self) -> str:
        return self.endpoint or str(self.hf.constants.ENDPOINT)

    def _check(self, path: str, name: str) -> Optional[str]:
        """None if ``path`` has the hub's SHA256 (or the hub gives none), else what is wrong.

        A file found wrong is deleted (its blob and the snapshot entry; :func:`verified.trusted`
        drops the marker) unless it was replaced while it was being hashed.
        """
        blob = _blob_of(path)
        expected = self._expected_sha256(path, blob, name)
        if expected is None:
            return None
        try:
            before: Optional[os.stat_result] = os.stat(blob)
        except FileNotFoundError:
            before = None
        if before is not None and verified.trusted(blob, expected):
            return None
        what = f"{name} of hub repo {self.repo_id!r} ({blob})"
        if before is None:
            return f"{what} went missing from the cache"
        what += f" does not have the SHA256 the hub gives, {expected}"
        try:
            if _same_file(os.stat(blob), before):  # not replaced while it was hashed
                os.remove(blob)
            if blob != path and os.path.lexists(path):
                os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DownloadError(
                f"{what}, and it cannot be deleted ({e}): delete it by hand and run again"
            ) from e
        return f"{what}; it was deleted"

    def _expected_sha256(self, path: str, blob: str, name: str) -> Optional[str]:
        if blob != path:  # a symlink into blobs/: the blob's name is the hub's ETag
            tag = os.path.basename(blob)
            return tag.lower() if _SHA256.fullmatch(tag) else None
        # No symlinks (Windows without developer mode): the file itself sits in the snapshot.
        # The SHA256 recorded when it was verified holds for good (a snapshot path is one
        # commit's file); without one, ask the hub for the ETag.
        recorded = verified.recorded_sha256(path)
        if recorded is not None or self.offline:
            if recorded is None:
                logger.info("%s: no SHA256 known offline; not verified", path)
            return recorded
        try:
            url = self.hf.hf_hub_url(
                self.repo_id, name, revision=_commit_of(path), endpoint=self.endpoint
            )
            tag = self.hf.get_hf_file_metadata(url).etag
        except OSError as e:  # the hub could not be asked
            logger.info("%s: cannot get its SHA256 from the hub (%s); not verified", path, e)
            return None
        return tag.lower() if isinstance(tag, str) and _SHA256.fullmatch(tag) else None


def _blob_of(path: str) -> str:
    """The file a snapshot entry stands for: its symlink's first hop (``blobs/<etag>``)."""
    if not os.path.islink(path):
        return path
    return os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns)


def _says_absent(hf: Any, e: BaseException) -> bool:
    """Whether the hub answered that the file does not exist (HTTP 404), not "cannot reach"."""
    if not isinstance(e, hf.errors.LocalEntryNotFoundError):
        return True  # RemoteEntryNotFoundError (huggingface_hub >= 1.0) / EntryNotFoundError
    seen: set[int] = set()
    cause: Optional[BaseException] = e.__cause__ or e.__context__
    while cause is not None and id(cause) not in seen:  # a mirror's 404 without X-Error-Code
        seen.add(id(cause))
        response = getattr(cause, "response", None)
        if getattr(response, "status_code", None) == 404:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _cause(e: BaseException) -> str:
    inner = e.__cause__ or e.__context__
    return f"{e} ({inner})" if inner is not None else str(e)
