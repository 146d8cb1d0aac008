"""The ``Graph`` pytree: one graph or a batch of graphs as flat arrays, plus batching, padding and masks.

A batch of ``G`` graphs with ``N`` nodes and ``E`` edges in total is stored jraph-style:

* ``nodes``     ``[N, ...]`` node features (layers want ``[N, F]``),
* ``edges``     ``[E, ...]`` edge features or ``None``,
* ``senders``   ``[E]`` int, source node of each edge (global index into ``nodes``),
* ``receivers`` ``[E]`` int, target node of each edge; messages flow ``senders -> receivers``,
* ``n_node``    ``[G]`` int, nodes per graph (nodes of graph ``g`` are contiguous and in graph order),
* ``n_edge``    ``[G]`` int, edges per graph,
* ``globals``   ``[G, ...]`` per-graph features or ``None``,
* ``graph_valid`` ``[G]`` bool or ``None``: ``False`` marks padding graphs (set by :func:`pad`); ``None`` = all real.

Static shapes for ``jax.jit``: :func:`pad` fills a batch up to a budget ``(n_node, n_edge, n_graph)``. All padding
nodes and edges go into the first padding graph; padding edges join the first padding node to itself, so they never
touch a real node. :func:`node_mask`, :func:`edge_mask` and :func:`graph_mask` tell real from padding.
:func:`budget` picks power-of-two buckets, so batches of different sizes in one bucket share one compilation;
:func:`dynamically_batch` packs a stream of graphs under a fixed budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Graph",
    "validate",
    "batch",
    "unbatch",
    "pad",
    "unpad",
    "node_mask",
    "edge_mask",
    "graph_mask",
    "budget",
    "next_power_of_two",
    "dynamically_batch",
    "node_graph_index",
    "num_graphs",
    "is_concrete",
]


class Graph(NamedTuple):
    """A graph or a batch of graphs as flat arrays (a pytree; see the module docstring for all shapes).

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((3, 2)), senders=np.array([0, 1]), receivers=np.array([1, 2]),
    ...           n_node=np.array([3]), n_edge=np.array([2]))
    >>> g.nodes.shape, int(g.n_edge.sum())
    ((3, 2), 2)
    """

    nodes: Any
    senders: Any
    receivers: Any
    n_node: Any
    n_edge: Any
    edges: Any = None
    globals: Any = None
    graph_valid: Any = None


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a ``jax`` tracer), so value checks can run.

    >>> import jax, jax.numpy as jnp
    >>> is_concrete(jnp.ones(2)), jax.jit(lambda x: jnp.float32(is_concrete(x)))(jnp.ones(2)).item()
    (True, 0.0)
    """
    return not isinstance(x, jax.core.Tracer)


def _shape(x):
    return tuple(np.shape(x))


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def validate(graph: Graph, node_rank: int | None = None) -> Graph:
    """Check a graph's shapes and dtypes (always) and its index values (when concrete); raise ``ValueError``.

    Shape checks run under ``jit`` too (shapes are static); value checks (indices in range, ``n_node`` summing
    to the number of nodes, ...) run only on concrete arrays, i.e. outside ``jit``.

    Args:
      graph: the :class:`Graph`.
      node_rank: if given, ``nodes`` must have exactly this rank (layers pass 2 for ``[N, F]``).

    Returns:
      ``graph`` unchanged.

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((2, 1)), senders=np.array([0]), receivers=np.array([5]),
    ...           n_node=np.array([2]), n_edge=np.array([1]))
    >>> try:
    ...     validate(g)
    ... except ValueError as e:
    ...     print(str(e)[:41])
    receivers has indices out of range [0, 2)
    """
    if not isinstance(graph, Graph):
        raise ValueError(
            f"graph must be an mmjax.graph.Graph, got {type(graph).__name__}; build one with "
            "Graph(nodes=..., senders=..., receivers=..., n_node=..., n_edge=...)."
        )
    if graph.nodes is None or np.ndim(graph.nodes) < 1:
        raise ValueError(
            f"nodes must be an array [N, ...], got {None if graph.nodes is None else _shape(graph.nodes)}."
        )
    if node_rank is not None and np.ndim(graph.nodes) != node_rank:
        raise ValueError(
            f"nodes must have rank {node_rank} ([N, F] node features), got shape {_shape(graph.nodes)}; "
            "reshape the node features to [num_nodes, features]."
        )
    n = _shape(graph.nodes)[0]
    for name in ("senders", "receivers", "n_node", "n_edge"):
        a = getattr(graph, name)
        if a is None or np.ndim(a) != 1:
            raise ValueError(
                f"{name} must be a 1-D integer array, got {'None' if a is None else 'shape ' + str(_shape(a))}."
            )
        if not np.issubdtype(_dtype(a), np.integer):
            raise ValueError(f"{name} must have an integer dtype, got {_dtype(a)}; cast with .astype(np.int32).")
    e = _shape(graph.senders)[0]
    if _shape(graph.receivers)[0] != e:
        raise ValueError(
            f"senders and receivers must have the same length, got senders {_shape(graph.senders)} "
            f"and receivers {_shape(graph.receivers)}."
        )
    g = _shape(graph.n_node)[0]
    if _shape(graph.n_edge)[0] != g:
        raise ValueError(
            f"n_edge must have one entry per graph like n_node {_shape(graph.n_node)}, got {_shape(graph.n_edge)}."
        )
    if graph.edges is not None and (np.ndim(graph.edges) < 1 or _shape(graph.edges)[0] != e):
        raise ValueError(
            f"edges must have shape [E={e}, ...] (one row per sender/receiver pair), got {_shape(graph.edges)}."
        )
    if graph.globals is not None and (np.ndim(graph.globals) < 1 or _shape(graph.globals)[0] != g):
        raise ValueError(f"globals must have shape [G={g}, ...] (one row per graph), got {_shape(graph.globals)}.")
    if graph.graph_valid is not None and _shape(graph.graph_valid) != (g,):
        raise ValueError(f"graph_valid must have shape [G={g}], got {_shape(graph.graph_valid)}.")
    for name, total, what in (("n_node", n, "nodes.shape[0]"), ("n_edge", e, "senders.shape[0]")):
        a = getattr(graph, name)
        if is_concrete(a):
            a = np.asarray(a)
            if (a < 0).any() or int(a.sum()) != total:
                raise ValueError(
                    f"{name} must be non-negative and sum to {what} = {total}, got {name}={a.tolist()[:8]}"
                    f"{'...' if a.size > 8 else ''} (sum {int(a.sum())})."
                )
    for name in ("senders", "receivers"):
        a = getattr(graph, name)
        if is_concrete(a) and e > 0:
            a = np.asarray(a)
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= n:
                raise ValueError(
                    f"{name} has indices out of range [0, {n}) (the node count): min {lo}, max {hi}; "
                    "every edge must point at an existing node."
                )
    return graph


def num_graphs(graph: Graph) -> int:
    """Static number of graphs ``G`` (``len(n_node)``), padding graphs included.

    >>> import numpy as np
    >>> num_graphs(Graph(nodes=np.ones((3, 1)), senders=np.zeros(0, int), receivers=np.zeros(0, int),
    ...                  n_node=np.array([1, 2]), n_edge=np.array([0, 0])))
    2
    """
    return int(_shape(graph.n_node)[0])


def graph_mask(graph: Graph) -> jax.Array:
    """Boolean ``[G]``: ``True`` for real graphs, ``False`` for padding graphs.

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((2, 1)), senders=np.zeros(0, int), receivers=np.zeros(0, int),
    ...           n_node=np.array([2]), n_edge=np.array([0]))
    >>> graph_mask(pad(g, n_node=4, n_edge=2, n_graph=3)).tolist()
    [True, False, False]
    """
    if graph.graph_valid is None:
        return jnp.ones(_shape(graph.n_node), bool)
    return jnp.asarray(graph.graph_valid, bool)


def node_graph_index(graph: Graph) -> jax.Array:
    """Graph id of every node, ``[N]`` int32 (``jit``-able; the segment ids for per-graph readouts).

    >>> import numpy as np
    >>> node_graph_index(Graph(nodes=np.ones((3, 1)), senders=np.zeros(0, int), receivers=np.zeros(0, int),
    ...                        n_node=np.array([1, 2]), n_edge=np.array([0, 0]))).tolist()
    [0, 1, 1]
    """
    g = num_graphs(graph)
    n = _shape(graph.nodes)[0]
    return jnp.repeat(jnp.arange(g, dtype=jnp.int32), jnp.asarray(graph.n_node), total_repeat_length=n)


def _edge_graph_index(graph: Graph) -> jax.Array:
    g = num_graphs(graph)
    e = _shape(graph.senders)[0]
    return jnp.repeat(jnp.arange(g, dtype=jnp.int32), jnp.asarray(graph.n_edge), total_repeat_length=e)


def node_mask(graph: Graph) -> jax.Array:
    """Boolean ``[N]``: ``True`` for nodes of real graphs (``jit``-able).

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((2, 1)), senders=np.zeros(0, int), receivers=np.zeros(0, int),
    ...           n_node=np.array([2]), n_edge=np.array([0]))
    >>> node_mask(pad(g, n_node=4, n_edge=2, n_graph=3)).tolist()
    [True, True, False, False]
    """
    if graph.graph_valid is None:
        return jnp.ones(_shape(graph.nodes)[:1], bool)
    return graph_mask(graph)[node_graph_index(graph)]


def edge_mask(graph: Graph) -> jax.Array:
    """Boolean ``[E]``: ``True`` for edges of real graphs (``jit``-able).

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((2, 1)), senders=np.array([0]), receivers=np.array([1]),
    ...           n_node=np.array([2]), n_edge=np.array([1]))
    >>> edge_mask(pad(g, n_node=4, n_edge=3, n_graph=2)).tolist()
    [True, False, False]
    """
    if graph.graph_valid is None:
        return jnp.ones(_shape(graph.senders), bool)
    return graph_mask(graph)[_edge_graph_index(graph)]


def _xp(graph: Graph):
    leaves = jax.tree.leaves(graph)
    return np if all(isinstance(x, (np.ndarray, np.generic, int, float)) for x in leaves) else jnp


def batch(graphs: Sequence[Graph]) -> Graph:
    """Join graphs (each may itself be a batch) into one batch, offsetting ``senders``/``receivers``.

    ``edges`` and ``globals`` must be all ``None`` or all present. Uses NumPy when every input is NumPy, else
    ``jax.numpy`` (then it is ``jit``-able).

    >>> import numpy as np
    >>> a = Graph(nodes=np.ones((2, 1)), senders=np.array([0]), receivers=np.array([1]),
    ...           n_node=np.array([2]), n_edge=np.array([1]))
    >>> b = batch([a, a])
    >>> b.senders.tolist(), b.receivers.tolist(), b.n_node.tolist()
    ([0, 2], [1, 3], [2, 2])
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("graphs must be a non-empty sequence of Graph, got an empty one.")
    for i, g in enumerate(graphs):
        if not isinstance(g, Graph):
            raise ValueError(f"graphs[{i}] must be a Graph, got {type(g).__name__}.")
    xp = np if all(_xp(g) is np for g in graphs) else jnp
    offsets = np.cumsum([0] + [_shape(g.nodes)[0] for g in graphs[:-1]])
    cat = lambda name: xp.concatenate([xp.asarray(getattr(g, name)) for g in graphs], axis=0)

    def optional(name):
        present = [getattr(g, name) is not None for g in graphs]
        if any(present) and not all(present):
            raise ValueError(
                f"{name} must be given for all graphs or for none, got it for {sum(present)} of {len(graphs)}."
            )
        return cat(name) if all(present) else None

    senders = xp.concatenate([xp.asarray(g.senders) + int(o) for g, o in zip(graphs, offsets)])
    receivers = xp.concatenate([xp.asarray(g.receivers) + int(o) for g, o in zip(graphs, offsets)])
    valid = None
    if any(g.graph_valid is not None for g in graphs):
        valid = xp.concatenate([xp.asarray(graph_mask(g)) if xp is jnp else np.asarray(graph_mask(g)) for g in graphs])
    return Graph(
        nodes=cat("nodes"),
        senders=senders,
        receivers=receivers,
        n_node=cat("n_node"),
        n_edge=cat("n_edge"),
        edges=optional("edges"),
        globals=optional("globals"),
        graph_valid=valid,
    )


def unbatch(graph: Graph, drop_padding: bool = True) -> list:
    """Split a batch into single graphs (host-side, needs concrete arrays); inverse of :func:`batch`.

    Args:
      graph: a batch.
      drop_padding: leave out padding graphs (``graph_valid == False``).

    Returns:
      list of :class:`Graph`, one per graph, indices local to each graph, ``graph_valid`` ``None``.

    >>> import numpy as np
    >>> a = Graph(nodes=np.ones((2, 1)), senders=np.array([0]), receivers=np.array([1]),
    ...           n_node=np.array([2]), n_edge=np.array([1]))
    >>> [g.senders.tolist() for g in unbatch(batch([a, a]))]
    [[0], [0]]
    """
    validate(graph)
    if not all(is_concrete(x) for x in jax.tree.leaves(graph)):
        raise ValueError("unbatch needs concrete arrays (call it outside jax.jit).")
    n_node = np.asarray(graph.n_node)
    n_edge = np.asarray(graph.n_edge)
    valid = np.asarray(graph_mask(graph))
    node_off = np.concatenate([[0], np.cumsum(n_node)])
    edge_off = np.concatenate([[0], np.cumsum(n_edge)])
    out = []
    for i in range(len(n_node)):
        if drop_padding and not valid[i]:
            continue
        ns, ne = slice(node_off[i], node_off[i + 1]), slice(edge_off[i], edge_off[i + 1])
        sl = lambda a, s: None if a is None else np.asarray(a)[s]
        out.append(
            Graph(
                nodes=sl(graph.nodes, ns),
                senders=np.asarray(graph.senders)[ne] - node_off[i],
                receivers=np.asarray(graph.receivers)[ne] - node_off[i],
                n_node=n_node[i : i + 1],
                n_edge=n_edge[i : i + 1],
                edges=sl(graph.edges, ne),
                globals=sl(graph.globals, slice(i, i + 1)),
            )
        )
    return out


def next_power_of_two(x: int) -> int:
    """Smallest power of two ``>= x`` (``>= 1``).

    >>> next_power_of_two(5), next_power_of_two(8), next_power_of_two(0)
    (8, 8, 1)
    """
    return 1 << max(int(x) - 1, 0).bit_length()


def budget(graph: Graph, minimum: tuple = (1, 1, 1)) -> tuple:
    """Power-of-two padding budget ``(n_node, n_edge, n_graph)`` for ``graph`` (host-side).

    Room for one padding graph and one padding node is always included:
    ``n_node = 2**ceil(log2(N + 1))``, ``n_edge = 2**ceil(log2(E))``, ``n_graph = 2**ceil(log2(G + 1))``,
    each at least the corresponding ``minimum``.

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((5, 1)), senders=np.zeros(3, int), receivers=np.zeros(3, int),
    ...           n_node=np.array([5]), n_edge=np.array([3]))
    >>> budget(g)
    (8, 4, 2)
    """
    n, e, g = _shape(graph.nodes)[0], _shape(graph.senders)[0], num_graphs(graph)
    return (
        max(next_power_of_two(n + 1), minimum[0]),
        max(next_power_of_two(e), minimum[1]),
        max(next_power_of_two(g + 1), minimum[2]),
    )


def pad(graph: Graph, n_node: int, n_edge: int, n_graph: int) -> Graph:
    """Pad a batch to exactly ``n_node`` nodes, ``n_edge`` edges and ``n_graph`` graphs.

    The padding goes into graph ``G`` (the first padding graph; graphs ``G+1 ..`` are empty); padding edges are
    self loops on the first padding node; padding features are 0. Needs ``n_node > N`` and ``n_graph > G``.
    Works on NumPy (host) or ``jax`` arrays, also under ``jax.jit`` (budgets are static ints).

    Returns:
      the padded :class:`Graph` with ``graph_valid`` set.

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((2, 1)), senders=np.array([0]), receivers=np.array([1]),
    ...           n_node=np.array([2]), n_edge=np.array([1]))
    >>> p = pad(g, n_node=4, n_edge=3, n_graph=2)
    >>> p.n_node.tolist(), p.n_edge.tolist(), p.senders.tolist()
    ([2, 2], [1, 2], [0, 2, 2])
    """
    validate(graph)
    n, e, g = _shape(graph.nodes)[0], _shape(graph.senders)[0], num_graphs(graph)
    for name, want, have, extra in (("n_node", n_node, n, 1), ("n_edge", n_edge, e, 0), ("n_graph", n_graph, g, 1)):
        if not isinstance(want, (int, np.integer)) or want < have + extra:
            raise ValueError(
                f"{name} budget must be an int >= {have + extra} (the batch has {have}"
                f"{' plus one for padding' if extra else ''}), got {want!r}; use mmjax.graph.budget()."
            )
    xp = _xp(graph)
    pn, pe, pg = n_node - n, n_edge - e, n_graph - g

    def pad_rows(a, k):
        a = xp.asarray(a)
        return xp.concatenate([a, xp.zeros((k,) + a.shape[1:], a.dtype)], axis=0)

    idx_dtype = _dtype(graph.senders)
    pad_idx = xp.full((pe,), n, idx_dtype)
    counts = lambda first, dtype: xp.concatenate([xp.asarray([first], dtype), xp.zeros((pg - 1,), dtype)])
    valid = xp.concatenate(
        [xp.asarray(graph_mask(graph)) if xp is jnp else np.asarray(graph_mask(graph)), xp.zeros((pg,), bool)]
    )
    return Graph(
        nodes=pad_rows(graph.nodes, pn),
        senders=xp.concatenate([xp.asarray(graph.senders), pad_idx]),
        receivers=xp.concatenate([xp.asarray(graph.receivers), pad_idx]),
        n_node=xp.concatenate([xp.asarray(graph.n_node), counts(pn, _dtype(graph.n_node))]),
        n_edge=xp.concatenate([xp.asarray(graph.n_edge), counts(pe, _dtype(graph.n_edge))]),
        edges=None if graph.edges is None else pad_rows(graph.edges, pe),
        globals=None if graph.globals is None else pad_rows(graph.globals, pg),
        graph_valid=valid,
    )


def unpad(graph: Graph) -> Graph:
    """Drop padding graphs, nodes and edges (host-side); inverse of :func:`pad`.

    >>> import numpy as np
    >>> g = Graph(nodes=np.ones((2, 1)), senders=np.array([0]), receivers=np.array([1]),
    ...           n_node=np.array([2]), n_edge=np.array([1]))
    >>> unpad(pad(g, 4, 3, 2)).nodes.shape
    (2, 1)
    """
    return batch(unbatch(graph, drop_padding=True))


def dynamically_batch(graphs: Iterable[Graph], n_node: int, n_edge: int, n_graph: int) -> Iterator[Graph]:
    """Pack a stream of graphs greedily into padded batches of one fixed budget (one compilation for all).

    Graphs are taken in order; a batch is emitted (padded with :func:`pad`) as soon as the next graph would not
    fit in ``n_node - 1`` nodes, ``n_edge`` edges and ``n_graph - 1`` graphs (one node and one graph are kept for
    padding). A graph that can never fit raises ``ValueError``.

    >>> import numpy as np
    >>> a = Graph(nodes=np.ones((3, 1)), senders=np.array([0, 1]), receivers=np.array([1, 2]),
    ...           n_node=np.array([3]), n_edge=np.array([2]))
    >>> [b.n_node.tolist() for b in dynamically_batch([a] * 3, n_node=8, n_edge=8, n_graph=4)]
    [[3, 3, 2, 0], [3, 5, 0, 0]]
    """
    cur, cn, ce, cg = [], 0, 0, 0
    for i, g in enumerate(graphs):
        validate(g)
        gn, ge, gg = _shape(g.nodes)[0], _shape(g.senders)[0], num_graphs(g)
        if gn > n_node - 1 or ge > n_edge or gg > n_graph - 1:
            raise ValueError(
                f"graph {i} ({gn} nodes, {ge} edges, {gg} graphs) does not fit the budget n_node="
                f"{n_node}, n_edge={n_edge}, n_graph={n_graph} (one node and one graph are kept for "
                "padding); raise the budget."
            )
        if cn + gn > n_node - 1 or ce + ge > n_edge or cg + gg > n_graph - 1:
            yield pad(batch(cur), n_node, n_edge, n_graph)
            cur, cn, ce, cg = [], 0, 0, 0
        cur.append(g)
        cn, ce, cg = cn + gn, ce + ge, cg + gg
    if cur:
        yield pad(batch(cur), n_node, n_edge, n_graph)
