"""Graph models built from :mod:`mmjax.gnn` layers: a node classifier (:class:`GCN`) and an image-as-graph
classifier (:class:`PatchGCN`).

* :class:`GCN` - Kipf & Welling (2017), two graph convolutions:
  ``logits = A_hat act(A_hat X W_1 + b_1) W_2 + b_2`` with ``A_hat = D^-1/2 (A + I) D^-1/2``; ``[N, F] -> [N, K]``.
  Trained full-batch by the ``"node_classification"`` task (:mod:`mmjax.train.node_classification`).
* :class:`PatchGCN` - images ``[B, H, W, C]`` become patch-grid graphs (:func:`mmjax.data.graphs.images_to_graphs`)
  inside the model, so the image-classification task trains it like any image classifier; ``[B, H, W, C] -> [B, K]``.

Engine configs name them ``"gcn"`` (node classification) or by path, ``"mmjax.graph_models:PatchGCN"``.

Output convention (big_vision; every mmjax model): ``(output, intermediates)``, where ``intermediates`` is a dict of
named stages (e.g. the hidden node features), so probes and notebooks read any of them the same way.

Activations are looked up in the one table of :mod:`mmjax.layers` (:func:`mmjax.layers.get_activation`):
``"gelu"`` is the exact GELU there, ``"gelu_tanh"`` the tanh approximation (what ``"gelu"`` meant here before).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import gnn
from mmjax.data.graphs import images_to_graphs
from mmjax.graph import Graph
from mmjax.layers import ACTIVATIONS, get_activation

__all__ = ["ACTIVATIONS", "GCN", "PatchGCN"]


class GCN(nn.Module):
    """Two-layer graph convolutional network for node classification (Kipf & Welling, ICLR 2017).

    ``H = dropout(act(GCNConv_hidden(dropout(X))))``, ``logits = GCNConv_K(H)``, with
    ``GCNConv(X) = D^-1/2 (A + I) D^-1/2 X W + b`` (:class:`mmjax.gnn.GCNConv`). Dropout (rate ``dropout``) is active
    only with ``train=True`` and needs a ``"dropout"`` rng then.

    Args (attributes):
      num_classes: ``K``, output features per node.
      hidden: width of the hidden layer.
      activation: a name in :data:`mmjax.layers.ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"gelu"`` (exact),
        ``"gelu_tanh"``, ``"elu"``, ...).
      dropout: dropout rate on the input and hidden features (0 = off).

    Call ``apply(variables, graph, adjacency=None, train=False)``: ``graph.nodes`` is ``[N, F]``; ``adjacency``
    (from :func:`mmjax.gnn.gcn_adjacency`, built once for a static graph) takes the fast sorted path.

    Returns:
      ``(logits, intermediates)``: ``[N, K]`` logits (with ``K = 2`` they double as a 2-D node embedding) and
      ``{"hidden": [N, hidden] node features after the activation (before dropout), "logits": the logits}``.

    >>> import jax, numpy as np
    >>> from mmjax.graph import Graph
    >>> g = Graph(nodes=np.eye(3, dtype=np.float32), senders=np.array([0, 1]), receivers=np.array([1, 2]),
    ...           n_node=np.array([3]), n_edge=np.array([2]))
    >>> m = GCN(num_classes=2, hidden=4)
    >>> logits, aux = m.apply(m.init(jax.random.key(0), g), g)
    >>> logits.shape, aux["hidden"].shape
    ((3, 2), (3, 4))
    """

    num_classes: int
    hidden: int = 16
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, graph: Graph, adjacency: gnn.GCNAdjacency | None = None, train: bool = False):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is not valid; expected a rate in [0, 1)")
        act = get_activation(self.activation)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        x = drop(jnp.asarray(graph.nodes))
        hidden = act(gnn.GCNConv(self.hidden, name="conv_0")(graph._replace(nodes=x), adjacency=adjacency))
        h = drop(hidden)
        logits = gnn.GCNConv(self.num_classes, name="conv_1")(graph._replace(nodes=h), adjacency=adjacency)
        return logits, {"hidden": hidden, "logits": logits}


class PatchGCN(nn.Module):
    """Images ``[B, H, W, C]`` -> patch graphs -> residual GCN -> per-graph logits ``[B, num_classes]``.

    Each image becomes a graph of ``(H/patch) (W/patch)`` nodes (patch pixels + patch-centre position) with edges
    between ``neighbours``-neighbouring patches (:func:`mmjax.data.graphs.images_to_graphs`). Then:

    * embedding: ``h = W_1' relu(W_1 x + b_1) + b_1'`` per node (two ``Dense(hidden)``);
    * ``depth`` residual blocks ``h <- h + relu(LayerNorm(GCNConv(h) + W_root h))`` (``W_root`` only with ``root``:
      a separate weight for the node itself, since GCN alone averages it with its neighbours); the grid's
      normalised adjacency is built once at trace time (the structure is static) and takes the fast sorted path;
    * readout ``[mean_i h_i, max_i h_i]`` per graph, then ``Dense(num_classes)(relu(Dense(hidden)(.)))``.

    ``train`` is accepted for the engine's interface and unused (no dropout).

    Returns ``(logits [B, num_classes], intermediates)`` with ``intermediates`` holding ``"embedded"`` (node
    features after the embedding MLP, ``[nodes, hidden]``), ``"gcn_{i}"`` (after block ``i``), ``"pooled"`` (the
    readout, ``[B, 2 hidden]``) and ``"logits"``.

    >>> import jax, numpy as np
    >>> m = PatchGCN(num_classes=3, hidden=8, depth=1)
    >>> x = np.zeros((2, 8, 8, 1), np.float32)
    >>> logits, aux = m.apply(m.init(jax.random.key(0), x), x)
    >>> logits.shape, aux["pooled"].shape
    ((2, 3), (2, 16))
    """

    num_classes: int = 10
    hidden: int = 128
    depth: int = 3
    patch: int = 4
    neighbours: int = 8
    root: bool = True

    @nn.compact
    def __call__(self, images, train: bool = False):
        del train  # no dropout
        if self.neighbours not in (4, 8):
            raise ValueError(f"neighbours={self.neighbours!r} is not valid; expected 4 or 8")
        g = images_to_graphs(images, self.patch, self.neighbours)
        with jax.ensure_compile_time_eval():  # the structure is concrete: normalise once, eagerly, at trace time
            adj = gnn.gcn_adjacency(g._replace(nodes=np.zeros((g.nodes.shape[0], 0), np.float32)))
        h = nn.relu(nn.Dense(self.hidden, name="embed_0")(g.nodes))  # per-patch MLP before any mixing
        h = nn.Dense(self.hidden, name="embed_1")(h)
        aux = {"embedded": h}
        for i in range(self.depth):
            u = gnn.GCNConv(self.hidden, name=f"gcn_{i}")(g._replace(nodes=h), adjacency=adj)
            if self.root:
                u = u + nn.Dense(self.hidden, use_bias=False, name=f"root_{i}")(h)
            h = h + nn.relu(nn.LayerNorm(name=f"norm_{i}")(u))
            aux[f"gcn_{i}"] = h
        pooled = jnp.concatenate([gnn.readout(g, "mean", h), gnn.readout(g, "max", h)], -1)
        aux["pooled"] = pooled
        pooled = nn.relu(nn.Dense(self.hidden, name="head_hidden")(pooled))
        logits = nn.Dense(self.num_classes, name="head")(pooled)
        aux["logits"] = logits
        return logits, aux
