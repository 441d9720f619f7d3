"""Plan a sharded job: inputs cut into shards with stable names, recorded once in ``plan.json``.

Shards:

* image files, folders and globs, pooled, sorted and cut every ``shard_size`` files
  (``images-00000``, ``images-00001``, ...);
* file lists (``.txt``/``.lst``: one image path per line, relative to the list's folder), cut
  the same way and named after the list (``batch-00000``, ...);
* Parquet files with a column of paths or URLs, cut every ``shard_size`` rows (``meta-00000``,
  ...: the name has the suffix whatever the number of shards);
* webdataset-style ``.tar`` files, one shard each, named after the file.

A file found in a folder or by a glob that is none of these is refused by name rather than
dropped. The first run writes the plan (settings and shards) to ``OUT/plan.json``, atomically,
once; a rerun with other settings or inputs is refused with what changed, and torchrun ranks
other than 0 read the recorded plan instead of listing the inputs themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

from clip.data import fs
from clip.data.discover import PathLike, discover, read_list, stem
from clip.data.write import pyarrow, read_json

__all__ = ["PLAN_FILE", "Shard", "plan_shards", "use_plan"]

PLAN_FILE = "plan.json"
_PLAN_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """One unit of work and its output name.

    Attributes:
        name: output stem: the shard writes ``<name>.parquet`` and ``<name>.stats.json``.
        kind: ``"files"``, ``"parquet"`` or ``"tar"``.
        source: the list, Parquet or tar file it reads ("" for pooled image files).
        members: for ``files``, the image paths.
        start, stop: for ``parquet``, the row range.
        column: for ``parquet``, the column of paths or URLs.
        only: if set, read only the items with these ids (a rerun of failed rows).
    """

    name: str
    kind: str
    source: str = ""
    members: tuple[str, ...] = ()
    start: int = 0
    stop: int = 0
    column: str = ""
    only: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """A hash of what the shard reads, so a rerun can tell a shard's inputs changed."""
        fields: dict[str, Any] = dict(self.__dict__)  # shallow: asdict's deep copy is slow
        del fields["only"]
        if self.kind in ("parquet", "tar"):
            fields["size"] = fs.size(self.source)
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        """The shard as one JSON object (see :meth:`from_json`)."""
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: Union[str, dict[str, Any]]) -> Shard:
        """The shard :meth:`to_json` wrote (a JSON string or the parsed object)."""
        fields = json.loads(text) if isinstance(text, str) else dict(text)
        fields.pop("fingerprint", None)
        fields["members"] = tuple(fields.get("members", ()))
        fields["only"] = tuple(fields.get("only", ()))
        return Shard(**fields)


def plan_shards(
    inputs: Union[PathLike, Iterable[PathLike]],
    shard_size: int = 10_000,
    column: Optional[str] = None,
) -> list[Shard]:
    """Cut ``inputs`` into shards with stable names (see the module docstring).

    Args:
        inputs: one or several image files, folders, globs, file lists, ``.parquet`` and ``.tar``
            files (a single ``str`` or ``Path`` is one input).
        shard_size: images (or Parquet rows) per shard for everything but tars.
        column: the Parquet column of paths or URLs (default: ``path``, else ``url``).

    Returns:
        The shards: tars, then Parquet files, then lists, each in input order, then the pooled
        images.

    Raises:
        ValueError: on ``shard_size`` < 1, two shards with one name, a Parquet file without
            the column, or files in folders/globs that are no kind of input (named).
        FileNotFoundError: if an input does not exist.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    found = discover(inputs)
    found.refuse_other()
    shards = [Shard(stem(tar), "tar", tar) for tar in found.tars]
    for table in found.parquets:
        shards.extend(_parquet_shards(table, shard_size, column))
    for listing in found.lists:
        shards.extend(_file_shards(stem(listing), read_list(listing), shard_size, listing))
    shards.extend(_file_shards("images", sorted(found.images), shard_size, ""))
    _check_unique(shards)
    return shards


def _file_shards(prefix: str, paths: list[str], size: int, source: str) -> list[Shard]:
    return [
        Shard(f"{prefix}-{k:05d}", "files", source, tuple(paths[start : start + size]))
        for k, start in enumerate(range(0, len(paths), size))
    ]


def _parquet_shards(path: str, size: int, column: Optional[str]) -> list[Shard]:
    with fs.open_read(path) as f:
        meta = pyarrow().parquet.ParquetFile(f)
        names = meta.schema_arrow.names
        rows = meta.metadata.num_rows
    chosen = column or next((c for c in ("path", "url") if c in names), None)
    if chosen is None or chosen not in names:
        wanted = repr(column) if column else "'path' or 'url'"
        raise ValueError(f"{path} has no column {wanted} (columns: {names}); pass column=")
    return [
        Shard(
            f"{stem(path)}-{k:05d}",
            "parquet",
            path,
            start=s,
            stop=min(rows, s + size),
            column=chosen,
        )
        for k, s in enumerate(range(0, rows, size))
    ]


def _check_unique(shards: list[Shard]) -> None:
    seen: dict[str, Shard] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(
                f"two inputs give shard name {shard.name!r} ({seen[shard.name].source or 'images'}"
                f" and {shard.source or 'images'}); rename one of them"
            )
        seen[shard.name] = shard


# ---- the recorded plan ----------------------------------------------------------------------


def use_plan(
    out_dir: str,
    inputs: Sequence[str],
    shard_size: int,
    column: Optional[str],
    settings: dict[str, Any],
    rank: int = 0,
    wait_s: float = 600.0,
) -> list[Shard]:
    """The job's shards, the same for every rank and every rerun.

    Rank 0 plans the inputs; if ``OUT/plan.json`` exists it must record the same shards and
    ``settings``, else it is written (atomically, only if still absent). Other ranks do not list
    the inputs: they wait for the recorded plan and take its shards, after checking
    ``settings``.

    Args:
        out_dir: the output folder.
        inputs, shard_size, column: as for :func:`plan_shards`.
        settings: what else must not change between runs (model, precisions, decode).
        rank: this process's rank.
        wait_s: how long a rank other than 0 waits for rank 0's plan.

    Returns:
        The shards, in plan order.

    Raises:
        ValueError: if the recorded plan differs, naming what changed and how to proceed.
        TimeoutError: if rank 0's plan does not appear within ``wait_s``.
    """
    path = fs.join(out_dir, PLAN_FILE)
    wanted = {"shard_size": shard_size, "column": column, **settings}
    if rank != 0:
        recorded = _wait_for(path, wait_s)
        _compare_settings(path, recorded.get("settings", {}), wanted)
        return [Shard.from_json(s) for s in recorded["shards"]]
    shards = plan_shards(inputs, shard_size, column)
    record: dict[str, Any] = {
        "version": _PLAN_VERSION,
        "inputs": [fs.normalize(i) for i in inputs],
        "settings": wanted,
        "shards": [{**asdict(s), "fingerprint": s.fingerprint()} for s in shards],
    }
    if not fs.exists(path) and _create(path, record):
        return shards
    recorded = read_json(path)
    _compare_settings(path, recorded.get("settings", {}), wanted)
    _compare_shards(path, recorded.get("shards", []), record["shards"])
    return shards


def _wait_for(path: str, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while not fs.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {wait_s:.0f} s for rank 0 to write {path}; is rank 0 running with the "
                "same --out?"
            )
        time.sleep(0.2)
    value = read_json(path)
    assert isinstance(value, dict)
    return value


def _create(path: str, record: dict[str, Any]) -> bool:
    """Write ``record`` to ``path`` unless it exists (atomically); False if another got there."""
    data = json.dumps(record, indent=1).encode()
    if fs.is_url(path):  # object stores have no exclusive create: last writer wins
        with fs.open_write(path) as f:
            f.write(data)
        return True
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.new")
    with fs.open_write(tmp) as f:  # whole and fsync'ed before it gets its real name
        f.write(data)
    try:
        os.link(tmp, path)  # fails if the name exists: exactly one creator wins
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return True


_FLAGS = {
    "shard_size": "--shard-size",
    "column": "--column",
    "dtype": "--dtype",
    "precision": "--precision",
    "decode": "--fast-decode / preprocess",
    "model_digest": "--model",
}


def _compare_settings(path: str, recorded: dict[str, Any], wanted: dict[str, Any]) -> None:
    changed = [k for k in sorted(set(recorded) | set(wanted)) if recorded.get(k) != wanted.get(k)]
    if changed:
        what = "; ".join(
            f"{k}: recorded {recorded.get(k)!r}, this run {wanted.get(k)!r}" for k in changed
        )
        hint = ", ".join(_FLAGS.get(k, k) for k in changed)
        raise ValueError(
            f"{path} records another job ({what}); rerun with the recorded settings ({hint}) "
            "to resume it, or write to a new output folder (or delete plan.json if that job "
            "wrote no shard yet)"
        )


def _compare_shards(
    path: str, recorded: list[dict[str, Any]], planned: list[dict[str, Any]]
) -> None:
    before = {s["name"]: s.get("fingerprint") for s in recorded}
    now = {s["name"]: s["fingerprint"] for s in planned}
    if before == now:
        return
    added = [n for n in now if n not in before]
    gone = [n for n in before if n not in now]
    changed = [n for n in now if n in before and before[n] != now[n]]
    parts = [
        f"{label} {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
        for label, names in (("new shards:", added), ("gone:", gone), ("changed:", changed))
        if names
    ]
    raise ValueError(
        f"the inputs no longer give the plan recorded in {path} ({'; '.join(parts)}); "
        "write to a new output folder, or delete the folder's files to start over"
    )
