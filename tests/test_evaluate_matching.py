"""mmjax.evaluate.matching: two-stage retrieval against a brute-force ranking, pairwise accuracy with ties, and
the attention plot; bad shapes are refused."""

import os

import numpy as np
import pytest

from mmjax.evaluate import pairwise_accuracy, plot_patch_word_attention, recall_at_k, rerank, top_candidates


def test_rerank_of_the_top_k_equals_a_brute_force_two_stage_ranking():
    rng = np.random.default_rng(0)
    q, g, k = 30, 50, 8
    first, second = rng.standard_normal((q, g)), rng.standard_normal((q, g))
    relevant = rng.random((q, g)) < 0.05
    cand = top_candidates(first, k)
    ranked = rerank(cand, np.take_along_axis(second, cand, 1))
    for i in range(q):
        shortlist = sorted(range(g), key=lambda j: -first[i, j])[:k]
        assert ranked[i].tolist() == sorted(shortlist, key=lambda j: -second[i, j])
    got = recall_at_k(ranked, relevant, (1, 5))
    for kk in (1, 5):
        want = np.mean([relevant[i, ranked[i, :kk]].any() for i in range(q)])
        assert got[kk] == pytest.approx(want)


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy([1.0, 1.0, 2.0, 0.0], [0.0, 1.0, 3.0, 0.0]) == pytest.approx(0.5)


def test_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"k=4 must be an int in \[1, 3\]"):
        top_candidates(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match=r"candidates \(2, 3\) and scores \(2, 2\)"):
        rerank(np.zeros((2, 3), int), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"K=5 must be in \[1, 3\]"):
        recall_at_k(np.zeros((2, 3), int), np.zeros((2, 4), bool), (5,))
    with pytest.raises(ValueError, match=r"attention must be \[B=1, L, g \* g\]"):
        plot_patch_word_attention(
            np.zeros((1, 8, 8, 3), np.uint8), [["a"]], np.zeros((1, 1, 5)), str(tmp_path / "a.png")
        )


def test_attention_plot_writes_a_png(tmp_path):
    att = np.random.default_rng(0).random((2, 3, 9))
    path = plot_patch_word_attention(
        np.zeros((2, 12, 12, 3), np.uint8), [["a", "red", "shirt"], ["a", "bag"]], att, str(tmp_path / "att.png")
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000
