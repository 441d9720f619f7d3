"""Live parity with open_clip, a second oracle independent of OpenAI's reference code.

``test_reference_outputs.py`` compares against outputs recorded once from OpenAI's reference. Here
open_clip (PyPI ``open-clip-torch``) is imported and run at test time, as a black box, on the same
OpenAI-format state dicts (``checkpoints.make_state_dict``), with inputs the recording does not
cover: several salts, weights that are not fp16-representable, batches of 1 and 5 images, a
full-length 77-token row and all-short token batches, and two medium-size architectures.

The oracle model is ``open_clip.model.build_model_from_openai_state_dict(sd)`` in fp32, eval, on
CPU. That builder casts the weights OpenAI keeps in fp16 to fp16 (open-clip-torch 3.3.0 does so even
with ``cast_dtype=torch.float32``), exactly as OpenAI's ``build_model`` does. ``.float()`` undoes
this losslessly only for fp16-representable weights, so:

* fp16-representable weights (``make_state_dict(layout="fp32")``): the built oracle is used as is,
  after checking that its weights equal the state dict bit for bit;
* weights with fp32-only values (``noisy_state_dict``): the oracle's weights are reloaded from the
  state dict after ``.float()`` (again checked bit for bit), so it runs at full fp32 precision like
  our ``clip.load`` on CPU. Our ``build_model(sd).float()`` rounds through fp16 by design, and is
  compared with the oracle as built (rounded the same way).

Tolerance, as in the golden tests: fp32 relative 1e-5 against the tensor's largest magnitude
(``conftest.assert_rel_close``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from checkpoints import TINY, Arch, is_half_in_release, make_state_dict, state_dict_shapes
from conftest import assert_rel_close, model_outputs, sample_images, sample_text

import clip
import clip.model

open_clip = pytest.importorskip(
    "open_clip",
    reason="open_clip is the live parity oracle; install the 'parity' extra: "
    "pip install -e '.[parity]' (the 'test' extra includes it)",
)

RTOL = 1e-5
SOT, EOT = 49406, 49407
SALTS = (0, 7, 1234)
OUTPUT_NAMES = ("encode_image", "encode_text", "logits_per_image", "logits_per_text")
CORPUS_FILE = Path(__file__).resolve().parent.parent / "data" / "tokenizer_corpus.json"

# Medium-size models: still fast on CPU, but with more heads, layers and blocks than TINY.
MEDIUM: dict[str, Arch] = {
    "medium-vit": Arch(128, 64, 4, 256, 16, 77, 49408, 256, 4, 3),
    "medium-rn": Arch(128, 64, (2, 2, 2, 2), 16, None, 77, 49408, 256, 4, 3),
}

State = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def noisy_state_dict(sd: Mapping[str, torch.Tensor], salt: int) -> State:
    """``sd`` with every float value perturbed by about 1e-3 relative.

    fp16 has a relative spacing of ~1e-3, so virtually no perturbed value is fp16-representable:
    a model that rounds any weight through fp16 drifts by far more than the tolerance.
    """
    g = torch.Generator().manual_seed(10_000 + salt)
    out = {}
    for key, t in sd.items():
        if t.is_floating_point():
            t = t * (1 + 1e-3 * torch.randn(t.shape, generator=g))
        out[key] = t
    return out


def _assert_not_fp16_representable(a: Arch, sd: Mapping[str, torch.Tensor]) -> None:
    """Every tensor that OpenAI stores in fp16 holds values that fp16 cannot represent."""
    for key, shape in state_dict_shapes(a).items():
        if is_half_in_release(key, shape):
            t = sd[key]
            inexact = (t.half().float() != t).float().mean().item()
            assert inexact > 0.9, f"{key}: only {inexact:.0%} of values are not fp16-exact"


def _assert_same_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(sd), set(got) ^ set(sd)
    for key, t in sd.items():
        assert got[key].dtype == t.dtype, (key, got[key].dtype, t.dtype)
        assert torch.equal(got[key], t), f"{key}: oracle weights differ from the state dict"


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def open_clip_model(sd: State, *, full_fp32: bool) -> torch.nn.Module:
    """open_clip's CLIP for ``sd``, fp32, eval, CPU.

    ``full_fp32=False``: as the builder makes it (fp16-stored weights rounded through fp16), then
    ``.float()``. ``full_fp32=True``: the exact fp32 values of ``sd`` reloaded into it afterwards.
    """
    # The builder may consume keys of the dict it is given; hand it a shallow copy.
    model = open_clip.model.build_model_from_openai_state_dict(dict(sd)).float().eval()
    if full_fp32:
        model.load_state_dict(sd, strict=True)
        _assert_same_weights(model, sd)
    return model.cpu()


def ours_loaded(sd: State, tmp: Path) -> clip.model.CLIP:
    path = tmp / "checkpoint.pt"
    torch.save(sd, path)
    model, _ = clip.load(str(path), device="cpu", jit=False)
    assert isinstance(model, clip.model.CLIP)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    return model


def ours_built(sd: State) -> clip.model.CLIP:
    return clip.model.build_model(sd).float().eval()


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def _rows(bodies: list[list[int]], length: int = 77) -> torch.Tensor:
    """Token rows SOT + body + EOT, zero-padded (EOT is each row's largest id)."""
    out = torch.zeros(len(bodies), length, dtype=torch.long)
    for i, body in enumerate(bodies):
        ids = [SOT, *body, EOT]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def token_batch(name: str) -> torch.Tensor:
    if name == "mixed-with-full-row":
        # EOT at positions 4, 8, 12 (sample_text), 5 and 10 (captions) and 76, the last one.
        captions = clip.tokenize(["a photo of a cat", "an astronaut riding a horse on the moon"])
        g = torch.Generator().manual_seed(3)
        full = _rows([torch.randint(1, SOT, (75,), generator=g).tolist()])
        ids = torch.cat([sample_text(3).long(), captions.long(), full])
        assert ids[-1, -1] == EOT and bool((ids[-1] != 0).all())
        return ids
    if name == "all-short":
        # Every row short: EOT at positions 1 (empty text) to 5.
        return _rows([[], [320], [320, 1125], [1929, 269, 3306], [256, 8, 49405, 2368]])
    raise ValueError(name)


TOKEN_BATCHES = ("mixed-with-full-row", "all-short")


def oracle_outputs(model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor) -> Outputs:
    """open_clip's features, and logits as its users compute them from its ``forward``."""
    with torch.no_grad():
        out = model(images, ids)
        if isinstance(out, dict):
            image_features, text_features = out["image_features"], out["text_features"]
            scale = out["logit_scale"]
        else:
            image_features, text_features, scale = out[:3]
        logits_per_image = scale * image_features @ text_features.t()
        return {
            "encode_image": model.encode_image(images),
            "encode_text": model.encode_text(ids),
            "logits_per_image": logits_per_image,
            "logits_per_text": logits_per_image.t(),
        }


def assert_outputs_match(ours: Outputs, oracle: Outputs, what: str) -> None:
    for name in OUTPUT_NAMES:
        assert ours[name].dtype == torch.float32, f"{what}/{name}: dtype {ours[name].dtype}"
        assert oracle[name].dtype == torch.float32, f"{what}/{name}: oracle {oracle[name].dtype}"
        try:
            assert_rel_close(ours[name], oracle[name], rel=RTOL)
        except AssertionError as e:
            raise AssertionError(f"{what}/{name}: {e}") from None


# --------------------------------------------------------------------------------------------
# Cached weights and models per (arch, salt, weights): building is the slow part, inputs vary.
# --------------------------------------------------------------------------------------------

WEIGHTS = ("fp16-exact", "fp32-noisy")
ModelKey = tuple[str, int, str]


@pytest.fixture(scope="module")
def states() -> Callable[[str, int, str], State]:
    cache: dict[ModelKey, State] = {}

    def get(arch_name: str, salt: int, weights: str) -> State:
        key = (arch_name, salt, weights)
        if key not in cache:
            a = TINY[arch_name]
            if weights == "fp16-exact":
                cache[key] = make_state_dict(a, layout="fp32", salt=salt)
            else:
                cache[key] = noisy_state_dict(get(arch_name, salt, "fp16-exact"), salt)
                _assert_not_fp16_representable(a, cache[key])
        return cache[key]

    return get


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory, states: Callable[[str, int, str], State]
) -> Callable[[str, int, str], dict[str, torch.nn.Module]]:
    """The oracle and our models for one key; only the last key's models are kept (tests run
    grouped by key, and the models of a tiny arch take ~100 MB)."""
    last: dict[ModelKey, dict[str, torch.nn.Module]] = {}

    def get(arch_name: str, salt: int, weights: str) -> dict[str, torch.nn.Module]:
        key = (arch_name, salt, weights)
        if key not in last:
            last.clear()
            sd = states(*key)
            tmp = tmp_path_factory.mktemp(f"{arch_name}-{salt}-{weights}")
            exact = weights == "fp16-exact"
            # fp16-exact weights go losslessly through the builders' fp16 casts: the oracle is
            # open_clip's model as built, and ours as built by build_model is compared too.
            group = {
                "oracle": open_clip_model(sd, full_fp32=not exact),
                "load": ours_loaded(sd, tmp),
            }
            if exact:
                _assert_same_weights(group["oracle"], sd)
                group["build_model"] = ours_built(sd)
            last[key] = group
        return last[key]

    return get


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", TOKEN_BATCHES)
@pytest.mark.parametrize("n_images", [1, 5])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("salt", SALTS)
@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_tiny_models_match_open_clip(
    models, arch_name: str, salt: int, weights: str, n_images: int, tokens: str
) -> None:
    group = models(arch_name, salt, weights)
    images = sample_images(TINY[arch_name], n=n_images, seed=salt + n_images)
    ids = token_batch(tokens)
    oracle = oracle_outputs(group["oracle"], images, ids)
    for variant in ("load", "build_model"):
        if variant in group:
            what = f"{arch_name}/salt={salt}/{weights}/{variant}"
            assert_outputs_match(model_outputs(group[variant], images, ids), oracle, what)


@pytest.mark.parametrize("salt", SALTS)
@pytest.mark.parametrize("arch_name", sorted(TINY))
def test_build_model_rounds_like_open_clip(states, arch_name: str, salt: int) -> None:
    """On fp32-only weights both builders round the same tensors through fp16, the same way."""
    sd = states(arch_name, salt, "fp32-noisy")
    ours, oracle = ours_built(sd), open_clip_model(sd, full_fp32=False)
    _assert_same_weights(ours, oracle.state_dict())
    a = TINY[arch_name]
    images, ids = sample_images(a, n=5, seed=salt), token_batch("mixed-with-full-row")
    assert_outputs_match(
        model_outputs(ours, images, ids),
        oracle_outputs(oracle, images, ids),
        f"{arch_name}/salt={salt}/build_model-fp16-rounded",
    )


@pytest.mark.parametrize("arch_name", sorted(MEDIUM))
def test_medium_models_match_open_clip(tmp_path: Path, arch_name: str) -> None:
    a = MEDIUM[arch_name]
    sd = noisy_state_dict(make_state_dict(a, salt=5), salt=5)
    _assert_not_fp16_representable(a, sd)
    oracle = open_clip_model(sd, full_fp32=True)
    ours = ours_loaded(sd, tmp_path)
    images = sample_images(a, n=3, seed=11)
    ids = torch.cat([token_batch("mixed-with-full-row"), token_batch("all-short")])
    assert_outputs_match(
        model_outputs(ours, images, ids), oracle_outputs(oracle, images, ids), arch_name
    )


# open_clip's tokenizer (3.3.0) reads the literal text "<|startoftext|>" / "<|endoftext|>" (also
# HTML-escaped) as ordinary characters, while OpenAI's turns it into the special id; ours follows
# OpenAI, as the golden ids in tests/data/tokenizer_ids.json (test_tokenizer.py) check. Texts that
# spell a special token are therefore not compared with open_clip.
SPECIAL_LITERAL = re.compile(r"(startoftext|endoftext)\|", re.IGNORECASE)


def _corpus() -> list[dict]:
    entries = json.loads(CORPUS_FILE.read_text(encoding="utf-8"))["entries"]
    return [e for e in entries if not SPECIAL_LITERAL.search(e["text"])]


def _tokenizer_sample(per_category: int = 4) -> list[dict]:
    """About 50 corpus entries, spread evenly over every category of the corpus."""
    by_category: dict[str, list[dict]] = {}
    for entry in _corpus():
        by_category.setdefault(entry["category"], []).append(entry)
    sample = []
    for group in by_category.values():
        step = max(1, len(group) // per_category)
        sample += group[::step][:per_category]
    return sample


TOKENIZER_SAMPLE = _tokenizer_sample()


@pytest.mark.parametrize(
    "entry",
    TOKENIZER_SAMPLE,
    ids=[f"{e['category']}-{i}" for i, e in enumerate(TOKENIZER_SAMPLE)],
)
def test_tokenize_matches_open_clip(entry: dict) -> None:
    """Same ids as ``open_clip.tokenize`` (packaged vocab, offline). open_clip always truncates
    over-long texts (no ``truncate`` flag), ending them with EOT as OpenAI's ``truncate=True``
    does, so ours is called with ``truncate=True``. Dtypes are not compared."""
    text, length = entry["text"], entry["context_length"]
    expected = open_clip.tokenize([text], context_length=length)
    ours = clip.tokenize([text], context_length=length, truncate=True)
    assert ours.shape == expected.shape == (1, length)
    assert torch.equal(ours.long(), expected.long()), (ours.tolist(), expected.tolist())


def test_tokenizer_sample_is_varied() -> None:
    assert 45 <= len(TOKENIZER_SAMPLE) <= 70
    categories = {e["category"] for e in TOKENIZER_SAMPLE}
    assert {"html", "mojibake", "emoji", "scripts", "long", "truncated"} <= categories
    assert any(e["context_length"] != 77 for e in TOKENIZER_SAMPLE)


def test_tokenize_matches_open_clip_on_whole_corpus() -> None:
    """Every corpus text but those spelling a special token (see ``SPECIAL_LITERAL``)."""
    entries = _corpus()
    assert len(entries) >= 700
    mismatches = []
    for entry in entries:
        text, length = entry["text"], entry["context_length"]
        expected = open_clip.tokenize([text], context_length=length).long()
        ours = clip.tokenize([text], context_length=length, truncate=True).long()
        if not torch.equal(ours, expected):
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]!r}"
