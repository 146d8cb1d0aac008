"""mmjax.multimodal_graph: the pair graph of patches, words and a global node, checked edge by edge against a
brute-force construction in NumPy; padding words are cut off; sizes are static under jit; bad sizes are refused."""

import jax
import numpy as np
import pytest

from mmjax import graph as gr
from mmjax.multimodal_graph import (
    EDGE_TYPES,
    JointGraphLayout,
    build_joint_graph,
    check_edge_type,
    joint_edges,
    knn_edges,
)

T = {name: i for i, name in enumerate(EDGE_TYPES)}


def _brute_edges(layout, patches, words, word_mask):
    """The edge multiset of one pair, from the module docstring's table, as {(sender, receiver, type): count}."""
    gh, gw = layout.grid
    p, L = layout.num_patches, layout.context_length
    edges = []
    for i in range(p):
        for j in range(p):
            (yi, xi), (yj, xj) = divmod(i, gw), divmod(j, gw)
            d = (abs(yi - yj), abs(xi - xj))
            if d in ((0, 1), (1, 0)) or (layout.grid_neighbours == 8 and d == (1, 1)):
                edges.append((j, i, T["patch_grid"]))
    if layout.knn:
        d = ((patches[:, None] - patches[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        for i in range(p):
            for j in np.argsort(d[i], kind="stable")[: layout.knn]:
                edges.append((int(j), i, T["patch_knn"]))
    for t in range(L - 1):
        edges += [(p + t, p + t + 1, T["word_next"]), (p + t + 1, p + t, T["word_prev"])]
    if layout.patch_word == "all":
        pairs = [(j, w) for w in range(L) for j in range(p)]
    elif layout.patch_word == "none":
        pairs = []
    else:
        unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
        sim = unit(words) @ unit(patches).T
        pairs = [(int(j), w) for w in range(L) for j in np.argsort(-sim[w], kind="stable")[: layout.patch_word]]
    for j, w in pairs:
        edges += [(j, p + w, T["patch_word"]), (p + w, j, T["word_patch"])]
    if layout.global_node:
        edges += [(i, p + L, T["to_global"]) for i in range(p + L)]
    real = np.concatenate([np.ones(p, bool), word_mask, np.ones(int(layout.global_node), bool)])
    out = {}
    for s, r, t in edges:
        if not (real[s] and real[r]):
            s = r = s if not real[s] else r  # the padding end
        out[(s, r, t)] = out.get((s, r, t), 0) + 1
    return out


def _as_multiset(s, r, t):
    out = {}
    for key in zip(s.tolist(), r.tolist(), t.tolist()):
        out[key] = out.get(key, 0) + 1
    return out


LAYOUTS = [
    dict(grid=(3, 3), context_length=4),
    dict(grid=(3, 4), context_length=5, grid_neighbours=8, knn=3),
    dict(grid=(2, 3), context_length=3, knn=2, patch_word=2, global_node=False),
    dict(grid=(3, 3), context_length=4, knn=1, patch_word="none"),
]


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_edges_match_the_brute_force_construction(kwargs):
    layout = JointGraphLayout(**kwargs)
    rng = np.random.default_rng(0)
    b, f = 3, 5
    patches = rng.standard_normal((b, layout.num_patches, f))
    words = rng.standard_normal((b, layout.context_length, f))
    word_mask = np.arange(layout.context_length)[None, :] < np.array([[layout.context_length], [2], [1]])
    s, r, t = (np.asarray(a) for a in joint_edges(layout, patches, words, word_mask))
    assert s.shape == r.shape == t.shape == (b, layout.num_edges)
    for i in range(b):
        assert _as_multiset(s[i], r[i], t[i]) == _brute_edges(layout, patches[i], words[i], word_mask[i])


def test_no_real_node_reads_a_padding_word_and_padding_reads_only_itself():
    layout = JointGraphLayout(grid=(2, 2), context_length=5, knn=1)
    word_mask = np.array([[True, True, True, False, False]])
    s, r, _ = (np.asarray(a)[0] for a in joint_edges(layout, np.ones((1, 4, 3)), np.ones((1, 5, 3)), word_mask))
    pad_nodes = {4 + 3, 4 + 4}
    touching = [(a, b) for a, b in zip(s, r) if a in pad_nodes or b in pad_nodes]
    assert touching and all(a == b for a, b in touching)


def test_batch_graph_is_valid_grouped_per_pair_and_static_under_jit():
    layout = JointGraphLayout(grid=(3, 3), context_length=4, knn=2, patch_word=3)
    rng = np.random.default_rng(1)
    patches, words = rng.standard_normal((4, 9, 6)), rng.standard_normal((4, 4, 6))
    mask = np.array([[1, 1, 1, 0]] * 4, bool)
    jg = build_joint_graph(patches, words, mask, layout)
    gr.validate(jg.graph, node_rank=2)
    n, e = layout.num_nodes, layout.num_edges
    pair_of_edge = np.repeat(np.arange(4), e)
    assert np.all(np.asarray(jg.graph.senders) // n == pair_of_edge)
    assert np.all(np.asarray(jg.graph.receivers) // n == pair_of_edge)
    check_edge_type(np.asarray(jg.edge_type))
    jitted = jax.jit(lambda p, w: build_joint_graph(p, w, mask, layout))(patches, words)
    np.testing.assert_array_equal(np.asarray(jitted.graph.senders), np.asarray(jg.graph.senders))
    np.testing.assert_array_equal(np.asarray(jitted.edge_type), np.asarray(jg.edge_type))
    np.testing.assert_allclose(np.asarray(jitted.graph.nodes[:9]), patches[0])  # pair 0's patches come first


def test_knn_edges_pick_the_nearest_other_points():
    x = np.random.default_rng(2).standard_normal((2, 7, 3))
    s, r = (np.asarray(a) for a in knn_edges(x, 3))
    for b in range(2):
        d = ((x[b][:, None] - x[b][None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        for i in range(7):
            assert set(s[b][r[b] == i]) == set(np.argsort(d[i])[:3])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(2, 2), context_length=3, knn=4), r"knn=4 is larger than the 3 other patches"),
        (dict(grid=(2, 2), context_length=3, patch_word=5), r"patch_word=5 is larger than the 4 patches"),
        (dict(grid=(2, 2), context_length=3, patch_word="some"), r"patch_word must be 'all', 'none' or an int"),
        (dict(grid=(2, 2), context_length=0), r"context_length must be an int >= 1, got 0"),
        (dict(grid=(2,), context_length=3), r"grid must be \(rows, columns\)"),
        (dict(grid=(2, 2), context_length=3, grid_neighbours=6), r"grid_neighbours must be 4 or 8, got 6"),
    ],
)
def test_bad_layouts_are_refused_with_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JointGraphLayout(**kwargs)


def test_bad_inputs_are_refused_with_the_value():
    layout = JointGraphLayout(grid=(2, 2), context_length=3)
    with pytest.raises(ValueError, match=r"patches must be \[B, P=4, F\].*got shape \(1, 5, 2\)"):
        build_joint_graph(np.ones((1, 5, 2)), np.ones((1, 3, 2)), np.ones((1, 3), bool), layout)
    with pytest.raises(ValueError, match=r"words must be \[B=1, L=3, F=2\].*got \(1, 4, 2\)"):
        build_joint_graph(np.ones((1, 4, 2)), np.ones((1, 4, 2)), np.ones((1, 3), bool), layout)
    with pytest.raises(ValueError, match=r"k=7 must be in \[1, 6\]"):
        knn_edges(np.ones((1, 7, 2)), 7)
    with pytest.raises(ValueError, match=r"edge_type holds ids outside \[0, 7\): min -1"):
        check_edge_type(np.array([0, -1]))
