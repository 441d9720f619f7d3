"""Model features beyond the reference: tokens, intermediate layers, attention maps, resizing,
dtypes. Every output is checked against the pooled encoders or against the functional oracle
(``parity.functional``: the architecture written out with ``torch.nn.functional`` over the state
dict, sharing no code with ``clip.model``)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from checkpoints import TINY, Arch, is_half_in_release, make_state_dict
from conftest import assert_rel_close, sample_images, sample_text
from parity import functional as oracle

import clip
from clip.clip import settle_dtype
from clip.model import CLIP, TextTokens, attention_heatmap, build_from_state_dict


def fp32_model(arch: Arch) -> CLIP:
    return build_from_state_dict(make_state_dict(arch))


def grid_side(arch: Arch) -> int:
    return arch.image_resolution // (arch.vision_patch_size or 32)


# ---- image tokens ---------------------------------------------------------------------------


def test_image_tokens_pool_to_encode_image(arch: Arch) -> None:
    model, images = fp32_model(arch), sample_images(arch, 3)
    tokens_in = 1 + grid_side(arch) ** 2
    with torch.no_grad():
        pooled = model.encode_image(images)
        tokens = model.encode_image_tokens(images)
        projected = model.encode_image_tokens(images, project=True)
    width = arch.vision_width if arch.is_vit else 32 * arch.vision_width
    assert tokens.shape == (3, tokens_in, width)
    assert projected.shape == (3, tokens_in, arch.embed_dim)
    assert_rel_close(projected[:, 0], pooled)
    assert not torch.allclose(projected[:, 1], pooled, atol=1e-3)  # tokens differ from the pool


def test_vit_tokens_are_ln_post_outputs_times_proj() -> None:
    arch = TINY["tiny-vit"]
    model, images = fp32_model(arch), sample_images(arch)
    with torch.no_grad():
        tokens = model.encode_image_tokens(images)
        projected = model.encode_image_tokens(images, project=True)
        last = model.encode_image_layers(images, [-1])[0]
    assert torch.equal(tokens, model.visual.ln_post(last))
    assert_rel_close(projected, tokens @ model.visual.proj)


def test_resnet_tokens_are_the_attention_pool_inputs() -> None:
    arch = TINY["tiny-rn"]
    model, images = fp32_model(arch), sample_images(arch)
    with torch.no_grad():
        tokens = model.encode_image_tokens(images)
        fmap = model.visual.forward_features(images)  # [B, C, h, w]
    flat = fmap.flatten(2).transpose(1, 2)
    expected = torch.cat([flat.mean(1, keepdim=True), flat], 1)
    expected = expected + model.visual.attnpool.positional_embedding
    assert_rel_close(tokens, expected)


# ---- text tokens ----------------------------------------------------------------------------


def test_text_tokens_pool_to_encode_text(arch: Arch) -> None:
    model, text = fp32_model(arch), sample_text(4)
    with torch.no_grad():
        result = model.encode_text_tokens(text, project=True)
        pooled = model.encode_text(text)
        unprojected = model.encode_text_tokens(text)
    assert isinstance(result, TextTokens)
    assert result.tokens.shape == (4, 77, arch.embed_dim)
    assert unprojected.tokens.shape == (4, 77, arch.transformer_width)
    assert torch.equal(result.eot, text.argmax(-1)) and result.eot.dtype == torch.long
    at_eot = result.tokens[torch.arange(4), result.eot]
    assert_rel_close(at_eot, pooled)
    assert_rel_close(result.tokens, unprojected.tokens @ model.text_projection)


def test_text_tokens_equal_encode_text_exactly_when_nothing_is_trimmed(arch: Arch) -> None:
    model = fp32_model(arch)
    text = sample_text(3)
    text = text[:, : int(text.argmax(-1).max()) + 1]  # encode_text has nothing left to trim
    with torch.no_grad():
        tokens, eot = model.encode_text_tokens(text)
        pooled = tokens[torch.arange(3), eot] @ model.text_projection
        assert torch.equal(pooled, model.encode_text(text))


def test_text_tokens_match_the_oracle(arch: Arch) -> None:
    sd = make_state_dict(arch)
    model, text = build_from_state_dict(sd), sample_text(3)
    with torch.no_grad():
        tokens = model.encode_text_tokens(text).tokens
    assert_rel_close(tokens, oracle.encode_text(sd, text).tokens)


def test_batched_prompt_groups_are_refused_by_every_text_method() -> None:
    model = fp32_model(TINY["tiny-vit"])
    grouped = torch.stack([sample_text(2), sample_text(2)])  # [B, N, L]
    for method in (model.encode_text, model.encode_text_tokens, model.encode_text_layers):
        with pytest.raises(ValueError, match=r"\[B, N, L\].*flatten"):
            method(grouped)


# ---- intermediate layers ------------------------------------------------------------------


def captured_block_outputs(
    blocks: torch.nn.Module, run: object, inputs: bool = False
) -> list[torch.Tensor]:
    """Outputs (or, with ``inputs``, first inputs) of every block in ``blocks`` during ``run()``."""
    seen: list[torch.Tensor] = []
    handles = [
        b.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        if inputs
        else b.register_forward_hook(lambda m, a, out: seen.append(out))
        for b in blocks
    ]
    try:
        with torch.no_grad():
            run()  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    return seen


def test_vit_layers_match_the_oracle() -> None:
    arch = TINY["tiny-vit"]
    sd = make_state_dict(arch)
    model, images = build_from_state_dict(sd), sample_images(arch)
    with torch.no_grad():
        layers = model.encode_image_layers(images)
        picked = model.encode_image_layers(images, [-1, 0, 1])
    expected = oracle.encode_image(sd, images).layers
    assert len(layers) == len(expected) == arch.vision_layers
    for got, want in zip(layers, expected):
        assert_rel_close(got, want)
    assert [torch.equal(a, b) for a, b in zip(picked, [layers[1], layers[0], layers[1]])] == [
        True
    ] * 3


def test_resnet_layers_are_the_four_stages() -> None:
    arch = TINY["tiny-rn"]
    sd = make_state_dict(arch)
    model, images = build_from_state_dict(sd), sample_images(arch)
    stages = [model.visual.layer1, model.visual.layer2, model.visual.layer3, model.visual.layer4]
    seen = captured_block_outputs(torch.nn.ModuleList(stages), lambda: model.encode_image(images))
    with torch.no_grad():
        layers = model.encode_image_layers(images)
        last = model.encode_image_layers(images, [-1])[0]
    r, w = arch.image_resolution, arch.vision_width
    assert [tuple(x.shape) for x in layers] == [
        (2, 4 * w * 2**i, r // (4 * 2**i), r // (4 * 2**i)) for i in range(4)
    ]
    assert all(torch.equal(a, b) for a, b in zip(layers, seen))
    for got, want in zip(layers, oracle.encode_image(sd, images).layers):
        assert_rel_close(got, want)
    with torch.no_grad():
        assert torch.equal(last, model.visual.forward_features(images))


def test_text_layers_match_the_oracle_and_end_in_the_tokens(arch: Arch) -> None:
    sd = make_state_dict(arch)
    model, text = build_from_state_dict(sd), sample_text(3)
    with torch.no_grad():
        layers = model.encode_text_layers(text)
        tokens = model.encode_text_tokens(text).tokens
    assert len(layers) == arch.transformer_layers and layers[0].shape == (3, 77, 128)
    assert torch.equal(model.ln_final(layers[-1]), tokens)
    for got, want in zip(layers, oracle.encode_text(sd, text).layers):
        assert_rel_close(got, want)


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        ([2], ValueError, r"layer index 2 is out of range .* 2 blocks; use 0\.\.1, or -2\.\.-1"),
        ([0, -3], ValueError, "layer index -3"),
        ([], ValueError, "empty"),
        (1, TypeError, r"sequence of ints such as \[-1\]"),
        ([0.5], TypeError, "sequence of ints"),
    ],
)
def test_bad_layer_indices(layers: object, error: type, match: str) -> None:
    arch = TINY["tiny-vit"]
    model = fp32_model(arch)
    for method, x in (
        (model.encode_image_layers, sample_images(arch)),
        (model.encode_text_layers, sample_text()),
        (model.image_attention, sample_images(arch)),
        (model.text_attention, sample_text()),
    ):
        with pytest.raises(error, match=match):
            method(x, layers)  # type: ignore[operator]


def test_resnet_layer_indices_name_stages() -> None:
    arch = TINY["tiny-rn"]
    model = fp32_model(arch)
    with pytest.raises(ValueError, match=r"4 blocks; use 0\.\.3"):
        model.encode_image_layers(sample_images(arch), [4])
    with pytest.raises(ValueError, match="attention pool"):
        model.image_attention(sample_images(arch), [1])


# ---- attention maps -----------------------------------------------------------------------


def test_vit_attention_rows_sum_to_one_and_match_the_oracle() -> None:
    arch = TINY["tiny-vit"]
    sd = make_state_dict(arch)
    model, images = build_from_state_dict(sd), sample_images(arch)
    with torch.no_grad():
        maps = model.image_attention(images)
        last = model.image_attention(images, [-1])
    t = 1 + grid_side(arch) ** 2
    assert [tuple(m.shape) for m in maps] == [(2, 2, t, t)] * arch.vision_layers
    for got, want in zip(maps, oracle.encode_image(sd, images).attention):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, t))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(last[0], maps[-1])


def test_text_attention_is_causal_and_matches_the_oracle(arch: Arch) -> None:
    sd = make_state_dict(arch)
    model, text = build_from_state_dict(sd), sample_text(2)
    with torch.no_grad():
        maps = model.text_attention(text)
    for got, want in zip(maps, oracle.encode_text(sd, text).attention):
        assert got.shape == (2, 2, 77, 77)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, 77))
        assert torch.equal(got.triu(1), torch.zeros_like(got))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_resnet_attention_pool_weights_reproduce_encode_image() -> None:
    arch = TINY["tiny-rn"]
    model, images = fp32_model(arch), sample_images(arch)
    pool = model.visual.attnpool
    with torch.no_grad():
        (weights,) = model.image_attention(images)
        tokens = model.encode_image_tokens(images)  # the pool's input sequence [B, T, C]
        v = pool.v_proj(tokens).view(2, tokens.shape[1], pool.num_heads, -1).transpose(1, 2)
        mixed = (weights[:, :, :1] @ v).transpose(1, 2).reshape(2, -1)  # row 0: the pool query
        d = tokens.shape[-1] // pool.num_heads
        q = pool.q_proj(tokens).view(2, -1, pool.num_heads, d).transpose(1, 2)
        k = pool.k_proj(tokens).view(2, -1, pool.num_heads, d).transpose(1, 2)
        plain = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
        assert_rel_close(pool.c_proj(mixed), model.encode_image(images))
    t = 1 + grid_side(arch) ** 2
    assert weights.shape == (2, pool.num_heads, t, t)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, pool.num_heads, t))
    torch.testing.assert_close(weights, plain, rtol=1e-5, atol=1e-6)


def test_attention_is_computed_only_on_request() -> None:
    arch = TINY["tiny-vit"]
    model = fp32_model(arch)
    calls = []
    for block in model.visual.transformer.resblocks:
        original = block.attention_weights
        block.attention_weights = lambda x, f=original: calls.append(1) or f(x)  # type: ignore[method-assign]
    with torch.no_grad():
        model.encode_image(sample_images(arch))
        model.encode_image_tokens(sample_images(arch))
        assert calls == []
        model.image_attention(sample_images(arch), [0])
    assert calls == [1]


def test_attention_heatmap(arch: Arch) -> None:
    model, images = fp32_model(arch), sample_images(arch)
    with torch.no_grad():
        maps = model.image_attention(images, [-1])
        heat = attention_heatmap(maps)
        big = clip.attention_heatmap(maps, size=arch.image_resolution)
    g = grid_side(arch)
    cls = maps[0][:, :, 0, 1:].mean(1)  # [B, G*G]: heads averaged
    r = arch.image_resolution
    assert heat.shape == (2, g, g) and big.shape == (2, r, r)
    torch.testing.assert_close(heat.sum((1, 2)), torch.ones(2))
    torch.testing.assert_close(heat.flatten(1), cls / cls.sum(-1, keepdim=True))
    assert (heat >= 0).all()


def test_attention_heatmap_averages_layers_and_rejects_bad_input() -> None:
    arch = TINY["tiny-vit"]
    model, images = fp32_model(arch), sample_images(arch)
    with torch.no_grad():
        maps = model.image_attention(images)
    both = attention_heatmap(maps)
    cls = torch.stack([m[:, :, 0, 1:].mean(1) for m in maps]).mean(0)
    torch.testing.assert_close(both.flatten(1), cls / cls.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="empty"):
        attention_heatmap([])
    with pytest.raises(ValueError, match="square grid"):
        attention_heatmap([torch.rand(1, 2, 6, 6)])
    with pytest.raises(ValueError, match="one shape"):
        attention_heatmap([torch.rand(1, 2, 5, 5), torch.rand(1, 2, 10, 10)])


# ---- other resolutions --------------------------------------------------------------------


def test_resize_to_the_native_size_changes_nothing(arch: Arch) -> None:
    original = fp32_model(arch)
    resized = copy.deepcopy(original).resize_input(arch.image_resolution)
    assert resized.visual.input_resolution == arch.image_resolution
    before, after = original.state_dict(), resized.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    images, text = sample_images(arch), sample_text()
    with torch.no_grad():
        assert torch.equal(resized.encode_image(images), original.encode_image(images))
        assert torch.equal(resized(images, text)[0], original(images, text)[0])


def test_resize_mutates_in_place_and_keeps_the_first_row(arch: Arch) -> None:
    model = fp32_model(arch)
    pos_of = (
        (lambda m: m.visual.positional_embedding)
        if arch.is_vit
        else (lambda m: m.visual.attnpool.positional_embedding)
    )
    old = pos_of(model).detach().clone()
    step = arch.vision_patch_size or 32
    new_res = arch.image_resolution + 2 * step
    assert model.resize_input(new_res) is model
    new = pos_of(model)
    g = new_res // step
    assert new.shape == (1 + g * g, old.shape[1]) and new.requires_grad
    assert torch.equal(new[0], old[0])
    assert model.visual.input_resolution == new_res
    with torch.no_grad():
        out = model.encode_image(sample_images(replace(arch, image_resolution=new_res)))
    assert out.shape == (2, arch.embed_dim) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=f"\\[B, 3, {new_res}, {new_res}\\]"):
        model.encode_image(sample_images(arch))


def test_resize_is_bicubic_over_the_grid() -> None:
    arch = TINY["tiny-vit"]
    model = fp32_model(arch)
    pos = model.visual.positional_embedding.detach().clone()
    g = grid_side(arch)
    model.resize_input(arch.image_resolution * 2)
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=2, mode="bicubic", align_corners=False)
    got = model.visual.positional_embedding[1:].reshape(1, 2 * g, 2 * g, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("arch_name", "bad"), [("tiny-vit", 36), ("tiny-rn", 48), ("tiny-vit", 0)])
def test_resize_refuses_sizes_off_the_grid(arch_name: str, bad: int) -> None:
    model = fp32_model(TINY[arch_name])
    with pytest.raises(ValueError, match=r"multiple of|positive"):
        model.resize_input(bad)
    assert model.visual.input_resolution == TINY[arch_name].image_resolution


def test_load_with_resolution(tiny_files: dict, arch_name: str) -> None:
    arch = TINY[arch_name]
    res = 2 * arch.image_resolution
    model, preprocess = clip.load(str(tiny_files[arch_name]["archive"]), "cpu", resolution=res)
    assert model.visual.input_resolution == res
    assert preprocess.transforms[1].size == (res, res)
    from PIL import Image

    image = preprocess(Image.new("RGB", (50, 70), "red")).unsqueeze(0)
    assert image.shape == (1, 3, res, res)
    with torch.no_grad():
        assert model.encode_image(image).shape == (1, arch.embed_dim)
    with pytest.raises(ValueError, match="multiple of"):
        clip.load(str(tiny_files[arch_name]["archive"]), "cpu", resolution=res + 1)


def test_load_jit_with_resolution(tiny_files: dict) -> None:
    path = str(tiny_files["tiny-vit"]["archive"])
    model, preprocess = clip.load(path, "cpu", jit=True, resolution=48)
    assert model.input_resolution.item() == 48 and preprocess.transforms[1].size == (48, 48)
    eager = fp32_model(TINY["tiny-vit"]).resize_input(48)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_rel_close(model.encode_image(images), eager.encode_image(images))


# ---- devices and dtypes -------------------------------------------------------------------


# Half-precision outputs against the oracle run in the same precision: the largest difference
# measured is 8e-4 in fp16 and 9e-3 in bf16 (two orders of summation, a few ulps apart). fp16 is
# also held to OpenAI's own fp16 outputs in tests/parity/test_reference_fp16.py.
HALF_REL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_dtype_override_on_cpu(tiny_files: dict, arch_name: str, dtype: torch.dtype) -> None:
    arch = TINY[arch_name]
    model, _ = clip.load(str(tiny_files[arch_name]["state_dict"]), "cpu", dtype=dtype)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            half = is_half_in_release(key, tuple(tensor.shape))
            assert tensor.dtype == (dtype if half else torch.float32), key
    assert model.dtype == dtype
    sd = make_state_dict(arch)
    images, text = sample_images(arch), sample_text()
    with torch.no_grad():
        image, words = model.encode_image(images), model.encode_text(text)
    assert image.dtype == dtype and words.dtype == dtype
    assert_rel_close(image, oracle.encode_image(sd, images, dtype).pooled, rel=HALF_REL[dtype])
    assert_rel_close(words, oracle.encode_text(sd, text, dtype).pooled, rel=HALF_REL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_layernorm_computes_in_fp32_in_a_half_model(
    tiny_files: dict, arch_name: str, dtype: torch.dtype
) -> None:
    """Each LayerNorm of a half-precision model, as called in encode_image and encode_text,
    gives exactly fp32 LayerNorm (fp32 weights) of its input, rounded once to ``dtype``. A
    LayerNorm run in half precision (weights cast down) differs here, although its effect on the
    pooled outputs is within half-precision noise."""
    arch = TINY[arch_name]
    model, _ = clip.load(str(tiny_files[arch_name]["state_dict"]), "cpu", dtype=dtype)
    sd = make_state_dict(arch)
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: calls.append((name, args[0], out))
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
    ]
    with torch.no_grad():
        model.encode_image(sample_images(arch))
        model.encode_text(sample_text())
    for handle in handles:
        handle.remove()
    expected_calls = (2 + 2 * arch.vision_layers if arch.is_vit else 0) + (
        2 * arch.transformer_layers + 1
    )
    assert len(calls) == expected_calls
    for name, x, out in calls:
        w, b = sd[f"{name}.weight"].float(), sd[f"{name}.bias"].float()
        assert x.dtype == out.dtype == dtype, name
        assert torch.equal(out, F.layer_norm(x.float(), w.shape, w, b, 1e-5).to(dtype)), name


def test_float32_override_and_defaults() -> None:
    arch = TINY["tiny-vit"]
    sd = make_state_dict(arch, layout="openai")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fp32 = settle_dtype(build_from_state_dict(sd), cuda, torch.float32)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert settle_dtype(build_from_state_dict(sd), cuda).dtype == torch.float16
    assert settle_dtype(build_from_state_dict(sd), torch.device("cuda", 1)).dtype == torch.float16
    assert settle_dtype(build_from_state_dict(sd), torch.device("mps")).dtype == torch.float32
    assert settle_dtype(build_from_state_dict(sd), cpu, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "float16"])
def test_unsupported_dtypes_are_refused(tiny_files: dict, dtype: object) -> None:
    with pytest.raises(ValueError, match=r"torch\.float32, torch\.float16 or torch\.bfloat16"):
        clip.load(str(tiny_files["tiny-vit"]["archive"]), "cpu", dtype=dtype)  # type: ignore[arg-type]


def test_float_model_fine_tunes_without_nans(tiny_files: dict) -> None:
    """The documented recipe: load, .float(), train with Adam: finite loss and parameters."""
    model, _ = clip.load(str(tiny_files["tiny-vit"]["state_dict_fp16"]), "cpu", dtype=torch.float16)
    model = model.float().train()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-8)
    images, text = sample_images(TINY["tiny-vit"], 3), sample_text(3)
    for _ in range(2):
        logits, _ = model(images, text)
        loss = F.cross_entropy(logits, torch.arange(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
