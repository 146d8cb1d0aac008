"""The node-classification task (mmjax.train.node_classification), the GCN model and the karate club dataset."""

import jax
import ml_collections
import numpy as np
import pytest

from mmjax import gnn
from mmjax.data.karate import karate_club, node_masks
from mmjax.graph import Graph
from mmjax.graph_models import GCN
from mmjax.train import train_and_evaluate
from mmjax.train.config import default_config
from mmjax.train.node_classification import (
    NodeClassificationTask,
    load_dataset,
    plot_node_embedding,
    project_2d,
)
from mmjax.train.task import resolve_task_class


def _config(**changes):
    c = default_config()
    c.task = "node_classification"
    c.model = ml_collections.ConfigDict({"name": "gcn", "hidden": 4})
    c.data = ml_collections.ConfigDict({"name": "karate_club"})
    c.batch_size = c.eval_batch_size = 1
    c.num_steps = 3
    c.progress = c.tensorboard = c.plot = False
    c.checkpoint_every = 0
    for k, v in changes.items():
        c[k] = v
    return c


def tiny_path_graph():
    """A 5-node path graph 0-1-2-3-4 with one-hot features; labels 0,0,1,1,1; nodes 0 and 4 labelled."""
    s = np.array([0, 1, 1, 2, 2, 3, 3, 4], np.int32)
    r = np.array([1, 0, 2, 1, 3, 2, 4, 3], np.int32)
    nodes = np.eye(5, dtype=np.float32)  # one-hot node ids
    g = Graph(nodes=nodes, senders=s, receivers=r, n_node=np.array([5], np.int32), n_edge=np.array([8], np.int32))
    train, test = node_masks(5, [0, 4])
    return {"graph": g, "labels": np.array([0, 0, 1, 1, 1], np.int32), "train_mask": train, "test_mask": test}


def test_registered_and_karate_dataset():
    assert resolve_task_class("node_classification") is NodeClassificationTask
    d = karate_club()
    senders, receivers = d["graph"].senders, d["graph"].receivers
    assert len(senders) == 156 and set(zip(senders.tolist(), receivers.tolist())) == set(
        zip(receivers.tolist(), senders.tolist())
    )  # undirected: both directions
    assert d["labels"][0] == 0 and d["labels"][33] == 1 and 10 < d["labels"].sum() < 24
    assert (d["train_mask"] ^ d["test_mask"]).all() and d["train_mask"].sum() == 2
    with pytest.raises(ValueError, match="train_nodes"):
        node_masks(34, [0, 34])


def test_gcn_matches_dense_formula():
    d = tiny_path_graph()
    g = d["graph"]
    m = GCN(num_classes=3, hidden=4, activation="tanh")
    params = m.init(jax.random.key(0), g)["params"]
    a = np.zeros((5, 5))
    a[g.receivers, g.senders] = 1
    a += np.eye(5)
    dis = 1 / np.sqrt(a.sum(1))
    a_hat = dis[:, None] * a * dis[None, :]
    p0, p1 = params["conv_0"], params["conv_1"]
    h = np.tanh(a_hat @ g.nodes @ np.asarray(p0["kernel"]) + np.asarray(p0["bias"]))
    expected = a_hat @ h @ np.asarray(p1["kernel"]) + np.asarray(p1["bias"])
    out, aux = jax.jit(lambda p: m.apply({"params": p}, g))(params)  # (output, intermediates), as every model
    fast, _ = jax.jit(lambda p, a: m.apply({"params": p}, g, adjacency=a))(params, gnn.gcn_adjacency(g))
    np.testing.assert_allclose(aux["hidden"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        GCN(num_classes=2, activation="swish").init(jax.random.key(0), g)


def test_loss_is_masked_to_training_nodes():
    task = NodeClassificationTask(_config())
    batch = next(task.train_batches(0))
    params = task.init_params(jax.random.key(0), batch)
    loss, metrics = jax.jit(lambda p, b: task.loss(p, b, None, train=False))(params, batch)
    logits = np.asarray(jax.jit(lambda p, b: task._logits(p, b, train=False))(params, batch))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([logp[i, task.labels[i]] for i in (0, 33)])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # changing a test node's label changes neither the loss nor its gradient
    other = dict(batch, labels=batch["labels"].copy())
    other["labels"][5] = 1 - other["labels"][5]
    grad = jax.jit(jax.grad(lambda p, b: task.loss(p, b, None, train=False)[0]))
    jax.tree.map(np.testing.assert_array_equal, grad(params, batch), grad(params, other))
    np.testing.assert_allclose(metrics["accuracy"], np.mean(logits[[0, 33]].argmax(-1) == [0, 1]))
    sums = jax.jit(task.eval_metrics)(params, batch)
    assert sums["count"] == 32
    correct = (logits.argmax(-1) == task.labels)[task.test_mask].sum()
    np.testing.assert_allclose(sums["accuracy"], correct)


def test_custom_dataset_by_path_trains(tmp_path):
    config = _config(num_steps=40)
    config.data.name = f"{__name__}:tiny_path_graph"  # any "module:function" returning a dataset dict
    config.model.hidden, config.model.dropout = 16, 0.1
    config.optimizer.lr = 0.05
    config.optimizer.weight_decay = 0.0
    result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 40 and result["eval_count"] == 3
    assert result["train_loss"] < 0.3 and result["eval_accuracy_train_nodes"] == 1.0


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            {
                "parallel": ml_collections.ConfigDict(
                    {"mode": "pmap", "num_devices": 0, "fsdp": False, "fsdp_min_size": 16384}
                )
            },
            "parallel.mode",
        ),
        ({"batch_size": 8}, "batch_size"),
    ],
)
def test_bad_config_raises(changes, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(_config(**changes), str(tmp_path))


def test_bad_names_and_datasets_raise():
    c = _config()
    c.data.name = "cora_not_here"
    with pytest.raises(ValueError, match="config.data.name"):
        NodeClassificationTask(c)
    c = _config()
    c.model.name = "gat_not_here"
    with pytest.raises(ValueError, match="config.model.name"):
        NodeClassificationTask(c)
    with pytest.raises(ValueError, match="train_nodes"):
        load_dataset({"name": "karate_club", "train_nodes": [99]})


def test_plot_and_projection(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4))
    xy = project_2d(x)
    c = x - x.mean(0)
    # PCA keeps the two largest variance directions: no 2-D projection has more total variance
    assert xy.var(0).sum() >= (c[:, :2]).var(0).sum() - 1e-9
    np.testing.assert_allclose(project_2d(x[:, :2]), x[:, :2])
    path = plot_node_embedding(x, np.array([0, 0, 1, 1, 2, 2]), np.eye(6, dtype=bool)[0], str(tmp_path / "e.png"))
    assert (tmp_path / "e.png").stat().st_size > 1000 and path.endswith("e.png")
    with pytest.raises(ValueError, match="labels"):
        plot_node_embedding(x, np.zeros(5, int), np.zeros(6, bool), str(tmp_path / "f.png"))
