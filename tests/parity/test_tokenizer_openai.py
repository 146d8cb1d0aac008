"""mmjax.tokenizer.CLIPTokenizer against OpenAI's own CLIP tokenizer, with the real vocabulary, on real text.

The reference is ``SimpleTokenizer`` of open_clip's ``tokenizer.py`` (OpenAI's ``clip/simple_tokenizer.py``, copied;
it cleans every text with ``ftfy.fix_text``), loaded from the file so that the ``open_clip`` package's
``__init__`` (which imports torchvision, broken beside torch 2.13) never runs; the vocabulary is the
``bpe_simple_vocab_16e6.txt.gz`` shipped inside the ``open_clip_torch`` wheel (``make setup`` installs it with
``--no-deps``). Real text: the translations of the ``iso-codes`` Debian package (country, language, currency and
script names in ~150 languages; ``make data`` installs it) and of coreutils' messages where present, plus curated
strings with curly quotes, full-width forms, ligatures, mojibake and HTML entities. A missing reference or corpus
fails the test (with the command that installs it); it never skips.
"""

import glob
import importlib.util
import os
import struct
import zlib

import numpy as np
import pytest

from mmjax.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.parity

INSTALL_REFERENCE = "make setup (or: .venv/bin/pip install --no-deps open_clip_torch==3.3.0)"
INSTALL_CORPUS = "make data (or: sudo apt-get install iso-codes)"

CURATED = [
    "a photo of a cat",
    "it’s a ‘quoted’ “double” word — isn’t it?",  # curly quotes and apostrophes
    "Don’t stop believing",
    "一只猫，坐在垫子上：很可爱！",  # Chinese with full-width punctuation
    "你好（世界）？「引用」、『二重』。",
    "これは「猫」の写真です。東京タワー！ｶﾀｶﾅ",  # Japanese, half-width katakana
    "ＡＢＣ ａｂｃ １２３ ＠＃＄％＆",  # full-width Latin, digits, symbols
    "ﬁne ﬂower ﬀ ﬃ ﬄ ﬅ ﬆ",  # ligatures
    "cafÃ©, donâ€™t, Ã¼ber, SchÃ¶ne GrÃ¼ÃŸe",  # mojibake (UTF-8 read as Windows-1252)
    "â€œquotedâ€\x9d",
    "fish &amp;amp; chips &lt;b&gt;bold&lt;/b&gt; &#39;single&#39; &quot;double&quot; caf&eacute; a&nbsp;b",
    "<b>tag</b> &amp; more",  # a '<' stops ftfy's own unescaping; OpenAI's two still run
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic space",
    "zero\u200bwidth, \x1b[31mred\x1b[0m, bell\x07char, C1 \x93curly\x94",
    "Cafe\u0301 ǅ ÅNGSTRÖM Straße Ωmega",
    "Καλημέρα κόσμε; Съешь же ещё этих мягких французских булок",
    "مرحبا بالعالم، كيف حالك؟ שלום עולם",
    "नमस्ते दुनिया। 안녕하세요, 세계! สวัสดีชาวโลก",
    "emoji 😀🎉👍🏽 👨‍👩‍👧 🇫🇷",
    "numbers 3.14159 1,000,000 2nd 42nd ①② ½ ² ⅷ",
    "",
    "   ",
    "the cat sat on the mat " * 20,  # longer than the context
]


def _load_reference():
    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the reference open_clip_torch is not installed; install it with {INSTALL_REFERENCE}")
    root = list(spec.submodule_search_locations)[0]
    bpe_path = os.path.join(root, "bpe_simple_vocab_16e6.txt.gz")
    module_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", os.path.join(root, "tokenizer.py"))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path), bpe_path


@pytest.fixture(scope="module")
def tokenizers():
    reference, bpe_path = _load_reference()
    return CLIPTokenizer.from_pretrained(bpe_path), reference


def read_mo(path: str) -> list[tuple[str, list[str]]]:
    """``[(msgid, [translations])]`` of a GNU gettext ``.mo`` file (plural forms split)."""
    data = open(path, "rb").read()
    order = "<" if struct.unpack("<I", data[:4])[0] == 0x950412DE else ">"
    _, n, originals, translations = struct.unpack(order + "4I", data[4:20])
    out = []
    for k in range(n):
        length, offset = struct.unpack(order + "2I", data[originals + 8 * k : originals + 8 * k + 8])
        msgid = data[offset : offset + length].decode("utf-8", "replace")
        length, offset = struct.unpack(order + "2I", data[translations + 8 * k : translations + 8 * k + 8])
        out.append((msgid, data[offset : offset + length].decode("utf-8", "replace").split("\0")))
    return out


# (gettext domain, keep 1 message in k (by a hash of the msgid, the same messages in every language), required)
DOMAINS = [("iso_3166-1", 32, True), ("iso_639-2", 32, True), ("iso_4217", 16, True), ("iso_15924", 16, True)]
DOMAINS += [("coreutils", 128, False)]


def translated_lines() -> list[str]:
    """A few thousand lines of real text in ~150 languages from the translations installed in /usr/share/locale."""
    lines = []
    for domain, k, required in DOMAINS:
        files = sorted(glob.glob(f"/usr/share/locale/*/LC_MESSAGES/{domain}.mo"))
        if required and len(files) < 50:
            pytest.fail(
                f"found {len(files)} translations of {domain}.mo (expected ~150); install them with {INSTALL_CORPUS}"
            )
        for i, path in enumerate(files):
            for msgid, translations in read_mo(path):
                if msgid and zlib.crc32(msgid.encode()) % k == 0:
                    texts = translations + ([msgid] if i == 0 else [])  # the English original once
                    lines += [line for text in texts for line in text.split("\n") if line.strip()]
    return lines


@pytest.fixture(scope="module")
def corpus():
    lines = translated_lines()
    assert len(lines) >= 2000, f"only {len(lines)} translated lines; install them with {INSTALL_CORPUS}"
    return lines


def _mismatches(ours, reference, texts):
    return [(t, ours.encode(t), reference.encode(t)) for t in texts if ours.encode(t) != reference.encode(t)]


@pytest.mark.parametrize("text", CURATED)
def test_curated_texts_match_openai(tokenizers, text):
    ours, reference = tokenizers
    want = reference.encode(text)
    assert ours.encode(text) == want
    assert ours.decode(want) == reference.decode(want).strip()
    assert len(want) > 0 or not text.strip()


def test_translated_messages_match_openai(tokenizers, corpus):
    ours, reference = tokenizers
    bad = _mismatches(ours, reference, corpus)
    assert not bad, f"{len(bad)} of {len(corpus)} lines differ from OpenAI's ids, e.g. {bad[:5]}"
    for text in corpus[::25]:
        ids = reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids).strip()


def test_the_corpus_needs_ftfy(tokenizers, corpus):
    # The comparison means something: without ftfy, many of these texts would get other ids.
    ours, reference = tokenizers
    without_ftfy = CLIPTokenizer(ours.vocab, ours.merges, fix_unicode=False)
    texts = CURATED + corpus
    differ = [t for t in texts if without_ftfy.encode(t) != reference.encode(t)]
    assert len(differ) >= 100, differ
    assert any("’" in t for t in differ) and any("，" in t or "（" in t for t in differ)


@pytest.mark.parametrize("context_length", [77, 16])
def test_batches_match_openai_padding_and_truncation(tokenizers, corpus, context_length):
    ours, reference = tokenizers
    texts = CURATED + corpus[::10]
    want = reference(texts, context_length=context_length).numpy()  # OpenAI pads with 0
    got = ours(texts, context_length=context_length, pad_id=0)
    assert got.dtype == np.int32 and got.shape == want.shape == (len(texts), context_length)
    np.testing.assert_array_equal(got, want)
    assert (ours.sot_id, ours.eot_id) == (reference.sot_token_id, reference.eot_token_id) == (49406, 49407)
