"""The output folder of ``clip finetune``: what it records, how a rerun resumes or is refused.

``DIR`` holds:

- ``finetune.json``: the settings that decide the numbers (inputs, model, epochs, batch size,
  learning rate, warmup, weight decay, precision, locking, seed, gradient clipping, number of
  processes, the pairs read: their number and a digest of their image paths and captions), the
  digest of the starting weights, and the run's status (``running`` or ``finished``). A rerun
  whose settings differ, or whose model file now holds other weights, is refused, naming each
  difference; the device, the decoding workers, the checkpoint interval, gradient checkpointing
  and progress may change between runs.
- ``checkpoint/last.pt``: the whole training state (model, optimiser, loss scaler, schedule,
  random states of every rank, epoch, step in the epoch, global step), replaced atomically every
  ``checkpoint_every`` steps and at the end of each epoch; removed when the run finishes (it is
  three times the model's size, and not part of the model a hub upload of ``DIR`` wants).
- ``metrics.jsonl``: one JSON object a line: per optimiser step ``{"step", "epoch", "loss",
  "lr", "logit_scale", "images_per_s"}`` and per evaluation ``{"eval": "val", "step", "epoch",
  "val_loss", ...}``. A resume drops the lines after the checkpoint's step (rewriting the file
  atomically), so the file never holds a step twice.
- the final model in the hub layout (``open_clip_config.json``, ``open_clip_model.safetensors``)
  once the run finishes.

A folder that exists, is not empty and holds no ``finetune.json`` is refused (it is not a run's
folder; nothing in it is overwritten).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import IO, Any, Optional

import torch

from clip.atomic import atomic_write, open_atomic

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "RECORD_NAME",
    "MetricsLog",
    "RunFolder",
    "RunMismatchError",
    "describe_differences",
]

RECORD_NAME = "finetune.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = os.path.join("checkpoint", "last.pt")
FORMAT = 1

# How each recorded setting is named on the command line, for messages.
FLAGS = {
    "train": "TRAIN",
    "val": "--val",
    "model": "--model",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "warmup": "--warmup",
    "weight_decay": "--wd",
    "precision": "--precision",
    "lock_image": "--lock-image",
    "image_column": "--image-column",
    "caption_column": "--caption-column",
    "seed": "--seed",
    "max_grad_norm": "--max-grad-norm",
    "world_size": "processes (torchrun --nproc-per-node)",
    "pairs": "pairs in TRAIN",
    "pairs_sha256": "TRAIN's pairs (image paths and captions)",
}


class RunMismatchError(ValueError):
    """The output folder holds another run (other settings), or is not a run's folder."""


def describe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"--lr: 0.0001 now, 1e-05 in the folder"`` for each setting that differs."""
    lines = []
    keys = [k for k in FLAGS if k in recorded or k in current]
    keys += sorted(k for k in {*recorded, *current} if k not in FLAGS)
    for key in keys:
        old, new = recorded.get(key), current.get(key)
        if old != new:
            lines.append(
                f"{FLAGS.get(key, key)}: {json.dumps(new)} now, {json.dumps(old)} in the folder"
            )
    return lines


@dataclass
class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (rank 0 only), each flushed as written."""

    file: Optional[IO[str]]

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (a no-op on ranks that do not log)."""
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        """Close the file."""
        if self.file is not None:
            self.file.close()
            self.file = None


class RunFolder:
    """The files of one fine-tuning run in ``path`` (see the module docstring).

    Args:
        path: the output folder (``--out``).
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.record_path = os.path.join(self.path, RECORD_NAME)
        self.metrics_path = os.path.join(self.path, METRICS_NAME)
        self.checkpoint_path = os.path.join(self.path, CHECKPOINT_NAME)

    # ---- the record ------------------------------------------------------------------------

    def read_record(self) -> Optional[dict[str, Any]]:
        """The folder's ``finetune.json``, or None if it has none."""
        try:
            with open(self.record_path, encoding="utf-8") as f:
                record: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunMismatchError(
                f"{self.record_path} is not a clip finetune record ({e}); give another --out"
            ) from None
        return record

    def prepare(self, settings: dict[str, Any]) -> str:
        """Check the folder against this run's ``settings`` and record them if it is new.

        Args:
            settings: the JSON-ready settings that decide the numbers.

        Returns:
            ``"new"`` (nothing to resume), ``"resume"`` (a run with these settings was started
            here) or ``"finished"`` (and completed).

        Raises:
            RunMismatchError: if the folder holds a run with other settings, or files that are
                not a run's, or ``path`` is a file.
        """
        settings = json.loads(json.dumps(settings))  # tuples → lists, as read back
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunMismatchError(f"--out {self.path} is a file; give a folder (new or empty)")
        record = self.read_record()
        if record is None:
            if os.path.isdir(self.path) and os.listdir(self.path):
                raise RunMismatchError(
                    f"--out {self.path} is not empty and holds no {RECORD_NAME}: it is not a "
                    "clip finetune run, and nothing in it is overwritten; give a new or empty "
                    "folder"
                )
            os.makedirs(self.path, exist_ok=True)
            self.write_record({"format": FORMAT, "status": "running", "settings": settings})
            return "new"
        differences = describe_differences(record.get("settings", {}), settings)
        if differences:
            raise RunMismatchError(
                f"--out {self.path} holds a fine-tuning run with other settings ("
                + "; ".join(differences)
                + "). To resume it, rerun with its settings; to start another run, give "
                "another --out"
            )
        return "finished" if record.get("status") == "finished" else "resume"

    def check_model(self, digest: str) -> None:
        """Record the starting weights' digest on a new run; refuse other weights on a resume.

        Raises:
            RunMismatchError: if the run started from other weights (the model file changed).
        """
        record = self.read_record() or {"format": FORMAT}
        recorded = record.get("model_sha256")
        if recorded is None:
            self.write_record({**record, "model_sha256": digest})
        elif recorded != digest:
            name = record.get("settings", {}).get("model", "--model")
            raise RunMismatchError(
                f"{name} now holds other weights than when the run in {self.path} started "
                f"({digest} now, {recorded} then); to train from them, give another --out"
            )

    def write_record(self, record: dict[str, Any]) -> None:
        """Replace ``finetune.json`` atomically."""
        atomic_write(self.record_path, (json.dumps(record, indent=2) + "\n").encode())

    def mark_finished(self, summary: dict[str, Any]) -> None:
        """Record that the run finished (a rerun then has nothing to do), with ``summary``."""
        record = self.read_record() or {"format": FORMAT}
        record.update(status="finished", **summary)
        self.write_record(record)

    # ---- the checkpoint --------------------------------------------------------------------

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace ``checkpoint/last.pt`` with ``state`` atomically (``torch.save``)."""
        os.makedirs(os.path.dirname(self.checkpoint_path), exist_ok=True)
        with open_atomic(self.checkpoint_path) as f:
            torch.save(state, f)

    def load_checkpoint(self) -> Optional[dict[str, Any]]:
        """The last checkpoint's state on the CPU, or None if there is none.

        Raises:
            RunMismatchError: if the file cannot be read as a checkpoint.
        """
        if not os.path.isfile(self.checkpoint_path):
            return None
        try:
            state: dict[str, Any] = torch.load(
                self.checkpoint_path, map_location="cpu", weights_only=True
            )
        except Exception as e:  # torch raises several kinds for a damaged file
            raise RunMismatchError(
                f"cannot read the checkpoint {self.checkpoint_path} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); delete it to restart the run "
                "from the beginning"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise RunMismatchError(
                f"{self.checkpoint_path} is not a checkpoint of this version of clip finetune; "
                "delete it to restart the run from the beginning"
            )
        return state

    def remove_checkpoint(self) -> None:
        """Delete the checkpoint (and its folder if that is then empty)."""
        if os.path.isfile(self.checkpoint_path):
            os.remove(self.checkpoint_path)
        folder = os.path.dirname(self.checkpoint_path)
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)

    # ---- metrics ---------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (a torn last line, from a kill, is left out)."""
        try:
            with open(self.metrics_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def open_metrics(self, through_step: int) -> MetricsLog:
        """Keep the records of steps ≤ ``through_step`` (rewritten atomically), then append.

        Args:
            through_step: the checkpoint's global step (-1 for a fresh start: keep nothing).
        """
        kept = [r for r in self.read_metrics() if int(r.get("step", -1)) <= through_step]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return MetricsLog(open(self.metrics_path, "a", encoding="utf-8"))
