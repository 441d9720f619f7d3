"""benchmarks/timing.write_section: each script replaces only its own section of RESULTS.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "timing.py"


def timing() -> ModuleType:
    if "bench_timing" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_timing", SCRIPT)
        assert spec is not None and spec.loader is not None
        sys.modules["bench_timing"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_timing"])
    return sys.modules["bench_timing"]


RESULTS = "# Benchmark results\n\nold tables\n\n## Reading\n\nby hand\n\n## Zoo\n\nzoo rows\n"


def test_the_head_section_is_replaced_and_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(RESULTS)
    timing().write_section(path, "# Benchmark results", "# Benchmark results\n\nnew tables\n")
    want = "# Benchmark results\n\nnew tables\n\n## Reading\n\nby hand\n\n## Zoo\n\nzoo rows\n"
    assert path.read_text() == want


def test_a_middle_section_is_replaced_with_a_blank_line_before_the_next(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(RESULTS)
    timing().write_section(path, "## Reading", "## Reading\n\nrewritten")
    assert path.read_text() == RESULTS.replace("by hand", "rewritten")


def test_a_missing_section_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(RESULTS)
    timing().write_section(path, "## ONNX Runtime", "## ONNX Runtime\n\nrows\n")
    assert path.read_text() == RESULTS + "\n## ONNX Runtime\n\nrows\n"
