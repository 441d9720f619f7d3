"""Parity of our models with OpenAI's reference implementation, on recorded golden outputs.

``tests/data/reference_outputs.pt`` was recorded by ``scripts/record_reference_outputs.py``, which
ran the reference CLIP (``clip-anytorch==2.6.0``) on the synthetic checkpoints of
``checkpoints.make_state_dict``. Here we rebuild the same checkpoints, load them with our
``clip.load`` and compare. Tolerance for fp32 outputs, elementwise::

    |ours - ref| <= 1e-5 * |ref| + 1e-5 * max|ref|

i.e. a relative error of 1e-5, measured against the tensor's scale for entries near zero.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import TINY, make_state_dict, state_dict_digest, write_openai_archive
from conftest import model_outputs

import clip

from .images import make_image

GOLDEN_PATH = Path(__file__).resolve().parent.parent / "data" / "reference_outputs.pt"
OUTPUT_NAMES = ("encode_image", "encode_text", "logits_per_image", "logits_per_text")
LAYOUTS = ("fp32", "openai")
RTOL = 1e-5
PIXEL_ATOL = 1e-6
RERECORD = "re-record with `python scripts/record_reference_outputs.py`"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN_PATH, weights_only=True)


@pytest.fixture(scope="module")
def checkpoint_paths(
    tmp_path_factory: pytest.TempPathFactory, golden: dict
) -> Callable[[str, str], Path]:
    """Lazily written state-dict files, one per (arch, layout), digest-checked on creation."""
    cache: dict[tuple[str, str], Path] = {}

    def path_for(arch_name: str, layout: str) -> Path:
        if (arch_name, layout) not in cache:
            sd = make_state_dict(TINY[arch_name], layout=layout)
            _check_digest(sd, golden["archs"][arch_name]["digest"][layout], arch_name, layout)
            path = tmp_path_factory.mktemp("ckpt") / f"{arch_name}-{layout}.pt"
            torch.save(sd, path)
            cache[arch_name, layout] = path
        return cache[arch_name, layout]

    return path_for


def _check_digest(sd: dict, recorded: str, arch_name: str, layout: str) -> None:
    digest = state_dict_digest(sd)
    if digest != recorded:
        pytest.fail(
            f"make_state_dict({arch_name!r}, layout={layout!r}) no longer reproduces the weights "
            f"the goldens were recorded with (digest {digest[:16]} != {recorded[:16]}). Either "
            f"torch's RNG (torch.randn with a seeded Generator) changed in torch "
            f"{torch.__version__}, or tests/checkpoints.py changed; {RERECORD}."
        )


def assert_matches_reference(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """fp32 parity with relative tolerance ``RTOL`` (see module docstring)."""
    assert ours.dtype == torch.float32, f"{what}: dtype {ours.dtype}, reference float32"
    atol = RTOL * float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("arch_name", sorted(TINY))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_digest_matches_recording(
    golden: dict, checkpoint_paths, arch_name: str, layout: str
) -> None:
    recorded = golden["archs"][arch_name]["digest"][layout]
    assert state_dict_digest(make_state_dict(TINY[arch_name], layout=layout)) == recorded
    # The file the parity tests load holds exactly those weights.
    on_disk = torch.load(checkpoint_paths(arch_name, layout), weights_only=True)
    assert state_dict_digest(on_disk) == recorded


def test_state_dict_digest_sees_one_changed_value() -> None:
    sd = make_state_dict(TINY["tiny-vit"])
    before = state_dict_digest(sd)
    sd["visual.proj"] = sd["visual.proj"].clone()
    sd["visual.proj"][0, 0] += 1e-3
    assert state_dict_digest(sd) != before
    assert before == hashlib.sha256(_digest_input(make_state_dict(TINY["tiny-vit"]))).hexdigest()


def _digest_input(sd: dict) -> bytes:
    """What :func:`state_dict_digest` hashes, written out independently of it."""
    parts = []
    for key in sorted(sd):
        t = sd[key]
        parts.append(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        parts.append(t.numpy().tobytes())  # numpy's bytes, not a uint8 view
    return b"".join(parts)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_outputs_match_reference(
    golden: dict, checkpoint_paths, arch_name: str, layout: str, jit: bool
) -> None:
    ref = golden["archs"][arch_name]
    with warnings.catch_warnings():
        # Like the reference, jit=True on a plain state dict may warn and fall back to eager.
        warnings.simplefilter("ignore", UserWarning)
        model, _ = clip.load(str(checkpoint_paths(arch_name, layout)), device="cpu", jit=jit)
    ours = model_outputs(model, ref["images"], golden["token_ids"])
    for name in OUTPUT_NAMES:
        assert_matches_reference(ours[name], ref[name], f"{arch_name}/{layout}/jit={jit}/{name}")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_torchscript_archive_outputs_match_reference(
    golden: dict, tmp_path: Path, arch_name: str, jit: bool
) -> None:
    """The released layout (a TorchScript archive), both as a traced model and rebuilt eagerly."""
    sd = make_state_dict(TINY[arch_name], layout="openai")
    _check_digest(sd, golden["archs"][arch_name]["digest"]["openai"], arch_name, "openai")
    path = tmp_path / "archive.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        write_openai_archive(TINY[arch_name], sd, str(path))
    model, _ = clip.load(str(path), device="cpu", jit=jit)
    assert isinstance(model, torch.jit.ScriptModule) == jit
    ref = golden["archs"][arch_name]
    ours = model_outputs(model, ref["images"], golden["token_ids"])
    for name in OUTPUT_NAMES:
        assert_matches_reference(ours[name], ref[name], f"{arch_name}/archive/jit={jit}/{name}")


@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_loaded_model_is_fp32_like_reference(golden: dict, checkpoint_paths, arch_name) -> None:
    ref = golden["archs"][arch_name]
    model, _ = clip.load(str(checkpoint_paths(arch_name, "openai")), device="cpu", jit=False)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    assert dtypes == ref["load_parameter_dtypes"]
    assert model.visual.input_resolution == ref["load_input_resolution"]


@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_load_preprocess_matches_reference(golden: dict, checkpoint_paths, arch_name) -> None:
    ref = golden["archs"][arch_name]
    _, preprocess = clip.load(str(checkpoint_paths(arch_name, "openai")), device="cpu")
    ours = preprocess(make_image(ref["load_preprocess_image"]))
    expected = ref["load_preprocess_output"]
    torch.testing.assert_close(ours, expected, rtol=0, atol=PIXEL_ATOL)


def test_tokenize_matches_reference_ids(golden: dict) -> None:
    """Same token ids. The dtype is not compared: clip-anytorch always returns int64, while
    OpenAI's upstream ``clip.tokenize`` returns int32 on torch >= 1.8."""
    ids = clip.tokenize(golden["captions"])
    assert ids.dtype in (torch.int32, torch.int64)
    assert torch.equal(ids.long(), golden["token_ids"].long())
