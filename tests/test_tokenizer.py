"""Unit tests for mmjax.tokenizer: byte map, cleaning, BPE merging, padding/truncation, the word tokenizer."""

import gzip
import json

import numpy as np
import pytest

from mmjax.tokenizer import (
    EOT_TOKEN,
    SOT_TOKEN,
    CLIPTokenizer,
    Tokenizer,
    WordTokenizer,
    bytes_to_unicode,
    clean_text,
)

MERGES = [("h", "i</w>"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>")]


@pytest.fixture(scope="module")
def bpe():
    return CLIPTokenizer(CLIPTokenizer.vocab_from_merges(MERGES), MERGES)


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    chars = list(table.values())
    assert len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    # printable ASCII maps to itself, space does not
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    assert table[ord(" ")] != " "


def test_clean_text():
    assert clean_text("  Hello\t\nWORLD  ") == "hello world"
    assert clean_text("fish &amp;amp; chips") == "fish & chips"  # unescaped twice, as OpenAI does
    assert clean_text("fish &amp; chips", unescape_html=False, fix_unicode=False) == "fish &amp; chips"
    assert clean_text("fish &amp; chips", unescape_html=False) == "fish & chips"  # ftfy unescapes once itself
    assert clean_text("Cafe\u0301") == "caf\u00e9"  # NFC
    with pytest.raises(ValueError, match="text must be a str"):
        clean_text(3)


def test_clean_text_fixes_unicode_with_ftfy_as_openai_does():
    # OpenAI's tokenizer runs ftfy.fix_text before the BPE: curly quotes, full-width forms, ligatures, mojibake
    assert clean_text("It’s “quoted”") == 'it\'s "quoted"'
    assert clean_text("一只猫，坐在垫子上：很可爱！") == "一只猫,坐在垫子上:很可爱!"
    assert clean_text("ＡＢＣ１２３ ﬁne cafÃ©") == "abc123 fine café"
    assert clean_text("a&nbsp;b &amp;amp;amp;") == "a b &"  # ftfy unescapes once, then OpenAI's two
    # without ftfy (Hugging Face's normaliser): NFC only
    assert clean_text("It’s ＡＢＣ ﬁ", fix_unicode=False) == "it’s ａｂｃ ﬁ"


def test_clip_tokenizer_cleans_with_ftfy_unless_told_not_to(bpe):
    assert bpe.tokens("ＴＨＥ “cat”") == bpe.tokens('the "cat"')
    raw = CLIPTokenizer(bpe.vocab, bpe.merges, fix_unicode=False)
    assert raw.tokens("ＴＨＥ") != bpe.tokens("the") and raw.tokens("ＴＨＥ") == raw.tokens("ｔｈｅ")
    # the word tokenizer keeps its cleaning (no ftfy), so saved vocabularies keep their ids
    assert WordTokenizer.split("it’s") == ["it", "’", "s"]


def test_bpe_merges_by_rank(bpe):
    v = bpe.vocab
    assert bpe.tokens("the cat") == ["the</w>", "cat</w>"]
    assert bpe.encode("THE  Cat") == [v["the</w>"], v["cat</w>"]]
    # "cats": c a t s</w> -> ca t s</w>; ("ca", "t</w>") does not apply because t is not word-final
    assert bpe.tokens("cats") == ["ca", "t", "s</w>"]
    # punctuation runs are one pre-token; digits are split one by one
    assert bpe.tokens("hi!! 42") == ["hi</w>", "!", "!</w>", "4</w>", "2</w>"]
    assert bpe.tokens("don't") == ["d", "o", "n</w>", "'", "t</w>"]


def test_bpe_unicode_bytes_round_trip(bpe):
    text = "naïve café 日本 😀"
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_special_tokens_in_text(bpe):
    assert bpe.encode(f"hi {EOT_TOKEN}") == [bpe.vocab["hi</w>"], bpe.eot_id]
    assert bpe.encode(SOT_TOKEN) == [bpe.sot_id]


def test_vocab_from_merges_layout():
    vocab = CLIPTokenizer.vocab_from_merges(MERGES)
    base = list(bytes_to_unicode().values())
    assert [vocab[b] for b in base] == list(range(256))
    assert [vocab[b + "</w>"] for b in base] == list(range(256, 512))
    assert vocab["hi</w>"] == 512 and vocab["the</w>"] == 516
    assert vocab[SOT_TOKEN] == 517 and vocab[EOT_TOKEN] == 518


def test_call_pads_and_truncates_with_eot_last(bpe):
    out = bpe(["hi", "the cat hi hi hi hi"], context_length=5)
    assert out.dtype == np.int32 and out.shape == (2, 5)
    assert out[0].tolist() == [bpe.sot_id, bpe.vocab["hi</w>"], bpe.eot_id, bpe.eot_id, bpe.eot_id]
    v = bpe.vocab
    assert out[1].tolist() == [bpe.sot_id, v["the</w>"], v["cat</w>"], v["hi</w>"], bpe.eot_id]
    zero_padded = bpe("hi", context_length=4, pad_id=0)
    assert zero_padded.tolist() == [[bpe.sot_id, v["hi</w>"], bpe.eot_id, 0]]
    assert CLIPTokenizer(v, MERGES, pad_id=7).pad_id == 7


def test_call_rejects_bad_input(bpe):
    with pytest.raises(ValueError, match="context_length"):
        bpe(["hi"], context_length=1)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        bpe(["hi", None])


def test_from_pretrained_hf_dir_and_openai_gz(tmp_path, bpe):
    bpe.save_pretrained(tmp_path / "hf")
    again = CLIPTokenizer.from_pretrained(tmp_path / "hf")
    assert again.vocab == bpe.vocab and again.merges == bpe.merges
    gz = tmp_path / "bpe.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    openai = CLIPTokenizer.from_pretrained(gz)
    assert openai.vocab == bpe.vocab
    texts = ["the cat", "hi there!"]
    np.testing.assert_array_equal(openai(texts), bpe(texts))
    assert CLIPTokenizer.from_pretrained(gz, num_merges=2).vocab_size == 512 + 2 + 2


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="without vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="merges line 2"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must contain"):
        CLIPTokenizer({"a": 0}, [])


def test_word_tokenizer():
    captions = ["A red shirt.", "a blue shirt", "A RED dress!"]
    tok = WordTokenizer.from_texts(captions)
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.unk_id, tok.sot_id, tok.eot_id) == (0, 1, 2, 3)
    # most frequent first: a (3), then red/shirt (2, alphabetical), then the rest
    words = [tok.inverse_vocab[i] for i in range(4, tok.vocab_size)]
    assert words[:3] == ["a", "red", "shirt"]
    assert sorted(words[3:]) == ["!", ".", "blue", "dress"]
    ids = tok(["a green shirt", "a red shirt a red shirt"], context_length=6)
    assert ids.dtype == np.int32
    assert ids[0].tolist() == [2, tok.vocab["a"], 1, tok.vocab["shirt"], 3, 0]
    assert ids[1, -1] == 3 and ids[1, 0] == 2
    assert tok.decode(ids[0]) == "a <unk> shirt"
    assert WordTokenizer.from_json(tok.to_json()).vocab == tok.vocab
    assert WordTokenizer.from_texts(captions, min_count=2).vocab_size == 4 + 3
    assert WordTokenizer.from_texts(captions, max_size=1).vocab_size == 5
    with pytest.raises(ValueError, match="unique"):
        WordTokenizer(["a", "a"])
