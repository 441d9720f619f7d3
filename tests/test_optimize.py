"""The opt-ins of clip.optimize: what each changes, and how far each moves the outputs.

Deviation bounds are relative to the largest magnitude of the default model's output
(``conftest.assert_rel_close``). Measured speed-ups are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from checkpoints import TINY, Arch, make_state_dict
from conftest import assert_rel_close, sample_images, sample_text
from torch import nn

import clip
from clip.model import CLIP, build_from_state_dict, convert_weights
from clip.optimize import compile_model, quantize_int8, to_channels_last


def fresh(arch_name: str) -> CLIP:
    return build_from_state_dict(make_state_dict(TINY[arch_name])).float()


def encodings(model: CLIP, arch_name: str, n_text: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (
            model.encode_image(sample_images(TINY[arch_name], 3)),
            model.encode_text(sample_text(n_text)),
        )


def test_optimize_is_exported_and_returns_the_same_model() -> None:
    model = fresh("tiny-rn")
    assert clip.optimize(model, channels_last=True) is model
    assert clip.optimize(model) is model  # nothing asked, nothing done


def test_int8_stays_within_its_documented_deviation(arch_name: str) -> None:
    image, text = encodings(fresh(arch_name), arch_name)
    model = clip.optimize(fresh(arch_name), int8=True)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert linears == []  # every plain Linear was swapped for a quantized one
    got_image, got_text = encodings(model, arch_name)
    for got, want in ((got_image, image), (got_text, text)):
        assert_rel_close(got, want, rel=5e-2)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
        assert cos.min() >= 0.99
        assert not torch.equal(got, want)  # it is an approximation, not the default path


def test_int8_refuses_half_precision_models() -> None:
    model = fresh("tiny-vit")
    convert_weights(model)
    with pytest.raises(ValueError, match="fp32"):
        quantize_int8(model)


def test_channels_last_resnet_matches_default() -> None:
    image, text = encodings(fresh("tiny-rn"), "tiny-rn")
    model = to_channels_last(fresh("tiny-rn"))
    conv = model.visual.layer1[0].conv2.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    got_image, got_text = encodings(model, "tiny-rn")
    assert_rel_close(got_image, image, rel=1e-5)
    assert torch.equal(got_text, text)  # the text tower is untouched
    assert set(model.state_dict()) == set(fresh("tiny-rn").state_dict())


def test_channels_last_refuses_a_vit() -> None:
    with pytest.raises(ValueError, match="ResNet"):
        clip.optimize(fresh("tiny-vit"), channels_last=True)


def test_compile_matches_default_and_keeps_names() -> None:
    # aot_eager traces and partitions exactly as the default inductor backend does, without the
    # C++ compile that would take minutes on CI; the benchmark runs the inductor path.
    image, text = encodings(fresh("tiny-vit"), "tiny-vit")
    model = compile_model(fresh("tiny-vit"), backend="aot_eager")
    assert isinstance(model.visual.transformer, nn.Module) and model.visual.conv1 is not None
    assert set(model.state_dict()) == set(fresh("tiny-vit").state_dict())
    got_image, got_text = encodings(model, "tiny-vit")
    assert_rel_close(got_image, image, rel=1e-5)
    assert_rel_close(got_text, text, rel=1e-5)
    # texts of another length (trimmed to a different longest prompt) still give the default
    _, other = encodings(fresh("tiny-vit"), "tiny-vit", n_text=5)
    assert_rel_close(encodings(model, "tiny-vit", n_text=5)[1], other, rel=1e-5)


class TracingRecorder:
    """A torch.compile backend that runs the graph eagerly and records inductor's freezing flag."""

    def __init__(self) -> None:
        self.freezing: list[bool] = []

    def __call__(
        self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor], **options: object
    ) -> object:
        import torch._inductor.config as inductor_config

        self.freezing.append(bool(inductor_config.freezing))
        return gm.forward


def test_compile_traces_grad_free_calls_with_freezing() -> None:
    # torch.compile(options={"freezing": True}) alone leaves dynamo's tracing unfrozen; the flag
    # must be on while the first grad-free call traces, and off for calls with gradients.
    recorder = TracingRecorder()
    model = compile_model(fresh("tiny-rn"), backend=recorder)
    encodings(model, "tiny-rn")
    assert recorder.freezing == [True, True]  # image tower, text transformer
    model.encode_image(sample_images(TINY["tiny-rn"], 3))  # gradients on: a separate trace
    assert recorder.freezing == [True, True, False]


def test_compile_with_gradients_on_matches_default_and_backpropagates() -> None:
    image, _ = encodings(fresh("tiny-vit"), "tiny-vit")
    model = compile_model(fresh("tiny-vit"), backend="aot_eager")
    encodings(model, "tiny-vit")  # the frozen path first
    got = model.encode_image(sample_images(TINY["tiny-vit"], 3))
    assert_rel_close(got.detach(), image, rel=1e-5)
    got.sum().backward()
    assert model.visual.proj.grad is not None and model.visual.proj.grad.abs().sum() > 0


def test_compile_refuses_grad_free_calls_after_weights_changed_in_place() -> None:
    model = compile_model(fresh("tiny-vit"), backend="aot_eager")
    before, _ = encodings(model, "tiny-vit")
    with torch.no_grad():
        model.visual.proj.mul_(2)  # e.g. an optimizer step or load_state_dict
    with pytest.raises(RuntimeError, match="changed in place"):
        encodings(model, "tiny-vit")
    # with gradients on, the unfrozen graph reads the edited weights
    got = model.encode_image(sample_images(TINY["tiny-vit"], 3)).detach()
    assert_rel_close(got, 2 * before, rel=1e-5)


def test_compile_without_freezing_keeps_weights_live() -> None:
    recorder = TracingRecorder()
    model = compile_model(fresh("tiny-vit"), backend=recorder, options={"freezing": False})
    before, _ = encodings(model, "tiny-vit")
    assert recorder.freezing == [False, False]
    with torch.no_grad():
        model.visual.proj.mul_(2)
    assert_rel_close(encodings(model, "tiny-vit")[0], 2 * before, rel=1e-5)


def test_compiling_again_keeps_refusing_edited_frozen_weights() -> None:
    model = compile_model(fresh("tiny-vit"), backend="aot_eager")
    encodings(model, "tiny-vit")
    with torch.no_grad():
        model.visual.proj.mul_(2)
    compile_model(model, backend="aot_eager")  # the frozen graphs of these parameters stay cached
    with pytest.raises(RuntimeError, match="build_from_state_dict"):
        encodings(model, "tiny-vit")
    rebuilt = compile_model(build_from_state_dict(model.state_dict()), backend="aot_eager")
    image, _ = encodings(rebuilt, "tiny-vit")
    assert_rel_close(
        image, encodings(build_from_state_dict(model.state_dict()), "tiny-vit")[0], rel=1e-5
    )


# One block per tower: inductor's C++ build of a tiny model still takes a minute on 2 cores.
ONE_BLOCK_VIT = Arch(32, 32, 1, 64, 16, 77, 49408, 64, 2, 1)
HAS_CXX = bool(os.environ.get("CXX") or any(map(shutil.which, ("g++", "clang++", "c++"))))


@pytest.mark.skipif(not HAS_CXX, reason="inductor's CPU backend needs a C++ compiler (g++)")
def test_compile_with_default_inductor_matches_default_and_refuses_weight_edits() -> None:
    # the path clip.optimize(compile=True) takes by default: inductor with freezing
    sd = make_state_dict(ONE_BLOCK_VIT)
    model = clip.optimize(build_from_state_dict(sd).float(), compile=True)
    default = build_from_state_dict(sd).float()
    images, texts = sample_images(ONE_BLOCK_VIT, 3), sample_text(3)
    with torch.no_grad():
        assert_rel_close(model.encode_image(images), default.encode_image(images), rel=1e-5)
        assert_rel_close(model.encode_text(texts), default.encode_text(texts), rel=1e-5)
        model.visual.proj.mul_(2)
        with pytest.raises(RuntimeError, match="changed in place"):
            model.encode_image(images)
