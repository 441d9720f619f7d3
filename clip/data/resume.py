"""Resume: what an output records about the run that made it, and what a rerun may trust.

Every output records the model's identity (``model_digest``), the precision the model computed
in (``precision``) and, for shards, the stored dtype and how images were decoded. A rerun with
another model or precision is refused with both named; rows are keyed by normalised absolute
path, so ``photos/a.jpg`` and ``./photos/a.jpg`` are one row.

The model digest is ``sha256:<hex>`` of the checkpoint file for a released model name (the
SHA256 in its URL, so nothing is read) or a checkpoint path (hashed once per process and file
version), and ``weights-sha256:<hex>`` of the state dict (names, shapes, dtypes and bytes) for
a model object, a model built by a function or a model folder (with, when the model's config
says more than OpenAI's defaults, that config: the same weights with another activation or mean
are another model).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch

from clip.data import fs
from clip.data.plan import Shard
from clip.data.write import load_embeddings, parquet_row_count, read_json, read_meta

__all__ = [
    "check_meta",
    "file_digest",
    "model_digest",
    "pending",
    "precision_of",
    "resume_file",
    "retry_shard",
    "stats_file",
    "weights_digest",
]

ModelSpec = Union[str, "os.PathLike[str]", Callable[[], torch.nn.Module], torch.nn.Module]
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(model: torch.nn.Module) -> str:
    """``weights-sha256:<hex>`` of the state dict: every name, shape, dtype and byte, in order.

    For a CLIP whose config says what shapes cannot and differs from OpenAI's defaults (GELU,
    a head width other than 64, another mean, std or resize), that config is hashed too: it
    changes the embeddings as much as the weights do. A model with OpenAI's defaults hashes its
    weights alone, as before those settings existed.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-dim too (logit_scale)
        h.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(_unseen_config(model))
    return f"weights-sha256:{h.hexdigest()}"


def _unseen_config(model: torch.nn.Module) -> bytes:
    """What the model's config says beyond its shapes, if not OpenAI's defaults (else b"")."""
    from clip.checkpoint import config_of
    from clip.preprocess import PreprocessConfig

    config = config_of(model)
    if config is None:
        return b""
    said = {
        "activation": config.activation,
        "vision_head_width": config.vision_head_width,
        "transformer_heads": config.transformer_heads,
        "preprocess": config.preprocess,
    }
    openai = {
        "activation": "quick_gelu",
        "vision_head_width": 64,
        "transformer_heads": config.transformer_width // 64,
        "preprocess": PreprocessConfig(),
    }
    return b"" if said == openai else f"config|{said!r}\n".encode()


def file_digest(path: str) -> str:
    """``sha256:<hex>`` of a file, hashed once per process while its size and mtime hold."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        from clip.download import sha256_of

        _FILE_DIGESTS[key] = f"sha256:{sha256_of(path)}"
    return _FILE_DIGESTS[key]


def model_digest(spec: ModelSpec) -> Optional[str]:
    """The identity of the model ``spec`` names, or None if only the loaded model can tell.

    Args:
        spec: a released model name, a checkpoint file, a model, or a function returning one.

    Returns:
        ``sha256:…`` for names and checkpoint files, ``weights-sha256:…`` for a model; None for
        a function or a folder (load the model and use :func:`weights_digest`).
    """
    from clip.download import MODELS, expected_sha256

    if isinstance(spec, torch.nn.Module):
        return weights_digest(spec)
    if callable(spec):
        return None
    path = os.fspath(spec)
    if path in MODELS:
        return f"sha256:{expected_sha256(MODELS[path])}"
    return file_digest(path) if os.path.isfile(path) else None


def precision_of(model: torch.nn.Module) -> str:
    """The dtype the model computes in: its visual weights' (``float16`` for OpenAI's CUDA
    layout), else its first parameter's."""
    visual = getattr(model, "visual", None)
    tensor = next(iter(visual.parameters()), None) if isinstance(visual, torch.nn.Module) else None
    tensor = tensor if tensor is not None else next(iter(model.parameters()), None)
    return str(tensor.dtype if tensor is not None else torch.float32).removeprefix("torch.")


def check_meta(where: str, recorded: Optional[dict[str, Any]], wanted: dict[str, Any]) -> None:
    """Refuse to add to an output made by another model or precision.

    Raises:
        ValueError: naming the recorded and the requested values, and the way out.
    """
    if recorded is None:
        raise ValueError(
            f"{where} has no record of the model that wrote it; write to a new output, "
            "or delete it to start over"
        )
    changed = [k for k in wanted if recorded.get(k) != wanted[k]]
    if changed:
        what = "; ".join(
            f"{k}: {recorded.get(k)!r} ({recorded.get('model', '?')}) there, "
            f"{wanted[k]!r} ({wanted.get('model', '?')}) now"
            for k in changed
            if k != "model"
        )
        raise ValueError(
            f"{where} was written with another model or precision ({what}); "
            "write to a new output, or delete it to start over"
        )


# ---- single-file outputs (clip embed --out x.npy) -------------------------------------------


def resume_file(
    out: str, keys: Sequence[str], meta: dict[str, Any]
) -> tuple[list[str], torch.Tensor, list[str]]:
    """What a single-file output already holds, and which of ``keys`` still need embedding.

    Args:
        out: the ``.npy``/``.parquet`` output (it may not exist yet).
        keys: the row keys wanted (normalised paths, or captions).
        meta: what this run records (``model_digest``, ``precision``, ...), compared with the
            output's sidecar.

    Returns:
        ``(done keys, their embeddings [M, D], keys to do)``.

    Raises:
        ValueError: if the output was written by another model or precision, or has no record.
    """
    if not fs.exists(out):
        return [], torch.empty(0, 0), list(dict.fromkeys(keys))
    compared = {k: v for k, v in meta.items() if k in ("model_digest", "precision", "key")}
    check_meta(out, read_meta(out), {**compared, "model": meta.get("model")})
    done_keys, done = load_embeddings(out)
    seen = set(done_keys)
    todo = [k for k in dict.fromkeys(keys) if k not in seen]
    return done_keys, done, todo


# ---- shards ---------------------------------------------------------------------------------


def stats_file(out_dir: str, name: str) -> str:
    """``OUT/<name>.stats.json``."""
    return fs.join(out_dir, f"{name}.stats.json")


def pending(
    out_dir: str, shards: Sequence[Shard], meta: dict[str, Any]
) -> tuple[list[Shard], dict[str, dict[str, Any]]]:
    """Split ``shards`` into those to do and the finished ones, in time linear in their number.

    One listing of ``out_dir``; for each shard whose Parquet file is there, one read of its
    stats and one of its Parquet footer. A shard is finished when its stats record ``meta`` and
    the shard's inputs, and its Parquet footer holds the row count the stats say. A 0-byte or
    corrupt Parquet file, or one whose stats are unreadable or disagree, is redone, with a
    warning.

    Returns:
        ``(shards to do, {finished shard name: its stats})``.

    Raises:
        ValueError: if a shard was written from other inputs, another model or dtype.
    """
    listing = {p.replace("\\", "/").rsplit("/", 1)[-1] for p in fs.glob(fs.join(out_dir, "*"))}
    todo: list[Shard] = []
    done: dict[str, dict[str, Any]] = {}
    for shard in shards:
        stats = _finished_stats(out_dir, shard, meta, f"{shard.name}.parquet" in listing)
        if stats is None:
            todo.append(shard)
        else:
            done[shard.name] = stats
    return todo, done


def _finished_stats(
    out_dir: str, shard: Shard, meta: dict[str, Any], present: bool
) -> Optional[dict[str, Any]]:
    if not present:
        return None
    parquet, stats_path = fs.join(out_dir, f"{shard.name}.parquet"), stats_file(out_dir, shard.name)
    try:
        recorded = read_json(stats_path)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        warnings.warn(f"{stats_path} is unreadable ({e}): redoing shard {shard.name}", stacklevel=3)
        return None
    expected = {"fingerprint": shard.fingerprint(), **meta}
    changed = [k for k, v in expected.items() if recorded.get(k) != v]
    if changed:
        raise ValueError(
            f"{parquet} was written with other {', '.join(changed)} "
            f"({', '.join(f'{k}={recorded.get(k)!r}' for k in changed)}); "
            "write to a new output folder, or delete that shard to redo it"
        )
    try:
        rows = parquet_row_count(parquet)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
        warnings.warn(f"{parquet} is not whole ({e}): redoing shard {shard.name}", stacklevel=3)
        return None
    if rows != recorded.get("embedded"):
        warnings.warn(
            f"{parquet} holds {rows} rows but {stats_path} says {recorded.get('embedded')}: "
            f"redoing shard {shard.name}",
            stacklevel=3,
        )
        return None
    return recorded


def retry_shard(shard: Shard, stats: dict[str, Any]) -> Optional[Shard]:
    """``shard`` restricted to the rows its stats list as failed (None if none failed); the whole
    shard if it could not be read to its end (a truncated tar), as it is then redone."""
    ids = tuple(f["id"] for f in stats.get("failures", []))
    if shard.source and shard.source in ids:
        return shard
    return Shard(**{**shard.__dict__, "only": ids}) if ids else None
