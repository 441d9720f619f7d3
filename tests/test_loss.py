"""clip.contrastive_loss: open_clip's ClipLoss values in one process; across 2 gloo ranks, the
gradients of one process on the concatenated batch; bad input refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import clip
from clip.loss import NORM_TOLERANCE, ContrastiveLoss, contrastive_loss, gather_with_grad

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import loss_worker  # noqa: E402


def unit(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


@pytest.mark.parametrize(("batch", "scale"), [(1, 14.3), (5, 1.0), (16, 100.0)])
def test_loss_and_gradients_equal_open_clip(batch: int, scale: float) -> None:
    from open_clip.loss import ClipLoss

    theirs_in = [unit(batch, 8, seed=1).requires_grad_(), unit(batch, 8, seed=2).requires_grad_()]
    ours_in = [t.detach().clone().requires_grad_() for t in theirs_in]
    theirs = ClipLoss()(*theirs_in, torch.tensor(scale))
    ours = clip.contrastive_loss(*ours_in, torch.tensor(scale))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    theirs.backward()
    ours.backward()
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_matching_pairs_give_a_lower_loss_than_shuffled_ones() -> None:
    images = unit(8, 16, seed=3)
    texts = F.normalize(images + 0.1 * unit(8, 16, seed=4), dim=-1)
    assert contrastive_loss(images, texts, 50.0) < contrastive_loss(images, texts.flip(0), 50.0)


def test_a_float_scale_equals_a_tensor_scale_and_the_module_equals_the_function() -> None:
    images, texts = unit(6, 8, seed=5), unit(6, 8, seed=6)
    expected = contrastive_loss(images, texts, torch.tensor(20.0))
    assert torch.equal(contrastive_loss(images, texts, 20.0), expected)
    assert torch.equal(ContrastiveLoss()(images, texts, torch.tensor(20.0)), expected)


def test_loss_runs_in_fp32_under_bf16_autocast() -> None:
    images, texts = unit(6, 8, seed=7), unit(6, 8, seed=8)
    expected = contrastive_loss(images, texts, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(images, texts, 100.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_half_features_give_an_fp32_loss_with_gradients_in_their_dtype() -> None:
    images = unit(4, 8, seed=9).half().requires_grad_()
    texts = unit(4, 8, seed=10).half().requires_grad_()
    loss = contrastive_loss(images, texts, 100.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert images.grad is not None and images.grad.dtype == torch.float16


def test_unnormalised_features_are_refused_unless_the_check_is_off() -> None:
    images, texts = unit(4, 8, seed=11), unit(4, 8, seed=12)
    with pytest.raises(ValueError, match=r"text_features row 2 has norm 3.*L2-normalised"):
        contrastive_loss(images, texts * torch.tensor([1, 1, 3, 1.0])[:, None], 10.0)
    raw = images * 5
    expected = contrastive_loss(images, texts, 50.0)
    got = contrastive_loss(raw, texts, 10.0, check_normalized=False)
    torch.testing.assert_close(got, expected)
    # Within the tolerance (what fp16 normalisation gives) passes.
    contrastive_loss(images * (1 + NORM_TOLERANCE / 2), texts, 10.0)


def test_non_finite_features_pass_the_check_and_give_a_nan_loss() -> None:
    images = unit(4, 8, seed=13)
    images[1] = float("nan")
    assert contrastive_loss(images, unit(4, 8, seed=14), 10.0).isnan()


@pytest.mark.parametrize(
    ("image", "text", "scale", "error", "match"),
    [
        (unit(4, 8), unit(5, 8), 10.0, ValueError, r"\(4, 8\) and text_features \(5, 8\)"),
        (unit(4, 8), unit(4, 7), 10.0, ValueError, "same shape"),
        (unit(8), unit(8), 10.0, ValueError, r"image_features must be \[batch, embed_dim\]"),
        (unit(2, 4, 8), unit(2, 4, 8), 10.0, ValueError, r"got shape \(2, 4, 8\)"),
        (unit(4, 8), unit(4, 8), torch.ones(4), ValueError, "logit_scale must be a scalar"),
        (unit(4, 8), unit(4, 8), "10", TypeError, "logit_scale must be a float"),
        (unit(4, 8).tolist(), unit(4, 8), 10.0, TypeError, "must be a torch.Tensor, got list"),
        (torch.ones(4, 8, dtype=torch.long), unit(4, 8), 10.0, TypeError, "floating point"),
        (unit(0, 8), unit(0, 8), 10.0, ValueError, "at least one"),
    ],
)
def test_bad_input_is_refused_by_name(
    image: Any, text: Any, scale: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        contrastive_loss(image, text, scale)


def test_gather_without_a_process_group_is_refused() -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        contrastive_loss(unit(4, 8), unit(4, 8), 10.0, gather=True)


def test_gather_with_grad_in_one_process_is_the_identity() -> None:
    x = unit(3, 4)
    assert gather_with_grad(x) is x
    with pytest.raises(ValueError, match="at least one dimension"):
        gather_with_grad(torch.tensor(1.0))


# ---- two ranks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run tests/loss_worker.py as ranks 0 and 1 of a gloo group; their saved results."""
    tmp = tmp_path_factory.mktemp("gloo")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "loss_worker.py"),
                str(r),
                "2",
                str(tmp / "init"),
                str(tmp / f"rank{r}.pt"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def one_process(total: int) -> tuple[float, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    model, x_image, x_text = loss_worker.make_case(total)
    x_image.requires_grad_(True)
    x_text.requires_grad_(True)
    loss = contrastive_loss(*model(x_image, x_text))
    loss.backward()
    return loss.item(), loss_worker.grads(model), x_image.grad, x_text.grad


@pytest.mark.parametrize("case", sorted(loss_worker.CASES))
def test_two_ranks_averaged_gradients_equal_one_process_on_the_whole_batch(
    two_ranks: list[dict[str, Any]], case: str
) -> None:
    sizes = loss_worker.CASES[case]
    loss, expected, _, _ = one_process(sum(sizes))
    ranks = [r[case] for r in two_ranks]
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(loss, abs=1e-6)
    assert set(expected) == {"image.weight", "text.weight", "text.bias", "logit_scale"}
    for name, grad in expected.items():
        averaged = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
        torch.testing.assert_close(averaged, grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(loss_worker.CASES))
def test_two_ranks_under_ddp_have_the_gradients_of_one_process(
    two_ranks: list[dict[str, Any]], case: str
) -> None:
    _, expected, _, _ = one_process(sum(loss_worker.CASES[case]))
    for rank in two_ranks:
        for name, grad in expected.items():
            torch.testing.assert_close(rank[case]["ddp_grads"][name], grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(loss_worker.CASES))
def test_each_rank_input_gradient_is_world_size_times_its_rows_of_one_process(
    two_ranks: list[dict[str, Any]], case: str
) -> None:
    """Each rank's loss is scaled for DDP's average: summed over ranks it is 2x the loss."""
    sizes = loss_worker.CASES[case]
    _, _, image_grad, text_grad = one_process(sum(sizes))
    torch.testing.assert_close(
        torch.cat([r[case]["x_image_grad"] for r in two_ranks]), 2 * image_grad, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        torch.cat([r[case]["x_text_grad"] for r in two_ranks]), 2 * text_grad, rtol=0, atol=1e-6
    )


def test_a_bad_rank_makes_every_rank_raise_instead_of_hanging(
    two_ranks: list[dict[str, Any]],
) -> None:
    assert two_ranks[1]["unnormalised"].startswith("image_features row 0 has norm 2, not 1")
    assert two_ranks[0]["unnormalised"] == "rank(s) [1] passed invalid features (see their error)"
    for rank in two_ranks:
        assert "embedding sizes [8, 6]" in rank["widths"]
        assert rank["after"] == pytest.approx(two_ranks[0]["after"])  # still in step


def test_gather_with_grad_concatenates_unequal_rows_in_rank_order(
    two_ranks: list[dict[str, Any]],
) -> None:
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for rank in two_ranks:
        assert torch.equal(rank["gathered"], expected)
