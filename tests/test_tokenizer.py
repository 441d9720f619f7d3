"""Tests for clip.tokenizer: known answers recorded from the reference, API and properties."""

from __future__ import annotations

import gzip
import hashlib
import json
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clip.tokenizer as tok_mod
from clip.tokenizer import (
    EOT_ID,
    SOT_ID,
    BoundedCache,
    SimpleTokenizer,
    basic_clean,
    bytes_to_unicode,
    default_bpe,
    default_tokenizer,
    get_pairs,
    tokenize,
    whitespace_clean,
)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CORPUS_FILE = DATA / "tokenizer_corpus.json"
IDS_FILE = DATA / "tokenizer_ids.json"


def _load_known_answers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    corpus = json.loads(CORPUS_FILE.read_text(encoding="utf-8"))["entries"]
    recorded = json.loads(IDS_FILE.read_text(encoding="utf-8"))["results"]
    assert len(corpus) == len(recorded)
    return list(zip(corpus, recorded))


KNOWN = _load_known_answers()
# Characters for which the tokenizer skips ftfy (printable ASCII except "&", tab, CR, LF).
FAST_PATH_ALPHABET = "".join(chr(c) for c in range(32, 127) if chr(c) != "&") + "\t\r\n"


@pytest.fixture(scope="module")
def tokenizer() -> SimpleTokenizer:
    return default_tokenizer()


# --------------------------------------------------------------------------- known answers


def test_corpus_matches_recording() -> None:
    recorded = json.loads(IDS_FILE.read_text(encoding="utf-8"))
    assert recorded["corpus_sha256"] == hashlib.sha256(CORPUS_FILE.read_bytes()).hexdigest()
    assert len(KNOWN) >= 500
    categories = {entry["category"] for entry, _ in KNOWN}
    assert {"html", "mojibake", "emoji", "scripts", "specials", "long"} <= categories


@pytest.mark.parametrize(
    ("entry", "expected"), KNOWN, ids=[f"{e['category']}-{i}" for i, (e, _) in enumerate(KNOWN)]
)
def test_known_ids(entry: dict[str, Any], expected: dict[str, Any]) -> None:
    text, length, truncate = entry["text"], entry["context_length"], entry["truncate"]
    assert (expected["context_length"], expected["truncate"]) == (length, truncate)
    if "error" in expected:
        with pytest.raises(RuntimeError, match=f"context length {length}"):
            tokenize(text, context_length=length, truncate=truncate)
        return
    out = tokenize(text, context_length=length, truncate=truncate)
    assert out.shape == (1, length)
    assert out.dtype == torch.int32
    ids = expected["ids"]
    assert out[0, : len(ids)].tolist() == ids
    assert not out[0, len(ids) :].any()


@pytest.mark.parametrize(
    ("entry", "expected"),
    [(e, r) for e, r in KNOWN if "decoded" in r],
    ids=[f"{e['category']}-{i}" for i, (e, r) in enumerate(KNOWN) if "decoded" in r],
)
def test_known_decode(
    tokenizer: SimpleTokenizer, entry: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert tokenizer.decode(tokenizer.encode(entry["text"])) == expected["decoded"]


def test_known_ids_as_one_batch() -> None:
    pairs = [
        (e["text"], r["ids"])
        for e, r in KNOWN
        if "ids" in r and e["context_length"] == 77 and not e["truncate"]
    ]
    out = tokenize([text for text, _ in pairs])
    assert out.shape == (len(pairs), 77)
    for row, (_, ids) in zip(out.tolist(), pairs):
        assert row == ids + [0] * (77 - len(ids))


def test_known_ids_with_fresh_tokenizer_and_tiny_cache() -> None:
    fresh = SimpleTokenizer(cache_size=3)
    for entry, expected in KNOWN[:200]:
        if "ids" in expected and entry["context_length"] == 77 and not entry["truncate"]:
            assert [SOT_ID, *fresh.encode(entry["text"]), EOT_ID] == expected["ids"]


# --------------------------------------------------------------------------- tokenize API


def test_hello_world() -> None:
    out = tokenize("Hello World!")
    assert out.shape == (1, 77)
    assert out[0, :6].tolist() == [49406, 3306, 1002, 256, 49407, 0]
    assert not out[0, 5:].any()


def test_dtype_is_int32() -> None:
    assert tokenize(["a", "b"]).dtype == torch.int32
    assert tokenize([]).dtype == torch.int32


def test_list_and_tuple_inputs() -> None:
    texts = ["a photo of a cat", "a photo of a dog"]
    expected = torch.cat([tokenize(t) for t in texts])
    assert torch.equal(tokenize(texts), expected)
    assert torch.equal(tokenize(tuple(texts)), expected)


def test_empty_list_shape() -> None:
    assert tokenize([]).shape == (0, 77)
    assert tokenize([], context_length=10).shape == (0, 10)


def test_empty_string() -> None:
    out = tokenize("")
    assert out[0, :3].tolist() == [SOT_ID, EOT_ID, 0]


def test_too_long_raises_with_limit_and_hint() -> None:
    text = "word " * 100
    with pytest.raises(RuntimeError) as info:
        tokenize(text)
    message = str(info.value)
    assert "77" in message
    assert "word word" in message
    assert "truncate=True" in message


def test_too_long_message_names_long_text_briefly() -> None:
    with pytest.raises(RuntimeError) as info:
        tokenize("x " * 10_000, context_length=8)
    assert "context length 8" in str(info.value)
    assert len(str(info.value)) < 500


def test_exact_fit_does_not_raise() -> None:
    out = tokenize("word " * 75)
    assert out[0, -1].item() == EOT_ID


def test_truncate() -> None:
    text = " ".join(f"w{i}" for i in range(200))
    full = [SOT_ID, *default_tokenizer().encode(text), EOT_ID]
    for length in (2, 3, 10, 77):
        row = tokenize(text, context_length=length, truncate=True)[0].tolist()
        assert len(row) == length
        assert row[:-1] == full[: length - 1]
        assert row[-1] == EOT_ID


def test_truncate_leaves_short_text_alone() -> None:
    assert torch.equal(tokenize("a cat", truncate=True), tokenize("a cat"))


@pytest.mark.parametrize("bad", [123, None, b"bytes", ["ok", 3], [None], [b"x"], 4.5])
def test_type_errors(bad: Any) -> None:
    with pytest.raises(TypeError, match="str"):
        tokenize(bad)


@pytest.mark.parametrize("length", [1, 0, -5])
def test_context_length_too_small(length: int) -> None:
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=length)


@pytest.mark.parametrize("length", [7.5, "77", None, True])
def test_context_length_not_int(length: Any) -> None:
    with pytest.raises(TypeError, match="context_length"):
        tokenize("a", context_length=length)


def test_context_length_integer_like() -> None:
    import numpy as np

    assert torch.equal(tokenize("a", context_length=np.int64(9)), tokenize("a", context_length=9))


# --------------------------------------------------------------------------- SimpleTokenizer


def test_vocabulary_layout(tokenizer: SimpleTokenizer) -> None:
    assert len(tokenizer.encoder) == 49408
    assert len(tokenizer.decoder) == 49408
    assert tokenizer.encoder["<|startoftext|>"] == SOT_ID
    assert tokenizer.encoder["<|endoftext|>"] == EOT_ID
    assert tokenizer.encoder["!"] == 0
    assert tokenizer.encoder["!</w>"] == 256
    assert len(tokenizer.bpe_ranks) == 48894
    assert all(tokenizer.decoder[i] == t for t, i in tokenizer.encoder.items())


def test_special_tokens_in_text(tokenizer: SimpleTokenizer) -> None:
    assert tokenizer.encode("<|startoftext|>") == [SOT_ID]
    assert tokenizer.encode("<|EndOfText|>") == [EOT_ID]
    assert tokenizer.decode([SOT_ID, EOT_ID]) == "<|startoftext|><|endoftext|>"


def test_bpe_returns_space_joined_symbols(tokenizer: SimpleTokenizer) -> None:
    assert tokenizer.bpe("hello") == "hello</w>"
    assert tokenizer.bpe("<|endoftext|>") == "<|endoftext|>"
    symbols = tokenizer.bpe("supercalifragilistic").split(" ")
    assert "".join(symbols) == "supercalifragilistic</w>"
    assert all(s in tokenizer.encoder for s in symbols)


def test_decode_accepts_tensor_and_replaces_bad_utf8(tokenizer: SimpleTokenizer) -> None:
    ids = tokenizer.encode("a photo")
    assert tokenizer.decode(torch.tensor(ids)) == "a photo "
    lone_byte = tokenizer.byte_encoder[0xE2]  # first byte of a 3-byte sequence
    assert tokenizer.decode([tokenizer.encoder[lone_byte]]) == "\ufffd"


def test_bpe_path_argument() -> None:
    other = SimpleTokenizer(bpe_path=default_bpe())
    assert other.encode("Hello World!") == [3306, 1002, 256]
    assert SimpleTokenizer(Path(default_bpe())).encode("a") == [320]


def test_bad_vocabulary_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("#version\na b\n")
    with pytest.raises(ValueError, match="merges"):
        SimpleTokenizer(bpe_path=str(path))


def test_simple_tokenizer_shim() -> None:
    import clip.simple_tokenizer as shim

    assert shim.SimpleTokenizer is SimpleTokenizer
    assert shim.bytes_to_unicode is bytes_to_unicode
    assert shim.get_pairs is get_pairs
    assert shim.basic_clean is basic_clean
    assert shim.whitespace_clean is whitespace_clean
    assert shim.default_bpe is default_bpe
    assert shim.SimpleTokenizer().encode("a dog") == [320, 1929]


def test_bytes_to_unicode() -> None:
    mapping = bytes_to_unicode()
    assert len(mapping) == 256
    assert len(set(mapping.values())) == 256
    assert mapping[ord("A")] == "A"
    assert mapping[ord("ÿ")] == "ÿ"
    assert mapping[0] == chr(256)
    assert mapping[ord(" ")] == chr(256 + 32)
    assert mapping[0xAD] == chr(256 + 67)
    assert list(mapping)[:3] == [ord("!"), ord('"'), ord("#")]


def test_get_pairs() -> None:
    assert get_pairs(("a", "b", "c", "b", "c")) == {("a", "b"), ("b", "c"), ("c", "b")}
    assert get_pairs(("a",)) == set()


def test_cleaning_helpers() -> None:
    assert basic_clean("  &amp;amp; sÃ³lo ") == "& sólo"
    assert whitespace_clean(" a \t\n\u00a0\u3000 b ") == "a b"


# --------------------------------------------------------------------------- laziness, caches


def test_import_does_not_read_vocabulary() -> None:
    code = (
        "import gzip, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "def boom(*a, **k):\n"
        "    raise AssertionError('vocabulary read at import')\n"
        "gzip.open = boom\n"
        "import clip, clip.tokenizer, clip.simple_tokenizer\n"
        "assert clip.tokenizer.default_tokenizer.cache_info().currsize == 0\n"
        "assert 'ftfy' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_packaged_vocabulary_is_openais_file() -> None:
    digest = hashlib.sha256(Path(default_bpe()).read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_default_tokenizer_is_shared() -> None:
    assert default_tokenizer() is default_tokenizer()


def test_bpe_cache_is_bounded() -> None:
    small = SimpleTokenizer(cache_size=50)
    reference = default_tokenizer()
    words = [f"word{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}x" for i in range(500)]
    for word in words:
        assert small.encode(word) == reference.encode(word)
        assert len(small.cache) <= 50
        assert len(small._chunk_cache) <= 50
    assert small.cache["<|startoftext|>"] == "<|startoftext|>"
    assert small.cache["<|endoftext|>"] == "<|endoftext|>"
    assert small.encode(words[0]) == reference.encode(words[0])


def test_default_cache_bound() -> None:
    assert default_tokenizer().cache.maxsize == tok_mod.DEFAULT_CACHE_SIZE


def test_bounded_cache() -> None:
    cache: BoundedCache[str, int] = BoundedCache(3, pinned={"keep": 0})
    for i in range(10):
        cache[f"k{i}"] = i
        assert len(cache) <= 3
        assert cache["keep"] == 0
    assert set(cache) == {"keep", "k8", "k9"}
    cache.clear()
    assert dict(cache) == {"keep": 0}
    with pytest.raises(ValueError):
        BoundedCache(0)


# --------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120), st.integers(min_value=2, max_value=80))
def test_property_any_text(text: str, length: int) -> None:
    out = tokenize([text, "a"], context_length=length, truncate=True)
    assert out.shape == (2, length)
    assert out.dtype == torch.int32
    row = out[0].tolist()
    assert row[0] == SOT_ID
    assert EOT_ID in row
    end = len(row) - 1 - row[::-1].index(EOT_ID)
    assert all(v == 0 for v in row[end + 1 :])
    assert all(0 <= v < 49408 for v in row)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + " ", max_size=200))
def test_property_letters_round_trip(text: str) -> None:
    tokenizer = default_tokenizer()
    decoded = tokenizer.decode(tokenizer.encode(text))
    cleaned = " ".join(text.split()).lower()
    assert decoded.removesuffix(" ") == cleaned


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=FAST_PATH_ALPHABET, max_size=60))
def test_property_ascii_fast_path_equals_full_cleaning(text: str) -> None:
    """The ASCII shortcut must agree with ftfy + html.unescape + whitespace_clean."""
    assert tok_mod._NEEDS_FIXING_RE.search(text) is None
    fast = tok_mod._clean_chunks(text)
    full = [c for c in whitespace_clean(basic_clean(text)).lower().split(" ") if c]
    assert [c for c in fast if c] == full
