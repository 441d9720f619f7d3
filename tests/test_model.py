"""clip.model: architecture, configuration from shapes, contracts research code relies on."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from checkpoints import (
    PUBLISHED,
    TINY,
    Arch,
    is_half_in_release,
    make_state_dict,
    meta_state_dict,
    state_dict_shapes,
)
from conftest import assert_rel_close, sample_images, sample_text
from parity import functional as oracle
from torch import nn

from clip.model import (
    CLIP,
    Bottleneck,
    CLIPConfig,
    LayerNorm,
    QuickGELU,
    ResidualAttentionBlock,
    build_from_state_dict,
    build_model,
    convert_weights,
)


def fp32_model(arch: Arch, salt: int = 0) -> CLIP:
    return build_from_state_dict(make_state_dict(arch, salt=salt))


# ---- configuration and size of the nine released architectures (meta device, no memory) ------


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_and_parameter_count(name: str) -> None:
    arch, published_count = PUBLISHED[name]
    sd = meta_state_dict(arch)
    config = CLIPConfig.from_state_dict(sd)
    fields = [f for f in config.__dataclass_fields__ if hasattr(arch, f)]
    assert config == CLIPConfig(**{f: getattr(arch, f) for f in fields})
    model = build_from_state_dict(sd)
    assert sum(p.numel() for p in model.parameters()) == published_count
    assert model.visual.input_resolution == arch.image_resolution
    assert model.visual.output_dim == arch.embed_dim
    assert model.context_length == 77 and model.vocab_size == 49408


@pytest.mark.parametrize("name", ["RN50x4", "ViT-B/16"])
def test_module_state_dict_is_openai_format(name: str) -> None:
    arch = PUBLISHED[name][0]
    with torch.device("meta"):
        model = CLIP(*(getattr(arch, f) for f in arch.__dataclass_fields__))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == state_dict_shapes(arch)


def test_heads_follow_width() -> None:
    model = build_from_state_dict(meta_state_dict(PUBLISHED["ViT-L/14"][0]))
    assert model.visual.transformer.resblocks[0].attn.num_heads == 1024 // 64
    assert model.transformer.resblocks[0].attn.num_heads == 768 // 64
    rn = build_from_state_dict(meta_state_dict(PUBLISHED["RN50x16"][0]))
    assert rn.visual.attnpool.num_heads == 96 * 32 // 64


# ---- build_model ---------------------------------------------------------------------------


def test_build_model_leaves_callers_dict_alone(arch: Arch) -> None:
    sd = make_state_dict(arch)
    sd["input_resolution"] = torch.tensor(arch.image_resolution)
    before = {k: v.clone() for k, v in sd.items()}
    model = build_model(sd)
    assert list(sd) == list(before)
    assert all(torch.equal(sd[k], before[k]) and sd[k].dtype == before[k].dtype for k in sd)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert all(torch.equal(sd[k], before[k]) for k in sd)


def test_build_model_uses_openai_mixed_precision(arch: Arch) -> None:
    model = build_model(make_state_dict(arch))
    assert not model.training
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        want = torch.float16 if is_half_in_release(key, tuple(tensor.shape)) else torch.float32
        assert tensor.dtype == want, key


def test_convert_weights_then_float_is_lossless_for_released_values(arch: Arch) -> None:
    sd = make_state_dict(arch)
    model = build_model(sd).float()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, sd[key]), key


def test_strict_loading_names_missing_and_unexpected_keys(arch: Arch) -> None:
    sd = make_state_dict(arch)
    del sd["ln_final.bias"]
    sd["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: ln_final\.bias") as info:
        build_model(sd)
    assert "unexpected keys: visual.extra.weight" in str(info.value)


def test_shape_mismatch_is_reported(arch: Arch) -> None:
    sd = make_state_dict(arch)
    sd["transformer.resblocks.1.ln_1.bias"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.1\.ln_1\.bias: \(3,\)"):
        build_model(sd)


def test_inconsistent_shapes_are_reported(arch: Arch) -> None:
    sd = make_state_dict(arch)
    sd["ln_final.weight"] = torch.ones(sd["ln_final.weight"].shape[0] + 1)
    with pytest.raises(ValueError, match="impossible CLIP"):
        build_model(sd)


def test_not_a_clip_state_dict() -> None:
    with pytest.raises(ValueError, match="missing"):
        build_model({"weight": torch.zeros(3)})


# ---- building blocks -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quick_gelu(dtype: torch.dtype) -> None:
    x = torch.randn(64, 97, generator=torch.Generator().manual_seed(0)).to(dtype)
    x_before = x.clone()
    expected = x * torch.sigmoid(1.702 * x)
    assert torch.equal(QuickGELU()(x), expected)  # the in-place inference path
    assert torch.equal(x, x_before)  # the caller's tensor is left alone
    leaf = x.float().requires_grad_()
    y = QuickGELU()(leaf)  # the autograd path
    y.sum().backward()
    assert torch.equal(y.detach(), leaf.detach() * torch.sigmoid(1.702 * leaf.detach()))
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("train", [False, True])
def test_bottleneck_in_place_residual_keeps_values_and_gradients(train: bool) -> None:
    """The residual is added in place; outputs and gradients equal the out-of-place formula."""
    torch.manual_seed(0)
    block = Bottleneck(8, 4, stride=2).train(train)
    assert block.downsample is not None

    def out_of_place(x: torch.Tensor) -> torch.Tensor:
        y = block.relu1(block.bn1(block.conv1(x)))
        y = block.relu2(block.bn2(block.conv2(y)))
        return torch.relu(block.bn3(block.conv3(block.avgpool(y))) + block.downsample(x))

    results = []
    for fn in (block, out_of_place):
        x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        block.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        assert x.grad is not None
        results.append([y.detach(), x.grad, *(p.grad for p in block.parameters())])
    for got, expected in zip(*results):
        assert got is not None and expected is not None and torch.equal(got, expected)


def test_layernorm_computes_in_fp32_and_keeps_input_dtype() -> None:
    ln = LayerNorm(8)
    x = torch.randn(4, 8).half()
    y = ln(x)
    assert y.dtype == torch.float16
    expected = nn.functional.layer_norm(x.float(), (8,), ln.weight, ln.bias, ln.eps).half()
    assert torch.equal(y, expected)


def test_attention_matches_multihead_attention() -> None:
    torch.manual_seed(0)
    mask = torch.full((7, 7), float("-inf")).triu_(1)
    block = ResidualAttentionBlock(128, 2, mask).eval()
    x = torch.randn(7, 3, 128)
    expected = block.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(block.attention(x), expected, rtol=1e-5, atol=1e-6)
    assert block.mask_is_causal


def test_reassigned_mask_is_honoured() -> None:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 1, torch.full((5, 5), float("-inf")).triu_(1)).eval()
    other = torch.zeros(5, 5)
    other[:, 0] = float("-inf")
    other[0, 0] = 0.0
    block.attn_mask = other
    assert not block.mask_is_causal and "attn_mask" in dict(block.named_buffers())
    x = torch.randn(5, 2, 64)
    expected = block.attn(x, x, x, need_weights=False, attn_mask=other)[0]
    torch.testing.assert_close(block.attention(x), expected, rtol=1e-5, atol=1e-6)
    block.attn_mask = None
    expected = block.attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(block.attention(x), expected, rtol=1e-5, atol=1e-6)


class WrappedAttention(nn.MultiheadAttention):
    """A user's replacement for ``attn`` (same weights, its own class)."""


def _hook(block: ResidualAttentionBlock, seen: list, monkeypatch: pytest.MonkeyPatch) -> None:
    block.attn.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))


def _pre_hook(block: ResidualAttentionBlock, seen: list, monkeypatch: pytest.MonkeyPatch) -> None:
    block.attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))


def _instance_patch(
    block: ResidualAttentionBlock, seen: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = block.attn.forward

    def forward(*args: object, **kwargs: object) -> object:
        seen.append(args[0].shape)  # type: ignore[attr-defined]
        return original(*args, **kwargs)  # type: ignore[arg-type]

    block.attn.forward = forward  # type: ignore[method-assign]


def _class_patch(
    block: ResidualAttentionBlock, seen: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = nn.MultiheadAttention.forward

    def forward(self: nn.MultiheadAttention, *args: object, **kwargs: object) -> object:
        seen.append(args[0].shape)  # type: ignore[attr-defined]
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nn.MultiheadAttention, "forward", forward)


def _replaced(block: ResidualAttentionBlock, seen: list, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = WrappedAttention(64, 1)
    wrapped.load_state_dict(block.attn.state_dict())
    wrapped.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    block.attn = wrapped


@pytest.mark.parametrize(
    "customise",
    [_hook, _pre_hook, _instance_patch, _class_patch, _replaced],
    ids=["hook", "pre_hook", "instance_forward", "class_forward", "replaced_module"],
)
def test_hooked_patched_or_replaced_attention_is_called(
    customise: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 1, torch.full((4, 4), float("-inf")).triu_(1)).eval()
    x = torch.randn(4, 2, 64)
    with torch.no_grad():
        expected = block(x)
        seen: list[torch.Size] = []
        customise(block, seen, monkeypatch)  # type: ignore[operator]
        assert not block.fused_attention()
        got = block(x)
    assert seen == [torch.Size([4, 2, 64])]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _mask_none(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.transformer.resblocks[-1].attn_mask = None


def _mask_other(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.transformer.resblocks[0].attn_mask = torch.zeros(77, 77)


def _mask_edited_in_place(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.transformer.resblocks[0].attn_mask.zero_()


def _block_hook(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.transformer.resblocks[0].register_forward_hook(lambda m, a, o: None)


def _block_backward_hook(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.transformer.resblocks[0].register_full_backward_hook(lambda m, gi, go: None)


def _mlp_hook(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.transformer.resblocks[1].mlp.c_fc.register_forward_hook(lambda m, a, o: None)


def _transformer_hook(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.transformer.register_forward_pre_hook(lambda m, a: None)


def _ln_final_hook(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    model.ln_final.register_forward_hook(lambda m, a, o: None)


def _block_forward_replaced(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    block = model.transformer.resblocks[0]
    block.forward = block.forward  # type: ignore[method-assign]


def _attention_class_patch(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    original = ResidualAttentionBlock.attention
    monkeypatch.setattr(ResidualAttentionBlock, "attention", lambda self, x: original(self, x))


def _global_hook(model: CLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    monkeypatch.setattr(model, "_test_cleanup", handle.remove, raising=False)


@pytest.mark.parametrize(
    "change",
    [
        _mask_none,
        _mask_other,
        _mask_edited_in_place,
        _block_hook,
        _block_backward_hook,
        _mlp_hook,
        _transformer_hook,
        _ln_final_hook,
        _block_forward_replaced,
        _attention_class_patch,
        _global_hook,
    ],
)
def test_text_is_trimmed_only_when_causal_and_unobserved(
    arch: Arch, change: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fp32_model(arch)
    assert model.text_is_trimmable()
    try:
        change(model, monkeypatch)  # type: ignore[operator]
        assert not model.text_is_trimmable()
    finally:
        getattr(model, "_test_cleanup", lambda: None)()


def test_mask_edited_in_place_is_honoured(arch: Arch) -> None:
    """Zeroing every mask in place makes the text tower bidirectional, for the fused path too."""
    sd = make_state_dict(arch)
    model = build_from_state_dict(sd)
    text = sample_text(3)
    with torch.no_grad():
        model.encode_text(text)  # the causal answer is remembered...
        for block in model.transformer.resblocks:
            block.attn_mask.zero_()  # ...and must be forgotten here
        got = model.encode_text(text)
    assert_rel_close(got, oracle.encode_text(sd, text, mask=None).pooled)


def test_attention_masks_follow_the_weights_device(arch: Arch) -> None:
    """build_model on CUDA tensors must give CUDA masks; checked here with meta tensors, which
    exercise the same move (the masks are built on the CPU, then follow the weights)."""
    sd = meta_state_dict(arch)
    for model in (build_from_state_dict(sd), build_model(sd)):
        masks = [block.attn_mask for block in model.transformer.resblocks]
        assert all(m is not None and m.device.type == "meta" for m in masks)
        assert all(block.mask_is_causal for block in model.transformer.resblocks)
    cpu = fp32_model(arch)
    assert all(b.attn_mask.device.type == "cpu" for b in cpu.transformer.resblocks)
    assert all(b.mask_is_causal for b in cpu.transformer.resblocks)


def test_mask_is_a_non_persistent_buffer_untouched_by_forward(arch: Arch) -> None:
    model = fp32_model(arch)
    block = model.transformer.resblocks[0]
    assert "attn_mask" in dict(block.named_buffers())
    assert not any("attn_mask" in k for k in model.state_dict())
    before = copy.deepcopy(dict(model.named_buffers()))
    ids = {k: id(v) for k, v in model.named_buffers()}
    with torch.no_grad():
        model(sample_images(arch), sample_text())
    after = dict(model.named_buffers())
    assert ids == {k: id(v) for k, v in after.items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mask_follows_dtype_and_device_moves(arch: Arch) -> None:
    model = fp32_model(arch).half()
    block = model.transformer.resblocks[0]
    assert block.attn_mask.dtype == torch.float16 and block.mask_is_causal
    model.to("meta")  # the second device every machine has
    assert block.attn_mask.device.type == "meta" and block.attn_mask.dtype == torch.float16
    assert block.mask_is_causal
    # a hooked attn runs the path that reads the mask: a mask left on the CPU would fail here
    block.attn.register_forward_hook(lambda *args: None)
    width = model.transformer.width
    x = torch.zeros(arch.context_length, 2, width, device="meta", dtype=torch.float16)
    assert model.transformer(x).device.type == "meta"


# ---- towers and pooled outputs ------------------------------------------------------------


def test_shapes(arch: Arch) -> None:
    model = fp32_model(arch)
    with torch.no_grad():
        image = model.encode_image(sample_images(arch, 3))
        text = model.encode_text(sample_text(4))
        per_image, per_text = model(sample_images(arch, 3), sample_text(4))
    assert image.shape == (3, arch.embed_dim) and text.shape == (4, arch.embed_dim)
    assert per_image.shape == (3, 4) and torch.equal(per_text, per_image.t())


def test_logits_are_scaled_cosine_similarities(arch: Arch) -> None:
    model = fp32_model(arch)
    images, texts = sample_images(arch, 2), sample_text(3)
    with torch.no_grad():
        i = nn.functional.normalize(model.encode_image(images), dim=-1)
        t = nn.functional.normalize(model.encode_text(texts), dim=-1)
        per_image, _ = model(images, texts)
    torch.testing.assert_close(per_image, model.logit_scale.exp() * i @ t.t())


def test_trimmed_text_path_equals_full_length(arch: Arch) -> None:
    sd = make_state_dict(arch)
    model = build_from_state_dict(sd)
    text = sample_text(5)
    assert model.text_is_trimmable()
    with torch.no_grad():
        assert_rel_close(model.encode_text(text), oracle.encode_text(sd, text).pooled)


def test_encode_text_accepts_any_length_up_to_context(arch: Arch) -> None:
    model = fp32_model(arch)
    text = sample_text(3)
    with torch.no_grad():
        full = model.encode_text(text)
        short = model.encode_text(text[:, :20])
        long_ids = model.encode_text(text.long())
    assert_rel_close(short, full)
    torch.testing.assert_close(long_ids, full)


def test_vision_tokens_and_pooled_output_share_a_path() -> None:
    model = fp32_model(TINY["tiny-vit"])
    images = sample_images(TINY["tiny-vit"])
    with torch.no_grad():
        tokens = model.visual.forward_features(images)
        assert tokens.shape == (2, 1 + (32 // 8) ** 2, 128)
        assert torch.equal(model.visual.forward_head(tokens), model.encode_image(images))


# ---- contracts of downstream research code --------------------------------------------------


def test_attributes_research_code_uses(arch: Arch) -> None:
    model = fp32_model(arch)
    for name in (
        "dtype",
        "context_length",
        "vocab_size",
        "token_embedding",
        "positional_embedding",
    ):
        assert hasattr(model, name), name
    for name in ("ln_final", "text_projection", "logit_scale", "transformer", "visual"):
        assert hasattr(model, name), name
    block = model.transformer.resblocks[-1]
    assert isinstance(block.attn, nn.MultiheadAttention)
    assert isinstance(block.mlp.c_fc, nn.Linear) and isinstance(block.mlp.c_proj, nn.Linear)
    assert isinstance(block.ln_1, nn.LayerNorm) and isinstance(block.ln_2, nn.LayerNorm)
    assert len(model.transformer.resblocks) == arch.transformer_layers
    assert model.dtype == torch.float32
    assert all(p.requires_grad for p in model.parameters())


def test_vit_attributes() -> None:
    visual = fp32_model(TINY["tiny-vit"]).visual
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj"):
        assert hasattr(visual, name), name
    assert visual.input_resolution == 32 and visual.output_dim == 32
    x = torch.randn(17, 2, 128)  # sequence-first [L, N, D]
    assert visual.transformer(x).shape == (17, 2, 128)


class PromptLearner(nn.Module):
    """CoOp-style: learnable context vectors spliced into the token embeddings."""

    def __init__(self, model: CLIP, text: torch.Tensor, n_ctx: int = 4) -> None:
        super().__init__()
        with torch.no_grad():
            embedded = model.token_embedding(text)  # [B, 77, D]
        self.ctx = nn.Parameter(embedded[0, 1 : 1 + n_ctx].clone())
        self.register_buffer("prefix", embedded[:, :1])
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :])

    def forward(self) -> torch.Tensor:
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


def coop_text_encoder(model: CLIP, prompts: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    x = prompts + model.positional_embedding.type(model.dtype)
    x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # sequence-first inside
    x = model.ln_final(x).type(model.dtype)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection


def test_coop_style_prompt_learning_matches_encode_text(arch: Arch) -> None:
    model = fp32_model(arch)
    text = sample_text(3)
    text[:, 1:5] = torch.tensor([1000, 1001, 1002, 1003])  # the same context tokens in every row
    learner = PromptLearner(model, text)
    features = coop_text_encoder(model, learner(), text)
    with torch.no_grad():
        assert_rel_close(features, model.encode_text(text))
    features.sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0


def test_subclassing_clip_with_openai_constructor_arguments() -> None:
    class Adapter(CLIP):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            self.adapter = nn.Linear(32, 32)

    arch = TINY["tiny-vit"]
    model = Adapter(*(getattr(arch, f) for f in arch.__dataclass_fields__))
    missing = model.load_state_dict(make_state_dict(arch), strict=False).missing_keys
    assert missing == ["adapter.weight", "adapter.bias"]


def test_resnet_block_names() -> None:
    visual = fp32_model(TINY["tiny-rn"]).visual
    bottleneck = visual.layer2[0]
    assert isinstance(bottleneck.downsample, nn.Sequential)
    assert list(bottleneck.downsample._modules) == ["-1", "0", "1"]
    assert isinstance(bottleneck.avgpool, nn.AvgPool2d)
    assert isinstance(visual.layer1[0].avgpool, nn.Identity)
    pool = visual.attnpool
    assert pool.positional_embedding.shape == (2 * 2 + 1, 256)


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 32, 32), "unsqueeze"),
        ((2, 1, 32, 32), r"\[B, 3, 32, 32\]"),
        ((2, 3, 64, 64), "preprocess"),
    ],
)
def test_bad_image_shapes(shape: tuple[int, ...], match: str) -> None:
    model = fp32_model(TINY["tiny-vit"])
    with pytest.raises(ValueError, match=match):
        model.encode_image(torch.zeros(shape))


def test_integer_images_are_refused() -> None:
    model = fp32_model(TINY["tiny-vit"])
    with pytest.raises(TypeError, match="float"):
        model.encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_inputs_on_another_device_are_refused() -> None:
    model = fp32_model(TINY["tiny-vit"])
    with pytest.raises(ValueError, match="meta"):
        model.encode_image(torch.zeros(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long, device="meta"))


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (torch.zeros(2, 77), TypeError, "integer token ids"),
        (torch.zeros(2, 78, dtype=torch.long), ValueError, "truncate=True"),
        (torch.zeros(2, 3, 77, dtype=torch.long), ValueError, "flatten"),
        (torch.full((1, 77), 49408), ValueError, r"\[0, 49408\)"),
        (torch.full((1, 77), -1), ValueError, r"\[0, 49408\)"),
        ([[49406, 49407]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_text(text: object, error: type, match: str) -> None:
    model = fp32_model(TINY["tiny-vit"])
    with pytest.raises(error, match=match):
        model.encode_text(text)  # type: ignore[arg-type]


def test_empty_batches() -> None:
    model = fp32_model(TINY["tiny-vit"])
    with torch.no_grad():
        assert model.encode_text(torch.zeros(0, 77, dtype=torch.int)).shape == (0, 32)
        assert model.encode_image(torch.zeros(0, 3, 32, 32)).shape == (0, 32)


def test_convert_weights_on_plain_modules() -> None:
    net = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 2)), ("ln", nn.LayerNorm(2))]))
    convert_weights(net)
    assert net.fc.weight.dtype == torch.float16 and net.ln.weight.dtype == torch.float32


def test_resnet_runs_channels_last_inside_and_hands_out_nchw() -> None:
    """The ResNet trunk convolves NHWC images (faster) but its weights and outputs stay NCHW, and
    the result is the NCHW computation up to summation order."""
    model = fp32_model(TINY["tiny-rn"])
    images = sample_images(TINY["tiny-rn"], 2)
    with torch.no_grad():
        plain = nn.functional.conv2d(images, model.visual.conv1.weight, stride=2, padding=1)
        inside = model.visual.conv1(images.contiguous(memory_format=torch.channels_last))
    seen: list[bool] = []
    model.visual.conv1.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        features = model.visual.forward_features(images)
        stages = model.visual.forward_layers(images)
    assert seen == [True, True]
    assert features.is_contiguous() and all(s.is_contiguous() for s in stages)
    assert all(p.is_contiguous() for p in model.parameters())
    assert_rel_close(inside, plain, 1e-5)
