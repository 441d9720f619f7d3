#!/usr/bin/env python
"""Build the tokenizer known-answer corpus and record the reference tokenizer's ids for it.

Writes ``tests/data/tokenizer_corpus.json`` (the texts and the settings to tokenize them
with) and ``tests/data/tokenizer_ids.json`` (the ids the reference produced). The reference
is the ``clip-anytorch`` package, installed with pip into a temporary directory and run as a
black box in a subprocess whose ``sys.path`` starts with that directory and does not contain
this repository, so ``import clip`` there is the reference and not this package.

Not run by CI (it needs PyPI). Usage::

    python scripts/record_tokenizer_ids.py [--reference clip-anytorch==2.6.0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
CORPUS_PATH = DATA / "tokenizer_corpus.json"
IDS_PATH = DATA / "tokenizer_ids.json"
DEFAULT_REFERENCE = "clip-anytorch==2.6.0"

# The child process: argv = [reference_dir, corpus_path, output_path, repo_root]. It imports
# the reference as `clip`, tokenizes every entry and writes one result object per entry.
CHILD = r"""
import json, os, sys, types
ref_dir, corpus_path, out_path, repo = sys.argv[1:5]
def _is_repo(p):
    return os.path.realpath(p or os.getcwd()) == os.path.realpath(repo)
sys.path[:] = [ref_dir] + [p for p in sys.path if p not in ("", ".") and not _is_repo(p)]
try:
    import pkg_resources  # noqa: F401  (the reference imports `packaging` through it)
except ImportError:
    import packaging, packaging.version
    stub = types.ModuleType("pkg_resources")
    stub.packaging = packaging
    sys.modules["pkg_resources"] = stub
import clip
from clip.simple_tokenizer import SimpleTokenizer
assert clip.__file__.startswith(ref_dir), clip.__file__
tokenizer = SimpleTokenizer()
results = []
for entry in json.load(open(corpus_path, encoding="utf-8"))["entries"]:
    text, length, truncate = entry["text"], entry["context_length"], entry["truncate"]
    result = {"context_length": length, "truncate": truncate}
    try:
        row = clip.tokenize(text, context_length=length, truncate=truncate)[0].tolist()
        while row and row[-1] == 0:
            row.pop()
        result["ids"] = row
    except RuntimeError as exc:
        result["error"] = type(exc).__name__
    if entry.get("check_decode"):
        result["decoded"] = tokenizer.decode(tokenizer.encode(text))
    results.append(result)
json.dump({"clip_file": clip.__file__, "results": results}, open(out_path, "w"))
"""


def _prose() -> list[str]:
    return [
        "Hello World!",
        "a photo of a cat",
        "a photo of a dog.",
        "A Photo Of A Dog",
        "A PHOTO OF A DOG",
        "an astronaut riding a horse on the moon",
        "The quick brown fox jumps over the lazy dog.",
        "a diagram",
        "a blurry photo of a {}.",
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "art of the {}.",
        "a photo of the small {}.",
        "a black and white photo of a red sports car parked next to a fire hydrant",
        "Two people sitting on a bench, looking at the sunset over the ocean.",
        "This is a sentence. This is another one; and a third: here!",
        "supercalifragilisticexpialidocious",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "antidisestablishmentarianism and floccinaucinihilipilification",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
        "a",
        "I",
        "x y z",
        "tokenization",
        "CLIP: Contrastive Language-Image Pre-training",
        "state-of-the-art zero-shot classifier",
        "well-known, self-driving, re-enter, e-mail",
        "New York City, NY 10001",
        "mr. smith's dog vs. mrs. jones' cat",
        "U.S.A. and U.K. and e.g. and i.e. etc.",
        "camelCaseIdentifier and PascalCase and snake_case_name",
        "ALL CAPS SHOUTING TEXT WITH NUMBERS 123",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "abababababababababababab",
        "zzzzzzzzzz qqqqqqq xxxxxxxx",
        "the the the the the the",
        "hello, world",
        "hello,world",
        "hello .world",
        "a dog; a cat: a bird",
    ]


def _punctuation_and_numbers() -> list[str]:
    return [
        "!!!",
        "?!?!?!",
        "...",
        "…",
        "---",
        "—–-",
        "(parenthesised) [bracketed] {braced} <angled>",
        "#hashtag @mention $100 %50 ^caret *star* _under_ +plus= ~tilde~ `tick`",
        "\\back\\slash/forward/slash|pipe|",
        ":-) ;-) :-( :D xD <3 </3 ^_^ o_O",
        "\"double quoted\" and 'single quoted'",
        "«guillemets» „German quotes“ 「Japanese brackets」",
        "¡Hola! ¿Qué tal?",
        "§ ¶ † ‡ • ° ± × ÷ ∞ ≈ ≠ ≤ ≥ √ ∑ ∫",
        "€100 £50 ¥1000 ₹500 ₩10000 ₿0.5 $9.99",
        "0",
        "1",
        "12",
        "123",
        "1234567890",
        "3.14159",
        "-42",
        "+1 (555) 123-4567",
        "1,000,000",
        "1.000.000,00",
        "2024-01-31T12:34:56Z",
        "10:30pm",
        "1st 2nd 3rd 4th 21st 100th",
        "100%",
        "50/50",
        "1e10 6.02e23 0xFF 0b1010 0o777",
        "v1.2.3-beta.4+build.5",
        "½ ¼ ¾ ⅓ ⅔ ⅛",
        "x² y³ H₂O CO₂ E=mc²",
        "① ② ③ ⑩ ⑳",
        "Ⅰ Ⅱ Ⅲ Ⅳ Ⅻ ⅰ ⅱ",
        "١٢٣٤٥٦٧٨٩٠",
        "०१२३४५६७८९",
        "一二三四五六七八九十百千万",
        "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ　１２３",
        "ﬁ ﬂ ﬀ ﬃ ﬄ ligatures",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    ]


def _contractions() -> list[str]:
    return [
        "don't",
        "DON'T",
        "Don't",
        "don’t",
        "DON’T",
        "it's",
        "IT'S",
        "it’s",
        "we're",
        "We'Re",
        "they've",
        "I'm",
        "I'M",
        "we'll",
        "WE'LL",
        "she'd",
        "SHE'D",
        "can't won't shouldn't",
        "y'all",
        "rock 'n' roll",
        "'s 't 're 've 'm 'll 'd",
        "'S 'T 'RE 'VE 'M 'LL 'D",
        "''s",
        "'''",
        "o'clock",
        "the dog's bone and the dogs' bones",
        "'tis the season",
        "l'amour d'été",
        "‘single curly’ and “double curly”",
        "it‘s ‛odd’ ′prime″",
        "don`t",
        "I'd've",
        "'123",
        "''",
        "'",
    ]


def _web_and_code() -> list[str]:
    return [
        "https://www.example.com/path/to/page?query=1&sort=desc#section",
        "http://localhost:8080/api/v1/users/42",
        "ftp://files.example.org/pub/file.tar.gz",
        "www.openai.com",
        "https://en.wikipedia.org/wiki/Caf%C3%A9",
        "https://例え.jp/パス",
        "user.name+tag@example.co.uk",
        "mailto:someone@example.com",
        "first.last@sub.domain.org, other@x.io",
        "def tokenize(texts: list[str]) -> torch.Tensor: return None",
        "for (int i = 0; i < n; i++) { sum += a[i]; }",
        "print('hello, world')",
        'if x == 1 and y != 2:\n    return {"key": [1, 2, 3]}',
        "SELECT * FROM users WHERE id = 42;",
        '<div class="container"><p>Hello</p></div>',
        "#include <stdio.h>",
        "x => x * 2",
        "a && b || !c",
        "C:\\Users\\name\\Documents\\file.txt",
        "/usr/local/bin/python3",
        "$ pip install clip-torch==0.1.0",
        'git commit -m "fix: tokenizer"',
        "@decorator\ndef f(): pass",
        "λx.x",
        "a_b-c.d/e\\f",
        "<script>alert('xss')</script>",
        "[link](https://example.com) **bold** _italic_ `code`",
        "#hashtag #AnotherHashtag #123",
        "@user_name mentioned @Other",
        "192.168.0.1:443",
        "2001:db8::1",
        "a1b2c3d4e5",
        "sha256:924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
    ]


def _emoji() -> list[str]:
    return [
        "😀",
        "😀😃😄😁",
        "I love 🍕 and 🍣!",
        "👍",
        "👍🏽",
        "👍🏿👍🏻",
        "👨‍👩‍👧‍👦",
        "👩‍💻 coding",
        "🏳️‍🌈",
        "❤️",
        "❤",
        "♥",
        "✨ sparkle ✨",
        "🇺🇸",
        "🇯🇵🇫🇷🇩🇪",
        "🇬🇧 flag",
        "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
        "1️⃣ 2️⃣ #️⃣",
        "🐶🐱🐭🐹🐰🦊",
        "☀️☁️☂️",
        "🤖 robot",
        "🧑‍🚀",
        "🦄🌈",
        "😂😂😂😂😂😂😂😂",
        "™ © ®",
        "♠♣♥♦",
        "→ ← ↑ ↓ ⇒",
        "★☆",
        "\U0001f600\U0001f3fb",
        "a😀b",
    ]


def _scripts() -> list[str]:
    return [
        "日本語のテキスト",
        "東京は日本の首都です。",
        "中文文本",
        "一只猫坐在垫子上",
        "漢字",
        "ひらがな",
        "カタカナ",
        "ｶﾀｶﾅ",
        "こんにちは世界",
        "ラーメンが好きです！",
        "한국어 텍스트",
        "안녕하세요 세계",
        "고양이 사진",
        "العربية",
        "مرحبا بالعالم",
        "صورة قطة",
        "עברית",
        "שלום עולם",
        "हिन्दी",
        "नमस्ते दुनिया",
        "एक बिल्ली की तस्वीर",
        "ภาษาไทย",
        "สวัสดีชาวโลก",
        "Русский текст",
        "Привет, мир!",
        "фотография кошки",
        "ЁЖИК В ТУМАНЕ",
        "Ελληνικά",
        "Γειά σου Κόσμε",
        "ΟΔΥΣΣΕΥΣ",
        "ς σ Σ",
        "Türkçe İstanbul ıi İI",
        "Ქართული",
        "Հայերեն",
        "বাংলা",
        "தமிழ்",
        "తెలుగు",
        "ગુજરાતી",
        "ਪੰਜਾਬੀ",
        "ಕನ್ನಡ",
        "മലയാളം",
        "සිංහල",
        "မြန်မာ",
        "ខ្មែរ",
        "ລາວ",
        "བོད་ཡིག",
        "ትግርኛ አማርኛ",
        "ᚠᚢᚦᚨᚱᚲ",
        "ᏣᎳᎩ",
        "Tiếng Việt có dấu",
        "Ἀθῆναι ᾅδης",
        "𝐁𝐨𝐥𝐝 𝑰𝒕𝒂𝒍𝒊𝒄",
        "𠜎𠜱𠝹𠱓",
        "English 日本語 한국어 mixed",
        "abc日本def",
        "Москва2024",
        "ÆØÅ æøå",
        "Straße STRASSE ß ẞ",
        "ǅungla ǈubljana",
        "ﬀ ﬅ",
    ]


def _accents() -> list[str]:
    return [
        "café",
        "cafe\u0301",
        "CAFÉ",
        "CAFE\u0301",
        "naïve",
        "nai\u0308ve",
        "résumé",
        "re\u0301sume\u0301",
        "Zoë Saldaña",
        "Ångström",
        "A\u030angstro\u0308m",
        "crème brûlée",
        "jalapeño",
        "jalapen\u0303o",
        "façade",
        "Ça va?",
        "São Paulo",
        "Kraków Łódź",
        "Dvořák",
        "Ñandú",
        "e\u0301\u0301\u0301",
        "\u0301leading combining",
        "a\u20dd",
        "x\u0345",
        "o\u0308\u0304",
        "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
        "ﬁancée",
    ]


def _html() -> list[str]:
    return [
        "&amp;",
        "&amp;amp;",
        "&amp;amp;amp;",
        "&lt;b&gt;bold&lt;/b&gt;",
        "&lt;b&gt;",
        "&#39;",
        "it&#39;s",
        "&#x27;quoted&#x27;",
        "&nbsp;",
        "a&nbsp;b",
        "a&nbsp;&nbsp;&nbsp;b",
        "&quot;hello&quot;",
        "Tom &amp; Jerry",
        "AT&T",
        "R&D",
        "&copy; 2024",
        "&eacute;t&eacute;",
        "&EACUTE;",
        "&Eacute;",
        "&NTILDE;",
        "&hellip;",
        "&mdash;&ndash;",
        "&#8217;",
        "&#8220;curly&#8221;",
        "&#128512;",
        "&#0;",
        "&#128;",
        "&#x80;",
        "&#xD800;",
        "&#9999999;",
        "&amp;lt;b&amp;gt;",
        "&ampx",
        "&copy",
        "&AMP;",
        "&Amp;",
        "&unknownentity;",
        "& ; &# &#x; &;",
        "<b>&amp;</b>",
        "<p>caf&eacute;</p>",
        "&lt;|endoftext|&gt;",
        "&lt;|startoftext|&gt;",
        "5 &lt; 6 &amp;&amp; 7 &gt; 3",
    ]


def _mojibake() -> list[str]:
    return [
        "sÃ³lo",
        "Ã©",
        "cafÃ©",
        "Ã¼ber",
        "naÃ¯ve",
        "doesnâ€™t",
        "â€œquotedâ€\x9d",
        "â€œquotedâ€",
        "Ã¢â‚¬â„¢",
        "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
        "ÃƒÂ©",
        "Ã¶Ã¤Ã¼",
        "Ã‰cole",
        "pÃ¢tÃ©",
        "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
        "æ—¥æœ¬èªž",
        "ðŸ˜€",
        "Â£100",
        "Â",
        "Ã",
        "l’humanitÃ©",
        "Ã\xa0 la carte",
        "\x80\x81\x8d\x9f",
        "caf\x82",
        "cÌ§",
    ]


def _whitespace_and_controls() -> list[str]:
    return [
        "",
        " ",
        "   ",
        "\t",
        "\n",
        "\r\n",
        " \t\n\r\x0b\x0c ",
        "\u00a0",
        "\u3000",
        "\u2028\u2029",
        "\u200b",
        "\u200b\u200b\u200b",
        "\ufeff",
        "tab\tseparated\tvalues",
        "line one\nline two\nline three",
        "windows\r\nline\r\nbreaks",
        "old mac\rbreaks",
        "  leading and trailing spaces  ",
        "multiple     internal      spaces",
        "non\u00a0breaking\u00a0space",
        "zero\u200bwidth\u200bspace",
        "zero\u200cwidth\u200dnon\u2060joiner",
        "soft\u00adhyphen",
        "ideographic\u3000space",
        "em\u2003space and thin\u2009space and hair\u200aspace",
        "narrow\u202fnbsp medium\u205fmath ogham\u1680space",
        "next\u0085line",
        "\x00null\x00byte",
        "bell\x07char",
        "back\x08space",
        "escape\x1b[31mred\x1b[0m",
        "file\x1csep\x1dgroup\x1erecord\x1funit",
        "del\x7fchar",
        "vertical\x0btab\x0cformfeed",
        "c1\x85\x8d\x9fcontrols",
        "bidi\u202eoverride\u202c",
        "lrm\u200erlm\u200f",
        "\ufffd replacement",
        "\ufffe\uffff noncharacters",
        "\U000e0041\U000e007f tags",
        "private\ue000use",
        "lone \ud800 surrogate",
        "lone \udfff low surrogate",
        "\n\n\n\n",
        " \u00a0 \u2003 \t ",
    ]


def _specials() -> list[str]:
    return [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|startoftext|>hello<|endoftext|>",
        "<|startoftext|> hello <|endoftext|>",
        "<|StartOfText|>",
        "<|ENDOFTEXT|>",
        "<|EndOfText|> and <|sTaRtOfTeXt|>",
        "a<|endoftext|>b",
        "<|endoftext|><|endoftext|><|endoftext|>",
        "<|endoftext|",
        "|endoftext|>",
        "< |endoftext| >",
        "<|end of text|>",
        "<|startoftext|>" * 3,
        "<|>",
        "<||>",
        "</w>",
        "a</w>b",
        "<|endoftext|>'s",
    ]


def _generated(rng: random.Random, count: int) -> list[str]:
    pools = (
        _prose()
        + _contractions()
        + _web_and_code()
        + _emoji()
        + _scripts()
        + _accents()
        + _html()
        + _mojibake()
        + _punctuation_and_numbers()
    )
    words = " ".join(pools).split()
    seps = [" ", " ", " ", "", "  ", "\n", "\t", ", ", ". ", "\u00a0", "-", "&amp;"]
    texts = []
    for _ in range(count):
        n = rng.randint(1, 14)
        parts = [rng.choice(words) + rng.choice(seps) for _ in range(n)]
        text = "".join(parts)
        if rng.random() < 0.2:
            text = text.upper()
        texts.append(text)
    for _ in range(count // 4):
        n = rng.randint(1, 20)
        texts.append("".join(chr(rng.randint(32, 0x2FFF)) for _ in range(n)))
    return texts


def _entry(category: str, text: str, context_length: int = 77, truncate: bool = False) -> dict:
    return {
        "category": category,
        "text": text,
        "context_length": context_length,
        "truncate": truncate,
        "check_decode": len(text) < 2000,
    }


def _long_entries(rng: random.Random) -> list[dict]:
    words = " ".join(_prose()).split()
    entries = []
    for i in range(12):
        text = " ".join(rng.choice(words) for _ in range(60 + 40 * i))
        entries.append(_entry("long", text, 77, True))
    entries.append(_entry("long", "a " * 5000, 77, True))
    entries.append(_entry("long", "日本語" * 400, 77, True))
    entries.append(_entry("long", "😀" * 300, 77, True))
    entries.append(_entry("long", "word " * 75, 77, False))  # exactly 77 ids: fits
    entries.append(_entry("long", "word " * 76, 77, False))  # 78 ids: error
    entries.append(_entry("long", "word " * 76, 77, True))
    entries.append(_entry("long", "the quick brown fox " * 30, 77, False))  # error
    for length in (2, 3, 5, 16, 32, 64, 128, 256):
        text = " ".join(rng.choice(words) for _ in range(length + 10))
        entries.append(_entry("context_length", text, length, True))
        entries.append(_entry("context_length", "a photo of a dog", length, True))
    entries.append(_entry("context_length", "a photo of a dog", 6, False))  # 7 ids: error
    entries.append(_entry("context_length", "a photo of a dog", 7, False))  # fits exactly
    entries.append(_entry("context_length", "", 2, False))
    return entries


def build_corpus(seed: int = 20240131) -> list[dict]:
    """Return the corpus entries (deterministic for a given seed)."""
    rng = random.Random(seed)
    groups = {
        "prose": _prose(),
        "punctuation_numbers": _punctuation_and_numbers(),
        "contractions": _contractions(),
        "web_code": _web_and_code(),
        "emoji": _emoji(),
        "scripts": _scripts(),
        "accents": _accents(),
        "html": _html(),
        "mojibake": _mojibake(),
        "whitespace_controls": _whitespace_and_controls(),
        "specials": _specials(),
        "generated": _generated(rng, 240),
    }
    entries = [_entry(cat, text) for cat, texts in groups.items() for text in texts]
    entries += [_entry("truncated", e["text"], 77, True) for e in entries[::25]]
    return entries + _long_entries(rng)


def _install_reference(requirement: str, target: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            target,
            requirement,
        ],
        check=True,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    """Write the corpus, run the reference on it and write the recorded ids."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=DEFAULT_REFERENCE, help="pip requirement")
    args = parser.parse_args()
    entries = build_corpus()
    DATA.mkdir(parents=True, exist_ok=True)
    CORPUS_PATH.write_text(json.dumps({"entries": entries}, indent=1) + "\n", encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = str(Path(tmp) / "ref")
        _install_reference(args.reference, ref_dir)
        out_path = Path(tmp) / "out.json"
        cmd = [sys.executable, "-c", CHILD, ref_dir, str(CORPUS_PATH), str(out_path), str(REPO)]
        subprocess.run(cmd, check=True, cwd=tmp)
        results = json.loads(out_path.read_text())["results"]
    payload = {
        "reference": args.reference,
        "corpus_sha256": _sha256(CORPUS_PATH),
        "note": "ids are trimmed of trailing zero padding; 'error' means tokenize raised",
        "results": results,
    }
    IDS_PATH.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    errors = sum("error" in r for r in results)
    print(f"recorded {len(results)} entries ({errors} errors) from {args.reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
