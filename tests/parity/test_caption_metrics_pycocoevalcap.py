"""Parity of mmjax.evaluate.bleu / cider_d with pycocoevalcap's ``Bleu(4)`` and ``Cider()`` scorers.

Corpus and per-example scores agree to 1e-9 (absolute, and relative for the tiny smoothed per-example BLEU values) on
hand-written corpora and a few hundred random ones. Only pycocoevalcap's pure-Python scorers are imported: its PTB
tokenizer, METEOR and SPICE need Java.
"""

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from mmjax.evaluate import bleu, cider_d

pytestmark = pytest.mark.parity
ATOL = 1e-9
RTOL = 1e-9

VOCAB = "a the small large red blue green sneaker boot shoe in on at top bottom left right corner of".split()

HAND_WRITTEN = {
    "shoes": (
        [
            ["a small red sneaker in the top left", "a red shoe at the top left", "the red sneaker is top left"],
            ["a large blue boot in the bottom right corner", "blue boot bottom right"],
            ["a green shoe on the left", "a green sneaker on the left of the image"],
        ],
        ["a small red sneaker in the top left", "a blue boot in the corner", "a green green green shoe"],
    ),
    # 'the' seven times against two references: BLEU's classic clipping example (Papineni et al. 2002).
    "clipping": (
        [["the cat is on the mat", "there is a cat on the mat"], ["a dog runs"]],
        ["the the the the the the the", "a dog runs"],
    ),
    # Empty candidate, 1-token candidate (no bigram: the 1e-6 smoothing factor), an empty reference, a tie for the
    # closest reference length (5 tokens between 4 and 6: the shorter wins).
    "edges": (
        [["a red shoe"], ["red"], ["", "a blue boot"], ["a b c d", "a b c d e f"], ["a red shoe"]],
        ["", "red", "a blue boot", "a b c d e", "a red shoe on top"],
    ),
    # One example: every reference n-gram has document frequency N = 1, so CIDEr-D is 0.
    "single": ([["a small red sneaker in the top left"]], ["a small red sneaker in the top left"]),
    # The same references everywhere: every idf is 0, the norms are 0 and the division is skipped.
    "same_refs": ([["a red shoe"], ["a red shoe"], ["a red shoe"]], ["a red shoe", "a red boot", "red"]),
    # Runs of spaces, tabs and newlines split as one separator (str.split()), duplicated references and examples.
    "whitespace": (
        [["a  red\tshoe", "a red shoe"], ["a red shoe ", " a red shoe"], ["blue\nboot"]],
        ["a red  shoe", "a\tred shoe", "blue boot"],
    ),
}


def _assert_bleu_parity(references, candidates, n=None, what=""):
    """``n=None``: the defaults of both sides, ``Bleu(4)`` and ``bleu(...)``; else ``Bleu(n)`` and ``bleu(..., n=n)``."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    want, want_each = (Bleu(4) if n is None else Bleu(n)).compute_score(gts, res, verbose=0)  # verbose=0: no prints
    options = {} if n is None else {"n": n}
    keys = [f"BLEU-{k}" for k in range(1, (n or 4) + 1)]
    got, got_each = bleu(references, candidates, per_example=True, **options)
    assert list(got) == keys and all(type(v) is float for v in got.values())
    _close([got[k] for k in keys], want, f"{what} corpus BLEU")
    _close(np.stack([got_each[k] for k in keys]), want_each, f"{what} per-example BLEU")
    assert bleu(references, candidates, **options) == got


def _assert_cider_parity(references, candidates, sigma=None, what=""):
    """``sigma=None``: the defaults of both sides, ``Cider()`` and ``cider_d(...)``; else the same ``sigma`` to both."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    want, want_each = (Cider() if sigma is None else Cider(sigma=sigma)).compute_score(gts, res)
    options = {} if sigma is None else {"sigma": sigma}
    got, got_each = cider_d(references, candidates, per_example=True, **options)
    assert type(got) is float
    _close(got, want, f"{what} corpus CIDEr-D")
    _close(got_each, want_each, f"{what} per-example CIDEr-D")
    assert cider_d(references, candidates, **options) == got


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=what)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-300, err_msg=what)


def _assert_parity(references, candidates, what=""):
    _assert_bleu_parity(references, candidates, what=what)
    _assert_cider_parity(references, candidates, what=what)


def _random_corpus(rng):
    """1..8 examples of 1..5 references (1..12 tokens, rarely empty, some repeated) and a candidate of 0..15 tokens
    (sometimes one of its references or another example's candidate), drawn from a small vocabulary so that n-grams
    repeat within and across examples."""

    def sentence(length):
        return " ".join(rng.choice(VOCAB, size=length))

    num = int(rng.integers(1, 9))
    references, candidates = [], []
    for _ in range(num):
        refs = [sentence(0 if rng.random() < 0.03 else int(rng.integers(1, 13))) for _ in range(rng.integers(1, 6))]
        if len(refs) > 1 and rng.random() < 0.2:
            refs[-1] = refs[0]  # a duplicated reference
        draw = rng.random()
        if draw < 0.2:
            cand = refs[int(rng.integers(len(refs)))]  # identical to a reference
        elif draw < 0.3 and candidates:
            cand = candidates[int(rng.integers(len(candidates)))]  # a duplicated candidate
        else:
            cand = sentence(int(rng.integers(0, 16)))
        references.append(refs)
        candidates.append(cand)
    return references, candidates


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_corpora(name):
    references, candidates = HAND_WRITTEN[name]
    _assert_parity(references, candidates, what=name)


@pytest.mark.parametrize("chunk", range(4))
def test_random_corpora(chunk):
    rng = np.random.default_rng(1000 + chunk)
    for i in range(100):
        references, candidates = _random_corpus(rng)
        _assert_parity(references, candidates, what=f"chunk {chunk} corpus {i}")


# pycocoevalcap's scorers always count 1..4-grams, whatever their n: Bleu(n) is right for n <= 4 (n > 4 raises
# IndexError) and Cider(n != 4) raises IndexError, so the other orders of cider_d are checked in test_caption_metrics.
@pytest.mark.parametrize("n", [1, 2, 3])
def test_bleu_lower_orders(n):
    rng = np.random.default_rng(n)
    for name in sorted(HAND_WRITTEN):
        _assert_bleu_parity(*HAND_WRITTEN[name], n=n, what=name)
    for i in range(25):
        _assert_bleu_parity(*_random_corpus(rng), n=n, what=f"random corpus {i}")


@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0])
def test_cider_sigma(sigma):
    rng = np.random.default_rng(int(sigma))
    for name in sorted(HAND_WRITTEN):
        _assert_cider_parity(*HAND_WRITTEN[name], sigma=sigma, what=name)
    for i in range(25):
        _assert_cider_parity(*_random_corpus(rng), sigma=sigma, what=f"random corpus {i}")


def test_random_corpora_cover_the_edge_cases():
    """The random corpora do contain what the parity above is meant to cover (so a quiet generator change is seen)."""
    rng = np.random.default_rng(1000)
    corpora = [_random_corpus(rng) for _ in range(100)]
    cands = [c for _, cs in corpora for c in cs]
    assert any(len(cs) == 1 for _, cs in corpora)
    assert any(c == "" for c in cands) and any(len(c.split()) == 15 for c in cands)
    assert any(c in refs for rs, cs in corpora for refs, c in zip(rs, cs))
    assert any(len(set(refs)) < len(refs) for rs, _ in corpora for refs in rs)
    assert any(len(refs) == 5 for rs, _ in corpora for refs in rs)
