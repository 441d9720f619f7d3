"""clip.wise_ft: weight-space interpolation of a zero-shot and a fine-tuned CLIP."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import clip
from clip.config import CLIPConfig
from clip.model import CLIP
from clip.preprocess import PreprocessConfig

VIT = CLIPConfig(32, 32, 1, 64, 16, 8, 100, 64, 1, 1)
RN = CLIPConfig(32, 32, (1, 1, 1, 1), 8, None, 8, 100, 64, 1, 1)


def build(config: CLIPConfig, seed: int) -> CLIP:
    torch.manual_seed(seed)
    return CLIP.from_config(config).eval()


def pair(config: CLIPConfig = VIT) -> tuple[CLIP, CLIP]:
    """A model and a 'fine-tuned' copy whose every float tensor differs."""
    zero_shot = build(config, 0)
    finetuned = copy.deepcopy(zero_shot)
    with torch.no_grad():
        for tensor in finetuned.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
            else:  # BatchNorm's num_batches_tracked
                tensor.fill_(7)
    return zero_shot, finetuned


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in actual:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("config", [VIT, RN], ids=["vit", "rn"])
def test_endpoints_are_bitwise_the_two_models(config: CLIPConfig) -> None:
    zero_shot, finetuned = pair(config)
    assert_bitwise(clip.wise_ft(zero_shot, finetuned, 0.0).state_dict(), zero_shot.state_dict())
    assert_bitwise(clip.wise_ft(zero_shot, finetuned, 1.0).state_dict(), finetuned.state_dict())


@pytest.mark.parametrize("config", [VIT, RN], ids=["vit", "rn"])
def test_interior_alpha_averages_floats_and_takes_counters_from_the_nearer_model(
    config: CLIPConfig,
) -> None:
    zero_shot, finetuned = pair(config)
    a, b = zero_shot.state_dict(), finetuned.state_dict()
    for alpha in (0.25, 0.5, 0.75):
        mixed = clip.wise_ft(zero_shot, finetuned, alpha).state_dict()
        for key, value in mixed.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, (1 - alpha) * a[key] + alpha * b[key])
            else:
                assert torch.equal(value, a[key] if alpha < 0.5 else b[key]), key


def test_result_is_a_new_model_and_inputs_are_unchanged() -> None:
    zero_shot, finetuned = pair()
    before_a, before_b = snapshot(zero_shot), snapshot(finetuned)
    result = clip.wise_ft(zero_shot, finetuned, 0.0)
    assert result is not zero_shot
    with torch.no_grad():
        for p in result.parameters():
            p.add_(1.0)  # would show in an input sharing storage with the result
    assert_bitwise(zero_shot.state_dict(), before_a)
    assert_bitwise(finetuned.state_dict(), before_b)


def test_result_keeps_the_zero_shot_models_config_mode_and_flags_without_grads() -> None:
    zero_shot, finetuned = pair()
    zero_shot.train()
    zero_shot.visual.requires_grad_(False)
    zero_shot.logit_scale.grad = torch.ones(())
    result = clip.wise_ft(zero_shot, finetuned, 0.5)
    assert type(result) is CLIP
    assert result.config == zero_shot.config == VIT
    assert result.training
    flags = {n: p.requires_grad for n, p in result.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in zero_shot.named_parameters()}
    assert not flags["visual.conv1.weight"] and flags["token_embedding.weight"]
    assert all(p.grad is None for p in result.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tensors_fine_tuning_left_unchanged_stay_exact_at_any_alpha(dtype: torch.dtype) -> None:
    zero_shot = build(VIT, 0).to(dtype)
    finetuned = copy.deepcopy(zero_shot).float()  # a locked image tower: only text trained
    with torch.no_grad():
        finetuned.token_embedding.weight.add_(0.5)
    result = clip.wise_ft(zero_shot, finetuned, 0.37)
    for key, value in result.visual.state_dict().items():
        assert torch.equal(value, zero_shot.visual.state_dict()[key]), key
    assert not torch.equal(result.token_embedding.weight, zero_shot.token_embedding.weight)


def test_fp16_zero_shot_with_fp32_finetuned_interpolates_in_fp32_and_stays_fp16() -> None:
    zero_shot, finetuned = pair()
    zero_shot.half()
    result = clip.wise_ft(zero_shot, finetuned, 0.3)
    a, b = zero_shot.state_dict(), finetuned.state_dict()
    for key, value in result.state_dict().items():
        assert value.dtype == a[key].dtype, key
        if not value.is_floating_point():
            continue
        exact = 0.7 * a[key].double() + 0.3 * b[key].double()
        # rounded once from a float32 value: within one fp16 ulp of the exact mix
        ulp = torch.finfo(torch.float16).eps * exact.abs() + 2**-24
        assert bool(((value.double() - exact).abs() <= ulp).all()), key
    one = clip.wise_ft(zero_shot, finetuned, 1.0).state_dict()
    assert_bitwise(one, {k: v.to(a[k].dtype) for k, v in b.items()})


def test_alpha_may_be_an_int_a_numpy_or_a_tensor_scalar() -> None:
    zero_shot, finetuned = pair()
    half = clip.wise_ft(zero_shot, finetuned, 0.5).state_dict()
    for alpha in (np.float64(0.5), torch.linspace(0, 1, 3)[1], np.linspace(0, 1, 3)[1]):
        assert_bitwise(clip.wise_ft(zero_shot, finetuned, alpha).state_dict(), half)  # type: ignore[arg-type]
    assert_bitwise(clip.wise_ft(zero_shot, finetuned, 1).state_dict(), finetuned.state_dict())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_alpha_outside_zero_one_is_refused(alpha: float) -> None:
    zero_shot, finetuned = pair()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        clip.wise_ft(zero_shot, finetuned, alpha)


@pytest.mark.parametrize("alpha", [True, "0.5", None, torch.ones(2)])
def test_alpha_that_is_not_a_number_is_refused(alpha: object) -> None:
    zero_shot, finetuned = pair()
    with pytest.raises(TypeError, match="alpha must be a number"):
        clip.wise_ft(zero_shot, finetuned, alpha)  # type: ignore[arg-type]


def test_vit_and_resnet_are_refused_naming_a_differing_key() -> None:
    with pytest.raises(ValueError, match=r"different architectures.*vision_layers"):
        clip.wise_ft(build(VIT, 0), build(RN, 0), 0.5)
    with pytest.raises(
        ValueError, match=r"different architectures.*lack 'visual\.class_embedding'"
    ):
        clip.wise_ft(build(VIT, 0), build(RN, 0).state_dict(), 0.5)


def test_different_widths_are_refused_naming_the_key_and_shapes() -> None:
    wider = build(VIT.replace(embed_dim=64), 0).state_dict()
    with pytest.raises(
        ValueError,
        match=r"'text_projection' is \(64, 32\) in the zero-shot model and \(64, 64\) in the fine",
    ):
        clip.wise_ft(build(VIT, 0), wider, 0.5)


def test_different_activation_with_equal_shapes_is_refused() -> None:
    gelu = build(VIT.replace(activation="gelu"), 0)
    with pytest.raises(ValueError, match="activation: 'quick_gelu' vs 'gelu'"):
        clip.wise_ft(build(VIT, 0), gelu, 0.5)


def test_different_preprocessing_warns_and_keeps_the_zero_shot_one() -> None:
    other = PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    finetuned = build(VIT.replace(preprocess=other), 1)
    with pytest.warns(UserWarning, match="preprocess images differently"):
        result = clip.wise_ft(build(VIT, 0), finetuned, 0.5)
    assert result.config.preprocess == VIT.preprocess


def test_finetuned_state_dict_with_or_without_ddp_prefix_is_accepted() -> None:
    zero_shot, finetuned = pair()
    expected = clip.wise_ft(zero_shot, finetuned, 0.5).state_dict()
    plain = finetuned.state_dict()
    prefixed = {f"module.{k}": v for k, v in plain.items()}
    for weights in (plain, prefixed):
        assert_bitwise(clip.wise_ft(zero_shot, weights, 0.5).state_dict(), expected)


def test_training_checkpoint_instead_of_state_dict_is_refused() -> None:
    zero_shot, finetuned = pair()
    checkpoint = {"epoch": 3, "state_dict": finetuned.state_dict()}
    with pytest.raises(TypeError, match=r"finetuned_model\['epoch'\].*checkpoint\['state_dict'\]"):
        clip.wise_ft(zero_shot, checkpoint, 0.5)  # type: ignore[arg-type]


def test_dataparallel_and_compiled_models_are_unwrapped() -> None:
    zero_shot, finetuned = pair()
    expected = clip.wise_ft(zero_shot, finetuned, 0.5).state_dict()
    wrapped = clip.wise_ft(nn.DataParallel(zero_shot), torch.compile(finetuned), 0.5)
    assert type(wrapped) is CLIP
    assert_bitwise(wrapped.state_dict(), expected)


def test_ddp_wrapped_models_are_unwrapped(tmp_path: Path) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        zero_shot, finetuned = pair()
        expected = clip.wise_ft(zero_shot, finetuned, 0.5).state_dict()
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(finetuned))
        assert_bitwise(clip.wise_ft(zero_shot, ddp, 0.5).state_dict(), expected)
    finally:
        dist.destroy_process_group()


def test_traced_model_is_refused_with_the_jit_false_fix() -> None:
    from clip.jit import trace

    zero_shot, finetuned = pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(copy.deepcopy(zero_shot))
    with pytest.raises(TypeError, match=r"zero_shot_model is a TorchScript.*jit=False"):
        clip.wise_ft(traced, finetuned, 0.5)
    with pytest.raises(TypeError, match=r"finetuned_model is a TorchScript"):
        clip.wise_ft(zero_shot, traced, 0.5)


def test_a_module_that_is_not_a_clip_is_refused() -> None:
    with pytest.raises(TypeError, match=r"zero_shot_model must be a clip\.model\.CLIP.*Linear"):
        clip.wise_ft(nn.Linear(2, 2), build(VIT, 0), 0.5)


def test_weights_on_the_meta_device_are_refused() -> None:
    with torch.device("meta"):
        empty = CLIP.from_config(VIT)
    with pytest.raises(ValueError, match=r"fine-tuned model's .* meta device"):
        clip.wise_ft(build(VIT, 0), empty, 0.5)
