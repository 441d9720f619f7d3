"""Byte-level BPE tokenizer that reproduces the ids of OpenAI's CLIP tokenizer.

The public entry points are :func:`tokenize` (text -> padded ``torch.int32`` tensor) and
:class:`SimpleTokenizer` (``encode``/``decode``). Importing this module is cheap: the
vocabulary is read only when a tokenizer is first built (see :func:`default_tokenizer`).

Speed comes from three id-preserving shortcuts:

* ``ftfy.fix_text`` and HTML unescaping are skipped for text made only of printable ASCII,
  tab, line feed and carriage return, without ``&``; on such text both are the identity.
* Cleaned text is split on spaces (no pre-token ever contains a space) and the ids of each
  space-free chunk are memoised in a bounded cache, so common words skip regex and BPE.
* The output tensor is filled with one vectorised scatter instead of per-element writes.
"""

from __future__ import annotations

import functools
import gzip
import html
import operator
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Optional, TypeVar, Union

import regex
import torch

__all__ = [
    "EOT_ID",
    "EOT_TOKEN",
    "SOT_ID",
    "SOT_TOKEN",
    "BoundedCache",
    "SimpleTokenizer",
    "basic_clean",
    "bytes_to_unicode",
    "default_bpe",
    "default_tokenizer",
    "get_pairs",
    "tokenize",
    "whitespace_clean",
]

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
END_OF_WORD = "</w>"
_SPECIAL_TOKENS = frozenset((SOT_TOKEN, EOT_TOKEN))
NUM_MERGES = 48894
DEFAULT_CACHE_SIZE = 100_000
# Texts up to this many characters that need ftfy have their cleaned form memoised.
TEXT_CACHE_SIZE = 10_000
TEXT_CACHE_MAX_CHARS = 512

# Pre-tokenisation: special tokens, English contractions, letter runs, single digits and runs
# of anything else that is neither whitespace, letter nor digit.
_PRETOKEN_RE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE_RE = regex.compile(r"\s+")
# Any character outside this set sends text through ftfy + HTML unescaping.
_NEEDS_FIXING_RE = regex.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")

K = TypeVar("K")
V = TypeVar("V")


def default_bpe() -> str:
    """Return the path of the BPE vocabulary shipped with the package.

    Returns:
        Absolute path of ``bpe_simple_vocab_16e6.txt.gz`` next to this module.
    """
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte value to a printable unicode character.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes map, in increasing
    byte order, to ``chr(256)``, ``chr(257)``, ... The dict's insertion order (printable
    bytes first) is the order of the first 256 vocabulary entries.

    Returns:
        Dict from byte value (0-255) to a one-character string.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    for offset, b in enumerate(others):
        mapping[b] = chr(256 + offset)
    return mapping


def get_pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    """Return the set of adjacent symbol pairs of a word.

    Args:
        word: Sequence of symbols (strings).

    Returns:
        Set of ``(left, right)`` tuples for each adjacent position.
    """
    return set(zip(word, word[1:]))


def _fix_text(text: str) -> str:
    import ftfy  # imported lazily: ftfy is slow to import and only needed on first use

    return ftfy.fix_text(text)


def basic_clean(text: str) -> str:
    """Repair mojibake with ftfy, unescape HTML entities twice and strip.

    Args:
        text: Raw input text.

    Returns:
        The cleaned text.
    """
    return html.unescape(html.unescape(_fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of unicode whitespace to one space and strip the ends.

    Args:
        text: Input text.

    Returns:
        The text with normalised whitespace.
    """
    return _WHITESPACE_RE.sub(" ", text).strip()


def _clean_and_split(text: str) -> tuple[str, ...]:
    """The full cleaning (ftfy, HTML, whitespace, lower case), split on spaces."""
    return tuple(whitespace_clean(basic_clean(text)).lower().split(" "))


_clean_and_split_cached = functools.lru_cache(maxsize=TEXT_CACHE_SIZE)(_clean_and_split)


def _clean_chunks(text: str) -> Sequence[str]:
    """Clean and lower-case ``text`` and split it into space-free chunks (possibly empty)."""
    if text.isascii() and _NEEDS_FIXING_RE.search(text) is None:
        # ftfy and html.unescape are the identity here and str.split() splits on exactly
        # the whitespace that ``\s`` matches within this character set.
        return text.lower().split()
    if len(text) <= TEXT_CACHE_MAX_CHARS:
        return _clean_and_split_cached(text)
    return _clean_and_split(text)


class BoundedCache(OrderedDict[K, V]):
    """Dict that evicts its oldest entries beyond ``maxsize``; pinned keys are never evicted.

    Args:
        maxsize: Maximum number of entries kept (pinned ones included).
        pinned: Entries that are always present.
    """

    def __init__(self, maxsize: int, pinned: Optional[dict[K, V]] = None) -> None:
        super().__init__()
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self._pinned: dict[K, V] = dict(pinned or {})
        self.maxsize = max(maxsize, len(self._pinned) + 1)
        self.update(self._pinned)

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        while len(self) > self.maxsize:
            old_key, old_value = self.popitem(last=False)
            if old_key in self._pinned:
                super().__setitem__(old_key, old_value)

    def clear(self) -> None:
        """Drop every entry except the pinned ones."""
        super().clear()
        self.update(self._pinned)


def _read_merges(bpe_path: Union[str, os.PathLike[str]]) -> list[tuple[str, str]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [line.split() for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not a CLIP BPE vocabulary ({NUM_MERGES} merges)")
    return [(m[0], m[1]) for m in merges]


class SimpleTokenizer:
    """CLIP's byte-level BPE tokenizer (49,408 ids).

    Attribute names follow OpenAI's ``clip.simple_tokenizer.SimpleTokenizer``: ``encoder``,
    ``decoder``, ``bpe_ranks``, ``byte_encoder``, ``byte_decoder``, ``cache``, ``pat``.

    Args:
        bpe_path: Path of the gzipped merges file; defaults to the packaged vocabulary.
        cache_size: Bound on the number of entries of each memo cache.
    """

    def __init__(
        self,
        bpe_path: Optional[Union[str, os.PathLike[str]]] = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self._byte_table = str.maketrans({chr(b): s for b, s in self.byte_encoder.items()})
        merges = _read_merges(default_bpe() if bpe_path is None else bpe_path)
        vocab = list(self.byte_encoder.values())
        vocab += [symbol + END_OF_WORD for symbol in vocab]
        vocab += ["".join(merge) for merge in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        specials = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.cache: BoundedCache[str, str] = BoundedCache(cache_size, specials)
        self._chunk_cache: BoundedCache[str, tuple[int, ...]] = BoundedCache(cache_size)
        self.pat = _PRETOKEN_RE

    def bpe(self, token: str) -> str:
        """Apply BPE merges to one byte-encoded pre-token.

        Args:
            token: Pre-token already mapped through :func:`bytes_to_unicode`.

        Returns:
            The resulting symbols joined by single spaces; the last one ends with ``</w>``.
        """
        cached = self.cache.get(token)
        if cached is None:
            cached = token if token in _SPECIAL_TOKENS else " ".join(self._merge(token))
            self.cache[token] = cached
        return cached

    def _merge(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(word) > 1:
            rank, pair = min((ranks.get(p, NUM_MERGES), p) for p in zip(word, word[1:]))
            if rank == NUM_MERGES:
                break
            word = _merge_pair(word, pair)
        return word

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        """Ids of one cleaned, lower-cased, space-free chunk (memoised)."""
        ids = self._chunk_cache.get(chunk)
        if ids is None:
            encoder, table = self.encoder, self._byte_table
            ids = tuple(
                encoder[symbol]
                for piece in _PRETOKEN_RE.findall(chunk)
                for symbol in self.bpe(
                    piece.encode("utf-8").decode("latin-1").translate(table)
                ).split(" ")
            )
            self._chunk_cache[chunk] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Clean ``text`` and convert it to BPE ids (without start/end tokens).

        Args:
            text: Text to encode.

        Returns:
            List of token ids.
        """
        ids: list[int] = []
        for chunk in _clean_chunks(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def decode(self, tokens: Iterable[int]) -> str:
        """Convert ids back to text; each end of word becomes a space.

        Args:
            tokens: Token ids (ints, or anything ``int()`` accepts such as 0-d tensors).

        Returns:
            The decoded text; invalid UTF-8 is replaced with U+FFFD.
        """
        symbols = "".join(self.decoder[int(t)] for t in tokens)
        data = bytes(self.byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every non-overlapping occurrence of ``pair`` in ``word``, left to right."""
    first, second = pair
    merged: list[str] = []
    i, n = 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == first and word[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    """Return the process-wide tokenizer for the packaged vocabulary, built on first use.

    Returns:
        A shared :class:`SimpleTokenizer`.
    """
    return SimpleTokenizer()


def _as_text_list(texts: Union[str, Iterable[str]]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    items = list(texts)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(
                f"texts must be a str or a list of str; item {i} is {type(item).__name__}"
            )
    return items


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool):
        raise TypeError("context_length must be an int, got bool")
    try:
        length = operator.index(context_length)
    except TypeError:
        raise TypeError(
            f"context_length must be an int, got {type(context_length).__name__}"
        ) from None
    if length < 2:
        raise ValueError(f"context_length must be >= 2 (room for start and end), got {length}")
    return length


def _too_long(text: str, n_tokens: int, context_length: int) -> RuntimeError:
    shown = text if len(text) <= 200 else text[:200] + "..."
    return RuntimeError(
        f"Input {shown!r} is too long for context length {context_length} "
        f"({n_tokens} tokens with start/end). Pass truncate=True or use a shorter text."
    )


def _encode_batch(
    texts: list[str], context_length: int, truncate: bool
) -> tuple[array[int], list[int]]:
    """Encode texts with start/end ids; return all ids concatenated and each row's length."""
    tokenizer = default_tokenizer()
    cached_ids = tokenizer._chunk_cache.get
    encode_chunk = tokenizer._encode_chunk
    flat: array[int] = array("i")
    lengths: list[int] = []
    for text in texts:
        ids = [SOT_ID]
        for chunk in _clean_chunks(text):
            ids += cached_ids(chunk) or encode_chunk(chunk)
        ids.append(EOT_ID)
        if len(ids) > context_length:
            if not truncate:
                raise _too_long(text, len(ids), context_length)
            ids = ids[:context_length]
            ids[-1] = EOT_ID
        flat.extend(ids)
        lengths.append(len(ids))
    return flat, lengths


def _pad(flat: array[int], lengths: list[int], context_length: int) -> torch.Tensor:
    """Lay the concatenated ids out as zero-padded rows of ``context_length``."""
    out = torch.zeros((len(lengths), context_length), dtype=torch.int32)
    if lengths:
        mask = torch.arange(context_length) < torch.tensor(lengths)[:, None]
        out[mask] = torch.frombuffer(flat, dtype=torch.int32)
    return out


def tokenize(
    texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = False
) -> torch.Tensor:
    """Tokenize text(s) into a zero-padded tensor of CLIP token ids.

    Each text becomes ``[49406] + ids + [49407]`` followed by zeros.

    Args:
        texts: A string or a list (or other sequence) of strings.
        context_length: Length of each output row (77 for all released CLIP models).
        truncate: If True, cut texts that are too long and end them with 49407; if False,
            raise ``RuntimeError`` for them.

    Returns:
        ``torch.int32`` tensor of shape ``(len(texts), context_length)`` (one row for a str).

    Raises:
        TypeError: If ``texts`` is not a str or a list of str.
        ValueError: If ``context_length`` is smaller than 2.
        RuntimeError: If a text needs more than ``context_length`` ids and ``truncate`` is
            False.
    """
    items = _as_text_list(texts)
    length = _check_context_length(context_length)
    flat, lengths = _encode_batch(items, length, bool(truncate))
    return _pad(flat, lengths, length)
