"""One graph per image-caption pair: image patches and words as nodes of the same :class:`mmjax.graph.Graph`.

Nodes of one pair, in this order (``P = gh * gw`` patches, ``L`` = context length)::

    0 .. P-1        patches, row-major over the ``gh x gw`` grid       node type 0 ("patch")
    P .. P+L-1      word positions 0 .. L-1 (padding words included)   node type 1 ("word")
    P+L             the global node (``global_node=True``)              node type 2 ("global")

Edges (``j -> i``: node ``i`` receives from ``j``), one relation id each (:data:`EDGE_TYPES`):

==== ================ ===============================================================================
id   name             edges
==== ================ ===============================================================================
0    ``patch_grid``   grid neighbours: 4 (up, down, left, right) or 8 (with the diagonals), both ways
1    ``patch_knn``    each patch from its ``knn`` nearest other patches in feature space (squared
                      Euclidean), recomputed from the current features (Vision GNN's dynamic graph)
2    ``word_next``    word ``t`` -> word ``t + 1`` (the sequence, forward)
3    ``word_prev``    word ``t + 1`` -> word ``t``
4    ``patch_word``   patch -> word: all pairs, or each word from its ``k`` most similar patches
5    ``word_patch``   word -> patch: the reverse of every ``patch_word`` edge
6    ``to_global``    every patch and word -> the global node (one way: the global node only reads)
==== ================ ===============================================================================

Padding words (``word_mask`` False) keep their node, but every edge that touches one is turned into a self loop
on it, so no real node reads a padding word and a padding word reads only itself. Sizes are static: every pair
has the same ``num_nodes`` and ``num_edges``, so a batch of ``B`` pairs is one :class:`Graph` of ``B`` graphs
(``n_node = [num_nodes] * B``, edges grouped per pair), built with ``jnp`` inside a jitted step.

``patch_word="none"`` drops edge types 4 and 5: patches and words then meet only in the global node (late fusion).

>>> import numpy as np
>>> layout = JointGraphLayout(grid=(2, 2), context_length=3, knn=1)
>>> layout.num_nodes, layout.num_edges, [NODE_TYPES[t] for t in layout.node_type]
(8, 47, ['patch', 'patch', 'patch', 'patch', 'word', 'word', 'word', 'global'])
>>> jg = build_joint_graph(np.ones((2, 4, 5)), np.ones((2, 3, 5)), np.array([[1, 1, 0], [1, 1, 1]], bool), layout)
>>> jg.graph.nodes.shape, jg.edge_type.shape, jg.graph.n_node.tolist()
((16, 5), (94,), [8, 8])
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.graph import Graph

__all__ = [
    "NODE_TYPES",
    "EDGE_TYPES",
    "JointGraphLayout",
    "JointGraph",
    "build_joint_graph",
    "joint_edges",
    "knn_edges",
    "check_edge_type",
]

NODE_TYPES = ("patch", "word", "global")
EDGE_TYPES = ("patch_grid", "patch_knn", "word_next", "word_prev", "patch_word", "word_patch", "to_global")
_T = {name: i for i, name in enumerate(EDGE_TYPES)}


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class JointGraphLayout:
    """The static structure of one pair's graph (see the module docstring for node order and edge types).

    Attributes:
      grid: ``(gh, gw)`` patches per column and row.
      context_length: word positions ``L`` (padding included).
      global_node: add the global node (the readout of a matching model).
      grid_neighbours: 4 or 8.
      knn: nearest patches each patch receives from (0: no kNN edges); at most ``P - 1``.
      patch_word: ``"all"`` (every patch with every word, both ways), ``"none"`` (no patch-word edges: late fusion),
        or an int ``k``: each word receives from its ``k`` most similar patches (cosine of the current features) and
        sends back to them; at most ``P``.

    Raises:
      ValueError: a size that is not a positive int, ``knn`` or ``k`` larger than the patches allow, an unknown
        ``patch_word``.

    >>> layout = JointGraphLayout(grid=(3, 3), context_length=4, knn=2, patch_word=2)
    >>> layout.num_patches, layout.num_nodes, layout.num_edges
    (9, 14, 77)
    >>> JointGraphLayout(grid=(2, 2), context_length=4, knn=4)
    Traceback (most recent call last):
    ...
    ValueError: knn=4 is larger than the 3 other patches of a 2x2 grid; choose knn <= 3.
    """

    grid: tuple[int, int]
    context_length: int
    global_node: bool = True
    grid_neighbours: int = 4
    knn: int = 0
    patch_word: Any = "all"

    def __post_init__(self):
        if not isinstance(self.grid, (tuple, list)) or len(self.grid) != 2:
            raise ValueError(f"grid must be (rows, columns) of patches, got {self.grid!r}.")
        gh, gw = (_positive_int("grid", g) for g in self.grid)
        object.__setattr__(self, "grid", (gh, gw))
        _positive_int("context_length", self.context_length)
        if self.grid_neighbours not in (4, 8):
            raise ValueError(f"grid_neighbours must be 4 or 8, got {self.grid_neighbours!r}.")
        p = gh * gw
        _positive_int("knn", self.knn, minimum=0)
        if self.knn > p - 1:
            raise ValueError(
                f"knn={self.knn} is larger than the {p - 1} other patches of a {gh}x{gw} grid; choose knn <= {p - 1}."
            )
        pw = self.patch_word
        if isinstance(pw, str):
            if pw not in ("all", "none"):
                raise ValueError(f"patch_word must be 'all', 'none' or an int k >= 1, got {pw!r}.")
        else:
            _positive_int("patch_word", pw)
            if pw > p:
                raise ValueError(
                    f"patch_word={pw} is larger than the {p} patches of a {gh}x{gw} grid; choose k <= {p}."
                )

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_nodes(self) -> int:
        return self.num_patches + self.context_length + int(self.global_node)

    @property
    def word_offset(self) -> int:
        """Index of word position 0 in a pair's nodes."""
        return self.num_patches

    @property
    def global_index(self) -> int:
        """Index of the global node in a pair's nodes (``-1`` without one)."""
        return self.num_patches + self.context_length if self.global_node else -1

    @property
    def node_type(self) -> np.ndarray:
        """``int32 [num_nodes]``: 0 patch, 1 word, 2 global."""
        t = [0] * self.num_patches + [1] * self.context_length + [2] * int(self.global_node)
        return np.asarray(t, np.int32)

    def static_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(senders, receivers, edge_type)`` int32 of the edges that do not depend on features, in one pair's
        node indices (grid, sequence, all patch-word pairs when ``patch_word="all"``, to-global)."""
        gh, gw = self.grid
        p, L = self.num_patches, self.context_length
        s, r, t = [], [], []
        steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
        if self.grid_neighbours == 8:
            steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
        for y in range(gh):
            for x in range(gw):
                for dy, dx in steps:
                    if 0 <= y + dy < gh and 0 <= x + dx < gw:
                        s.append((y + dy) * gw + x + dx), r.append(y * gw + x), t.append(_T["patch_grid"])
        for i in range(L - 1):
            s += [p + i, p + i + 1]
            r += [p + i + 1, p + i]
            t += [_T["word_next"], _T["word_prev"]]
        if self.patch_word == "all":
            for w in range(L):
                for j in range(p):
                    s += [j, p + w]
                    r += [p + w, j]
                    t += [_T["patch_word"], _T["word_patch"]]
        if self.global_node:
            g = self.global_index
            s += list(range(p + L))
            r += [g] * (p + L)
            t += [_T["to_global"]] * (p + L)
        as32 = lambda a: np.asarray(a, np.int32).reshape(-1)  # noqa: E731
        return as32(s), as32(r), as32(t)

    @property
    def num_edges(self) -> int:
        """Edges per pair: the static ones plus ``P * knn`` kNN edges plus ``2 * L * k`` for ``patch_word=k``."""
        dynamic = self.num_patches * self.knn
        if not isinstance(self.patch_word, str):
            dynamic += 2 * self.context_length * int(self.patch_word)
        return int(self.static_edges()[0].size) + dynamic


class JointGraph(NamedTuple):
    """A batch of pair graphs: ``graph`` (:class:`Graph`, ``B`` graphs of ``num_nodes`` nodes), ``edge_type``
    ``int32 [B * num_edges]`` (ids into :data:`EDGE_TYPES`) and ``node_type`` ``int32 [B * num_nodes]``.

    >>> layout = JointGraphLayout(grid=(1, 2), context_length=2, patch_word="none")
    >>> jg = build_joint_graph(np.ones((1, 2, 4)), np.ones((1, 2, 4)), np.ones((1, 2), bool), layout)
    >>> [EDGE_TYPES[t] for t in jg.edge_type.tolist()][:3], jg.node_type.tolist()
    (['patch_grid', 'patch_grid', 'word_next'], [0, 0, 1, 1, 2])
    """

    graph: Graph
    edge_type: Any
    node_type: Any


def knn_edges(x, k: int):
    """Each of the ``P`` points receives from its ``k`` nearest other points (squared Euclidean distance).

    Args:
      x: ``[B, P, F]``.
      k: neighbours per point, ``1 <= k <= P - 1``.

    Returns:
      ``(senders, receivers)`` int32 ``[B, P * k]`` in ``0..P-1``; receiver ``i`` appears ``k`` times in a row.

    >>> import numpy as np
    >>> s, r = knn_edges(np.array([[[0.0], [1.0], [5.0]]]), 1)
    >>> s.tolist(), r.tolist()
    ([[1, 0, 1]], [[0, 1, 2]])
    """
    x = jnp.asarray(x)
    b, p, _ = x.shape
    if not 1 <= k <= p - 1:
        raise ValueError(f"k={k} must be in [1, {p - 1}] for {p} points (a point is not its own neighbour).")
    sq = jnp.sum(x * x, -1)
    d = sq[:, :, None] + sq[:, None, :] - 2 * jnp.einsum("bif,bjf->bij", x, x)  # [B, P, P]
    d = jnp.where(jnp.eye(p, dtype=bool), jnp.inf, d)
    _, nearest = jax.lax.top_k(-jax.lax.stop_gradient(d), k)  # [B, P, k]
    senders = nearest.reshape(b, p * k).astype(jnp.int32)
    receivers = jnp.broadcast_to(jnp.repeat(jnp.arange(p, dtype=jnp.int32), k), (b, p * k))
    return senders, receivers


def _similar_patches(patches, words, k: int):
    """``[B, L, k]``: the ``k`` patches of highest cosine similarity with each word."""
    unit = lambda v: v / jnp.sqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)  # noqa: E731
    sim = jnp.einsum("blf,bpf->blp", unit(words), unit(patches))
    return jax.lax.top_k(jax.lax.stop_gradient(sim), k)[1].astype(jnp.int32)


def joint_edges(layout: JointGraphLayout, patches, words, word_mask):
    """Edges of every pair, ``(senders, receivers, edge_type)`` each ``int32 [B, num_edges]`` in the pair's own node
    indices: the static edges, then the kNN edges from ``patches`` ``[B, P, F]``, then (``patch_word=k``) the
    word-patch edges from the similarity of ``words`` ``[B, L, F]`` and ``patches``; edges touching a padding word
    (``word_mask`` ``[B, L]`` False) become self loops on it.

    >>> import numpy as np
    >>> layout = JointGraphLayout(grid=(1, 2), context_length=2, global_node=False, patch_word="none")
    >>> s, r, t = joint_edges(layout, np.ones((1, 2, 3)), np.ones((1, 2, 3)), np.array([[True, False]]))
    >>> s.tolist(), r.tolist(), [EDGE_TYPES[i] for i in t[0]]
    ([[1, 0, 3, 3]], [[0, 1, 3, 3]], ['patch_grid', 'patch_grid', 'word_next', 'word_prev'])
    """
    patches, words, word_mask = jnp.asarray(patches), jnp.asarray(words), jnp.asarray(word_mask, bool)
    b, p, L = patches.shape[0], layout.num_patches, layout.context_length
    s0, r0, t0 = layout.static_edges()
    parts = [
        (jnp.broadcast_to(s0, (b, s0.size)), jnp.broadcast_to(r0, (b, r0.size)), jnp.broadcast_to(t0, (b, t0.size)))
    ]
    if layout.knn:
        s, r = knn_edges(patches, layout.knn)
        parts.append((s, r, jnp.full(s.shape, _T["patch_knn"], jnp.int32)))
    if not isinstance(layout.patch_word, str):
        k = int(layout.patch_word)
        patch = _similar_patches(patches, words, k).reshape(b, L * k)
        word = jnp.broadcast_to(p + jnp.repeat(jnp.arange(L, dtype=jnp.int32), k), (b, L * k))
        types = jnp.concatenate([jnp.full((b, L * k), _T["patch_word"]), jnp.full((b, L * k), _T["word_patch"])], 1)
        parts.append((jnp.concatenate([patch, word], 1), jnp.concatenate([word, patch], 1), types.astype(jnp.int32)))
    s, r, t = (jnp.concatenate([part[i] for part in parts], 1) for i in range(3))
    # edges that touch a padding word become self loops on that word
    node_real = jnp.concatenate(
        [jnp.ones((b, p), bool), word_mask, jnp.ones((b, int(layout.global_node)), bool)], axis=1
    )  # [B, num_nodes]
    s_real, r_real = jnp.take_along_axis(node_real, s, 1), jnp.take_along_axis(node_real, r, 1)
    pad_node = jnp.where(s_real, r, s)  # the padding end of the edge
    touches_pad = ~(s_real & r_real)
    s, r = jnp.where(touches_pad, pad_node, s), jnp.where(touches_pad, pad_node, r)
    return s, r, t


def check_edge_type(edge_type, num_types: int = len(EDGE_TYPES)):
    """Raises ``ValueError`` when a concrete ``edge_type`` holds an id outside ``[0, num_types)``; returns it.

    >>> check_edge_type(np.array([0, 6])).tolist()
    [0, 6]
    >>> check_edge_type(np.array([7]))
    Traceback (most recent call last):
    ...
    ValueError: edge_type holds ids outside [0, 7): min 7, max 7; the joint graph's types are EDGE_TYPES (0..6).
    """
    if not isinstance(edge_type, jax.core.Tracer) and np.size(edge_type):
        a = np.asarray(edge_type)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"edge_type must be an int array, got dtype {a.dtype}.")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_types:
            raise ValueError(
                f"edge_type holds ids outside [0, {num_types}): min {lo}, max {hi}; the joint graph's types are "
                f"EDGE_TYPES (0..{num_types - 1})."
            )
    return edge_type


def build_joint_graph(patches, words, word_mask, layout: JointGraphLayout, global_features=None) -> JointGraph:
    """A batch of ``B`` image-caption graphs as one :class:`JointGraph` (``jit``-able: all sizes are static).

    Args:
      patches: ``[B, P, F]`` patch features (with their 2-D position already added), ``P = layout.num_patches``.
      words: ``[B, L, F]`` word features (with position), ``L = layout.context_length``.
      word_mask: ``bool [B, L]``, True for real words.
      layout: the :class:`JointGraphLayout`.
      global_features: ``[B, F]`` or ``[F]`` initial features of the global node (default zeros).

    Returns:
      :class:`JointGraph`: nodes ``[B * num_nodes, F]`` (pair ``b``'s nodes at ``b * num_nodes + i``), edges grouped
      per pair.

    Raises:
      ValueError: shapes that do not match the layout or each other.

    >>> import numpy as np
    >>> layout = JointGraphLayout(grid=(2, 2), context_length=2)
    >>> jg = build_joint_graph(np.zeros((3, 4, 8)), np.zeros((3, 2, 8)), np.ones((3, 2), bool), layout)
    >>> jg.graph.nodes.shape, int(jg.graph.n_edge[0]) == layout.num_edges, jg.node_type[:7].tolist()
    ((21, 8), True, [0, 0, 0, 0, 1, 1, 2])
    """
    patches, words = jnp.asarray(patches), jnp.asarray(words)
    if patches.ndim != 3 or patches.shape[1] != layout.num_patches:
        raise ValueError(
            f"patches must be [B, P={layout.num_patches}, F] for a {layout.grid[0]}x{layout.grid[1]} grid, got shape "
            f"{tuple(patches.shape)}."
        )
    b, _, f = patches.shape
    if words.shape != (b, layout.context_length, f):
        raise ValueError(
            f"words must be [B={b}, L={layout.context_length}, F={f}] like the patches, got {tuple(words.shape)}."
        )
    if np.shape(word_mask) != (b, layout.context_length):
        raise ValueError(f"word_mask must be bool [B={b}, L={layout.context_length}], got {np.shape(word_mask)}.")
    nodes = [patches, words]
    if layout.global_node:
        g = (
            jnp.zeros((b, 1, f), patches.dtype)
            if global_features is None
            else jnp.asarray(global_features, patches.dtype)
        )
        nodes.append(jnp.broadcast_to(g.reshape(-1, 1, f), (b, 1, f)))
    n = layout.num_nodes
    s, r, t = joint_edges(layout, patches, words, word_mask)
    offset = (jnp.arange(b, dtype=jnp.int32) * n)[:, None]
    e = s.shape[1]
    graph = Graph(
        nodes=jnp.concatenate(nodes, 1).reshape(b * n, f),
        senders=(s + offset).reshape(-1),
        receivers=(r + offset).reshape(-1),
        n_node=jnp.full((b,), n, jnp.int32),
        n_edge=jnp.full((b,), e, jnp.int32),
    )
    return JointGraph(graph, t.reshape(-1), jnp.tile(jnp.asarray(layout.node_type), b))
