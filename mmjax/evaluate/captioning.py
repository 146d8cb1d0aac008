"""Caption metrics: corpus BLEU-1..4 and CIDEr-D, computed exactly as the COCO caption toolkit (pycocoevalcap).

Captions come already tokenised: each is a ``str`` whose tokens are separated by whitespace (``str.split()``, as
pycocoevalcap splits them). Nothing is lower-cased or stripped of punctuation here; the COCO pipeline runs its PTB
tokenizer (Java) before the scorers, so do the equivalent first when comparing with published COCO numbers. An
example is one candidate caption ``c`` and its references ``R`` (one or more); a sentence's ``k``-grams are its runs
of ``k`` consecutive tokens, counted with multiplicity.

**BLEU** (Papineni et al. 2002), as pycocoevalcap's ``Bleu(4)`` (option ``"closest"``). Per example ``i`` with
candidate length ``|c_i|`` and order ``k``:

* clipped matches ``m_ik = sum over k-grams g of c_i of min(count_c(g), max_{r in R_i} count_r(g))``,
* candidate k-grams ``l_ik = max(0, |c_i| - k + 1)``,
* effective reference length ``r_i``: the reference length closest to ``|c_i|`` (the shorter one on a tie).

Corpus sums ``M_k = sum_i m_ik``, ``L_k = sum_i l_ik``, ``C = sum_i |c_i|``, ``R = sum_i r_i`` give::

    BLEU-n = BP * (prod_{k=1..n} (M_k + 1e-15) / (L_k + 1e-9)) ** (1 / n)
    BP = exp(1 - 1 / rho) if rho < 1 else 1,    rho = (C + 1e-15) / (R + 1e-9)

The constants 1e-15 ("tiny") and 1e-9 ("small") are pycocoevalcap's: they keep the quotients finite, and they make an
order without candidate k-grams contribute the factor ``1e-15 / 1e-9 = 1e-6`` rather than 0 or NaN (so a 1-token
candidate has a small but non-zero BLEU-2). The per-example scores apply the same formula to one example's sums.

**CIDEr-D** (Vedantam et al. 2015), as pycocoevalcap's ``Cider()`` (``n = 4``, ``sigma = 6``). Over a corpus of
``N`` examples, ``df(g)`` is the number of examples whose references (any of them) contain the n-gram ``g``; a
sentence ``s`` has the tf-idf weights ``w_s(g) = count_s(g) * (log N - log max(1, df(g)))``. For each reference ``r``
and order ``k``, with ``w^k`` the weights of the k-grams only::

    s_k(c, r) = exp(-(|c| - |r|)^2 / (2 sigma^2)) * sum_{g in c, |g| = k} min(w_c(g), w_r(g)) w_r(g) / (|w_c^k| |w_r^k|)
    CIDEr-D_i = 10 / (n |R_i|) * sum_{r in R_i} sum_{k=1..n} s_k(c_i, r),    CIDEr-D = mean_i CIDEr-D_i

The ``min`` clips a candidate's weight by the reference's (no reward for repeating an n-gram); the Gaussian penalises
length differences. Where a norm ``|w^k|`` is 0 the division is skipped (the sum is 0 then anyway). pycocoevalcap
measures a sentence's length as its number of bigrams, ``max(0, |s| - 1)``: the difference is the same as that of
token counts whenever both sentences have a token, and a score involving an empty sentence is 0 either way, so the
token counts used here give the same numbers. The document frequencies come from the references of the corpus being
scored, so CIDEr-D needs a corpus: with ``N = 1`` every reference n-gram has weight 0 and the score is 0.

>>> refs = [["a small red sneaker in the top left", "a red shoe at the top left"], ["two dogs on a beach"]]
>>> cands = ["a small red sneaker in the top left", "a dog on the beach"]
>>> {k: round(v, 4) for k, v in bleu(refs, cands).items()}
{'BLEU-1': 0.8462, 'BLEU-2': 0.7338, 'BLEU-3': 0.7107, 'BLEU-4': 0.7116}
>>> round(cider_d(refs, cands), 4)
3.8082
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

__all__ = ["bleu", "cider_d", "BLEU_TINY", "BLEU_SMALL", "CIDER_SIGMA"]

BLEU_TINY = 1e-15  # added to the numerators of BLEU (matches, candidate length): pycocoevalcap's `tiny`
BLEU_SMALL = 1e-9  # added to the denominators of BLEU (candidate k-grams, reference length): pycocoevalcap's `small`
CIDER_SIGMA = 6.0  # standard deviation of CIDEr-D's Gaussian length penalty, in tokens


def _tokenised_corpus(references, candidates) -> tuple[list[list[list[str]]], list[list[str]]]:
    """Checks the two lists and splits every caption on whitespace: ``(refs[i][j] tokens, cands[i] tokens)``."""
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)):
        hint = "; wrap a single caption as [caption]" if isinstance(candidates, str) else ""
        raise ValueError(
            f"candidates must be a list of str (one caption per example), got {type(candidates).__name__}{hint}."
        )
    if isinstance(references, str) or not isinstance(references, (list, tuple)):
        raise ValueError(
            "references must be a list with one list of reference str per example, got "
            f"{type(references).__name__}; e.g. [['a cat on a mat', 'a cat sitting'], ['a dog']]."
        )
    if len(references) != len(candidates):
        raise ValueError(
            f"references has {len(references)} examples but candidates has {len(candidates)}; pass one list of "
            "references per candidate caption, in the same order."
        )
    if not candidates:
        raise ValueError("references and candidates are empty; the metrics need at least one example.")
    tokenised_refs = []
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(
                f"references[{i}] is a str ({refs[:40]!r}), expected a list of str; wrap it as [references[{i}]], "
                "or pass [[r] for r in references] for one reference per example."
            )
        if not isinstance(refs, (list, tuple)):
            raise ValueError(f"references[{i}] must be a list of str, got {type(refs).__name__}.")
        if not refs:
            raise ValueError(
                f"references[{i}] is empty; every example needs at least one reference caption (drop the example "
                "or add its references)."
            )
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(
                    f"references[{i}][{j}] must be a str, got {type(ref).__name__} ({str(ref)[:40]}); join a list "
                    "of tokens with ' '.join(tokens)."
                )
        tokenised_refs.append([ref.split() for ref in refs])
    for i, cand in enumerate(candidates):
        if not isinstance(cand, str):
            raise ValueError(
                f"candidates[{i}] must be a str, got {type(cand).__name__} ({str(cand)[:40]}); join a list of tokens "
                "with ' '.join(tokens)."
            )
    return tokenised_refs, [cand.split() for cand in candidates]


def _check_order(n) -> int:
    """The largest n-gram order as an int >= 1, or a ValueError."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n = {n!r} must be a positive int (the largest n-gram order; 4 for BLEU-4 / CIDEr-D).")
    return int(n)


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    """Counts of every k-gram of ``tokens`` for ``k = 1..n``, keyed by token tuples (the order is ``len(key)``)."""
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _bleu_from_counts(matches: np.ndarray, totals: np.ndarray, cand_len, ref_len) -> np.ndarray:
    """``[..., n]`` BLEU-1..n from ``[..., n]`` clipped matches / candidate k-grams and ``[...]`` lengths."""
    precision = (matches + BLEU_TINY) / (totals + BLEU_SMALL)
    geometric_mean = np.cumprod(precision, axis=-1) ** (1.0 / np.arange(1, matches.shape[-1] + 1))
    ratio = (np.asarray(cand_len, np.float64) + BLEU_TINY) / (np.asarray(ref_len, np.float64) + BLEU_SMALL)
    brevity = np.where(ratio < 1, np.exp(1.0 - 1.0 / ratio), 1.0)
    return geometric_mean * brevity[..., None]


def bleu(references, candidates, *, n: int = 4, per_example: bool = False):
    """Corpus BLEU-1..n of candidate captions against their references, as pycocoevalcap's ``Bleu(n)``.

    ``BLEU-k = BP * (prod_{j<=k} (M_j + 1e-15) / (L_j + 1e-9)) ** (1/k)``, with ``M_j`` the corpus sum of clipped
    ``j``-gram matches (a candidate's count of an n-gram, capped by its largest count in one reference), ``L_j`` the
    corpus sum of the candidates' ``j``-gram counts ``max(0, |c| - j + 1)``, and the brevity penalty
    ``BP = min(1, exp(1 - R / C))`` computed as ``exp(1 - 1/rho)`` for ``rho = (C + 1e-15) / (R + 1e-9) < 1``: ``C`` the
    total candidate length, ``R`` the sum over examples of the reference length closest to the candidate's (the
    shorter one on a tie). See the module docstring for the details and the constants.

    Args:
      references: a list with, per example, a list of one or more reference captions (``str``, tokens separated by
        whitespace).
      candidates: a list with one candidate caption (``str``) per example, in the same order. An empty candidate
        scores 0 (its brevity penalty is 0).
      n: the largest n-gram order; the keys are ``"BLEU-1"`` .. ``f"BLEU-{n}"``. (pycocoevalcap's ``Bleu(n)`` counts
        n-grams up to 4 whatever its ``n``: it agrees for ``n <= 4`` and fails above.)
      per_example: also return each example's BLEU-1..n (the same formula on that example's counts and lengths),
        as pycocoevalcap's second return value.

    Returns:
      ``{"BLEU-1": float, ..., "BLEU-n": float}``; with ``per_example=True`` a pair of that dict and
      ``{"BLEU-k": float64 array [N]}``.

    Raises:
      ValueError: naming the value, for lists of different lengths or no examples, an example without references,
        references that are not a list of lists of ``str``, a candidate that is not a ``str``, or an ``n`` that is
        not a positive int.

    >>> refs = [["the cat sat on the mat", "a cat is on the mat"]]
    >>> round(bleu(refs, ["the cat sat on the mat"])["BLEU-4"], 6)  # a candidate equal to a reference
    1.0

    Two examples: 3 of the 5 bigrams of "the cat sat on a mat" are in a reference, and "a dog" has 1 bigram and no
    trigram, so its BLEU-3 is ``(1 * 1 * 1e-6) ** (1/3)``; the corpus BLEU-2 is ``sqrt(1 * (3 + 1) / (5 + 1))``:

    >>> corpus, each = bleu(refs + [["a dog"]], ["the cat sat on a mat", "a dog"], per_example=True)
    >>> round(corpus["BLEU-2"], 6), each["BLEU-2"].round(6).tolist(), each["BLEU-3"].round(6).tolist()
    (0.816497, [0.774597, 1.0], [0.669433, 0.01])
    """
    n = _check_order(n)
    tokenised_refs, tokenised_cands = _tokenised_corpus(references, candidates)
    num = len(tokenised_cands)
    matches = np.zeros((num, n))
    totals = np.zeros((num, n))
    cand_len = np.zeros(num)
    ref_len = np.zeros(num)
    for i, (refs, cand) in enumerate(zip(tokenised_refs, tokenised_cands)):
        max_ref_counts = Counter()
        for ref in refs:
            max_ref_counts |= _ngram_counts(ref, n)  # Counter | Counter keeps the larger count of each n-gram
        for gram, count in (_ngram_counts(cand, n) & max_ref_counts).items():  # & keeps the smaller: the clipping
            matches[i, len(gram) - 1] += count
        totals[i] = np.maximum(0, len(cand) - np.arange(n))
        cand_len[i] = len(cand)
        ref_len[i] = min((len(ref) for ref in refs), key=lambda length: (abs(length - len(cand)), length))
    corpus = _bleu_from_counts(matches.sum(0), totals.sum(0), cand_len.sum(), ref_len.sum())
    scores = {f"BLEU-{k + 1}": float(corpus[k]) for k in range(n)}
    if not per_example:
        return scores
    each = _bleu_from_counts(matches, totals, cand_len, ref_len)
    return scores, {f"BLEU-{k + 1}": each[:, k] for k in range(n)}


def _tfidf(counts: Counter, log_num: float, log_df: dict, n: int) -> tuple[list[dict], np.ndarray]:
    """Per order ``k``: ``{k-gram: count * (log N - log max(1, df))}``, and the ``[n]`` Euclidean norms of those."""
    weights = [{} for _ in range(n)]
    squares = np.zeros(n)
    for gram, count in counts.items():
        w = count * (log_num - log_df.get(gram, 0.0))
        weights[len(gram) - 1][gram] = w
        squares[len(gram) - 1] += w * w
    return weights, np.sqrt(squares)


def _clipped_dot(cand: dict, ref: dict) -> float:
    """``sum_g min(w_c(g), w_r(g)) * w_r(g)``: the dot product with the candidate's weights clipped by the reference's."""
    return sum(min(w, ref.get(gram, 0.0)) * ref.get(gram, 0.0) for gram, w in cand.items())


def cider_d(references, candidates, *, n: int = 4, sigma: float = CIDER_SIGMA, per_example: bool = False):
    """Corpus CIDEr-D of candidate captions against their references, as pycocoevalcap's ``Cider()``.

    ``CIDEr-D_i = 10 / (n |R_i|) * sum_{r in R_i} sum_{k=1..n} exp(-(|c| - |r|)^2 / (2 sigma^2)) *
    <min(w_c^k, w_r^k), w_r^k> / (|w_c^k| |w_r^k|)``, with ``w_s^k`` the tf-idf vector of the ``k``-grams of sentence
    ``s`` (``count_s(g) * (log N - log max(1, df(g)))``, ``df(g)`` the number of the corpus' ``N`` examples whose
    references contain ``g``); the corpus score is the mean over examples. See the module docstring for the details.

    Args:
      references: a list with, per example, a list of one or more reference captions (``str``, tokens separated by
        whitespace). Their n-grams give the document frequencies, so score the whole evaluation set in one call; a
        corpus of one example scores 0.
      candidates: a list with one candidate caption (``str``) per example, in the same order. An empty candidate
        scores 0.
      n: the largest n-gram order (4). pycocoevalcap's ``Cider(n=...)`` counts n-grams up to 4 whatever its ``n``
        and fails for any other value, so only ``n = 4`` has a reference to compare with.
      sigma: the standard deviation of the Gaussian length penalty, in tokens (pycocoevalcap's ``sigma``, 6).
      per_example: also return each example's CIDEr-D (pycocoevalcap's second return value).

    Returns:
      The corpus CIDEr-D as a float in ``[0, 10]``: 0 without shared n-grams, 10 for candidates equal to each of
      their references (less when a candidate has fewer than ``n`` tokens or only n-grams of idf 0 in some order, as
      such an order counts 0). With ``per_example=True`` a pair of that float and a float64 array ``[N]``.

    Raises:
      ValueError: naming the value, for lists of different lengths or no examples, an example without references,
        references that are not a list of lists of ``str``, a candidate that is not a ``str``, an ``n`` that is not a
        positive int, or a ``sigma`` that is not a finite number > 0.

    >>> refs = [["a red sneaker on the grass"], ["a blue boot in the snow"], ["two green hats on a shelf"]]
    >>> round(cider_d(refs, [r[0] for r in refs]), 6)  # every candidate equal to its only reference
    10.0

    "a" is in the references of all 3 examples (idf ``log 3 - log 3 = 0``) and "cat" in none, so "a cat" scores 0:

    >>> corpus, each = cider_d(refs, ["a red sneaker on the grass", "a red boot in the snow", "a cat"], per_example=True)
    >>> each.round(4).tolist(), round(corpus, 4)
    ([10.0, 5.4789, 0.0], 5.1596)
    """
    n = _check_order(n)
    if not isinstance(sigma, (int, float, np.integer, np.floating)) or not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma = {sigma!r} must be a finite number > 0 (the length penalty's width; 6 in CIDEr-D).")
    tokenised_refs, tokenised_cands = _tokenised_corpus(references, candidates)
    ref_counts = [[_ngram_counts(ref, n) for ref in refs] for refs in tokenised_refs]
    document_frequency = Counter(gram for counts in ref_counts for gram in set().union(*counts))
    log_df = {gram: math.log(df) for gram, df in document_frequency.items()}
    log_num = math.log(len(tokenised_cands))
    scores = np.zeros(len(tokenised_cands))
    for i, (cand, refs, counts) in enumerate(zip(tokenised_cands, tokenised_refs, ref_counts)):
        cand_weights, cand_norm = _tfidf(_ngram_counts(cand, n), log_num, log_df, n)
        total = np.zeros(n)
        for ref, ref_count in zip(refs, counts):
            ref_weights, ref_norm = _tfidf(ref_count, log_num, log_df, n)
            overlap = np.array([_clipped_dot(c, r) for c, r in zip(cand_weights, ref_weights)], np.float64)
            norms = cand_norm * ref_norm
            cosine = np.divide(overlap, norms, out=overlap.copy(), where=norms != 0)
            total += cosine * math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
        scores[i] = 10.0 * total.mean() / len(refs)
    corpus = float(scores.mean())
    return (corpus, scores) if per_example else corpus
