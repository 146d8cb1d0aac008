"""Image classification as a task: any Flax module mapping NHWC images to logits (or ``(logits, aux)``).

Loss (label smoothing ``eps`` over ``K`` classes): ``-sum_k q_k log softmax(logits)_k`` with
``q = (1 - eps) * onehot(label) + eps / K``; metrics: accuracy. Images arrive as ``uint8`` and are normalised on the
device: ``x = (image / 255 - mean) / std``.

>>> import ml_collections
>>> build_model_class(ml_collections.ConfigDict({"name": "flax.linen:Dense"})).__name__
'Dense'
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.data.pipeline import eval_batches, load_source, train_batches
from mmjax.train.task import instantiate_model, resolve_named

#: Model names -> "module:Class".
MODELS = {"vit": "mmjax.vit:ViT"}


def build_model_class(model_config):
    """The model class named by ``config.model.name`` (a key of :data:`MODELS` or ``"module:Class"``).

    >>> build_model_class({"name": "vit"}).__name__, build_model_class({"name": "flax.linen:Dense"}).__name__
    ('ViT', 'Dense')
    >>> build_model_class({"name": "resnet"})
    Traceback (most recent call last):
    ...
    ValueError: config.model.name='resnet' is not valid; valid choices: ['vit'] or a 'package.module:Class' path
    """
    return resolve_named(model_config.get("name", None), MODELS, "config.model.name")


def build_model(model_config, num_classes: int):
    """Instantiates the model with the other ``config.model`` fields as keyword arguments.

    ``num_classes`` (from the dataset) is passed when the class takes it and the config does not set it.

    >>> import ml_collections
    >>> build_model(ml_collections.ConfigDict({"name": "flax.linen:Dense", "features": 3}), num_classes=10).features
    3
    """
    cls = build_model_class(model_config)
    return instantiate_model(cls, {k: v for k, v in model_config.to_dict().items() if k != "name"}, num_classes)


def _logits(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class ClassificationTask:
    """Supervised image classification (see :mod:`mmjax.train.task` for the contract).

    Reads ``config.model``, ``config.data`` (name, data_dir, splits, crop_padding, flip, mean, std),
    ``config.batch_size``, ``config.eval_batch_size``, ``config.seed`` and ``config.label_smoothing``.
    Batches: ``{"image": uint8 [B, H, W, C], "label": int32 [B]}`` (+ ``"mask"`` float32 [B] for evaluation).
    A full run is shown in :func:`mmjax.train.train_and_evaluate`.

    A tiny ViT on eight 8x8 images (written as Fashion-MNIST IDX files), one loss and one evaluation batch:

    >>> import os, tempfile
    >>> from mmjax.data import write_idx
    >>> from mmjax.train.config import prepare_config
    >>> data, rng = tempfile.mkdtemp(), np.random.default_rng(0)
    >>> for prefix in ("train", "t10k"):
    ...     write_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte"), rng.integers(0, 255, (8, 8, 8), np.uint8))
    ...     write_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, 8).astype(np.uint8))
    >>> config = prepare_config({"model": {"name": "vit", "variant": None, "width": 8, "depth": 1, "num_heads": 1,
    ...                                    "mlp_dim": 8, "patch_size": 4}, "data": {"data_dir": data},
    ...                          "batch_size": 4, "eval_batch_size": 8})
    >>> task = ClassificationTask(config)
    >>> batch = next(iter(task.train_batches(0)))
    >>> task.num_classes, task.num_train_examples, batch["image"].shape, batch["label"].shape
    (10, 8, (4, 8, 8, 1), (4,))
    >>> params = jax.eval_shape(task.init_params, jax.random.key(0), batch)  # shapes only: nothing compiles
    >>> loss, metrics = jax.eval_shape(lambda p: task.loss(p, batch, jax.random.key(1), train=False), params)
    >>> loss.shape, sorted(metrics)
    ((), ['accuracy'])
    >>> eval_batch = next(iter(task.eval_batches()))
    >>> sorted(jax.eval_shape(task.eval_metrics, params, eval_batch)), int(eval_batch["mask"].sum())
    (['accuracy', 'count', 'loss'], 8)
    """

    unit = "img"

    def __init__(self, config):
        d = config.data
        data_dir = d.data_dir or None
        self.train_source, info = load_source(d.name, d.train_split, data_dir)
        self.eval_source, _ = load_source(d.name, d.eval_split, data_dir)
        self.num_classes = int(info["num_classes"])
        self.num_train_examples = len(self.train_source)
        self.model = build_model(config.model, self.num_classes)
        self.mean, self.std = float(d.mean), float(d.std)
        self.label_smoothing = float(config.label_smoothing)
        self.batch_size, self.eval_batch_size = int(config.batch_size), int(config.eval_batch_size)
        self.seed = int(config.seed)
        self.crop_padding, self.flip = int(d.crop_padding), bool(d.flip)

    # -- data ---------------------------------------------------------------------------------------------------
    def train_batches(self, start_step: int):
        """Host batches ``{"image": uint8 [b, H, W, C], "label": int32 [b]}`` from step ``start_step``."""
        return train_batches(
            self.train_source, self.batch_size, self.seed, start_step, crop_padding=self.crop_padding, flip=self.flip
        )

    def eval_batches(self):
        """Ordered evaluation batches, the last one padded, with ``mask``."""
        return eval_batches(self.eval_source, self.eval_batch_size)

    def example_count(self, batch) -> int:
        """Real examples in a host batch."""
        return int(np.sum(batch["mask"])) if "mask" in batch else int(np.shape(batch["label"])[0])

    # -- model --------------------------------------------------------------------------------------------------
    def _images(self, batch):
        return (batch["image"].astype(jnp.float32) / 255.0 - self.mean) / self.std

    def init_params(self, rng, batch):
        """Initial params from one batch's image shape."""
        images = self._images(batch)[:1]
        variables = self.model.init({"params": rng, "dropout": rng}, images, train=False)
        return variables["params"]

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """Mean label-smoothed cross-entropy and accuracy over this (device-local or global) batch."""
        del axis_name  # per-example loss: the engine's pmean of gradients is all that is needed
        logits = _logits(self.model.apply({"params": params}, self._images(batch), train=train, rngs={"dropout": rng}))
        logits = logits.astype(jnp.float32)
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), self.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (jnp.argmax(logits, -1) == labels).mean()
        return loss, {"accuracy": accuracy}

    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums of cross-entropy (no smoothing) and correct predictions over real examples, and their count."""
        del axis_name
        logits = _logits(self.model.apply({"params": params}, self._images(batch), train=False)).astype(jnp.float32)
        mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": jnp.sum(ce * mask), "accuracy": jnp.sum(correct * mask), "count": jnp.sum(mask)}
