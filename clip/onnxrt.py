"""ONNX Runtime behind ``encode_image`` and ``encode_text`` (``clip.optimize(onnxruntime=True)``).

:func:`use_onnxruntime` exports the image tower (images → embeddings, dynamic batch) and the text
transformer (its [L, N, D] token stream, dynamic length and batch) to ONNX, applies ONNX Runtime's
transformer fusions to both (LayerNorm with its residual add, the MLP activation), and builds one
``onnxruntime.InferenceSession`` per tower at graph optimisation level ALL. The model stays a
:class:`clip.model.CLIP`: no module, parameter, state-dict key or method changes. Only the call of
``model.visual`` and of ``model.transformer`` is redirected (the slot ``torch.compile`` uses), so
``encode_image``, ``encode_text`` and ``forward`` keep their input checks, dtypes and shapes, and
``encode_text`` still runs only up to the batch's last end-of-text token.

A call runs in torch instead, with one warning per model (:class:`OnnxRuntimeFallbackWarning`),
when ONNX Runtime would not give what torch gives: gradients are on and something needs them, a
hook or a patched method watches the tower, the model is in training mode, a torch function or
dispatch mode (``FlopCounterMode``...) is active, or the tower's weights changed (edited in place,
replaced, moved or cast) since the sessions were built. Calls ONNX Runtime's graph does not take
(another input shape, dtype or device, an empty batch) and tracing (``torch.export``,
``torch.jit.trace``) run in torch silently. The feature methods (``encode_image_tokens``,
``encode_*_layers``, ``*_attention``) run in torch, as before, except ``encode_text_tokens``, whose
transformer call is served by the text session like ``encode_text``'s.

Costs: the first export of a tower takes seconds to a minute (ViT-B/32: ~30 s on 2 cores); the
exported files are cached on disk by weights, code and versions (:mod:`clip.onnxrt_cache`,
``$CLIP_CACHE_DIR/onnxruntime``, about the size of the fp32 weights), so a later process with the
same model builds its sessions in seconds. The sessions hold their own copy of the weights beside
the model's, and are rebuilt from the files when ``torch.get_num_threads()`` changes. Copies of
the model (``copy.deepcopy``, pickling, ``torch.save``) run in torch.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from clip.export import export_tower, fuse, require_exporter
from clip.layers import global_hooks_active, is_hooked
from clip.model import CLIP, ModifiedResNet
from clip.onnxrt_cache import ExportCache, tower_key

__all__ = [
    "LEVELS",
    "OnnxRuntimeFallbackWarning",
    "TowerSession",
    "remove_onnxruntime",
    "session_options",
    "use_onnxruntime",
]

# ONNX Runtime's graph optimisation levels, by the names accepted here.
LEVELS = ("disable", "basic", "extended", "all")


class OnnxRuntimeFallbackWarning(UserWarning):
    """A call of a model optimised with ``onnxruntime=True`` ran in torch (once per model)."""


def use_onnxruntime(
    model: CLIP,
    *,
    text: bool = True,
    level: str = "all",
    fusions: bool = True,
    spinning: bool = False,
    cache: Union[bool, str, os.PathLike[str]] = True,
) -> CLIP:
    """Run ``model``'s image tower and text transformer through ONNX Runtime, in place.

    See the module's documentation for what runs where. Calling it again rebuilds the sessions
    from the model's current weights (e.g. after editing them).

    Args:
        model: a :class:`clip.model.CLIP` on the CPU in fp32 (not quantized, not compiled).
        text: also the text transformer (else only the image tower).
        level: ONNX Runtime's graph optimisation level, one of :data:`LEVELS`.
        fusions: apply ONNX Runtime's transformer fusions (``onnxruntime.transformers``:
            LayerNorm with its residual add, QuickGELU/GELU) to the exported graphs first.
        spinning: let ONNX Runtime's idle worker threads spin (lower latency, but they take CPU
            from whatever else runs, e.g. image decoding or torch's own threads).
        cache: keep the exported towers on disk, so that the next process with the same
            weights skips the export (:mod:`clip.onnxrt_cache`): True for
            ``$CLIP_CACHE_DIR/onnxruntime`` (default ``~/.cache/clip/onnxruntime``), a folder,
            or False to export into a temporary folder removed with the model.

    Returns:
        The same ``model`` object.

    Raises:
        ImportError: if onnxruntime, onnx or onnxscript is missing, or torch is older than 2.9
            (``pip install 'clip-torch[onnx]'``).
        TypeError: if ``model`` is not a :class:`clip.model.CLIP`.
        ValueError: if the model is not fp32 on the CPU, is int8-quantized or compiled, or
            ``level`` is unknown.
    """
    require_exporter()
    _require_onnxruntime()
    _check_model(model, level)
    remove_onnxruntime(model)
    owner = ModelSessions(level=level, spinning=spinning)
    store = None if cache is False else ExportCache(None if cache is True else cache)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # export what inference computes (BatchNorm statistics, no dropout)
    config = model.config
    res, length = model.visual.input_resolution, model.context_length
    width = config.transformer_width
    # the fusion pass's attention search wants a ViT's heads and width (0: read from the graph)
    vit = not isinstance(model.visual, ModifiedResNet)
    sizes = (config.vision_heads, config.vision_width, length) if vit else (0, 0, length)
    images = torch.zeros(2, 3, res, res)
    exports = [_Export(model.visual, images, {0: "batch"}, "visual", sizes, fusions)]
    if text:
        tokens, dims = torch.zeros(length, 2, width), {0: "length", 1: "batch"}
        text_sizes = (config.transformer_heads, width, length)
        exports.append(_Export(model.transformer, tokens, dims, "textual", text_sizes, fusions))
    try:
        sessions = []
        for export in exports:
            module, name = export.module, export.name
            key = None if store is None else tower_key(module, export.settings())
            if store is None or key is None:
                folder, info = owner.directory, export(owner.directory)
            else:
                folder, info = store.get(key, export)
            owner.fused[name] = info["fused"]
            sessions.append(TowerSession(owner, module, folder / f"{name}.onnx", name))
    finally:
        for module, mode in modes:
            module.training = mode
    for session in sessions:
        session.install()
    return model


class _Export:
    """Exports one tower (and fuses it) into a folder: what :class:`ExportCache` builds."""

    def __init__(
        self,
        module: nn.Module,
        example: Tensor,
        dims: dict[int, str],
        name: str,
        sizes: tuple[int, int, int],
        fusions: bool,
    ) -> None:
        self.module, self.example, self.dims, self.name = module, example, dims, name
        self.heads, self.width, self.max_length = sizes  # heads, width: 0 = read from the graph
        self.fusions = fusions

    def settings(self) -> dict[str, Any]:
        """What the graph depends on besides the module: part of its cache key."""
        shape = list(self.example.shape)
        sizes = [self.heads, self.width, self.max_length]
        return {
            "tower": self.name,
            "example": shape,
            "dims": self.dims,
            "sizes": sizes,
            "fusions": self.fusions,
        }

    def __call__(self, folder: Path) -> dict[str, Any]:
        path = folder / f"{self.name}.onnx"
        export_tower(self.module, self.example, self.dims, path, max_length=self.max_length)
        return {"fused": fuse(path, heads=self.heads, width=self.width) if self.fusions else {}}


def remove_onnxruntime(model: CLIP) -> CLIP:
    """Undo :func:`use_onnxruntime`: both towers run in torch again (a no-op if they do).

    Args:
        model: the model.

    Returns:
        The same ``model`` object.
    """
    for module in (model.visual, model.transformer):
        if isinstance(module._compiled_call_impl, TowerSession):
            module._compiled_call_impl = None
    return model


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "clip.optimize(model, onnxruntime=True) needs onnxruntime; install it with "
            "pip install 'clip-torch[onnx]'"
        ) from e


def _check_model(model: CLIP, level: str) -> None:
    if not isinstance(model, CLIP):
        raise TypeError(
            f"onnxruntime=True needs a clip.model.CLIP, got {type(model).__name__}; "
            "load it with clip.load(..., jit=False)"
        )
    if level not in LEVELS:
        raise ValueError(f"unknown onnxruntime optimisation level {level!r}; use one of {LEVELS}")
    weight = model.token_embedding.weight
    if weight.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"onnxruntime=True runs on the CPU in fp32; this model is on {weight.device} in "
            f"{model.dtype}: load it with clip.load(name, device='cpu')"
        )
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        raise ValueError(
            "this model is int8-quantized (clip.optimize(int8=True)), which onnxruntime=True "
            "cannot export: optimize a fresh fp32 model with one of the two"
        )
    for module in (model.visual, model.transformer):
        impl = module._compiled_call_impl
        if impl is not None and not isinstance(impl, TowerSession):
            raise ValueError(
                f"model.{'visual' if module is model.visual else 'transformer'} is compiled "
                "(clip.optimize(compile=True)); onnxruntime=True replaces the same call: "
                "optimize a fresh model with one of the two"
            )


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------


class ModelSessions:
    """What the sessions of one model share: the folder of exported files (removed with this
    object), the options, the one warning."""

    def __init__(self, *, level: str, spinning: bool) -> None:
        self._directory: Optional[Path] = None
        self.level = level
        self.spinning = spinning
        self.fused: dict[str, dict[str, int]] = {}
        self.warned = False

    @property
    def directory(self) -> Path:
        """A temporary folder for towers exported without the cache, removed with this object."""
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="clip-onnxruntime-"))
            weakref.finalize(self, shutil.rmtree, self._directory, True)
        return self._directory

    def warn_once(self, what: str, reason: str) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"clip.optimize(onnxruntime=True): a call of model.{what} ran in torch, not "
            f"onnxruntime, because {reason}. This warning is given once per model",
            OnnxRuntimeFallbackWarning,
            stacklevel=_caller_stacklevel(),
        )

    def options(self, threads: int) -> Any:
        return session_options(self.level, threads=threads, spinning=self.spinning)


def session_options(level: str = "all", *, threads: int, spinning: bool = False) -> Any:
    """ONNX Runtime session options for a CPU session as :func:`use_onnxruntime` builds them.

    Args:
        level: the graph optimisation level, one of :data:`LEVELS` (ONNX Runtime's default is
            ``"all"``).
        threads: intra-op threads (``torch.get_num_threads()`` for the model's sessions).
        spinning: let idle worker threads spin instead of sleeping.

    Returns:
        An ``onnxruntime.SessionOptions``.
    """
    import onnxruntime as ort

    levels = ort.GraphOptimizationLevel
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": levels.ORT_DISABLE_ALL,
        "basic": levels.ORT_ENABLE_BASIC,
        "extended": levels.ORT_ENABLE_EXTENDED,
        "all": levels.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    spin = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


class TowerSession:
    """An ONNX Runtime session standing in for one tower's call (``module._compiled_call_impl``).

    Remembers what the tower was when exported (its tensors, their in-place edit counters, the
    code of its classes) and runs the session only while all of it is unchanged and the call is
    one ONNX Runtime computes exactly as torch would; otherwise the tower's own call runs.
    """

    def __init__(self, owner: ModelSessions, module: nn.Module, path: Path, name: str) -> None:
        self.owner = owner
        self.module = module
        self.path = path
        self.name = name
        self.what = "encode_image" if name == "visual" else "encode_text"
        self.lock = threading.Lock()
        self.session: Any = None
        self.threads = 0
        self.runs = 0  # calls the session served
        modules = list(_walk(module))
        self.code = {cls: _functions(cls) for cls in {type(m) for m in modules}}
        self.state = _tensor_states(modules)
        # the input's fixed sizes: [B, 3, R, R] images, or [L, N, D] text tokens
        side = getattr(module, "input_resolution", 0)
        self.fixed = (3, side, side) if name == "visual" else (getattr(module, "width", 0),)
        self.ensure_session()  # built now: errors show at optimize, not at the first call

    def install(self) -> None:
        self.module._compiled_call_impl = self

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Copies (deepcopy, pickle, torch.save) of the model run in torch: sessions are not
        # copyable, and a copy's tensors are other tensors.
        return (type(None), ())

    def ensure_session(self) -> Any:
        """The session, (re)built for ``torch.get_num_threads()`` threads."""
        threads = torch.get_num_threads()
        with self.lock:
            if self.session is None or self.threads != threads:
                import onnxruntime as ort

                self.session = None  # free the old one's memory first
                self.session = ort.InferenceSession(
                    str(self.path), self.owner.options(threads), providers=["CPUExecutionProvider"]
                )
                self.threads = threads
            return self.session

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs or not self.takes(args[0]) or _tracing():
            return self.module._call_impl(*args, **kwargs)
        x: Tensor = args[0]
        reason = self.reason_for_torch(x)
        if reason is not None:
            self.owner.warn_once(self.what, reason)
            return self.module._call_impl(*args, **kwargs)
        try:
            session = self.ensure_session()
        except Exception as e:  # rebuilt for another thread count from files since deleted
            reason = (
                f"its session could not be rebuilt from {self.path} ({type(e).__name__}): call "
                "clip.optimize(model, onnxruntime=True) again"
            )
            self.owner.warn_once(self.what, reason)
            return self.module._call_impl(*args, **kwargs)
        array = x.detach().contiguous().numpy()
        out = torch.from_numpy(session.run(["y"], {"x": array})[0])
        self.runs += 1
        return out

    def takes(self, x: Any) -> bool:
        """Whether the exported graph takes ``x`` (else torch runs, and raises if it must)."""
        if not isinstance(x, Tensor) or x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        if self.name == "visual":  # at the tower's current resolution (a change warns, below)
            side = getattr(self.module, "input_resolution", 0)
            return x.dim() == 4 and x.shape[0] > 0 and tuple(x.shape[1:]) == (3, side, side)
        return x.dim() == 3 and x.shape[0] > 0 and x.shape[1] > 0 and x.shape[2:] == self.fixed

    def reason_for_torch(self, x: Tensor) -> Optional[str]:
        """Why this call must run in torch, or None when the session gives the same result."""
        modules = list(_walk(self.module))
        classes = {type(m) for m in modules}
        # a hook, a method replaced on a class or an instance, a module class added since export
        hooked = global_hooks_active() or any(self.code.get(c) != _functions(c) for c in classes)
        hooked = hooked or any(
            is_hooked(m) or not self.code[type(m)].names.isdisjoint(m.__dict__) for m in modules
        )
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for m in modules for p in m.parameters(recurse=False))
        )
        if needs_grad:
            return (
                "gradients are on and the output needs them: call it under torch.no_grad() or "
                "torch.inference_mode() to use onnxruntime"
            )
        if any(m.training for m in modules):
            return "the model is in training mode: call model.eval() to use onnxruntime"
        if hooked:
            return "a hook or a patched method observes the tower: remove it to use onnxruntime"
        if _modes_active():
            return "a torch function or dispatch mode (e.g. FlopCounterMode) is active"
        if _tensor_states(modules) != self.state or x.shape[-len(self.fixed) :] != self.fixed:
            return (
                "the tower's weights (or input resolution) changed since its onnxruntime "
                "session was built: call clip.optimize(model, onnxruntime=True) again to rebuild it"
            )
        return None


class _Functions(tuple[tuple[str, Any], ...]):
    """The functions of a class (and its bases below ``nn.Module``), with their names."""

    names: frozenset[str]


def _functions(cls: type) -> _Functions:
    items = [
        (name, value)
        for base in cls.__mro__
        if base not in (nn.Module, object)
        for name, value in vars(base).items()
        if callable(value) or isinstance(value, (property, staticmethod, classmethod))
    ]
    result = _Functions(items)
    result.names = frozenset(name for name, _ in items if not name.startswith("__"))
    return result


def _walk(root: nn.Module) -> Iterator[nn.Module]:
    stack = [root]
    while stack:
        module = stack.pop()
        yield module
        stack.extend(m for m in module._modules.values() if m is not None)


def _tensor_states(modules: list[nn.Module]) -> tuple[tuple[int, int, int], ...]:
    """Identity of every parameter's and buffer's contents (object, storage, in-place edits),
    as :meth:`TowerSession.reason_for_torch` computes it."""
    states = []
    for module in modules:
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is None:
                    states.append((id(module), hash(name), 0))
                    continue
                try:
                    version = t._version
                except RuntimeError:  # an inference tensor: no version counter
                    version = -1
                states.append((id(t), t.data_ptr(), version))
    return tuple(states)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside clip and torch."""
    inside = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__ or ""))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _tracing() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


def _modes_active() -> bool:
    """Whether a TorchFunctionMode or TorchDispatchMode is active (they watch torch ops)."""
    lengths = ("_len_torch_function_stack", "_len_torch_dispatch_stack")
    return any(getattr(torch._C, name, lambda: 0)() for name in lengths)
