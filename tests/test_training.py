"""The fine-tuning pieces: parameter groups, AdamW, the cosine schedule, the logit-scale clamp,
tower locking, precision (an fp16-layout model trains without NaN on the CPU) and train_step."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from clip.config import CLIPConfig
from clip.freeze import is_batchnorm_locked, lock_image_tower, lock_text_tower
from clip.model import CLIP, convert_weights
from clip.optim import (
    BETAS,
    DEFAULT_WEIGHT_DECAY,
    EPS,
    MAX_LOGIT_SCALE,
    CosineWithWarmup,
    clamp_logit_scale,
    cosine_schedule,
    make_optimizer,
    param_groups,
)
from clip.precision import Precision, prepare_for_training
from clip.training import ContrastiveForward, batch_loss, train_step

VIT = CLIPConfig(16, 32, 2, 64, 16, 77, 49408, 64, 1, 2)
RESNET = CLIPConfig(16, 32, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1)


def tiny(config: CLIPConfig = VIT, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP.from_config(config)


def pairs(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random 32x32 images and n distinct 5-token captions (SOT ... EOT)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    texts = torch.zeros(n, 77, dtype=torch.long)
    texts[:, 0] = 49406
    texts[:, 1:6] = torch.randint(1, 49405, (n, 5), generator=generator)
    texts[:, 6] = 49407
    return images, texts


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


# ---- parameter groups, optimiser --------------------------------------------------------

MATRIX = re.compile(
    r"(conv\d|downsample\.0|[qkvc]_proj|out_proj|c_fc)\.weight$|in_proj_weight$"
    r"|^text_projection$|^visual\.proj$"
)
NO_DECAY_NAMED = {
    "logit_scale",
    "positional_embedding",
    "token_embedding.weight",
    "ln_final.weight",
    "ln_final.bias",
}


@pytest.mark.parametrize("config", [VIT, RESNET], ids=["vit", "resnet"])
def test_param_groups_decay_matrices_only(config: CLIPConfig) -> None:
    model = tiny(config)
    decay, no_decay = param_groups(model, weight_decay=0.2)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    every = [n for n, _ in model.named_parameters()]
    assert sorted(decay["param_names"] + no_decay["param_names"]) == sorted(every)
    assert set(decay["param_names"]) == {n for n in every if MATRIX.search(n)}
    if config is VIT:
        special = {"visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight"}
    else:
        special = {"visual.attnpool.positional_embedding", "visual.bn1.weight", "visual.bn1.bias"}
    assert NO_DECAY_NAMED | special <= set(no_decay["param_names"])
    by_name = dict(model.named_parameters())
    for group in (decay, no_decay):
        assert all(p is by_name[n] for p, n in zip(group["params"], group["param_names"]))


def test_param_groups_leave_out_frozen_parameters_and_refuse_an_all_frozen_model() -> None:
    model = tiny()
    lock_image_tower(model)
    grouped = {n for g in param_groups(model) for n in g["param_names"]}
    assert grouped == trainable(model) and not any(n.startswith("visual.") for n in grouped)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        param_groups(model)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(tiny(), weight_decay=-0.1)


def test_make_optimizer_is_adamw_with_clip_betas_eps_and_the_groups() -> None:
    model = tiny()
    optimizer = make_optimizer(model, lr=3e-5)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [DEFAULT_WEIGHT_DECAY, 0.0]
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (3e-5, BETAS, EPS)
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_optimizer(model, lr=0)


# ---- schedule -----------------------------------------------------------------------------


def sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def lrs(scheduler: Any, steps: int) -> list[float]:
    """The lr each of ``steps`` optimiser steps trains with."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero() -> None:
    got = lrs(cosine_schedule(sgd(2.0), warmup_steps=4, total_steps=12), 14)
    cosine = [1 + math.cos(math.pi * k / 8) for k in range(8)]  # 2 * ½ (1 + cos)
    expected = [0.5, 1.0, 1.5, 2.0, *cosine, 0.0, 0.0]
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(lr > 0 for lr in got[:12])


def test_cosine_schedule_without_warmup_starts_at_the_peak() -> None:
    got = lrs(cosine_schedule(sgd(1.0), warmup_steps=0, total_steps=4), 5)
    assert got == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5**1.5, 0])


def test_cosine_schedule_resumes_from_its_state_dict() -> None:
    scheduler = cosine_schedule(sgd(1e-3), warmup_steps=3, total_steps=10)
    uninterrupted = lrs(scheduler, 10)
    first = cosine_schedule(sgd(1e-3), warmup_steps=3, total_steps=10)
    lrs(first, 4)
    state = {"optimizer": first.optimizer.state_dict(), "scheduler": first.state_dict()}
    resumed = cosine_schedule(sgd(1e-3), warmup_steps=3, total_steps=10)
    resumed.optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert lrs(resumed, 6) == uninterrupted[4:]
    assert state["scheduler"]["lr_lambdas"] == [{"warmup_steps": 3, "total_steps": 10}]


@pytest.mark.parametrize(
    ("warmup", "total", "match"),
    [
        (5, 4, "longer than the whole run"),
        (-1, 4, "warmup_steps must be"),
        (0, 0, "total_steps must be >= 1"),
        (1.5, 4, "non-negative int"),
        (0, True, "total_steps"),
    ],
)
def test_cosine_schedule_refuses_bad_step_counts(warmup: Any, total: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cosine_schedule(sgd(), warmup, total)


def test_cosine_factor_is_zero_after_the_run() -> None:
    assert CosineWithWarmup(2, 5)(5) == 0.0 and CosineWithWarmup(2, 5)(100) == 0.0


# ---- logit scale ----------------------------------------------------------------------------


def test_clamp_logit_scale_keeps_it_in_zero_to_ln_100_through_wrappers() -> None:
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(ContrastiveForward(model))
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE) == math.log(100)
    with torch.no_grad():
        model.logit_scale.fill_(-2.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == 0.0
    with pytest.raises(ValueError, match="no logit_scale parameter"):
        clamp_logit_scale(nn.Linear(2, 2))


# ---- locking ----------------------------------------------------------------------------


def test_lock_vit_image_tower_whole_then_last_block_and_head() -> None:
    model = tiny()
    everything = trainable(model)
    lock_image_tower(model)
    assert trainable(model) == everything - names(model, "visual.")
    assert "logit_scale" in trainable(model)
    lock_image_tower(model, unlocked_blocks=1)
    assert trainable(model) & names(model, "visual.") == names(
        model, "visual.transformer.resblocks.1."
    ) | {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    lock_image_tower(model, unlocked_blocks=2)  # every block: the stem stays locked
    assert names(model, "visual.") - trainable(model) == {
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
    }


@pytest.mark.parametrize("unlocked", [-1, 3, True, 1.0])
def test_lock_refuses_a_bad_block_count(unlocked: Any) -> None:
    with pytest.raises(ValueError, match="unlocked_blocks"):
        lock_image_tower(tiny(), unlocked_blocks=unlocked)


def test_lock_refuses_a_model_without_towers() -> None:
    with pytest.raises(TypeError, match="ViT or ResNet image tower"):
        lock_image_tower(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="needs a CLIP model"):
        lock_text_tower(nn.Linear(2, 2))


def test_locked_resnet_batchnorm_stays_in_eval_and_keeps_its_statistics_across_train() -> None:
    model = tiny(RESNET)
    lock_image_tower(model, unlocked_blocks=2)  # layer3.0, layer4.0 and attnpool train
    assert trainable(model) & names(model, "visual.") == (
        names(model, "visual.layer3.")
        | names(model, "visual.layer4.")
        | names(model, "visual.attnpool.")
    )
    visual: Any = model.visual
    locked, unlocked = visual.layer2[0].bn1, visual.layer4[0].bn1
    before = locked.running_mean.clone(), unlocked.running_mean.clone()
    model.train()
    model.encode_image(pairs(4)[0])
    assert not locked.training and torch.equal(locked.running_mean, before[0])
    assert not visual.bn1.training and is_batchnorm_locked(visual.bn1)
    assert unlocked.training and not torch.equal(unlocked.running_mean, before[1])
    lock_image_tower(model, unlocked_blocks=4)  # a rerun unlocks layer2 (and its BatchNorm)
    model.train()
    model.encode_image(pairs(4)[0])
    assert locked.training and not is_batchnorm_locked(locked)
    assert not visual.bn3.training  # the stem is still locked


def test_lock_text_tower_whole_then_last_block_and_head() -> None:
    model = tiny()
    text = (
        names(model, "transformer.")
        | names(model, "token_embedding.")
        | {"positional_embedding", "text_projection", "ln_final.weight", "ln_final.bias"}
    )
    lock_text_tower(model)
    assert trainable(model) == names(model, "visual.") | {"logit_scale"}
    lock_text_tower(model, unlocked_blocks=1)
    assert trainable(model) & text == names(model, "transformer.resblocks.1.") | {
        "text_projection",
        "ln_final.weight",
        "ln_final.bias",
    }


# ---- precision ------------------------------------------------------------------------------


def test_fp16_layout_is_upcast_to_fp32_master_weights_with_a_warning() -> None:
    model = tiny()
    convert_weights(model)
    assert model.visual.conv1.weight.dtype == torch.float16
    with pytest.warns(UserWarning, match=r"upcasting them to fp32 master weights.*#57"):
        precision = prepare_for_training(model, "FP16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert precision.name == "fp16" and precision.scaler.is_enabled()


def test_an_fp32_model_is_prepared_without_a_warning() -> None:
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision = prepare_for_training(model, "bf16", device="cpu")
    assert not precision.scaler.is_enabled()
    with precision.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with prepare_for_training(model, "fp32").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp8", "float16", "", None])
def test_unknown_precision_is_refused(precision: Any) -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        prepare_for_training(tiny(), precision)


def test_fp16_layout_model_trains_three_steps_in_fp16_on_cpu_without_nan() -> None:
    model = tiny()
    convert_weights(model)
    with pytest.warns(UserWarning, match="fp32 master weights"):
        precision = prepare_for_training(model, "fp16", device="cpu")
    optimizer = make_optimizer(model, lr=1e-4)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, texts = pairs()
    model.train()
    losses = [train_step(model, images, texts, optimizer, precision) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.text_projection, start["text_projection"])  # it did train


# ---- train_step -------------------------------------------------------------------------


def test_plain_adamw_loop_lowers_the_loss_on_32_pairs() -> None:
    model = tiny()
    precision = prepare_for_training(model, "fp32")
    optimizer = make_optimizer(model, lr=3e-4)
    images, texts = pairs(32)
    start = batch_loss(model, images, texts)
    model.train()
    for _ in range(3):
        for batch in (slice(0, 16), slice(16, 32)):
            train_step(model, images[batch], texts[batch], optimizer, precision)
    assert batch_loss(model, images, texts) < 0.75 * start


def test_train_step_steps_the_schedule_and_clamps_the_logit_scale() -> None:
    model = tiny()
    precision = prepare_for_training(model, "fp32")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = cosine_schedule(optimizer, warmup_steps=2, total_steps=5)
    with torch.no_grad():
        model.logit_scale.fill_(MAX_LOGIT_SCALE)
    images, texts = pairs(8)
    for _ in range(2):
        train_step(model, images, texts, optimizer, precision, scheduler)
    assert scheduler.last_epoch == 2
    assert model.logit_scale.item() <= MAX_LOGIT_SCALE
    assert all(p.grad is None for p in model.parameters())


def test_max_grad_norm_bounds_the_update() -> None:
    model = tiny()
    precision = prepare_for_training(model, "fp32")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # update = -gradient
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, *pairs(8), optimizer, precision, max_grad_norm=1e-3)
    change = torch.stack([(p - b).norm() for p, b in zip(model.parameters(), before)]).norm()
    assert change.item() == pytest.approx(1e-3, rel=1e-3)


def test_an_overflowing_fp16_step_is_skipped_and_not_scheduled() -> None:
    model = tiny()
    precision = prepare_for_training(model, "fp32")
    overflowing = Precision("fp16", "cpu", torch.amp.GradScaler("cpu", init_scale=1e38))
    optimizer = make_optimizer(model, lr=1e-3)
    scheduler = cosine_schedule(optimizer, warmup_steps=0, total_steps=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, *pairs(8), optimizer, overflowing, scheduler)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scheduler.last_epoch == 0 and overflowing.scaler.get_scale() < 1e38
    train_step(model, *pairs(8), optimizer, precision, scheduler)
    assert scheduler.last_epoch == 1


def test_a_nan_loss_in_fp32_raises_and_leaves_the_weights_untouched() -> None:
    model = tiny()
    precision = prepare_for_training(model, "fp32")
    optimizer = make_optimizer(model, lr=1e-3)
    images, texts = pairs(4)
    images[2] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="the loss is nan"):
        train_step(model, images, texts, optimizer, precision)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_train_step_through_the_ddp_wrapper_equals_the_plain_model() -> None:
    plain, wrapped = tiny(seed=1), ContrastiveForward(tiny(seed=1))
    images, texts = pairs(8)
    losses = []
    for model in (plain, wrapped):
        precision = prepare_for_training(model, "fp32")
        optimizer = make_optimizer(model, lr=1e-3)
        losses.append([train_step(model, images, texts, optimizer, precision) for _ in range(2)])
        losses[-1].append(batch_loss(model, images, texts))
    assert losses[0] == losses[1]
    assert torch.equal(plain.text_projection, wrapped.model.text_projection)


def test_train_step_refuses_a_module_that_does_not_return_features() -> None:
    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            return self.w * images.mean()

    model = Logits()
    with pytest.raises(TypeError, match="returns \\(image_features, text_features, logit_scale\\)"):
        train_step(
            model,
            *pairs(2),
            torch.optim.SGD(model.parameters(), lr=1),
            Precision("fp32", "cpu", torch.amp.GradScaler("cpu", enabled=False)),
        )
