"""clip.load on tiny checkpoints in every OpenAI format, jit on and off, and its failure modes."""

from __future__ import annotations

import copy
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from checkpoints import TINY, Arch, is_half_in_release, make_state_dict
from conftest import assert_rel_close, sample_images, sample_text

import clip
from clip.checkpoint import CheckpointError
from clip.clip import settle_dtype
from clip.model import CLIP, build_from_state_dict

FORMATS = ["state_dict", "state_dict_fp16", "archive"]


def expected_outputs(arch: Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = build_from_state_dict(make_state_dict(arch))
    with torch.no_grad():
        images, texts = sample_images(arch), sample_text()
        return model.encode_image(images), model.encode_text(texts), model(images, texts)[0]


def outputs(model: torch.nn.Module, arch: Arch) -> tuple[torch.Tensor, ...]:
    images, texts = sample_images(arch), sample_text()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts), model(images, texts)[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_eager_on_cpu(tiny_files: dict, arch_name: str, fmt: str) -> None:
    arch = TINY[arch_name]
    model, preprocess = clip.load(str(tiny_files[arch_name][fmt]), device="cpu")
    assert isinstance(model, CLIP) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for got, want in zip(outputs(model, arch), expected_outputs(arch)):
        assert torch.equal(got, want)
    assert preprocess.transforms[1].size == (arch.image_resolution, arch.image_resolution)


@pytest.mark.parametrize("fmt", ["archive"])
def test_load_jit(tiny_files: dict, arch_name: str, fmt: str) -> None:
    arch = TINY[arch_name]
    model, _ = clip.load(str(tiny_files[arch_name][fmt]), device="cpu", jit=True)
    assert isinstance(model, torch.jit.ScriptModule)
    assert model.input_resolution.item() == arch.image_resolution
    for got, want in zip(outputs(model, arch), expected_outputs(arch)):
        assert_rel_close(got, want)
    with torch.no_grad():  # other batch sizes and shorter texts than the trace example
        eager = build_from_state_dict(make_state_dict(arch))
        texts = sample_text(5)[:, :30]
        assert_rel_close(model.encode_text(texts), eager.encode_text(texts))
        images = sample_images(arch, 4, seed=3)
        assert_rel_close(model.encode_image(images), eager.encode_image(images))


def test_jit_model_has_the_archive_scalars_and_eager_attributes(tiny_files: dict) -> None:
    arch = TINY["tiny-vit"]
    model, _ = clip.load(str(tiny_files["tiny-vit"]["archive"]), device="cpu", jit=True)
    # OpenAI's archives: 0-d tensors read as model.context_length.item()
    assert model.input_resolution.item() == arch.image_resolution
    assert model.context_length.item() == arch.context_length
    assert model.vocab_size.item() == arch.vocab_size
    # what code written for the eager model reads
    assert model.visual.input_resolution == arch.image_resolution
    assert model.dtype == torch.float32


def test_jit_state_dict_has_exactly_the_archive_keys(tiny_files: dict, arch_name: str) -> None:
    path = str(tiny_files[arch_name]["archive"])
    model, _ = clip.load(path, device="cpu", jit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        archive = torch.jit.load(path, map_location="cpu")
    assert set(model.state_dict()) == set(archive.state_dict())  # no attn_mask keys


def test_jit_model_saved_with_torch_jit_save_loads_back(tiny_files: dict, tmp_path: Path) -> None:
    arch = TINY["tiny-vit"]
    model, _ = clip.load(str(tiny_files["tiny-vit"]["archive"]), device="cpu", jit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.save(model, str(tmp_path / "saved.pt"))
    for jit in (False, True):
        again, _ = clip.load(str(tmp_path / "saved.pt"), device="cpu", jit=jit)
        for got, want in zip(outputs(again, arch), expected_outputs(arch)):
            assert_rel_close(got, want)


def jit_and_eager(path: str, dtype: torch.dtype) -> tuple[torch.nn.Module, CLIP]:
    jit_model, _ = clip.load(path, device="cpu", jit=True, dtype=dtype)
    eager, _ = clip.load(path, device="cpu", dtype=dtype)
    return jit_model, eager


def test_jit_float_after_an_fp16_load_gives_fp32_outputs(tiny_files: dict, arch_name: str) -> None:
    # the CUDA default is fp16; .float() must not keep the traced fp16 casts
    arch = TINY[arch_name]
    model, eager = jit_and_eager(str(tiny_files[arch_name]["archive"]), torch.float16)
    assert model.float() is model and model.dtype == torch.float32
    for got, want in zip(outputs(model, arch), outputs(eager.float(), arch)):
        assert got.dtype == torch.float32
        assert_rel_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_jit_cast_to_half_precision_matches_the_eager_cast(
    tiny_files: dict, dtype: torch.dtype
) -> None:
    arch = TINY["tiny-rn"]
    model, eager = jit_and_eager(str(tiny_files["tiny-rn"]["archive"]), torch.float32)
    model.to(dtype)
    eager.to(dtype)
    images, texts = sample_images(arch), sample_text()
    with torch.no_grad():
        got = model.encode_image(images)
        assert got.dtype == dtype and torch.equal(got, eager.encode_image(images))
        # the trace runs all 77 columns: compare with the eager model's untrimmed text path
        tokens, eot = eager.encode_text_tokens(texts, project=True)
        got = model.encode_text(texts)
        assert got.dtype == dtype and torch.equal(got, tokens[torch.arange(len(texts)), eot])


def test_jit_moved_to_an_untraceable_device_is_refused_clearly(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = clip.load(str(tiny_files["tiny-vit"]["archive"]), device="cpu", jit=True)

    def untraceable(module: torch.nn.Module) -> None:
        # what recent torch does on "meta" (torch 2.4 still traced there): the tracer fails
        raise RuntimeError("convolution shape checks fail under the tracer")

    monkeypatch.setattr(clip.jit, "_trace_module", untraceable)
    with pytest.raises(RuntimeError, match=r"meta.*cannot be traced.*jit=False"):
        model.to("meta")


def test_jit_move_retraces_from_the_moved_weights(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No second device here: check that a device move re-traces the eager model holding the
    # moved tensors (the dtype tests above run the same path end to end; benchmarks/gpu_check.py
    # runs CUDA -> CPU).
    import clip.jit

    model, _ = clip.load(str(tiny_files["tiny-vit"]["archive"]), device="cpu", jit=True)
    seen: list[CLIP] = []

    def record(eager: CLIP) -> None:
        seen.append(eager)
        raise NotImplementedError("recorded")

    monkeypatch.setattr(clip.jit, "_trace_module", record)
    with pytest.raises(RuntimeError, match="recorded"):
        model.to("meta")
    (eager,) = seen
    assert {t.device.type for t in [*eager.parameters(), *eager.buffers()]} == {"meta"}
    assert eager.visual.proj is model.visual.proj


def test_jit_deepcopy_is_a_traced_clip_of_its_own(tiny_files: dict) -> None:
    arch = TINY["tiny-rn"]
    model, _ = clip.load(str(tiny_files["tiny-rn"]["archive"]), device="cpu", jit=True)
    twin = copy.deepcopy(model)
    assert type(twin) is type(model)
    assert twin.visual.attnpool.c_proj.weight is not model.visual.attnpool.c_proj.weight
    twin.half()  # follows its own casts, leaves the original alone
    assert model.dtype == torch.float32 and model.visual.conv1.weight.dtype == torch.float32
    images = sample_images(arch)
    with torch.no_grad():
        assert twin.encode_image(images).dtype == torch.float16
        assert model.encode_image(images).dtype == torch.float32


def test_jit_with_a_state_dict_warns_and_loads_eagerly(tiny_files: dict) -> None:
    with pytest.warns(UserWarning, match="jit=False"):
        model, _ = clip.load(str(tiny_files["tiny-vit"]["state_dict"]), device="cpu", jit=True)
    assert isinstance(model, CLIP)


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu")])
def test_cpu_device_spellings_give_fp32(tiny_files: dict, device: object) -> None:
    model, _ = clip.load(str(tiny_files["tiny-rn"]["archive"]), device=device)  # type: ignore[arg-type]
    assert all(t.dtype in (torch.float32, torch.long) for t in model.state_dict().values())


def test_default_device_is_decided_at_call_time(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen.append(1) or False)
    model, _ = clip.load(str(tiny_files["tiny-vit"]["archive"]))
    assert seen and model.visual.conv1.weight.device.type == "cpu"


def test_path_objects_are_accepted(tiny_files: dict) -> None:
    model, _ = clip.load(tiny_files["tiny-rn"]["state_dict"], device="cpu")
    assert isinstance(model, CLIP)


def test_unavailable_devices_are_refused_clearly(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = str(tiny_files["tiny-vit"]["archive"])
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(RuntimeError, match=r"not available.*device='cpu'"):
            clip.load(path, device=device)
    with pytest.raises(RuntimeError, match="Expected one of"):  # torch's own list of devices
        clip.load(path, device="gpu")


def test_a_directory_without_weights_names_the_expected_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(FileNotFoundError, match=r"open_clip_model\.safetensors.*notes\.txt"):
        clip.load(str(tmp_path))


def test_cuda_gets_openai_mixed_precision(arch: Arch) -> None:
    model = settle_dtype(build_from_state_dict(make_state_dict(arch)), torch.device("cuda"))
    for key, tensor in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            half = is_half_in_release(key, tuple(tensor.shape))
            assert tensor.dtype == (torch.float16 if half else torch.float32), key


def test_mps_gets_fp32(arch: Arch) -> None:
    sd = make_state_dict(arch, layout="openai")
    model = settle_dtype(build_from_state_dict(sd), torch.device("mps"))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compat_names() -> None:
    assert clip.available_models() == [
        "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
        "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px",
    ]  # fmt: skip
    from clip.clip import _MODELS, _download, _transform, available_models, load, tokenize

    assert list(_MODELS) == available_models() and callable(_download) and callable(load)
    assert callable(tokenize) and _transform(224).transforms[1].size == (224, 224)
    for name, url in _MODELS.items():
        assert len(url.split("/")[-2]) == 64, name


# ---- failure modes --------------------------------------------------------------------------


def test_unknown_name_lists_models() -> None:
    with pytest.raises(RuntimeError, match=r"ViT-B/32.*available models.*RN50"):
        clip.load("ViT-B/32-typo")
    with pytest.raises(RuntimeError, match=r"Did you mean 'ViT-B/32'\?"):
        clip.load("ViT-B-32")


def test_missing_file() -> None:
    with pytest.raises(RuntimeError, match="not found"):
        clip.load("/no/such/file.pt")


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="neither a TorchScript archive nor") as info:
        clip.load(str(path), device="cpu")
    assert "Check the documentation" not in str(info.value)  # torch's generic advice is dropped


def test_an_image_is_not_a_checkpoint() -> None:
    photo = os.path.join(os.path.dirname(__file__), "data", "images", "photo.jpg")
    with pytest.raises(CheckpointError, match=r"photo\.jpg.*corrupt download\?") as info:
        clip.load(photo, device="cpu")
    assert "Weights only load failed" not in str(info.value)


@pytest.mark.parametrize("fmt", ["state_dict", "archive"])
def test_truncated_file(tiny_files: dict, tmp_path: Path, fmt: str) -> None:
    data = tiny_files["tiny-vit"][fmt].read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        clip.load(str(path), device="cpu")


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_pickles_that_run_code_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": _RunsCode()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused"):
        clip.load(str(path), device="cpu")


def test_a_saved_model_object_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="dict of tensors"):
        clip.load(str(path), device="cpu")


def test_state_dict_with_missing_keys(tmp_path: Path) -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    del sd["visual.ln_post.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing keys: visual\.ln_post\.weight"):
        clip.load(str(tmp_path / "partial.pt"), device="cpu")
