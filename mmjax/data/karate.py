"""Zachary's karate club (1977) as a node-classification dataset.

34 members, 78 friendships (each listed in both directions: 156 edges). Label: the club each member joined after
the split, ``"Mr. Hi"`` = 0, ``"Officer"`` = 1 (from ``networkx.karate_club_graph()``). Features: one-hot node ids
(``X = I``, ``[34, 34]``). The classic semi-supervised setting labels only the two leaders, node 0 (Mr. Hi) and
node 33 (the club's administrator), and predicts the other 32.

A node-classification dataset (what :mod:`mmjax.train.node_classification` reads) is a dict:

* ``graph``: a :class:`mmjax.graph.Graph` with ``nodes [N, F]`` float32 (one graph, ``n_node = [N]``);
* ``labels``: ``[N]`` int32 in ``[0, K)``;
* ``train_mask``, ``test_mask``: ``[N]`` bool (which nodes the loss sees / the evaluation counts);
* ``class_names``: ``K`` strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.graph import Graph

__all__ = ["karate_club", "node_masks"]


def node_masks(num_nodes: int, train_nodes: Sequence[int]):
    """``(train_mask, test_mask)``, ``[num_nodes]`` bool each: ``train_nodes`` and every other node.

    >>> tr, te = node_masks(4, [0, 3])
    >>> tr.tolist(), te.tolist()
    ([True, False, False, True], [False, True, True, False])
    """
    idx = np.asarray(list(train_nodes), np.int64)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= num_nodes:
        raise ValueError(
            f"train_nodes={list(train_nodes)!r} is not valid; expected a non-empty list of node "
            f"indices in [0, {num_nodes})"
        )
    train = np.zeros(num_nodes, bool)
    train[idx] = True
    return train, ~train


def karate_club(train_nodes: Sequence[int] = (0, 33)) -> dict:
    """The karate club as a node-classification dataset (see the module docstring for the keys).

    Args:
      train_nodes: the labelled nodes (default: the two leaders); all others are test nodes.

    >>> d = karate_club()
    >>> d["graph"].nodes.shape, d["graph"].senders.shape, d["labels"][[0, 33]].tolist(), int(d["test_mask"].sum())
    ((34, 34), (156,), [0, 1], 32)
    """
    import networkx as nx

    g = nx.karate_club_graph()
    n = g.number_of_nodes()
    edges = np.array(sorted(g.edges()), np.int32)
    senders = np.concatenate([edges[:, 0], edges[:, 1]])
    receivers = np.concatenate([edges[:, 1], edges[:, 0]])
    labels = np.array([0 if g.nodes[i]["club"] == "Mr. Hi" else 1 for i in range(n)], np.int32)
    graph = Graph(
        nodes=np.eye(n, dtype=np.float32),
        senders=senders,
        receivers=receivers,
        n_node=np.array([n], np.int32),
        n_edge=np.array([len(senders)], np.int32),
    )
    train_mask, test_mask = node_masks(n, train_nodes)
    return {
        "graph": graph,
        "labels": labels,
        "train_mask": train_mask,
        "test_mask": test_mask,
        "class_names": ("Mr. Hi", "Officer"),
    }
