"""mmjax.tokenizer.CLIPTokenizer against transformers.CLIPTokenizer built from the same vocab.json/merges.txt.

transformers' CLIPTokenizer normalises with NFC only (no ftfy, no HTML unescaping), so ours is built with
``fix_unicode=False, unescape_html=False`` here; OpenAI's cleaning (the default) is tested in test_tokenizer_openai.py.
"""

import collections

import numpy as np
import pytest
import transformers

from mmjax.tokenizer import CLIPTokenizer, bytes_to_unicode, clean_text

pytestmark = pytest.mark.parity

CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "the cat sat on the mat",
    "photography of the city at night",
    "two dogs playing in the snow",
    "don't stop believing, it's 1984!",
    "naïve café crème brûlée",
    "東京の夜景 and Straße",
    "emoji 😀😀 party 🎉",
    "hello, world... hello!!! world??",
]

TEXTS = [
    "a photo of a cat",
    "A PHOTO of   a Dog\t\n  ",
    "Photography!!! of the dog's mat, 123.45 -- (really) [sic] {x} @home #tag $5 %20 ^_^ ~~",
    "don't you'll I'M we've they're she'd he's it'S",
    "naïve café — 東京 Straße ÅNGSTRÖM Ωmega ǅ ﬁ",  # accents, CJK, capitals, a digraph and a ligature
    "emoji 😀🎉👍🏽 and zero\u200bwidth",
    "numbers 3.14159 1,000,000 2nd 42nd ①②",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp",
    "",
    "   ",
    "word " * 100,  # truncated
    "the cat sat on the mat " * 20,
]


def learn_bpe(corpus, num_merges):
    """A small BPE learner over CLIP pre-tokens (most frequent pair first, ties broken by the pair)."""
    import regex

    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    table = bytes_to_unicode()
    words = collections.Counter()
    for text in corpus:
        for piece in pattern.findall(clean_text(text, fix_unicode=False)):
            mapped = "".join(table[b] for b in piece.encode("utf-8"))
            words[tuple(mapped[:-1]) + (mapped[-1] + "</w>",)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    merges = learn_bpe(CORPUS, 100)
    assert len(merges) == 100
    hf_cleaning = dict(unescape_html=False, fix_unicode=False)
    ours = CLIPTokenizer(CLIPTokenizer.vocab_from_merges(merges), merges, **hf_cleaning)
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    ours.save_pretrained(directory)
    reference = transformers.CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))
    from_dir = transformers.CLIPTokenizer.from_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory, **hf_cleaning), reference, from_dir


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizers, text):
    ours, reference, from_dir = tokenizers
    want = reference(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == want
    assert from_dir(text, add_special_tokens=False)["input_ids"] == want
    assert len(want) > 0 or not text.strip()


@pytest.mark.parametrize("context_length", [77, 16])
def test_batch_padding_and_truncation_match_transformers(tokenizers, context_length):
    ours, reference, _ = tokenizers
    want = reference(TEXTS, padding="max_length", truncation=True, max_length=context_length)["input_ids"]
    got = ours(TEXTS, context_length=context_length)
    assert got.dtype == np.int32 and got.shape == (len(TEXTS), context_length)
    np.testing.assert_array_equal(got, np.asarray(want))
    # Hugging Face pads with its pad token, which is <|endoftext|> for CLIP.
    assert reference.pad_token_id == ours.eot_id == ours.pad_id
    assert reference.bos_token_id == ours.sot_id


def test_merges_matter(tokenizers):
    ours, _, _ = tokenizers
    # the learned merges compress the corpus: fewer tokens than bytes
    text = "a photo of the cat"
    assert len(ours.encode(text)) < len(text.replace(" ", ""))
