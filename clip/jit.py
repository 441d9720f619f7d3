"""``clip.load(..., jit=True)``: our model traced to TorchScript, and kept right when it moves.

A traced graph records the device and the dtype casts of the run it was traced from: a model traced
on the CPU in fp32 keeps creating index tensors on the CPU and casting its inputs to fp32 after
``.cuda().half()``. OpenAI's ``clip.load`` rewrites those constants in the released graphs once, at
load time, for the requested device (and, on the CPU, from fp16 to fp32); a later ``.to()`` is not
followed. :class:`TracedCLIP` instead re-traces itself from the eager model whenever ``.to()``,
``.cuda()``, ``.cpu()``, ``.float()``, ``.half()``, ``.bfloat16()`` or ``.type()`` changes the
device or dtype of any of its tensors, so the graph always matches where and how its weights live.

What the traced module exposes, as OpenAI's archives do: ``encode_image``, ``encode_text``,
``forward``, and the 0-d int64 tensors ``input_resolution``, ``context_length`` and ``vocab_size``
(also in its state dict, as in the archives). Its state dict has exactly the keys of an OpenAI
archive. Added for code written against the eager model: ``model.dtype``,
``model.visual.input_resolution`` (an int) and ``model.config`` (the eager model's
:class:`clip.config.CLIPConfig`: activation, head width, preprocessing).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from clip.config import CLIPConfig
from clip.model import CLIP

__all__ = ["TracedCLIP", "trace"]


def trace(model: CLIP) -> TracedCLIP:
    """Trace ``model`` on its device and in its dtypes, as ``clip.load(..., jit=True)`` does.

    The returned module shares ``model``'s parameters and keeps ``model`` to re-trace from when
    it is moved or cast as a whole (see :class:`TracedCLIP`); do not keep using ``model``
    itself.

    Args:
        model: an eager :class:`clip.model.CLIP` (eval mode), on any device, in any dtype layout.

    Returns:
        The traced module, with ``encode_image``, ``encode_text`` and ``forward``.
    """
    # trace_module gives a TracedModule wrapper; OpenAI's torch.jit.load'ed archives (and this
    # class) are RecursiveScriptModules around the same C++ module.
    traced = torch.jit._recursive.wrap_cpp_module(_trace_module(model)._c)
    traced.__class__ = TracedCLIP
    traced.__dict__["_eager"] = model
    traced._adopt()
    return traced


class TracedCLIP(torch.jit.RecursiveScriptModule):
    """A traced CLIP that follows whole-model moves and casts by re-tracing itself.

    Moving or casting the whole module (``model.to(...)``, ``.cuda()``, ``.cpu()``, ``.float()``,
    ``.half()``...) re-traces it from the eager model it was built from, holding the moved
    tensors: a second or so for a full-size model, only when a device or dtype changed. Where
    TorchScript cannot trace (``"meta"``: its convolution shape checks fail under the tracer) the
    move raises ``RuntimeError``. Moving a submodule alone (``model.visual.cuda()``) is not
    followed: move the whole model.
    ``torch.jit.save`` writes an ordinary archive (the graph for the current device and dtypes);
    ``clip.load`` reads it back like OpenAI's.
    """

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the image tower's first convolution (what input images are cast to)."""
        return self.visual.conv1.weight.dtype

    @property
    def config(self) -> CLIPConfig:
        """The configuration of the eager model this module was traced from."""
        eager: CLIP = self.__dict__["_eager"]
        return eager.config

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TracedCLIP:
        super()._apply(fn, recurse)
        if _layout(self) != self.__dict__["_layout"]:
            self._retrace(fn)
        return self

    def __deepcopy__(self, memo: Optional[dict[int, Any]]) -> TracedCLIP:
        import copy

        eager = copy.deepcopy(self.__dict__["_eager"], memo)
        return trace(eager)

    def _retrace(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Point the eager model at this module's (moved) tensors and trace it again in place."""
        eager: CLIP = self.__dict__["_eager"]
        own: dict[str, Tensor] = dict(self.named_parameters(remove_duplicate=False))
        own.update(self.named_buffers(remove_duplicate=False))
        tensors: dict[str, Tensor] = dict(eager.named_parameters(remove_duplicate=False))
        tensors.update(eager.named_buffers(remove_duplicate=False))
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = eager.get_submodule(owner_name)
            store: dict[str, Any] = (
                owner._parameters if leaf in owner._parameters else owner._buffers
            )
            # tensors the graph does not hold (the causal masks) are converted like the rest
            store[leaf] = own[name] if name in own else fn(tensor)
        try:
            fresh = _trace_module(eager)
        except Exception as e:  # e.g. TorchScript cannot trace convolutions on "meta"
            where = sorted({f"{d}/{str(t).removeprefix('torch.')}" for d, t in _layout(self)})
            raise RuntimeError(
                f"this jit=True model was moved or cast to {', '.join(where)}, where it cannot "
                f"be traced again ({type(e).__name__}: {e}); its traced code no longer matches "
                "its weights. Use the eager model there instead: clip.load(name, jit=False), "
                "then .to(...)"
            ) from e
        self._reconstruct(fresh._c)
        self._adopt()

    def _adopt(self) -> None:
        """Python-side attributes that a (re-)trace does not carry."""
        eager: CLIP = self.__dict__["_eager"]
        self.visual.__dict__["input_resolution"] = int(eager.visual.input_resolution)
        self.__dict__["_layout"] = _layout(self)


def _layout(module: nn.Module) -> list[tuple[torch.device, torch.dtype]]:
    """Device and dtype of every parameter and buffer: what a traced graph depends on."""
    tensors = [*module.parameters(), *module.buffers()]
    return [(t.device, t.dtype) for t in tensors]


class _Archive(nn.Module):
    """What is traced: ``model``'s children and parameters at the top level (so the module tree
    and state-dict keys are the model's), plus the archive's 0-d tensors; its methods run
    ``model``'s."""

    model: CLIP

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.__dict__["model"] = model  # not a child: its children are ours
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        device = model.token_embedding.weight.device
        # the 0-d tensors OpenAI's archives carry beside the weights, read as model.<name>.item()
        values = {
            "input_resolution": model.visual.input_resolution,
            "context_length": model.context_length,
            "vocab_size": model.vocab_size,
        }
        for name, value in values.items():
            self.register_buffer(name, torch.tensor(int(value), device=device))

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(image, text)

    def encode_image(self, image: Tensor) -> Tensor:
        return self.model.encode_image(image)

    def encode_text(self, text: Tensor) -> Tensor:
        return self.model.encode_text(text)


def _trace_module(model: CLIP) -> torch.jit.ScriptModule:
    """Trace ``encode_image``, ``encode_text`` and ``forward`` of ``model`` on its device."""
    res = model.visual.input_resolution
    device = model.visual.conv1.weight.device
    image = torch.zeros(1, 3, res, res, device=device)
    text = torch.zeros(1, model.context_length, dtype=torch.long, device=device)
    text[:, 1] = model.vocab_size - 1  # the end-of-text token is the row's largest id
    inputs = {"forward": (image, text), "encode_image": (image,), "encode_text": (text,)}
    with warnings.catch_warnings(), _causal_masks_as_constants(model):
        # Tracing is what the caller asked for; torch's deprecation notice is not theirs to fix.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        return torch.jit.trace_module(_Archive(model), inputs, check_trace=False)


@contextmanager
def _causal_masks_as_constants(model: nn.Module) -> Iterator[None]:
    """Keep the text blocks' causal masks out of the traced module's tensors.

    They are derived data, not weights: OpenAI's archives and state dicts have no ``attn_mask``
    keys, and the non-persistent buffers of an eager model become ordinary ones in TorchScript.
    While tracing, each mask is a plain attribute (a graph constant if the code reads it at all;
    a re-trace after a move converts it with the weights).
    """
    hidden = []
    for module in model.modules():
        mask = module._buffers.get("attn_mask")
        if mask is not None:
            del module._buffers["attn_mask"]
            module.__dict__["attn_mask"] = mask
            hidden.append((module, mask))
    try:
        yield
    finally:
        for module, mask in hidden:
            del module.__dict__["attn_mask"]
            module._buffers["attn_mask"] = mask
