"""ONNX export of CLIP's two towers (needs the optional ``onnx`` extra): :func:`export_onnx` for
files to ship, :func:`export_tower` and :func:`fuse` for the sessions of :mod:`clip.onnxrt`."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from clip.atomic import publish
from clip.model import CLIP

__all__ = ["OnnxFiles", "export_onnx", "export_tower", "fuse", "require_exporter"]

# Above this many bytes of weights a tower is saved with an external data file (protobuf's
# 2 GiB limit), as ``<name>.onnx.data`` beside ``<name>.onnx``.
_EXTERNAL_DATA_BYTES = 1_500_000_000

# From torch 2.9, torch.onnx.export runs the torch.export-based exporter by default, the one that
# takes ``dynamic_shapes``; older releases run the TorchScript exporter, which refuses them.
_MIN_TORCH = (2, 9)


class OnnxFiles(NamedTuple):
    """Paths written by :func:`export_onnx`."""

    visual: Path
    textual: Path


class _Visual(nn.Module):
    """image [B, 3, R, R] float32 → image_features [B, E]: ``encode_image`` without checks."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, image: Tensor) -> Tensor:
        return self.visual(image)


class _Textual(nn.Module):
    """text [B, L] int64 → text_features [B, E]: ``encode_text`` without checks or trimming."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: Tensor) -> Tensor:
        return self.model.encode_text_unchecked(text, trim=False)


def export_onnx(
    model: CLIP, directory: Union[str, os.PathLike[str]], *, opset: Optional[int] = None
) -> OnnxFiles:
    """Write the image and text towers as ``visual.onnx`` and ``textual.onnx``.

    ``visual.onnx``: input ``image`` float32 [batch, 3, R, R] (as from ``preprocess``), output
    ``image_features`` float32 [batch, E] = ``encode_image``. ``textual.onnx``: input ``text``
    int64 [batch, context_length] (``clip.tokenize(...).long()``), output ``text_features``
    float32 [batch, E] = ``encode_text``; the exported graph always runs the full context and
    pools at the argmax (end-of-text) token. The batch size is dynamic in both. Features are not
    normalised. The export runs in fp32 on the CPU (on a copy when ``model`` is elsewhere, in
    another dtype, or in training mode; ``model`` itself is not changed). Each file appears
    complete or not at all.

    Args:
        model: a :class:`clip.model.CLIP` (not a ``jit=True`` TorchScript module).
        directory: where to write; created if missing; existing files of those names replaced.
        opset: ONNX opset version (default: the exporter's).

    Returns:
        ``OnnxFiles(visual, textual)``: the paths written.

    Raises:
        ImportError: if ``onnx`` or ``onnxscript`` is missing, or torch is older than 2.9
            (``pip install 'clip-torch[onnx]'`` installs what is missing).
        TypeError: if ``model`` is not a :class:`clip.model.CLIP`.
    """
    require_exporter()
    if not isinstance(model, CLIP):
        raise TypeError(
            f"export_onnx needs a clip.model.CLIP, got {type(model).__name__}; "
            "load it with clip.load(..., jit=False)"
        )
    model = _fp32_cpu_eval(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    res = model.visual.input_resolution
    image = torch.zeros(2, 3, res, res)
    text = torch.zeros(2, model.context_length, dtype=torch.long)
    text[:, 1] = model.vocab_size - 1  # an end-of-text token (the row's largest id)
    visual = _export(_Visual(model), image, "image", "image_features", out, "visual", opset)
    textual = _export(_Textual(model), text, "text", "text_features", out, "textual", opset)
    return OnnxFiles(visual, textual)


def require_exporter() -> None:
    """Raise ImportError, naming what to install, unless ONNX export is available.

    Raises:
        ImportError: if ``onnx`` or ``onnxscript`` is missing, or torch is older than 2.9.
    """
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < _MIN_TORCH:
        raise ImportError(
            "clip.export_onnx needs torch>=2.9 (its torch.export-based ONNX exporter); this is "
            f"torch {torch.__version__}. Upgrade with pip install 'clip-torch[onnx]' (it asks "
            "for torch>=2.9, onnx and onnxscript)"
        )
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"clip.export_onnx needs {' and '.join(missing)}; install the optional extra with "
            "pip install 'clip-torch[onnx]' (it also brings onnxruntime to run the files)"
        )


def _fp32_cpu_eval(model: CLIP) -> CLIP:
    """``model`` if it is already fp32, on the CPU and in eval mode, else such a copy."""
    tensors = [*model.parameters(), *model.buffers()]
    ready = not any(m.training for m in model.modules()) and all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
        for t in tensors
    )
    return model if ready else copy.deepcopy(model).float().cpu().eval()


def _export(
    module: nn.Module,
    example: Tensor,
    input_name: str,
    output_name: str,
    directory: Path,
    name: str,
    opset: Optional[int],
) -> Path:
    """Export ``module`` to ``directory/name.onnx`` through a temporary folder, then move."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter, not the caller's to fix
            torch.onnx.export(
                module.eval(),
                (example,),
                str(staging / f"{name}.onnx"),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes={input_name: {0: torch.export.Dim("batch")}},
                opset_version=opset,
                external_data=size > _EXTERNAL_DATA_BYTES,
                verbose=False,
            )
        for path in sorted(staging.iterdir(), key=lambda p: p.suffix == ".onnx"):
            publish(path, directory / path.name)  # the .onnx last, after its data
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / f"{name}.onnx"


# --------------------------------------------------------------------------------------------
# Towers for onnxruntime sessions (clip.onnxrt): dynamic dimensions, fusions
# --------------------------------------------------------------------------------------------


def export_tower(
    module: nn.Module, example: Tensor, dims: dict[int, str], path: Path, *, max_length: int = 0
) -> Path:
    """Export ``module`` (one tensor in, one out) to ``path`` with the named dimensions dynamic.

    Args:
        module: the tower, in eval mode, fp32 on the CPU.
        example: an example input (size ≥ 2 along each dynamic dimension).
        dims: dynamic dimensions of the input, index → name; ``"length"`` is bounded by
            ``max_length``.
        path: the ``.onnx`` file to write (its weights beside it, as ``.onnx.data``, when large).
        max_length: the largest ``"length"``.

    Returns:
        ``path``.
    """
    shapes = {
        i: torch.export.Dim(name, max=max_length) if name == "length" else torch.export.Dim(name)
        for i, name in dims.items()
    }
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    # Not under torch.no_grad(): QuickGELU's inference path (in-place ops) exports as a pattern
    # ONNX Runtime's QuickGelu fusion does not match.
    with warnings.catch_warnings(), _quiet_logs(["onnxscript", "onnx_ir", "torch.onnx"]):
        warnings.simplefilter("ignore")  # exporter chatter, not the caller's to fix
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes={"x": shapes},
            external_data=size > _EXTERNAL_DATA_BYTES,
            verbose=False,
        )
    return path


def fuse(
    path: Path, *, heads: int = 0, width: int = 0, skip_layer_norm: bool = False
) -> dict[str, int]:
    """Apply ONNX Runtime's transformer fusions to the graph at ``path``, in place.

    Uses ``onnxruntime.transformers.optimizer`` with its CLIP fusions and no approximations
    (``FastGelu`` stays off): LayerNorm, QuickGELU and GELU, and attention where its pattern
    matches. LayerNorm fused with the residual add before it (``SkipLayerNormalization``) is
    off by default: on CPUs it measured 3-4% slower than ``LayerNormalization`` and ``Add``
    (``benchmarks/onnxruntime_speed.py``, table 3).

    Args:
        path: an exported ``.onnx`` file.
        heads: attention heads of the tower (0: read from the graph).
        width: its width (0: read from the graph).
        skip_layer_norm: also fuse residual adds into ``SkipLayerNormalization``.

    Returns:
        How many nodes of each fused operator the graph now holds.
    """
    import onnxruntime.transformers as package
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("clip")
    options.enable_gelu_approximation = False  # tanh GELU: not exact
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    # The pass logs under its modules' own top-level names (fusion_attention, onnx_model...) and
    # prints a failed shape inference on stdout: neither is the caller's.
    names = ["onnxruntime", *(p.stem for p in Path(package.__file__).parent.glob("*.py"))]
    with _quiet_logs(names), contextlib.redirect_stdout(io.StringIO()):
        fused = optimize_model(
            str(path),
            model_type="clip",
            num_heads=heads,
            hidden_size=width,
            optimization_options=options,
            opt_level=0,  # the session applies ONNX Runtime's own levels
        )
        stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items()}
        external = path.with_name(path.name + ".data")
        large = external.exists()
        fused.save_model_to_file(str(path), use_external_data_format=large)
    return stats


@contextlib.contextmanager
def _quiet_logs(names: list[str]) -> Iterator[None]:
    """Keep the named loggers' records below ERROR from reaching the caller's stderr."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
