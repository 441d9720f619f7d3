"""One hub repository's files in the huggingface_hub cache: downloaded, then verified.

The machinery under :func:`clip.hub.fetch` (whose module docstring tells the whole story:
verification against the hub's SHA256, offline use, environment variables). :class:`HubRepo`
gets one file at a time with the settings of one call and answers a local path, or why there is
none (:data:`ABSENT`, :data:`NOT_CACHED`); a file whose bytes do not match is deleted and
downloaded once more before :class:`clip.download.DownloadError` is raised.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from typing import Any, Optional, Union

from clip import verified
from clip.download import DownloadError

__all__ = ["ABSENT", "NOT_CACHED", "HubRepo", "Missing", "at_revision", "commit_of"]

logger = logging.getLogger("clip.hub")  # the name it has always logged under

_EXTRA = "pip install 'clip-torch[hub]'"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")

PathLike = Union[str, "os.PathLike[str]"]


class Missing:
    """Why a file has no local path: :data:`ABSENT` or :data:`NOT_CACHED`."""


ABSENT = Missing()  # the hub says the file does not exist (HTTP 404)
NOT_CACHED = Missing()  # offline, and the file is not in the cache


def at_revision(revision: Optional[str]) -> str:
    """`` at revision 'REV'`` for a message, or nothing without a revision."""
    return f" at revision {revision!r}" if revision else ""


def commit_of(path: str) -> str:
    """The commit of a snapshot file (``.../snapshots/<commit>/<name>``)."""
    return os.path.basename(os.path.dirname(path))


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


class HubRepo:
    """One repo's downloads with the settings of one call (offline, endpoint, cache, bars).

    The environment (``CLIP_OFFLINE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``CLIP_QUIET``) is
    read when it is made.

    Args:
        repo_id: ``"ORG/REPO"``, already checked.
        cache_dir: the hub cache; None: huggingface_hub's (``$HF_HUB_CACHE``).

    Raises:
        ImportError: huggingface_hub is not installed (the ``hub`` extra).
    """

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
        """The hub cache folder in use."""
        return self.cache_dir or str(self.hf.constants.HF_HUB_CACHE)

    def offline_message(self, names: list[str], revision: Optional[str]) -> str:
        """Why files are missing offline, and how to get them.

        Args:
            names: the file names not in the cache.
            revision: the revision they were asked at.

        Returns:
            The message for a :class:`clip.download.DownloadError`.
        """
        why = "$CLIP_OFFLINE" if _flag("CLIP_OFFLINE") else "$HF_HUB_OFFLINE"
        return (
            f"offline ({why} is set), and {' / '.join(names)} of hub repo {self.repo_id!r}"
            f"{at_revision(revision)} is not in the hub cache {self.where()!r}. Run once with "
            f"network access (unset {why}) to download it, or copy a hub cache that has it "
            "there ($HF_HUB_CACHE)"
        )

    def get(self, name: str, revision: Optional[str]) -> Union[str, Missing]:
        """The verified local path of ``name``, or why there is none; deletes corrupt copies.

        Args:
            name: a file at the repo's top level.
            revision: branch, tag or commit hash; None: the default branch.

        Returns:
            The path in the cache's snapshot folder, :data:`ABSENT` (the hub says there is no
            such file) or :data:`NOT_CACHED` (offline, and not in the cache).

        Raises:
            DownloadError: the repo or revision cannot be had, the hub cannot be reached, or
                the file's bytes do not match its SHA256 even after downloading it again.
        """
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

    def _download(self, name: str, revision: Optional[str]) -> Union[str, Missing]:
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
                return ABSENT
            elif self.offline:
                return NOT_CACHED
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
                return ABSENT
            raise DownloadError(
                f"could not get {name} of hub repo {self.repo_id!r}{at_revision(revision)} from "
                f"{self._endpoint()}, and it is not in the hub cache {self.where()!r}: "
                f"{_cause(e)}. Check the network and $HF_ENDPOINT, or set CLIP_OFFLINE=1 to "
                "use only what is cached"
            ) from e
        except OSError as e:  # HTTP errors (403, ...), a size mismatch, a full or read-only disk
            raise DownloadError(
                f"could not get {name} of hub repo {self.repo_id!r}{at_revision(revision)} into "
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
                self.repo_id, name, revision=commit_of(path), endpoint=self.endpoint
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
