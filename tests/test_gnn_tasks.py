"""Smoke tests (tiny sizes) of the graph tasks: image -> patch graphs, karate club GCN, Fashion-MNIST graphs job."""

import os
import sys

import numpy as np
import pytest

from mmjax import graph as gr
from mmjax.data import graphs as dg

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)


@pytest.mark.parametrize("neighbours,degrees", [(4, (2, 3, 4)), (8, (3, 5, 8))])
def test_grid_graph_degrees(neighbours, degrees):
    g = dg.grid_graph(4, 5, neighbours)
    gr.validate(g)
    deg = np.bincount(g.receivers, minlength=20).reshape(4, 5)
    assert deg[0, 0] == degrees[0] and deg[0, 2] == degrees[1] and deg[1, 2] == degrees[2]
    pairs = set(zip(g.senders.tolist(), g.receivers.tolist()))
    assert all((r, s) in pairs for s, r in pairs)  # symmetric
    assert all(s != r for s, r in pairs) and len(pairs) == len(g.senders)  # no loops, no duplicates


def test_images_to_graphs_features_and_structure():
    rng = np.random.default_rng(0)
    images = rng.random((3, 8, 12, 2)).astype(np.float32)
    g = dg.images_to_graphs(images, patch=4, neighbours=8)
    gr.validate(g, node_rank=2)
    assert g.nodes.shape == (3 * 6, 4 * 4 * 2 + 2)
    np.testing.assert_array_equal(g.n_node, [6, 6, 6])
    # node 4 of image 1 is the patch at grid row 1, col 1 (grid 2 x 3)
    node = np.asarray(g.nodes)[6 + 4]
    np.testing.assert_allclose(node[:32], images[1, 4:8, 4:8, :].reshape(-1))
    np.testing.assert_allclose(node[32:], [1.0, 0.5])
    assert g.senders.min() >= 0 and (g.senders[g.n_edge[0]:] >= 6).all()
    with pytest.raises(ValueError, match="patch"):
        dg.images_to_graphs(images, patch=5)
    with pytest.raises(ValueError, match="images"):
        dg.images_to_graphs(images[0], patch=4)


def test_karate_gcn_smoke(tmp_path):
    import karate_gcn

    _, emb, labels, metrics = karate_gcn.train(steps=3)
    assert emb.shape == (34, 2) and labels.shape == (34,) and set(labels.tolist()) == {0, 1}
    assert 0.0 <= metrics["accuracy_unlabelled"] <= 1.0 and np.isfinite(metrics["final_train_loss"])
    karate_gcn.plot(emb, labels, str(tmp_path / "e.png"))
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_fashion_mnist_graphs_smoke(tmp_path):
    import fashion_mnist_graphs
    from mmjax.data.fashion_mnist import write_idx

    rng = np.random.default_rng(0)
    for prefix, n in [("train", 32), ("t10k", 12)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 255, (n, 8, 8)).astype(np.uint8))
        write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    result = fashion_mnist_graphs.main([
        "--workdir", str(tmp_path / "work"), "--data_dir", str(tmp_path), "--num_steps", "2", "--hidden", "8",
        "--depth", "1", "--batch_size", "8", "--eval_batch_size", "4", "--quiet"])
    assert result["step"] == 2
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and result["eval_count"] == 12
    assert np.isfinite(result["train_loss"])
