"""Two-stage retrieval and matching evaluation: a dual encoder retrieves, a matching model re-ranks its top ``k``.

* :func:`top_candidates`: the ``k`` best gallery items of every query by a similarity matrix (stage one).
* :func:`rerank`: reorder each query's candidates by the second stage's scores (stable: ties keep stage one's
  order).
* :func:`recall_at_k`: Recall@K of ranked candidate lists against a relevance table (a query is a hit at ``K`` when
  any relevant item is among its first ``K``).
* :func:`pairwise_accuracy`: the fraction of (positive, negative) score pairs ordered correctly.
* :func:`plot_patch_word_attention`: an image and, per word, the model's attention over the patch grid.

>>> sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
>>> cand = top_candidates(sim, 2)
>>> cand.tolist(), recall_at_k(cand, np.eye(2, 3, dtype=bool), (1, 2))
([[0, 2], [2, 1]], {1: 0.5, 2: 1.0})
>>> recall_at_k(rerank(cand, np.array([[0.0, 1.0], [0.0, 1.0]])), np.eye(2, 3, dtype=bool), (1,))
{1: 0.5}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.evaluate.embeddings import _agg_figure, _save

__all__ = ["top_candidates", "rerank", "recall_at_k", "pairwise_accuracy", "plot_patch_word_attention"]


def top_candidates(similarity, k: int) -> np.ndarray:
    """The indices of the ``k`` highest entries of every row, best first (ties: lower index first).

    Args:
      similarity: ``[Q, G]`` scores of ``Q`` queries against ``G`` gallery items.
      k: candidates per query, ``1 <= k <= G``.

    Returns:
      ``int [Q, k]``.

    >>> top_candidates([[0.1, 0.3, 0.2]], 2).tolist()
    [[1, 2]]
    """
    sim = np.asarray(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be [queries, gallery], got shape {sim.shape}.")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= sim.shape[1]:
        raise ValueError(f"k={k!r} must be an int in [1, {sim.shape[1]}] (the gallery size).")
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def rerank(candidates, scores) -> np.ndarray:
    """``candidates`` ``[Q, k]`` reordered by ``scores`` ``[Q, k]`` (highest first; ties keep the given order).

    >>> rerank([[4, 7, 9]], [[0.1, 0.5, 0.1]]).tolist()
    [[7, 4, 9]]
    """
    cand, s = np.asarray(candidates), np.asarray(scores)
    if cand.shape != s.shape or cand.ndim != 2:
        raise ValueError(f"candidates {cand.shape} and scores {s.shape} must both be [queries, k].")
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1)


def recall_at_k(ranked, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K: the fraction of queries with a relevant item among the first ``K`` of ``ranked``.

    Args:
      ranked: ``int [Q, k]`` gallery indices per query, best first.
      relevant: ``bool [Q, G]``, True where gallery item ``g`` is a right answer for query ``q``.
      ks: the ``K`` values (each at most ``k``).

    Returns:
      ``{K: recall}``.

    >>> recall_at_k([[2, 0]], [[True, False, False]], (1, 2))
    {1: 0.0, 2: 1.0}
    """
    ranked, rel = np.asarray(ranked), np.asarray(relevant, bool)
    if ranked.ndim != 2 or rel.ndim != 2 or rel.shape[0] != ranked.shape[0]:
        raise ValueError(f"ranked {ranked.shape} must be [Q, k] and relevant {rel.shape} [Q, G] with the same Q.")
    hits = np.take_along_axis(rel, ranked, axis=1)  # [Q, k]
    out = {}
    for k in ks:
        if not 1 <= k <= ranked.shape[1]:
            raise ValueError(f"K={k} must be in [1, {ranked.shape[1]}] (the candidates per query).")
        out[int(k)] = float(hits[:, :k].any(axis=1).mean())
    return out


def pairwise_accuracy(positive, negative) -> float:
    """The fraction of pairs with ``positive[i] > negative[i]`` (a tie counts as half).

    >>> pairwise_accuracy([2.0, 1.0, 0.5], [1.0, 1.0, 0.9])
    0.5
    """
    p, n = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if p.shape != n.shape:
        raise ValueError(f"positive {p.shape} and negative {n.shape} must have the same shape.")
    return float(np.mean((p > n) + 0.5 * (p == n)))


def plot_patch_word_attention(images, words, attention, path: str, dpi: int = 100) -> str:
    """For each example, the image and one panel per word with its attention over the ``gh x gw`` patch grid (a
    heat map over the image, scaled to the word's largest weight).

    Args:
      images: ``uint8 [B, S, S, 3]``.
      words: ``B`` lists of the words to show (one panel each).
      attention: ``[B, L, gh * gw]``; row ``t`` belongs to ``words[b][t]``.
      path: the PNG to write.

    Returns:
      ``path``.

    >>> import tempfile, os
    >>> p = plot_patch_word_attention(np.zeros((1, 8, 8, 3), np.uint8), [["red"]], np.ones((1, 1, 4)) / 4,
    ...                               os.path.join(tempfile.mkdtemp(), "a.png"))
    >>> os.path.getsize(p) > 0
    True
    """
    images, att = np.asarray(images), np.asarray(attention, np.float64)
    b, s = images.shape[0], images.shape[1]
    g = int(round(np.sqrt(att.shape[-1])))
    if g * g != att.shape[-1] or att.shape[0] != b or len(words) != b:
        raise ValueError(f"attention must be [B={b}, L, g * g] with one word list per image, got {att.shape}.")
    cols = 1 + max(len(w) for w in words)
    fig = _agg_figure(1.3 * cols, 1.45 * b)
    for i in range(b):
        ax = fig.add_subplot(b, cols, i * cols + 1)
        ax.imshow(images[i])
        ax.set_axis_off()
        for t, word in enumerate(words[i]):
            ax = fig.add_subplot(b, cols, i * cols + 2 + t)
            ax.imshow(images[i], extent=(0, s, s, 0))
            a = att[i, t].reshape(g, g)
            ax.imshow(a, cmap="magma", alpha=0.65, extent=(0, s, s, 0), vmin=0, vmax=max(a.max(), 1e-12))
            ax.set_title(word, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path, dpi)
