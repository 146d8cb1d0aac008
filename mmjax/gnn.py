"""Message-passing layers (flax.linen) over :class:`mmjax.graph.Graph`: MessagePassing, GraphConv, GCNConv, GATConv,
RGCNConv (typed edges), and per-graph readouts.

Every layer takes a :class:`~mmjax.graph.Graph` with ``nodes [N, F_in]`` and returns new node features
``[N, F_out]``; messages flow from ``senders`` (``j``) to ``receivers`` (``i``). Padding (see
:func:`mmjax.graph.pad`) never reaches real nodes: padding edges join padding nodes only, and the layers also zero
them out with :func:`mmjax.graph.edge_mask`.

``GCNConv``, ``GATConv`` and ``RGCNConv`` follow PyTorch Geometric 2.8 (``torch_geometric.nn.GCNConv`` /
``GATConv`` / ``RGCNConv``); with the same weights (``kernel = lin.weight.T``) they agree to float32 rounding
(``tests/parity/test_gnn_pyg.py``, ``tests/parity/test_gnn_relational_pyg.py``). Graphs with typed edges: either
``RGCNConv(...).apply(params, graph, edge_type)`` (one weight matrix per relation), or ``GATConv(edge_dim=d)`` with
``edge_attr`` an embedding (or one-hot) of the edge type. One documented difference (GCN): PyG's ``gcn_norm``
ignores ``improved=True`` when no ``edge_weight`` is passed (every self loop then gets weight 1); here a missing
``edge_weight`` means all ones, so ``improved`` always adds ``2 I`` for missing loops, exactly like PyG with
``edge_weight=torch.ones(E)``.

Fast GCN path: :func:`gcn_adjacency` normalises a graph once (like PyG's ``cached=True``) and stores the edges
twice, sorted by receiver and sorted by sender; ``GCNConv(...).apply(params, graph, adjacency=adj)`` then
aggregates ``A_norm @ (X W)`` with a ``custom_vjp``: the forward walks the edges in sender order (the gather
``(XW)[s]`` reads rows in order), the backward computes ``A_norm^T @ g`` walking the edges in receiver order (the
gather ``g[r]`` reads rows in order). On CPU the row gather, not the scatter-add, is the expensive part, and an
ordered gather is about twice as fast as a random one. Both paths aggregate long edge lists in blocks of about
2 MiB of messages (a ``lax.scan``), never materialising all ``[E, F]`` messages at once (3-5x faster on CPU than
one gather + scatter). The default path (no ``adjacency``) normalises inside every call and uses the edges in the
order given, with the same custom backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import graph as gr
from mmjax import segment

Array = jax.Array

__all__ = [
    "GCNAdjacency",
    "gcn_norm",
    "gcn_adjacency",
    "propagate",
    "MessagePassing",
    "GraphConv",
    "GCNConv",
    "GATConv",
    "TransformerConv",
    "RGCNConv",
    "readout",
    "AttentionReadout",
    "READOUTS",
]

glorot = nn.initializers.glorot_uniform()
# Glorot over the last two axes of a stack of matrices (PyG's ``glorot``: U(+-sqrt(6 / (fan_in + fan_out))) with
# fan_in, fan_out = shape[-2], shape[-1]); flax's glorot_uniform would count the leading axes into both fans.
_glorot_stacked = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,))


# ----------------------------------------------------------------------------------------------------------------
# Weighted propagation  out[i] = sum_{e: r_e = i} w_e x[s_e]  with a custom backward.
# ----------------------------------------------------------------------------------------------------------------


# Edges per block in _weighted_segment_sum: about 2 MiB of float32 messages per block (8192 edges at 64 features).
_BLOCK_BYTES = 1 << 21


def _block_edges(row_elems: int) -> int:
    b = _BLOCK_BYTES // (4 * max(int(row_elems), 1))
    return int(min(max(1 << max(b.bit_length() - 1, 0), 1024), 1 << 16))


def _weighted_segment_sum(x, senders, receivers, weights, num_nodes, is_sorted=False):
    """``out[i] = sum_{e: receivers[e] = i} weights[e] * x[senders[e]]``.

    Large edge lists are processed in blocks (a ``lax.scan`` adding each block's messages into the output), so the
    ``[E, F]`` messages are never materialised at once: on CPU this is 3-5x faster than one gather + scatter of
    all edges (the block stays in cache).
    """
    e = senders.shape[0]
    w = weights.astype(x.dtype).reshape((e,) + (1,) * (x.ndim - 1))
    block = _block_edges(int(np.prod(x.shape[1:])))
    if e <= block:
        return jax.ops.segment_sum(x[senders] * w, receivers, num_nodes, indices_are_sorted=is_sorted)
    pad = (-e) % block
    s = jnp.pad(senders, (0, pad)).reshape(-1, block)
    r = jnp.pad(receivers, (0, pad), constant_values=num_nodes).reshape(-1, block)  # padding: dropped
    w = jnp.pad(w, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape((-1, block) + w.shape[1:])

    def body(out, blk):
        sb, rb, wb = blk
        return out.at[rb].add(x[sb] * wb, mode="drop", indices_are_sorted=is_sorted), None

    out, _ = jax.lax.scan(body, jnp.zeros((num_nodes,) + x.shape[1:], x.dtype), (s, r, w))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _propagate(x, weights, senders, receivers, t_senders, t_receivers, t_weights, num_nodes, is_sorted):
    return _weighted_segment_sum(x, senders, receivers, weights, num_nodes, is_sorted)


def _propagate_fwd(x, weights, senders, receivers, t_senders, t_receivers, t_weights, num_nodes, is_sorted):
    out = _propagate(x, weights, senders, receivers, t_senders, t_receivers, t_weights, num_nodes, is_sorted)
    return out, (x, weights, senders, receivers, t_senders, t_receivers, t_weights)


def _propagate_bwd(num_nodes, is_sorted, res, g):
    x, weights, senders, receivers, t_senders, t_receivers, t_weights = res
    # d x = A^T g, summed at the senders, over the edge list given for the backward pass (t_*). ``x`` may have
    # another number of rows than the output (a rectangular A, e.g. RGCNConv's (node, relation) rows).
    dx = _weighted_segment_sum(g, t_receivers, t_senders, t_weights, x.shape[0], is_sorted)
    # d w_e = <g[r_e], x[s_e]>  (removed by XLA when nobody asks for it).
    dw = jnp.sum(g[receivers] * x[senders], axis=-1).astype(weights.dtype)
    return dx, dw, None, None, None, None, jnp.zeros_like(t_weights)


_propagate.defvjp(_propagate_fwd, _propagate_bwd)


class GCNAdjacency(NamedTuple):
    """A normalised adjacency as two edge lists: sorted by receiver (``senders``, ``receivers``, ``weights``) and
    the same edges sorted by sender (``t_senders``, ``t_receivers``, ``t_weights``).

    ``(A @ x)[i] = sum_{e: receivers[e] = i} weights[e] x[senders[e]]``. Build it with :func:`gcn_adjacency`.

    >>> g = gr.Graph(nodes=np.zeros((2, 1)), senders=np.array([1]), receivers=np.array([0]),
    ...              n_node=np.array([2]), n_edge=np.array([1]))
    >>> adj = gcn_adjacency(g)  # the edge 1 -> 0 plus a self-loop on each node
    >>> adj._fields[:3], adj.senders.tolist(), adj.receivers.tolist()
    (('senders', 'receivers', 'weights'), [1, 0, 1], [0, 0, 1])
    >>> out = propagate(jnp.ones((2, 1)), adj.senders, adj.receivers, adj.weights, 2)
    >>> [round(float(v), 4) for v in out[:, 0]]
    [1.2071, 1.0]
    """

    senders: Any
    receivers: Any
    weights: Any
    t_senders: Any
    t_receivers: Any
    t_weights: Any


def propagate(x, senders, receivers, weights, num_nodes: int) -> Array:
    """Weighted sum aggregation ``out[i] = sum_{e: receivers[e] = i} weights[e] * x[senders[e]]`` (``[N, F]``).

    Differentiable in ``x`` and ``weights`` (custom backward: ``dx = A^T g`` as a segment sum at the senders).

    >>> import jax.numpy as jnp
    >>> propagate(jnp.array([[1.], [2.]]), jnp.array([0, 1]), jnp.array([1, 1]), jnp.array([1., 3.]), 2).tolist()
    [[0.0], [7.0]]
    """
    return _propagate(x, weights, senders, receivers, senders, receivers, weights, num_nodes, False)


def _check_edge_weight(edge_weight, graph):
    if edge_weight is None:
        return None
    e = graph.senders.shape[0]
    if np.ndim(edge_weight) != 1 or np.shape(edge_weight)[0] != e:
        raise ValueError(f"edge_weight must have shape [E={e}] (one scalar per edge), got {np.shape(edge_weight)}.")
    if not jnp.issubdtype(jnp.asarray(edge_weight).dtype, jnp.floating):
        raise ValueError(f"edge_weight must be floating point, got dtype {jnp.asarray(edge_weight).dtype}.")
    return jnp.asarray(edge_weight)


def gcn_norm(
    graph: gr.Graph,
    edge_weight=None,
    add_self_loops: bool = True,
    improved: bool = False,
    normalize: bool = True,
    dtype=jnp.float32,
):
    """GCN edge weights with PyG's ``gcn_norm`` semantics, as static-shape arrays (``jit``-able).

    With ``normalize``: "remaining" self loops are added (a node that already has a self loop keeps its weight,
    the last one if it has several; others get ``fill = 2 if improved else 1``; the original self-loop edges get
    weight 0), then ``w_e <- d_s^-1/2 w_e d_r^-1/2`` with the in-degree ``d_i = sum_{e: r_e = i} w_e`` (loops
    included) and ``0^-1/2 := 0``. Without ``normalize`` the weights are returned as given (no loops).
    Padding edges (``edge_mask == False``) get weight 0.

    Args:
      graph: the graph (``N`` nodes, ``E`` edges).
      edge_weight: optional ``[E]`` weights (default 1).

    Returns:
      ``(senders, receivers, weights)`` of length ``E + N`` (with loops) or ``E``.

    >>> import numpy as np
    >>> g = gr.Graph(nodes=np.zeros((2, 1)), senders=np.array([0]), receivers=np.array([1]),
    ...              n_node=np.array([2]), n_edge=np.array([1]))
    >>> s, r, w = gcn_norm(g)
    >>> s.tolist(), r.tolist(), [round(v, 4) for v in w.tolist()]
    ([0, 0, 1], [1, 0, 1], [0.7071, 1.0, 0.5])
    """
    gr.validate(graph)
    edge_weight = _check_edge_weight(edge_weight, graph)
    n = graph.nodes.shape[0]
    senders = jnp.asarray(graph.senders).astype(jnp.int32)
    receivers = jnp.asarray(graph.receivers).astype(jnp.int32)
    e = senders.shape[0]
    w = jnp.ones((e,), dtype) if edge_weight is None else edge_weight.astype(dtype)
    emask = gr.edge_mask(graph)
    w = jnp.where(emask, w, 0)
    if not normalize:
        return senders, receivers, w
    if add_self_loops:
        fill = 2.0 if improved else 1.0
        is_loop = (senders == receivers) & emask
        # weight of the last existing self loop of each node (PyG keeps an existing loop's weight).
        last = jax.ops.segment_max(jnp.where(is_loop, jnp.arange(e), -1), jnp.where(is_loop, senders, n), n)
        has_loop = last >= 0
        loop_w = jnp.where(has_loop, w[jnp.clip(last, 0, max(e - 1, 0))] if e else 0, fill).astype(dtype)
        w = jnp.where(is_loop, 0, w)
        nodes = jnp.arange(n, dtype=jnp.int32)
        senders = jnp.concatenate([senders, nodes])
        receivers = jnp.concatenate([receivers, nodes])
        w = jnp.concatenate([w, loop_w])
    deg = jax.ops.segment_sum(w, receivers, n)
    dis = jnp.where(deg > 0, jax.lax.rsqrt(jnp.where(deg > 0, deg, 1)), 0)
    return senders, receivers, dis[senders] * w * dis[receivers]


def gcn_adjacency(
    graph: gr.Graph,
    edge_weight=None,
    add_self_loops: bool = True,
    improved: bool = False,
    normalize: bool = True,
    dtype=jnp.float32,
) -> GCNAdjacency:
    """Normalise once and sort for the fast GCN path (PyG ``cached=True`` analogue); pass to ``GCNConv(adjacency=)``.

    Same weights as :func:`gcn_norm`; edges sorted by receiver (stable), and a transposed copy sorted by sender.
    Call it outside the training step for a static graph; it is ``jit``-able too.

    >>> import numpy as np
    >>> g = gr.Graph(nodes=np.zeros((2, 1)), senders=np.array([1]), receivers=np.array([0]),
    ...              n_node=np.array([2]), n_edge=np.array([1]))
    >>> adj = gcn_adjacency(g)
    >>> adj.receivers.tolist(), adj.t_senders.tolist()
    ([0, 0, 1], [0, 1, 1])
    """
    s, r, w = gcn_norm(graph, edge_weight, add_self_loops, improved, normalize, dtype)
    order = jnp.argsort(r, stable=True)
    t_order = jnp.argsort(s, stable=True)
    return GCNAdjacency(
        senders=s[order],
        receivers=r[order],
        weights=w[order],
        t_senders=s[t_order],
        t_receivers=r[t_order],
        t_weights=w[t_order],
    )


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


def _nodes(graph):
    gr.validate(graph, node_rank=2)
    return jnp.asarray(graph.nodes)


class MessagePassing(nn.Module):
    """Generic message passing ``h_i' = update(h_i, AGG_{e: j -> i} message(h_i, h_j, e_ji))``.

    ``message_fn(h_i, h_j, e_ji)`` gets ``[E, F]`` receiver and sender features and ``[E, ...]`` edge features (or
    ``None``) and returns ``[E, M]`` messages; ``update_fn(h_i, m_i)`` gets ``[N, F]`` and the aggregated ``[N, M]``
    and returns ``[N, F']``. Either may be a plain function or a flax module (then its parameters live under this
    module). Defaults: ``message = h_j``, ``update = m_i``. ``aggregation`` is ``"sum"``, ``"mean"`` or ``"max"``
    (empty neighbourhoods give 0). Padding edges are masked out.

    Returns:
      ``[N, F']`` new node features.

    >>> import jax, numpy as np
    >>> g = gr.Graph(nodes=np.array([[1.], [2.], [4.]]), senders=np.array([0, 1]), receivers=np.array([2, 2]),
    ...              n_node=np.array([3]), n_edge=np.array([2]))
    >>> mp = MessagePassing(aggregation="max", update_fn=lambda h, m: h + m)
    >>> mp.apply({}, g).tolist()
    [[1.0], [2.0], [6.0]]
    """

    message_fn: Callable | None = None
    update_fn: Callable | None = None
    aggregation: str = "sum"

    @nn.compact
    def __call__(self, graph: gr.Graph) -> Array:
        if self.aggregation not in segment.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {sorted(segment.AGGREGATIONS)}, got {self.aggregation!r}.")
        h = _nodes(graph)
        s, r = jnp.asarray(graph.senders), jnp.asarray(graph.receivers)
        h_i, h_j = h[r], h[s]
        msg = h_j if self.message_fn is None else self.message_fn(h_i, h_j, graph.edges)
        agg = segment.segment_aggregate(self.aggregation, msg, r, h.shape[0], mask=gr.edge_mask(graph))
        return agg if self.update_fn is None else self.update_fn(h, agg)


class GraphConv(nn.Module):
    """Graph convolution ``h_i' = act(sum_{j in N(i)} w_ji W h_j + b [+ W_self h_i])``.

    ``W`` is applied before aggregating (same result, fewer flops). ``w_ji`` is the optional per-edge
    ``edge_weight`` (default 1); duplicate edges count twice. With ``self_term`` a separate ``W_self`` (param
    ``self_kernel``) adds ``W_self h_i``. ``activation`` defaults to identity. Params ``kernel [F_in, F]``,
    ``bias [F]``.

    >>> import jax, numpy as np
    >>> g = gr.Graph(nodes=np.ones((3, 2), np.float32), senders=np.array([0, 1]), receivers=np.array([2, 2]),
    ...              n_node=np.array([3]), n_edge=np.array([2]))
    >>> m = GraphConv(features=4)
    >>> p = m.init(jax.random.key(0), g)
    >>> m.apply(p, g).shape
    (3, 4)
    """

    features: int
    use_bias: bool = True
    self_term: bool = False
    activation: Callable | None = None
    kernel_init: Callable = glorot

    @nn.compact
    def __call__(self, graph: gr.Graph, edge_weight=None) -> Array:
        h = _nodes(graph)
        ew = _check_edge_weight(edge_weight, graph)
        kernel = self.param("kernel", self.kernel_init, (h.shape[-1], self.features), h.dtype)
        xw = h @ kernel
        w = jnp.ones(graph.senders.shape, xw.dtype) if ew is None else ew.astype(xw.dtype)
        w = jnp.where(gr.edge_mask(graph), w, 0)
        out = propagate(xw, jnp.asarray(graph.senders), jnp.asarray(graph.receivers), w, h.shape[0])
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (self.features,), h.dtype)
        if self.self_term:
            out = out + h @ self.param("self_kernel", self.kernel_init, (h.shape[-1], self.features), h.dtype)
        return out if self.activation is None else self.activation(out)


class GCNConv(nn.Module):
    """Kipf & Welling graph convolution with PyTorch Geometric's semantics.

    ``out = D^-1/2 (A + I) D^-1/2 X W + b``: ``A[i, j]`` sums the weights of edges ``j -> i`` (duplicates add up),
    ``D`` is the in-degree of ``A + I`` at the receiver, self loops are added only where missing (existing ones keep
    their weight; ``improved`` uses ``2 I``); see :func:`gcn_norm`. ``normalize=False`` uses ``A`` as given (no
    loops, no scaling; ``add_self_loops`` then has no effect, as PyG refuses the combination). ``W`` is applied
    before aggregation, ``b`` after. Params are named like ``nn.Dense``: ``kernel [F_in, F]`` (= PyG
    ``lin.weight.T``), ``bias [F]``.

    Call ``apply(params, graph, edge_weight=None)``, or pass ``adjacency=gcn_adjacency(graph, ...)`` (computed once
    for a static graph, with the same flags as the layer) to use the fast sorted path.

    Returns:
      ``[N, F]`` node features.

    >>> import jax, numpy as np
    >>> g = gr.Graph(nodes=np.ones((3, 5), np.float32), senders=np.array([0, 1]), receivers=np.array([1, 2]),
    ...              n_node=np.array([3]), n_edge=np.array([2]))
    >>> m = GCNConv(features=4)
    >>> params = m.init(jax.random.key(0), g)["params"]
    >>> m.apply({"params": params}, g).shape, params["kernel"].shape
    ((3, 4), (5, 4))
    """

    features: int
    add_self_loops: bool = True
    improved: bool = False
    normalize: bool = True
    use_bias: bool = True
    kernel_init: Callable = glorot

    @nn.compact
    def __call__(self, graph: gr.Graph, edge_weight=None, adjacency: GCNAdjacency | None = None) -> Array:
        h = _nodes(graph)
        n = h.shape[0]
        kernel = self.param("kernel", self.kernel_init, (h.shape[-1], self.features), h.dtype)
        xw = h @ kernel
        if adjacency is not None:
            if edge_weight is not None:
                raise ValueError(
                    "edge_weight must be None when adjacency is given (fold the weights into "
                    "gcn_adjacency(graph, edge_weight=...))."
                )
            a = adjacency
            # Forward: edges in sender order, so the gather x[s] reads rows in order (on CPU the gather, not the
            # scatter, dominates). Backward: edges in receiver order, so the gather g[r] reads rows in order.
            out = _propagate(xw, a.t_weights, a.t_senders, a.t_receivers, a.senders, a.receivers, a.weights, n, False)
        else:
            s, r, w = gcn_norm(graph, edge_weight, self.add_self_loops, self.improved, self.normalize, xw.dtype)
            out = propagate(xw, s, r, w, n)
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (self.features,), h.dtype)
        return out


class GATConv(nn.Module):
    """Graph attention (Velickovic et al.) with PyTorch Geometric ``GATConv`` semantics, optionally with edge
    features (PyG's ``edge_dim``); no attention dropout.

    Per head ``k``: ``x = X W`` split into ``[N, H, C]``;
    ``alpha_ji = softmax_{j in N(i)} LeakyReLU(a_src . x_j + a_dst . x_i [+ a_edge . (W_e e_ji)])``;
    ``out_i = sum_j alpha_ji x_j``; heads are concatenated (``concat``) or averaged; then ``+ bias``.
    ``add_self_loops`` first removes existing self loops and then adds exactly one per node (PyG's
    ``remove_self_loops`` + ``add_self_loops``); duplicate edges enter the softmax separately.

    Edge features (``edge_dim`` set, ``apply(params, graph, edge_attr)`` with ``edge_attr [E, edge_dim]``, or ``[E]``
    when ``edge_dim == 1``): ``W_e`` (param ``lin_edge [edge_dim, H*C]``, no bias) projects each edge's features to
    ``[H, C]`` and ``a_edge`` (param ``att_edge [H, C]``) scores them, as PyG's ``GATConv(edge_dim=...)``. With
    ``add_self_loops`` the added loop of node ``i`` gets the mean of the features of ``i``'s incoming edges (self
    loops and padding excluded; 0 without any), PyG's ``fill_value="mean"``. Without ``edge_attr`` the edge term is
    left out (as PyG). Edge *types* enter as features: ``edge_attr = nn.Embed(num_types, d)(edge_type)`` (learned, in
    the enclosing module) or ``jax.nn.one_hot(edge_type, num_types)``.

    Params: ``kernel [F_in, H*C]`` (= PyG ``lin.weight.T``), ``att_src``/``att_dst`` ``[H, C]`` (= PyG
    ``att_src[0]``), ``bias [H*C]`` or ``[C]``; with ``edge_dim``: ``lin_edge [edge_dim, H*C]`` (= PyG
    ``lin_edge.weight.T``), ``att_edge [H, C]`` (= PyG ``att_edge[0]``).

    Returns:
      ``[N, H*C]`` (concat) or ``[N, C]``; with ``return_attention=True`` also ``alpha [E, H]``, the attention
      weight of every edge of ``graph`` (PyG's ``return_attention_weights``, without the added self loops; padding
      edges and, with ``add_self_loops``, the graph's own self loops get 0).

    >>> import jax, numpy as np
    >>> g = gr.Graph(nodes=np.ones((3, 5), np.float32), senders=np.array([0, 1]), receivers=np.array([1, 2]),
    ...              n_node=np.array([3]), n_edge=np.array([2]))
    >>> m = GATConv(features=4, heads=2)
    >>> m.apply(m.init(jax.random.key(0), g), g).shape
    (3, 8)
    >>> typed = GATConv(features=4, heads=2, edge_dim=3)  # edge types 0..2 as one-hot edge features
    >>> edge_attr = jax.nn.one_hot(np.array([2, 0]), 3)
    >>> p = typed.init(jax.random.key(0), g, edge_attr)["params"]
    >>> typed.apply({"params": p}, g, edge_attr).shape, p["lin_edge"].shape, p["att_edge"].shape
    ((3, 8), (3, 8), (2, 4))
    >>> out, alpha = m.apply(m.init(jax.random.key(0), g), g, return_attention=True)
    >>> alpha.shape  # node 1 attends to node 0 and to itself: the two weights of edge 0 -> 1 are below 1
    (2, 2)
    """

    features: int
    heads: int = 1
    concat: bool = True
    negative_slope: float = 0.2
    add_self_loops: bool = True
    use_bias: bool = True
    kernel_init: Callable = glorot
    edge_dim: int | None = None

    @nn.compact
    def __call__(self, graph: gr.Graph, edge_attr=None, return_attention: bool = False) -> Array:
        h, edge_attr = _attention_inputs(self, graph, edge_attr, "GATConv")
        n, H, C = h.shape[0], self.heads, self.features
        x = (h @ self.param("kernel", self.kernel_init, (h.shape[-1], H * C), h.dtype)).reshape(n, H, C)
        att_src = self.param("att_src", glorot, (H, C), h.dtype)
        att_dst = self.param("att_dst", glorot, (H, C), h.dtype)
        a_src, a_dst = jnp.sum(x * att_src, -1), jnp.sum(x * att_dst, -1)  # [N, H]
        s, r = jnp.asarray(graph.senders).astype(jnp.int32), jnp.asarray(graph.receivers).astype(jnp.int32)
        mask = gr.edge_mask(graph)
        if self.add_self_loops:
            mask = mask & (s != r)
            if edge_attr is not None:  # PyG's fill_value="mean": a loop gets the mean of the node's incoming edges
                loop_attr = segment.segment_mean(edge_attr, r, n, mask=mask)
                edge_attr = jnp.concatenate([edge_attr, loop_attr.astype(edge_attr.dtype)])
            loops = jnp.arange(n, dtype=jnp.int32)
            s, r = jnp.concatenate([s, loops]), jnp.concatenate([r, loops])
            mask = jnp.concatenate([mask, jnp.ones((n,), bool)])
        logits = a_src[s] + a_dst[r]  # [E', H]
        if self.edge_dim is not None:
            lin_edge = self.param("lin_edge", self.kernel_init, (self.edge_dim, H * C), h.dtype)
            att_edge = self.param("att_edge", glorot, (H, C), h.dtype)
            if edge_attr is not None:
                # a_edge . (W_e e) = e . (W_e a_edge): one [edge_dim, H] matrix, no [E, H, C] projection.
                logits = logits + edge_attr @ jnp.einsum("dhc,hc->dh", lin_edge.reshape(-1, H, C), att_edge)
        logits = nn.leaky_relu(logits, self.negative_slope)
        alpha = segment.segment_softmax(logits, r, n, mask=mask)
        out = jax.ops.segment_sum(alpha[..., None] * x[s], r, n)  # [N, H, C]
        out = out.reshape(n, H * C) if self.concat else out.mean(axis=1)
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (out.shape[-1],), h.dtype)
        if return_attention:  # the graph's own edges (the added self loops are left out); masked edges get 0
            return out, alpha[: graph.senders.shape[0]]
        return out


def _attention_inputs(layer, graph, edge_attr, name: str):
    """The node features ``[N, F]`` and the checked edge features of an attention layer (``heads``, ``features``,
    ``edge_dim`` read from ``layer``)."""
    h = _nodes(graph)
    if layer.heads < 1 or layer.features < 1:
        raise ValueError(f"heads and features must be >= 1, got heads={layer.heads}, features={layer.features}.")
    return h, _check_edge_attr(layer.edge_dim, edge_attr, graph, name)


def _check_edge_attr(edge_dim, edge_attr, graph, layer: str):
    if edge_dim is not None and (not isinstance(edge_dim, int) or edge_dim < 1):
        raise ValueError(f"edge_dim must be None or an int >= 1, got {edge_dim!r}.")
    if edge_attr is None:
        return None
    if edge_dim is None:
        raise ValueError(
            f"edge_attr was given (shape {np.shape(edge_attr)}) but edge_dim is None; set "
            f"{layer}(edge_dim=edge_attr.shape[-1]) to use edge features."
        )
    e = graph.senders.shape[0]
    edge_attr = jnp.asarray(edge_attr)
    if edge_attr.ndim == 1 and edge_dim == 1:
        edge_attr = edge_attr[:, None]  # PyG views [E] as [E, 1]
    if edge_attr.shape != (e, edge_dim):
        raise ValueError(
            f"edge_attr must have shape [E={e}, edge_dim={edge_dim}] (one row per edge), got "
            f"{tuple(np.shape(edge_attr))}."
        )
    if not jnp.issubdtype(edge_attr.dtype, jnp.floating):
        raise ValueError(
            f"edge_attr must be floating point, got dtype {edge_attr.dtype}; embed integer edge types first "
            "(nn.Embed(num_types, d)(edge_type) or jax.nn.one_hot(edge_type, num_types))."
        )
    return edge_attr


class TransformerConv(nn.Module):
    """Graph transformer convolution (Shi et al. 2021, "Masked Label Prediction") with PyTorch Geometric
    ``TransformerConv`` semantics (``beta=False``, no attention dropout): dot-product attention along the edges.

    Per head (``C = features``): ``q_i = W_q x_i + b_q``, ``k_j = W_k x_j + b_k``, ``v_j = W_v x_j + b_v`` (each
    ``[H, C]``); with edge features ``e_ji = W_e edge_attr_ji`` (no bias) added to the key and the value::

        alpha_ji = softmax_{j in N(i)} (q_i . (k_j + e_ji) / sqrt(C))
        out_i    = sum_j alpha_ji (v_j + e_ji)   (+ W_s x_i + b_s with root_weight)

    heads concatenated (``concat``) or averaged. No self loops are added (a node without incoming edges gets only
    the skip term); duplicate edges enter the softmax separately. Unlike :class:`GATConv`, whose score
    ``a_src . x_j + a_dst . x_i`` ranks the neighbours the same for every receiver, the attention here depends on
    the receiver's query (what a word node must do to pick the patches of its colour).

    Params (PyG's names): ``lin_query``, ``lin_key``, ``lin_value`` (``kernel [F_in, H*C]`` = PyG ``weight.T``,
    ``bias``), ``lin_edge/kernel [edge_dim, H*C]`` (with ``edge_dim``), ``lin_skip`` (``[F_in, H*C]`` or
    ``[F_in, C]``, with ``root_weight``).

    Call ``apply(params, graph, edge_attr=None, return_attention=False)``; ``edge_attr [E, edge_dim]``.

    Returns:
      ``[N, H*C]`` (concat) or ``[N, C]``; with ``return_attention=True`` also ``alpha [E, H]`` (padding edges 0).

    >>> import jax, numpy as np
    >>> g = gr.Graph(nodes=np.ones((3, 5), np.float32), senders=np.array([0, 1, 2]), receivers=np.array([1, 1, 2]),
    ...              n_node=np.array([3]), n_edge=np.array([3]))
    >>> m = TransformerConv(features=4, heads=2, edge_dim=3)
    >>> ea = np.eye(3, dtype=np.float32)
    >>> p = m.init(jax.random.key(0), g, ea)["params"]
    >>> out, alpha = m.apply({"params": p}, g, ea, return_attention=True)
    >>> out.shape, sorted(p), np.round(alpha[:2].sum(0), 5).tolist()  # node 1's two incoming edges share it
    ((3, 8), ['lin_edge', 'lin_key', 'lin_query', 'lin_skip', 'lin_value'], [1.0, 1.0])
    """

    features: int
    heads: int = 1
    concat: bool = True
    root_weight: bool = True
    use_bias: bool = True
    edge_dim: int | None = None
    kernel_init: Callable = glorot

    @nn.compact
    def __call__(self, graph: gr.Graph, edge_attr=None, return_attention: bool = False) -> Array:
        h, edge_attr = _attention_inputs(self, graph, edge_attr, "TransformerConv")
        n, H, C = h.shape[0], self.heads, self.features
        dense = lambda f, name, bias=self.use_bias: nn.Dense(  # noqa: E731
            f, use_bias=bias, kernel_init=self.kernel_init, param_dtype=h.dtype, name=name
        )
        q = dense(H * C, "lin_query")(h).reshape(n, H, C)
        k = dense(H * C, "lin_key")(h).reshape(n, H, C)
        v = dense(H * C, "lin_value")(h).reshape(n, H, C)
        s, r = jnp.asarray(graph.senders).astype(jnp.int32), jnp.asarray(graph.receivers).astype(jnp.int32)
        key, value = k[s], v[s]  # [E, H, C]
        if self.edge_dim is not None:
            lin_edge = dense(H * C, "lin_edge", bias=False)
            if edge_attr is None:  # create the parameter; PyG requires edge_attr when edge_dim is set
                raise ValueError(f"edge_attr [E, {self.edge_dim}] is required when edge_dim={self.edge_dim} is set.")
            e = lin_edge(edge_attr).reshape(-1, H, C)
            key, value = key + e, value + e
        logits = jnp.sum(q[r] * key, -1) / jnp.sqrt(jnp.asarray(C, h.dtype))  # [E, H]
        alpha = segment.segment_softmax(logits, r, n, mask=gr.edge_mask(graph))
        out = jax.ops.segment_sum(alpha[..., None] * value, r, n)  # [N, H, C]
        out = out.reshape(n, H * C) if self.concat else out.mean(axis=1)
        if self.root_weight:
            out = out + dense(out.shape[-1], "lin_skip")(h)
        return (out, alpha) if return_attention else out


RGCN_AGGRS = ("mean", "sum", "add", "max")


class RGCNConv(nn.Module):
    """Relational graph convolution (Schlichtkrull et al. 2018) with PyTorch Geometric ``RGCNConv`` semantics.

    Every edge ``j -> i`` carries a relation ``r = edge_type[e]`` in ``[0, num_relations)``; ``N_r(i)`` are the
    senders of the edges of relation ``r`` into ``i`` (duplicates count separately)::

        out_i = x_i @ root + sum_r AGG_{j in N_r(i)} x_j @ W_r + bias

    ``aggr="mean"`` averages per (receiver, relation) (an empty ``N_r(i)`` adds 0), ``"sum"`` (or ``"add"``) sums.
    ``"max"`` takes the feature-wise maximum of the *inputs*, ``(max_{j in N_r(i)} x_j) @ W_r`` (0 for an empty
    ``N_r(i)``), as PyG does (it aggregates before transforming). Basis decomposition (``num_bases=B``):
    ``W_r = sum_b comp[r, b] weight[b]``. ``root_weight=False`` drops the ``root`` term, ``use_bias=False`` the bias.

    Params (PyG's names, shapes and initialisation): ``weight [R, F_in, F]`` (or ``[B, F_in, F]`` with bases),
    ``comp [R, B]`` (with bases), ``root [F_in, F]``, ``bias [F]``; Glorot over the last two axes, bias 0.

    Call ``apply(params, graph, edge_type)`` with ``edge_type`` an int ``[E]`` array (one relation per edge, in the
    order of ``graph.senders``), or leave it out to read the types from ``graph.edges`` (an int ``[E]`` array there
    is batched and padded with the graph; :func:`mmjax.graph.pad` fills padding edges with type 0). Padding edges
    are masked; under ``jit``, an edge with a type outside ``[0, num_relations)`` is ignored (outside ``jit`` it
    raises ``ValueError``).

    Cost: sum/mean transform all nodes by all relations once (``[N, R, F]``, one matmul) and aggregate one
    ``F``-row per edge at the receivers, weighted by ``1 / |N_r(i)|`` for the mean (when ``F > F_in`` it
    aggregates the ``F_in``-rows per (receiver, relation) first and transforms after); max aggregates per
    (receiver, relation) and transforms after. Memory ``O(N R max(F_in, F) + E)``: no per-edge ``[E, F_in, F]``
    weights, but for very many relations the ``[N, R, F]`` table is the limit.

    Returns:
      ``[N, F]`` node features.

    >>> import jax, numpy as np
    >>> g = gr.Graph(nodes=np.ones((3, 5), np.float32), senders=np.array([0, 1, 2]), receivers=np.array([1, 2, 2]),
    ...              n_node=np.array([3]), n_edge=np.array([3]))
    >>> edge_type = np.array([0, 1, 1])
    >>> m = RGCNConv(features=4, num_relations=2, num_bases=2)
    >>> p = m.init(jax.random.key(0), g, edge_type)["params"]
    >>> m.apply({"params": p}, g, edge_type).shape, {k: v.shape for k, v in p.items()}
    ((3, 4), {'weight': (2, 5, 4), 'comp': (2, 2), 'root': (5, 4), 'bias': (4,)})
    >>> x, W = g.nodes, np.einsum("rb,bio->rio", p["comp"], p["weight"])
    >>> want_2 = x[2] @ p["root"] + (x[1] + x[2]) / 2 @ W[1]  # node 2: mean over its two relation-1 edges
    >>> bool(np.allclose(m.apply({"params": p}, g, edge_type)[2], want_2, atol=1e-5))
    True
    """

    features: int
    num_relations: int
    num_bases: int | None = None
    aggr: str = "mean"
    root_weight: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, graph: gr.Graph, edge_type=None) -> Array:
        F, R, B = self.features, self.num_relations, self.num_bases
        for name, v in (("features", F), ("num_relations", R)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}.")
        if B is not None and (not isinstance(B, (int, np.integer)) or isinstance(B, bool) or B < 1):
            raise ValueError(f"num_bases must be None or an int >= 1, got {B!r}.")
        if self.aggr not in RGCN_AGGRS:
            raise ValueError(f"aggr must be one of {RGCN_AGGRS}, got {self.aggr!r}.")
        h = _nodes(graph)
        t = _check_edge_type(edge_type, graph, R)
        n, f_in = h.shape
        if B is None:
            W = self.param("weight", _glorot_stacked, (R, f_in, F), h.dtype)
        else:
            weight = self.param("weight", _glorot_stacked, (B, f_in, F), h.dtype)
            comp = self.param("comp", glorot, (R, B), h.dtype)
            W = jnp.einsum("rb,bio->rio", comp, weight)
        s, r = jnp.asarray(graph.senders).astype(jnp.int32), jnp.asarray(graph.receivers).astype(jnp.int32)
        mask = gr.edge_mask(graph) & (t >= 0) & (t < R)
        t = jnp.clip(t, 0, R - 1)
        seg = r * R + t  # the (receiver, relation) pair of each edge: row i * R + r of an [N * R, ...] table
        if self.aggr == "max":
            agg = segment.segment_max(h[s], seg, n * R, mask=mask)  # [N * R, F_in]
            out = agg.reshape(n, R * f_in) @ W.reshape(R * f_in, F)
        else:
            w = mask.astype(h.dtype)
            if self.aggr == "mean":
                w = w / jnp.maximum(jax.ops.segment_sum(w, seg, n * R), 1)[seg]
            if F <= f_in:  # transform first: gather one F-row of x @ W_r per edge, sum at the receivers
                xw = (h @ W.transpose(1, 0, 2).reshape(f_in, R * F)).reshape(n * R, F)  # row j * R + r: x_j @ W_r
                out = propagate(xw, s * R + t, r, w, n)
            else:  # aggregate the (narrower) inputs per (receiver, relation) first, then transform
                agg = propagate(h, s, seg, w, n * R)  # [N * R, F_in]
                out = agg.reshape(n, R * f_in) @ W.reshape(R * f_in, F)
        if self.root_weight:
            out = out + h @ self.param("root", glorot, (f_in, F), h.dtype)
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (F,), h.dtype)
        return out


def _check_edge_type(edge_type, graph, num_relations):
    name = "edge_type"
    if edge_type is None:
        if graph.edges is None:
            raise ValueError(
                "edge_type must be given: an int array [E] with the relation of each edge (or store it in "
                "graph.edges); got None and graph.edges is None."
            )
        edge_type, name = graph.edges, "graph.edges (used as edge_type)"
    e = graph.senders.shape[0]
    if np.ndim(edge_type) != 1 or np.shape(edge_type)[0] != e:
        raise ValueError(
            f"{name} must have shape [E={e}] like senders (one relation id per edge), got {tuple(np.shape(edge_type))}."
        )
    dtype = edge_type.dtype if hasattr(edge_type, "dtype") else np.asarray(edge_type).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer relation ids, got dtype {dtype}; cast with .astype(np.int32).")
    if gr.is_concrete(edge_type) and e > 0:
        a = np.asarray(edge_type)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_relations:
            raise ValueError(
                f"{name} has values out of range [0, num_relations={num_relations}): min {lo}, max {hi}; "
                "every edge must name an existing relation."
            )
    return jnp.asarray(edge_type).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Readouts
# ----------------------------------------------------------------------------------------------------------------

READOUTS = ("sum", "mean", "max")


def readout(graph: gr.Graph, kind: str = "mean", node_features=None) -> Array:
    """Pool node features per graph: ``out[g] = AGG_{i in graph g} h_i`` (``"sum"``, ``"mean"``, ``"max"``).

    Padding nodes are ignored; empty graphs give 0. ``node_features`` defaults to ``graph.nodes``.

    Returns:
      ``[G, F]``.

    >>> import numpy as np
    >>> g = gr.Graph(nodes=np.array([[1.], [3.], [5.]]), senders=np.zeros(0, int), receivers=np.zeros(0, int),
    ...              n_node=np.array([2, 1]), n_edge=np.array([0, 0]))
    >>> readout(g, "mean").tolist()
    [[2.0], [5.0]]
    """
    if kind not in READOUTS:
        raise ValueError(f"kind must be one of {READOUTS}, got {kind!r}.")
    gr.validate(graph)
    h = jnp.asarray(graph.nodes if node_features is None else node_features)
    if h.shape[0] != graph.nodes.shape[0]:
        raise ValueError(f"node_features must have {graph.nodes.shape[0]} rows (one per node), got {h.shape}.")
    return segment.segment_aggregate(
        kind, h, gr.node_graph_index(graph), gr.num_graphs(graph), mask=gr.node_mask(graph), indices_are_sorted=True
    )


class AttentionReadout(nn.Module):
    """Gated attention pooling (Li et al. 2016): ``out[g] = sum_{i in g} softmax_g(gate(h_i)) * feat(h_i)``.

    ``gate`` is ``Dense(1)`` (param ``gate``), ``feat`` is ``Dense(features)`` (param ``feat``) or identity when
    ``features`` is ``None``. The softmax runs over the nodes of each graph (padding ignored).

    Returns:
      ``[G, F]``.

    >>> import jax, numpy as np
    >>> g = gr.Graph(nodes=np.ones((3, 2), np.float32), senders=np.zeros(0, int), receivers=np.zeros(0, int),
    ...              n_node=np.array([2, 1]), n_edge=np.array([0, 0]))
    >>> m = AttentionReadout(features=4)
    >>> m.apply(m.init(jax.random.key(0), g), g).shape
    (2, 4)
    """

    features: int | None = None

    @nn.compact
    def __call__(self, graph: gr.Graph, node_features=None) -> Array:
        gr.validate(graph)
        h = jnp.asarray(graph.nodes if node_features is None else node_features)
        if h.ndim != 2 or h.shape[0] != graph.nodes.shape[0]:
            raise ValueError(f"node_features must be [N={graph.nodes.shape[0]}, F], got {h.shape}.")
        ids, g = gr.node_graph_index(graph), gr.num_graphs(graph)
        mask = gr.node_mask(graph)
        gate = segment.segment_softmax(nn.Dense(1, name="gate")(h)[:, 0], ids, g, mask=mask, indices_are_sorted=True)
        feat = h if self.features is None else nn.Dense(self.features, name="feat")(h)
        return segment.segment_sum(gate[:, None] * feat, ids, g, mask=mask, indices_are_sorted=True)
