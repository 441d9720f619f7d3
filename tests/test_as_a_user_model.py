"""The model as research code uses it: masks changed, blocks hooked, attention patched, token ids
in whatever integer dtype a pipeline produced. Every expected value comes from the functional
oracle (``parity.functional``), which shares no code with ``clip.model``, and every shape
expectation is what OpenAI's package gives (full ``context_length`` columns)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from checkpoints import TINY, make_state_dict
from conftest import assert_rel_close, sample_text
from parity import functional as oracle

import clip
from clip.model import CLIP

ARCH = TINY["tiny-vit"]


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return make_state_dict(ARCH)


@pytest.fixture
def model(state_dict: dict[str, torch.Tensor], tmp_path) -> CLIP:
    path = tmp_path / "model.pt"
    torch.save(state_dict, path)
    loaded, _ = clip.load(str(path), device="cpu")
    assert isinstance(loaded, CLIP)
    return loaded


@pytest.fixture
def global_hook() -> Iterator[list[tuple[str, Any]]]:
    """A global forward hook (what profilers and some explainability tools install)."""
    seen: list[tuple[str, Any]] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append((type(module).__name__, args[0].shape))
    )
    yield seen
    handle.remove()


def test_bidirectional_text_variant_runs_every_column(model: CLIP, state_dict) -> None:
    """Research code drops the causal mask; encode_text must then not trim to the last EOT."""
    for block in model.transformer.resblocks:
        block.attn_mask = None
    text = sample_text(3)
    with torch.no_grad():
        got = model.encode_text(text)
    assert_rel_close(got, oracle.encode_text(state_dict, text, mask=None).pooled)


def test_subclass_building_its_own_mask_is_not_trimmed(state_dict) -> None:
    """Research code overrides ``build_attention_mask`` (here: all zeros, i.e. bidirectional)."""

    class Bidirectional(CLIP):
        def build_attention_mask(self) -> torch.Tensor:
            return torch.zeros(self.context_length, self.context_length)

    model = Bidirectional(*(getattr(ARCH, f) for f in ARCH.__dataclass_fields__)).eval()
    model.load_state_dict(state_dict)
    text = sample_text(3)
    with torch.no_grad():
        got = model.encode_text(text)
    assert_rel_close(got, oracle.encode_text(state_dict, text, mask=None).pooled)


def test_text_blocks_given_another_mask_use_it(model: CLIP, state_dict) -> None:
    """A prefix-LM variant: the first 4 positions see each other, the rest stay causal."""
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    mask[:4, :4] = 0.0
    for block in model.transformer.resblocks:
        block.attn_mask = mask.clone()
    text = sample_text(3)
    with torch.no_grad():
        got = model.encode_text(text)
    assert_rel_close(got, oracle.encode_text(state_dict, text, mask=mask).pooled)


def test_forward_hook_on_a_text_block_sees_the_full_context(model: CLIP, state_dict) -> None:
    shapes: list[torch.Size] = []
    model.transformer.resblocks[0].register_forward_hook(
        lambda module, args, out: shapes.append(out.shape)
    )
    text = sample_text(3)
    with torch.no_grad():
        got = model.encode_text(text)
    assert shapes == [torch.Size([77, 3, ARCH.transformer_width])]  # OpenAI's [L, N, D]
    assert_rel_close(got, oracle.encode_text(state_dict, text).pooled)


def test_patched_attn_forward_is_called_with_the_full_context(model: CLIP, state_dict) -> None:
    """The explainability trick: replace ``blk.attn.forward`` to capture attention weights."""
    captured: list[torch.Tensor] = []
    for block in model.transformer.resblocks:
        original = block.attn.forward

        def forward(*args: Any, original: Any = original, **kwargs: Any) -> Any:
            kwargs["need_weights"] = True
            kwargs["average_attn_weights"] = False
            out, weights = original(*args, **kwargs)
            captured.append(weights)
            return out, weights

        block.attn.forward = forward  # type: ignore[method-assign]
    text = sample_text(2)
    expected = oracle.encode_text(state_dict, text)
    with torch.no_grad():
        got = model.encode_text(text)
    assert len(captured) == ARCH.transformer_layers
    for weights, want in zip(captured, expected.attention):
        assert weights.shape == (2, ARCH.transformer_heads, 77, 77)
        torch.testing.assert_close(weights, want, rtol=1e-4, atol=1e-6)
    assert_rel_close(got, expected.pooled)


def test_patched_attn_forward_is_called_in_the_image_tower(model: CLIP, state_dict) -> None:
    calls: list[torch.Size] = []
    block = model.visual.transformer.resblocks[-1]
    original = block.attn.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    block.attn.forward = forward  # type: ignore[method-assign]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.encode_image(images)
    assert calls == [torch.Size([1 + (32 // 8) ** 2, 2, ARCH.vision_width])]
    assert_rel_close(got, oracle.encode_image(state_dict, images).pooled)


def test_global_module_hook_sees_reference_shapes(
    model: CLIP, state_dict, global_hook: list
) -> None:
    text = sample_text(2)
    with torch.no_grad():
        got = model.encode_text(text)
    attn_inputs = [shape for name, shape in global_hook if name == "MultiheadAttention"]
    assert attn_inputs == [torch.Size([77, 2, ARCH.transformer_width])] * ARCH.transformer_layers
    assert_rel_close(got, oracle.encode_text(state_dict, text).pooled)


def test_removing_a_hook_restores_the_trimmed_path(model: CLIP) -> None:
    handle = model.transformer.resblocks[1].attn.register_forward_pre_hook(lambda m, a: None)
    assert not model.text_is_trimmable()
    handle.remove()
    assert model.text_is_trimmable()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint16, torch.uint32])
def test_token_ids_in_any_wide_enough_integer_dtype(model: CLIP, dtype: torch.dtype) -> None:
    text = sample_text(3)
    with torch.no_grad():
        expected = model.encode_text(text.long())
        assert torch.equal(model.encode_text(text.to(dtype)), expected)
        tokens = model.encode_text_tokens(text.to(dtype))
    assert torch.equal(tokens.eot, text.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_token_ids_too_narrow_for_the_vocabulary_are_refused(
    model: CLIP, dtype: torch.dtype
) -> None:
    text = sample_text(2).to(dtype)  # 49407 (end of text) does not fit: the ids wrapped around
    for method in (model.encode_text, model.encode_text_tokens, model.encode_text_layers):
        with pytest.raises(TypeError, match=rf"{dtype}.*49408 ids.*\.long\(\)"):
            method(text)


def test_uint8_ids_are_taken_when_the_vocabulary_fits(tmp_path) -> None:
    """A small-vocabulary model (256 ids): uint8 holds every id, so it is accepted."""
    from dataclasses import replace

    small = replace(ARCH, vocab_size=256)
    path = tmp_path / "small.pt"
    torch.save(make_state_dict(small), path)
    model, _ = clip.load(str(path), device="cpu")
    text = torch.tensor([[200, 5, 7, 255, 0, 0]])
    with torch.no_grad():
        assert torch.equal(model.encode_text(text.to(torch.uint8)), model.encode_text(text))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_float_or_bool_token_ids_are_refused(model: CLIP, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=rf"integer token ids, got {dtype}.*clip\.tokenize"):
        model.encode_text(sample_text(1).to(dtype))
