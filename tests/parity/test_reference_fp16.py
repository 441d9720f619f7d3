"""fp16 parity with OpenAI's reference on the CPU: the stand-in for its fp16 CUDA path.

``tests/data/reference_outputs_fp16.pt`` was recorded by ``scripts/record_reference_outputs.py``
(``--part fp16``): the reference's ``build_model(sd)`` in its mixed fp16 precision, run on the
CPU. Here ``clip.load(path, device="cpu", dtype=torch.float16)`` on the same state dict must
agree, for ViT and ResNet, image and text, on two measures, both relative to the reference's
magnitude:

* ``MAX_REL``: the largest elementwise difference over the largest |ref| (the issue's 5e-3);
* ``MEAN_REL``: the mean |ours - ref| over the mean |ref|. Two fp16 computations of the same
  thing in a different order differ by an ulp here and there (measured: at most 2.4e-4); a
  LayerNorm computed in fp16 instead of fp32 (weights and input cast to fp16) shifts nearly every
  output (measured: 9e-4 to 1.3e-3 on ViT images and on texts). The maximum cannot tell the two
  apart (both a few ulps), the mean can.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import TINY, make_state_dict, state_dict_digest

import clip

GOLDEN_PATH = Path(__file__).resolve().parent.parent / "data" / "reference_outputs_fp16.pt"
MAX_REL = 5e-3
MEAN_REL = 6e-4
RERECORD = "re-record with `python scripts/record_reference_outputs.py --part fp16`"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN_PATH, weights_only=True)


def relative_errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref| / max |ref|, mean |ours - ref| / mean |ref|), computed in float64."""
    diff = (ours.double() - ref.double()).abs()
    return float(diff.max() / ref.double().abs().max()), float(
        diff.mean() / ref.double().abs().mean()
    )


@pytest.fixture(scope="module")
def fp16_outputs(golden: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Our outputs per arch, from clip.load(..., device="cpu", dtype=torch.float16)."""
    results = {}
    for name, arch in TINY.items():
        ref = golden["archs"][name]
        sd = make_state_dict(arch, layout="openai")
        if state_dict_digest(sd) != ref["digest"]:
            pytest.fail(f"make_state_dict({name!r}) changed since the recording; {RERECORD}")
        path = tmp_path_factory.mktemp("fp16") / f"{name}.pt"
        torch.save(sd, path)
        model, _ = clip.load(str(path), device="cpu", dtype=torch.float16)
        images, ids = ref["images"], golden["token_ids"]
        with torch.no_grad():
            logits_per_image, logits_per_text = model(images, ids)
            results[name] = {
                "parameter_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                "encode_image": model.encode_image(images),
                "encode_text": model.encode_text(ids),
                "logits_per_image": logits_per_image,
                "logits_per_text": logits_per_text,
            }
    return results


@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_fp16_parameters_are_openais_mixed_layout(golden, fp16_outputs, arch_name) -> None:
    ref = golden["archs"][arch_name]
    assert fp16_outputs[arch_name]["parameter_dtypes"] == ref["parameter_dtypes"]


@pytest.mark.parametrize("output", ["encode_image", "encode_text"])
@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_fp16_embeddings_match_reference(golden, fp16_outputs, arch_name, output) -> None:
    ours, ref = fp16_outputs[arch_name][output], golden["archs"][arch_name][output]
    assert ours.dtype == ref.dtype == torch.float16 and ours.shape == ref.shape
    worst, mean = relative_errors(ours, ref)
    assert worst <= MAX_REL, f"{arch_name}/{output}: max relative error {worst:.2e}"
    assert mean <= MEAN_REL, f"{arch_name}/{output}: mean relative error {mean:.2e}"


@pytest.mark.parametrize("output", ["logits_per_image", "logits_per_text"])
@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_fp16_logits_match_reference(golden, fp16_outputs, arch_name, output) -> None:
    ours, ref = fp16_outputs[arch_name][output], golden["archs"][arch_name][output]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    worst, _ = relative_errors(ours, ref)
    assert worst <= MAX_REL, f"{arch_name}/{output}: max relative error {worst:.2e}"
