"""mmjax.evaluate.bleu / cider_d on values computed by hand from the formulas, and their input checks.

The parity with pycocoevalcap is in tests/parity/test_caption_metrics_pycocoevalcap.py; nothing here needs it.
"""

import math

import numpy as np
import pytest

from mmjax.evaluate import bleu, cider_d

TINY, SMALL = 1e-15, 1e-9  # BLEU's smoothing constants (pycocoevalcap's tiny and small)


def _brevity(cand_len, ref_len):
    ratio = (cand_len + TINY) / (ref_len + SMALL)
    return math.exp(1 - 1 / ratio) if ratio < 1 else 1.0


# --- BLEU ---------------------------------------------------------------------------------------------------------


def test_bleu_perfect_candidate_is_one():
    refs = [["a small red sneaker in the top left", "a red shoe at the top left"], ["a blue boot on the right"]]
    scores = bleu(refs, ["a small red sneaker in the top left", "a blue boot on the right"])
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    for value in scores.values():
        assert type(value) is float
        assert value == pytest.approx(1.0, abs=1e-8)  # 1 up to the 1e-9 smoothing in the denominators
        assert value < 1.0


def test_bleu_clips_repeated_words():
    """Papineni et al.'s example: 'the' 7 times, at most 2 in one reference -> unigram precision 2/7, no bigram."""
    refs = [["the cat is on the mat", "there is a cat on the mat"]]
    scores = bleu(refs, ["the the the the the the the"])
    bp = _brevity(7, 7)  # the closest reference length is 7
    p1 = (2 + TINY) / (7 + SMALL)
    p2 = TINY / (6 + SMALL)  # no bigram matches: the smoothing keeps the product finite and non-zero
    assert scores["BLEU-1"] == pytest.approx(p1 * bp, rel=1e-12)
    assert scores["BLEU-2"] == pytest.approx(math.sqrt(p1 * p2) * bp, rel=1e-12)
    assert 0 < scores["BLEU-4"] < 1e-3


def test_bleu_brevity_penalty_and_missing_orders():
    """'the cat' against a 6-token reference: BP = exp(1 - 6/2); no trigram, so BLEU-3 gets the factor 1e-15/1e-9."""
    scores = bleu([["the cat sat on the mat"]], ["the cat"])
    bp = math.exp(1 - 6 / 2)
    assert scores["BLEU-1"] == pytest.approx(bp, rel=1e-8)
    assert scores["BLEU-2"] == pytest.approx(bp, rel=1e-8)
    assert scores["BLEU-3"] == pytest.approx((1e-6) ** (1 / 3) * bp, rel=1e-8)
    assert scores["BLEU-4"] == pytest.approx((1e-6 * 1e-6) ** (1 / 4) * bp, rel=1e-8)


def test_bleu_closest_reference_length_prefers_the_shorter_on_a_tie():
    """A 5-token candidate between references of 4 and 6 tokens: the effective length is 4, so no brevity penalty."""
    scores = bleu([["a b c d", "a b c d e f"]], ["a b c d e"])
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-8)
    # With the 6-token reference alone the penalty applies.
    assert bleu([["a b c d e f"]], ["a b c d e"])["BLEU-1"] == pytest.approx(math.exp(1 - 6 / 5), rel=1e-8)


def test_bleu_corpus_pools_counts_and_per_example_scores_each():
    """The corpus score pools the counts (not the mean of per-example scores); per_example gives each example's."""
    refs = [["a red shoe on the left"], ["a blue boot"]]
    cands = ["a red shoe on the right", "a green boot"]  # unigram matches 5/6 and 2/3, bigrams 4/5 and 0/2
    corpus, each = bleu(refs, cands, per_example=True)
    assert corpus["BLEU-1"] == pytest.approx((5 + 2) / (6 + 3), rel=1e-8)
    assert corpus["BLEU-2"] == pytest.approx(math.sqrt(7 / 9 * 4 / 7), rel=1e-8)
    assert set(each) == set(corpus)
    assert each["BLEU-1"].shape == (2,) and each["BLEU-1"].dtype == np.float64
    np.testing.assert_allclose(each["BLEU-1"], [5 / 6, 2 / 3], rtol=1e-8)
    assert each["BLEU-2"][0] == pytest.approx(math.sqrt(5 / 6 * 4 / 5), rel=1e-8)
    assert each["BLEU-2"][1] < 1e-6
    assert corpus["BLEU-1"] != pytest.approx(each["BLEU-1"].mean())


def test_bleu_empty_candidate_scores_zero_and_whitespace_splits():
    scores = bleu([["a red shoe"]], [""])
    assert all(v == 0.0 for v in scores.values())
    assert bleu([["a  red\tshoe"]], ["a red shoe "]) == bleu([["a red shoe"]], ["a red shoe"])


def test_bleu_order_keyword():
    scores = bleu([["a red shoe"]], ["a red boot"], n=2)
    assert list(scores) == ["BLEU-1", "BLEU-2"]
    assert scores["BLEU-2"] == pytest.approx(math.sqrt(2 / 3 * 1 / 2), rel=1e-8)


# --- CIDEr-D ------------------------------------------------------------------------------------------------------


def test_cider_d_hand_computed():
    """N = 2 examples; every reference word has df 1, so idf = log 2 for all of them and cancels in the cosines.

    Example 1, 'red hat' against 'red shoe': unigram cosine 1/2 ('red' shared out of 2 words each), no shared bigram,
    no 3- or 4-grams: 10 * (1/2 + 0 + 0 + 0) / 4 = 1.25. Example 2, equal: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    """
    refs = [["red shoe"], ["blue hat"]]
    corpus, each = cider_d(refs, ["red hat", "blue hat"], per_example=True)
    np.testing.assert_allclose(each, [1.25, 5.0], rtol=1e-12)
    assert corpus == pytest.approx(3.125, rel=1e-12)
    assert type(corpus) is float and each.dtype == np.float64


def test_cider_d_clipping_and_length_penalty():
    """n = 1: 'red red shoe' against 'red shoe'. Weights (in units of idf = log 2): candidate (2, 1), reference
    (1, 1); clipped dot min(2, 1) * 1 + min(1, 1) * 1 = 2 (unclipped it would be 3), norms sqrt(5) and sqrt(2), and
    one token longer: the penalty exp(-1 / (2 * 6^2))."""
    refs = [["red shoe"], ["blue hat"]]
    each = cider_d(refs, ["red red shoe", "blue hat"], n=1, per_example=True)[1]
    assert each[0] == pytest.approx(10 * 2 / math.sqrt(10) * math.exp(-1 / 72), rel=1e-12)
    assert each[1] == pytest.approx(10.0, rel=1e-12)
    wider = cider_d(refs, ["red red shoe", "blue hat"], n=1, sigma=2.0, per_example=True)[1]
    assert wider[0] == pytest.approx(10 * 2 / math.sqrt(10) * math.exp(-1 / 8), rel=1e-12)


def test_cider_d_needs_a_corpus():
    """Document frequencies come from the corpus: one example, or n-grams in every example's references, weigh 0."""
    assert cider_d([["a small red sneaker in the top left"]], ["a small red sneaker in the top left"]) == 0.0
    each = cider_d([["a red shoe"], ["a red boot"]], ["a red", "a red boot"], per_example=True)[1]
    assert each[0] == 0.0 and each[1] > 0.0
    assert cider_d([["a red shoe"], ["a blue boot"]], ["", "a blue boot"], per_example=True)[1][0] == 0.0


def test_cider_d_is_ten_for_candidates_equal_to_their_references():
    refs = [
        ["a small red sneaker in the top left"] * 2,
        ["a large blue boot on the right"],
        ["two green hats on a shelf"],
    ]
    assert cider_d(refs, [r[0] for r in refs]) == pytest.approx(10.0, rel=1e-12)


# --- input checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [bleu, cider_d])
@pytest.mark.parametrize(
    ("references", "candidates", "match"),
    [
        ([["a cat"], ["a dog"]], ["a cat"], r"references has 2 examples but candidates has 1"),
        ([], [], r"empty; the metrics need at least one example"),
        ([["a cat"], []], ["a cat", "a dog"], r"references\[1\] is empty; every example needs at least one reference"),
        ([["a cat"]], [["a", "cat"]], r"candidates\[0\] must be a str, got list .*' '.join\(tokens\)"),
        ([["a cat"]], [None], r"candidates\[0\] must be a str, got NoneType"),
        ([["a cat"]], "a cat", r"candidates must be a list of str .* got str; wrap a single caption as \[caption\]"),
        (["a cat", "a dog"], ["a cat", "a dog"], r"references\[0\] is a str \('a cat'\), expected a list of str"),
        ([["a cat", 3]], ["a cat"], r"references\[0\]\[1\] must be a str, got int"),
        ([("a cat",), {"a dog"}], ["a cat", "a dog"], r"references\[1\] must be a list of str, got set"),
        ("a cat", ["a cat"], r"references must be a list with one list of reference str per example, got str"),
    ],
)
def test_bad_input_raises_value_error(metric, references, candidates, match):
    with pytest.raises(ValueError, match=match):
        metric(references, candidates)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match=r"n = 0 must be a positive int"):
        bleu([["a cat"]], ["a cat"], n=0)
    with pytest.raises(ValueError, match=r"n = 2.5 must be a positive int"):
        cider_d([["a cat"]], ["a cat"], n=2.5)
    for sigma in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"sigma = .* must be a finite number > 0"):
            cider_d([["a cat"]], ["a cat"], sigma=sigma)


def test_tuples_are_accepted():
    assert bleu((("a red shoe",),), ("a red shoe",)) == bleu([["a red shoe"]], ["a red shoe"])
