"""Timing and reporting helpers: alternating runs, medians, markdown tables."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

PEER_ORDER = ("clip", "reference", "open_clip", "hf", "onnxruntime")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(
    fns: dict[str, Callable[[], Any]], reps: int, device: str = "cpu", warmup: bool = True
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved and the order rotated.

    Interleaving spreads slow phases of a shared machine over every contender instead of
    penalising whichever ran during them.
    """
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


@dataclass
class Table:
    """A markdown table that is printed as rows arrive and kept for RESULTS.md."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def header(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        return "\n".join([*lines, "|" + "|".join("---" for _ in self.columns) + "|"])

    def add(self, row: list[str]) -> None:
        self.rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def markdown(self) -> str:
        body = ["| " + " | ".join(r) + " |" for r in self.rows]
        notes = [""] + [f"- {n}" for n in self.notes] if self.notes else []
        return "\n".join([self.header(), *body, *notes, ""])


def peer_table(title: str, unit: str) -> Table:
    table = Table(title, ["case", *PEER_ORDER, "clip / best peer"])
    table.note(f"throughput in {unit}, median of alternating runs; higher is better")
    print(table.header(), flush=True)
    return table


def peer_row(case: str, throughput: dict[str, float]) -> list[str]:
    """A row of throughputs per peer and the ratio of ours to the best other one."""
    cells = [fmt(throughput[p]) if p in throughput else "—" for p in PEER_ORDER]
    others = [v for k, v in throughput.items() if k != "clip"]
    ratio = f"**{throughput['clip'] / max(others):.2f}×**" if others else "—"
    return [case, *cells, ratio]


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 1 else f"{value:.3f}"


def deviation(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |actual − expected| / max |expected|, minimum row cosine similarity)."""
    a = actual.detach().double().cpu().flatten(1)
    e = expected.detach().double().cpu().flatten(1)
    rel = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
    cos = torch.nn.functional.cosine_similarity(a, e, dim=1).min().item()
    return rel, cos


def write_section(path: Path, title: str, text: str) -> None:
    """Replace the section that starts with the heading ``title`` in ``path`` by ``text`` (up to
    the next ``## `` heading), or append it; atomically, the other sections kept."""
    from clip.atomic import atomic_write

    old = path.read_text() if path.exists() else ""
    start = old.find(title)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(title))
        rest = old[end + 1 :] if end >= 0 else ""
        new = old[:start] + (text.rstrip("\n") + "\n\n" if rest else text) + rest
    atomic_write(path, new.encode())


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat; this process idles)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float) -> float:
    """Wait until other processes leave the CPUs ≥ 85% idle, at most ``limit`` seconds.

    Returns:
        The seconds waited.
    """
    start = time.perf_counter()
    while limit > 0 and cpu_busy() > 0.15 and time.perf_counter() - start < limit:
        pass
    return time.perf_counter() - start
