"""benchmarks/gpu_check.py runs where there is no GPU: its skip, its help, and a CPU dry run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def gpu_check() -> ModuleType:
    if "gpu_check" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        assert spec is not None and spec.loader is not None
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def test_without_cuda_it_says_skipped_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check().main([]) == 0
    assert "no CUDA: skipped" in capsys.readouterr().out


def test_help_lists_the_checks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fp16", "jit", "compile", "pipeline", "ranks", "suite"))


def test_cpu_dry_run_passes_and_appends_its_report(tmp_path: Path) -> None:
    # compile (a minute of C++ build) and ranks (four interpreters) are left to the GPU run
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nearlier runs\n")
    argv = ["--device", "cpu", "--quick", "--tiny", "tiny-vit", "--skip", "compile,ranks"]
    assert gpu_check().main([*argv, "--out", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\nearlier runs\n\n## benchmarks/gpu_check.py")
    for row in ("| fp16 | tiny-vit image", "| jit | tiny-vit .cpu().float() text", "| pipeline |"):
        assert row in text
    assert "| FAIL |" not in text and text.count("| SKIP |") == 3  # compile, ranks, suite
