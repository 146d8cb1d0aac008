"""Transductive node classification as a task: one graph, node labels, train/test node masks, full-batch steps.

Every training step sees the whole graph; the loss is the cross-entropy averaged over the *training* nodes only
(label smoothing ``eps`` over ``K`` classes, ``q = (1 - eps) onehot(y) + eps / K``):

    loss = sum_i m_i CE(q_i, softmax(f(X, A)_i)) / sum_i m_i,    m_i = train_mask[i]

and evaluation counts the *test* nodes (``accuracy = #{i in test: argmax f_i = y_i} / #test``). One step is one
"epoch" (``num_train_examples = 1``, one graph per step), so ``config.num_epochs`` counts full-graph steps;
``config.batch_size`` and ``config.eval_batch_size`` must be 1.

Config: ``config.model.name`` (a key of :data:`MODELS` or ``"module:Class"``; the class gets ``num_classes``
from the dataset when it takes it, plus the other ``config.model`` fields), ``config.data.name`` (a key of
:data:`DATASETS` or ``"module:function"`` returning the dict described in :mod:`mmjax.data.karate`),
``config.data.train_nodes`` (optional: a list of labelled nodes replacing the dataset's train mask; every other
node is then a test node), ``config.label_smoothing``, ``config.plot`` (the final report's embedding plot).

A model whose ``__call__`` takes ``adjacency`` gets the GCN-normalised adjacency built once on the host
(:func:`mmjax.gnn.gcn_adjacency`); ``train`` and a ``"dropout"`` rng are passed as for image models.

Only ``config.parallel.mode = "single"`` is supported: one graph has no example axis to split over devices.

>>> import ml_collections
>>> cfg = ml_collections.ConfigDict({"model": {"name": "gcn", "hidden": 4}, "data": {"name": "karate_club"},
...                                  "parallel": {"mode": "single"}, "batch_size": 1, "eval_batch_size": 1,
...                                  "label_smoothing": 0.0, "seed": 0, "plot": False})
>>> task = NodeClassificationTask(cfg)
>>> task.num_classes, task.num_nodes, int(task.train_mask.sum()), int(task.test_mask.sum())
(2, 34, 2, 32)
"""

from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import gnn
from mmjax.errors import ConfigError, UserError
from mmjax.graph import validate
from mmjax.losses import softmax_cross_entropy, softmax_cross_entropy_sum
from mmjax.train.task import (
    check_label_smoothing,
    constructor_keys,
    init_model_params,
    instantiate_model,
    resolve_named,
    with_defaults,
)

#: Model names -> "module:Class".
MODELS = {"gcn": "mmjax.graph_models:GCN"}
#: Dataset names -> "module:function" returning a node-classification dataset dict.
DATASETS = {"karate_club": "mmjax.data.karate:karate_club"}


def load_dataset(data_config) -> dict:
    """The dataset named by ``config.data.name`` (with ``config.data.train_nodes`` applied), checked.

    Returns:
      ``{"graph", "labels" [N] int32, "train_mask" [N] bool, "test_mask" [N] bool, "class_names", "num_classes"}``.

    >>> d = load_dataset({"name": "karate_club", "train_nodes": [0, 1, 33]})
    >>> int(d["train_mask"].sum()), int(d["test_mask"].sum()), d["num_classes"]
    (3, 31, 2)
    """
    from mmjax.data.karate import node_masks

    get = data_config.get
    d = dict(resolve_named(get("name", None), DATASETS, "config.data.name", kind="name")())
    missing = {"graph", "labels", "train_mask", "test_mask"} - set(d)
    if missing:
        raise UserError(
            f"config.data.name={get('name')!r}: the dataset lacks {sorted(missing)}; a node-"
            "classification dataset is a dict with graph, labels, train_mask, test_mask"
        )
    graph = d["graph"]
    validate(graph, node_rank=2)
    n = graph.nodes.shape[0]
    labels = np.asarray(d["labels"])
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise UserError(
            f"dataset labels must be non-negative ints of shape [N={n}], got shape {labels.shape}, dtype {labels.dtype}"
        )
    train_nodes = get("train_nodes", None)
    if train_nodes:
        d["train_mask"], d["test_mask"] = node_masks(n, train_nodes)
    for key in ("train_mask", "test_mask"):
        m = np.asarray(d[key])
        if m.shape != (n,) or m.dtype != bool or not m.any():
            raise UserError(
                f"dataset {key} must be a bool [N={n}] mask with at least one True, got shape "
                f"{m.shape}, dtype {m.dtype}, {int(m.sum()) if m.dtype == bool else '?'} True"
            )
        d[key] = m
    k = int(labels.max()) + 1
    d["class_names"] = tuple(d.get("class_names") or (str(c) for c in range(k)))
    d["num_classes"] = max(k, len(d["class_names"]))
    d["labels"] = labels.astype(np.int32)
    d["graph"] = graph._replace(nodes=np.asarray(graph.nodes, np.float32))
    return d


def build_model(model_config, num_classes: int):
    """Instantiates ``config.model`` (``num_classes`` from the dataset when the class takes it and it is unset).

    >>> build_model({"name": "gcn", "hidden": 8}, num_classes=3).hidden
    8
    """
    items = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    cls = resolve_named(items.get("name", None), MODELS, "config.model.name", kind="name")
    return instantiate_model(cls, {k: v for k, v in items.items() if k != "name"}, num_classes)


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class NodeClassificationTask:
    """Full-batch transductive node classification (see the module docstring; contract in :mod:`mmjax.train.task`).

    Batch (the same every step): ``{"graph": Graph, "labels": int32 [N], "train_mask": float32 [N],
    "test_mask": float32 [N]}`` plus ``"adjacency"`` (:class:`mmjax.gnn.GCNAdjacency`) when the model takes one.
    A full run: ``experiments/karate_gcn.py``.

    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict({"model": {"name": "gcn", "hidden": 4}, "data": {"name": "karate_club"},
    ...                                  "parallel": {"mode": "single"}, "batch_size": 1, "eval_batch_size": 1,
    ...                                  "label_smoothing": 0.0, "seed": 0, "plot": False})
    >>> task = NodeClassificationTask(cfg)
    >>> batch = next(task.train_batches(0))
    >>> batch["labels"].shape, batch["train_mask"].shape, "adjacency" in batch
    ((34,), (34,), True)
    >>> params = jax.eval_shape(task.init_params, jax.random.key(0), batch)  # shapes only: nothing compiles
    >>> loss, metrics = jax.eval_shape(lambda p: task.loss(p, batch, jax.random.key(1), train=False), params)
    >>> loss.shape, sorted(metrics)
    ((), ['accuracy'])
    >>> sorted(jax.eval_shape(task.eval_metrics, params, batch)), int(batch["test_mask"].sum())  # test nodes count
    (['accuracy', 'count', 'loss'], 32)
    """

    unit = "graph"
    num_train_examples = 1

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's keys with their defaults (merged under the engine's by
        :func:`mmjax.train.config.prepare_config`); one full-graph step per batch.

        >>> c = NodeClassificationTask.default_config()
        >>> c.model.name, c.data.name, c.batch_size
        ('gcn', 'karate_club', 1)
        """
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict({"name": "gcn"})  # name (a key of MODELS or "module:Class") + kwargs
        c.data = ml_collections.ConfigDict({"name": "karate_club", "train_nodes": ()})  # () = the dataset's mask
        c.label_smoothing = 0.0
        c.batch_size = 1  # engine keys with this task's only valid value
        c.eval_batch_size = 1
        return c

    @staticmethod
    def model_keys(model_config) -> frozenset[str] | None:
        """``config.model``'s valid keys: ``name`` and the model class's constructor fields.

        >>> "hidden" in NodeClassificationTask.model_keys({"name": "gcn"})
        True
        """
        name = model_config.get("name", None)
        keys = constructor_keys(resolve_named(name, MODELS, "config.model.name", kind="name"))
        return None if keys is None else keys | {"name"}

    @staticmethod
    def check_config(config) -> None:
        """Checks ``parallel.mode`` (``"single"``), ``batch_size`` and ``eval_batch_size`` (1) and
        ``label_smoothing``; raises :class:`mmjax.errors.ConfigError`.

        >>> NodeClassificationTask.check_config({"parallel": {"mode": "pmap"}})
        Traceback (most recent call last):
        ...
        mmjax.errors.ConfigError: config.parallel.mode='pmap' is not supported by the node_classification task: it trains on one whole graph per step, which has no example axis to split over devices; use config.parallel.mode='single'
        """
        mode = config["parallel"]["mode"]
        if mode != "single":
            raise ConfigError(
                f"config.parallel.mode={mode!r} is not supported by the node_classification task: it "
                "trains on one whole graph per step, which has no example axis to split over devices; "
                "use config.parallel.mode='single'"
            )
        for key in ("batch_size", "eval_batch_size"):
            if config[key] != 1:
                raise ConfigError(
                    f"config.{key}={config[key]!r} is not valid for node_classification: each step is "
                    f"one full-graph step; set config.{key}=1 (and count steps with num_steps or "
                    "num_epochs)"
                )
        check_label_smoothing(config)

    def __init__(self, config):
        config = with_defaults(config, type(self))
        self.check_config(config)
        data = load_dataset(config.data)
        self.graph, self.labels = data["graph"], data["labels"]
        self.train_mask, self.test_mask = data["train_mask"], data["test_mask"]
        self.class_names, self.num_classes = data["class_names"], data["num_classes"]
        self.num_nodes = int(self.graph.nodes.shape[0])
        self.model = build_model(config.model, self.num_classes)
        self.label_smoothing = float(config.label_smoothing)
        self.plot = bool(config.get("plot", True))
        self._batch = None

    # -- data ---------------------------------------------------------------------------------------------------
    def _full_batch(self) -> dict:
        if self._batch is None:
            batch = {
                "graph": self.graph,
                "labels": self.labels,
                "train_mask": self.train_mask.astype(np.float32),
                "test_mask": self.test_mask.astype(np.float32),
            }
            if _takes(self.model.__call__, "adjacency"):  # normalise once: the graph is static
                batch["adjacency"] = jax.tree.map(np.asarray, gnn.gcn_adjacency(self.graph))
            self._batch = batch
        return self._batch

    def train_batches(self, start_step: int):
        """The whole graph, once per step, forever (the batch does not depend on the step)."""
        del start_step
        batch = self._full_batch()
        while True:
            yield batch

    def eval_batches(self):
        """One batch: the whole graph (the test mask selects what is counted)."""
        return [self._full_batch()]

    def example_count(self, batch) -> int:
        """One graph per batch."""
        del batch
        return 1

    # -- model --------------------------------------------------------------------------------------------------
    def _logits(self, params, batch, train: bool, rng=None):
        kwargs = {"adjacency": batch["adjacency"]} if "adjacency" in batch else {}
        if _takes(self.model.__call__, "train"):
            kwargs["train"] = train
        rngs = {"dropout": rng} if rng is not None else None
        out = self.model.apply({"params": params}, batch["graph"], rngs=rngs, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.astype(jnp.float32)

    def init_params(self, rng, batch):
        """Initial params (the graph gives the feature size)."""
        kwargs = {"adjacency": batch["adjacency"]} if "adjacency" in batch else {}
        if _takes(self.model.__call__, "train"):
            kwargs["train"] = False
        return init_model_params(self.model, {"params": rng, "dropout": rng}, batch["graph"], **kwargs)

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """Label-smoothed cross-entropy averaged over the training nodes; accuracy on them."""
        del axis_name  # single mode only
        logits = self._logits(params, batch, train, rng)
        labels, m = batch["labels"], batch["train_mask"]
        count = jnp.maximum(jnp.sum(m), 1.0)
        accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) * m) / count
        return softmax_cross_entropy(logits, labels, self.label_smoothing, where=m), {"accuracy": accuracy}

    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums of cross-entropy and correct predictions over the test nodes, and their count."""
        del axis_name
        logits = self._logits(params, batch, train=False)
        labels, m = batch["labels"], batch["test_mask"]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        loss_sum = softmax_cross_entropy_sum(logits, labels, where=m)
        return {"loss": loss_sum, "accuracy": jnp.sum(correct * m), "count": jnp.sum(m)}

    # -- report -------------------------------------------------------------------------------------------------
    def final_report(self, params, workdir: str) -> dict:
        """Accuracy on train / test / all nodes and, with ``config.plot``, ``embedding.png`` (the model's output,
        projected to 2-D by PCA when it is wider) coloured by class, training nodes ringed."""
        out = np.asarray(jax.jit(lambda p, b: self._logits(p, b, train=False))(params, self._full_batch()))
        correct = out.argmax(-1) == self.labels
        report = {
            "accuracy_train_nodes": float(correct[self.train_mask].mean()),
            "accuracy_test_nodes": float(correct[self.test_mask].mean()),
            "accuracy_all_nodes": float(correct.mean()),
        }
        if self.plot:
            path = os.path.join(workdir, "embedding.png")
            plot_node_embedding(out, self.labels, self.train_mask, path, self.class_names)
            report["embedding_plot"] = path
        return report


def project_2d(x) -> np.ndarray:
    """``[N, D] -> [N, 2]``: ``x`` itself when ``D <= 2`` (zero-padded), else its first two principal components.

    >>> project_2d(np.array([[0., 0., 0.], [1., 1., 0.], [2., 2., 0.]])).shape
    (3, 2)
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise UserError(f"x must be [N, D] node features, got shape {x.shape}")
    if x.shape[1] <= 2:
        return np.pad(x, ((0, 0), (0, 2 - x.shape[1])))
    c = x - x.mean(0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    return c @ vt[:2].T


def plot_node_embedding(embedding, labels, train_mask, path: str, class_names=None, title=None) -> str:
    """Scatter plot of ``[N, D]`` node outputs (2-D, or PCA to 2-D) coloured by ``labels [N]``; the nodes of
    ``train_mask [N]`` are ringed in black, every node is annotated with its index. Writes a PNG; returns ``path``.

    >>> import tempfile, os
    >>> p = plot_node_embedding(np.eye(3), np.array([0, 1, 1]), np.array([True, False, False]),
    ...                         os.path.join(tempfile.mkdtemp(), "e.png"))
    >>> os.path.getsize(p) > 0
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = project_2d(embedding)
    labels, train_mask = np.asarray(labels), np.asarray(train_mask, bool)
    if labels.shape != (xy.shape[0],) or train_mask.shape != (xy.shape[0],):
        raise UserError(f"labels and train_mask must be [N={xy.shape[0]}], got {labels.shape} and {train_mask.shape}")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c in np.unique(labels):
        sel = labels == c
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=70, label=name)
    ax.scatter(
        xy[train_mask, 0],
        xy[train_mask, 1],
        s=160,
        facecolors="none",
        edgecolors="black",
        linewidths=1.5,
        label="labelled (train)",
    )
    for i, (a, b) in enumerate(xy):
        ax.annotate(str(i), (a, b), fontsize=6, ha="center", va="center")
    ax.set_title(
        title
        or f"node outputs ({'PCA of ' if np.shape(embedding)[1] > 2 else ''}"
        f"{np.shape(embedding)[1]}-D), {int(train_mask.sum())} labelled nodes"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
