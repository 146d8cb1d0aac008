"""Smoke tests (tiny sizes) of the graph tasks through the engine: image -> patch graphs, the karate club GCN config
(node classification) and the Fashion-MNIST patch-graph config (graph classification). No sys.path changes: configs
are loaded from their files like ``mmjax train --config`` does, models are found by registry name or
``"mmjax.module:Class"``."""

import os
import sys

import numpy as np
import pytest

from mmjax import graph as gr
from mmjax.cli import load_config_file
from mmjax.data import graphs as dg
from mmjax.train import evaluate, train_and_evaluate
from mmjax.train.classification import build_model_class
from mmjax.train.config import prepare_config

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


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
    assert g.senders.min() >= 0 and (g.senders[g.n_edge[0] :] >= 6).all()
    with pytest.raises(ValueError, match="patch"):
        dg.images_to_graphs(images, patch=5)
    with pytest.raises(ValueError, match="images"):
        dg.images_to_graphs(images[0], patch=4)


def test_configs_need_no_sys_path_hack():
    assert EXPERIMENTS not in sys.path
    config = load_config_file(os.path.join(EXPERIMENTS, "fashion_mnist_graphs.py"))
    from mmjax.graph_models import PatchGCN

    assert build_model_class(config.model) is PatchGCN  # found by "mmjax.graph_models:PatchGCN"
    karate = load_config_file(os.path.join(EXPERIMENTS, "karate_gcn.py"))
    assert karate.task == "node_classification" and karate.model.name == "gcn"
    assert EXPERIMENTS not in sys.path and "fashion_mnist_graphs" not in sys.modules
    for name in ("karate_gcn.py", "fashion_mnist_graphs.py"):
        path = os.path.join(EXPERIMENTS, name)
        prepare_config(load_config_file(path))  # valid engine configs
        doc = open(path).read().split('"""')[1]
        assert f"mmjax train --config experiments/{name}" in doc and "Expected" in doc


def test_karate_gcn_config_trains_with_engine(tmp_path):
    config = load_config_file(os.path.join(EXPERIMENTS, "karate_gcn.py"))
    config.num_steps = 30
    result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 30 and result["eval_count"] == 32  # the 32 unlabelled members
    assert result["train_loss"] < 0.5 and result["train_accuracy"] == 1.0  # the two labelled leaders are fitted
    assert result["eval_accuracy"] > 0.6 and result["eval_accuracy"] == result["eval_accuracy_test_nodes"]
    assert result["eval_accuracy_train_nodes"] == 1.0
    assert os.path.getsize(result["eval_embedding_plot"]) > 1000 and (tmp_path / "curves.png").exists()
    assert evaluate(str(tmp_path))["eval_accuracy"] == result["eval_accuracy"]  # checkpoint + saved config


def test_fashion_mnist_graphs_config_trains_with_engine(tmp_path):
    from mmjax.data.fashion_mnist import write_idx

    rng = np.random.default_rng(0)
    for prefix, n in [("train", 32), ("t10k", 12)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 255, (n, 8, 8)).astype(np.uint8))
        write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    config = load_config_file(os.path.join(EXPERIMENTS, "fashion_mnist_graphs.py"))
    config.model.hidden, config.model.depth = 8, 1
    config.data.data_dir = str(tmp_path)
    config.num_steps, config.batch_size, config.eval_batch_size = 2, 8, 4
    config.tensorboard = config.plot = False
    result = train_and_evaluate(config, str(tmp_path / "work"))
    assert result["step"] == 2
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and result["eval_count"] == 12
    assert np.isfinite(result["train_loss"])
