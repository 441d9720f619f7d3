"""Compatibility alias for code written against ``clip.simple_tokenizer``."""

from clip.tokenizer import (  # noqa: F401
    SimpleTokenizer,
    basic_clean,
    bytes_to_unicode,
    default_bpe,
    get_pairs,
    whitespace_clean,
)
