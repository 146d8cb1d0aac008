"""Image classification as a task: any Flax module mapping NHWC images to logits (or ``(logits, aux)``).

Loss (label smoothing ``eps`` over ``K`` classes, :func:`mmjax.losses.softmax_cross_entropy`):
``-sum_k q_k log softmax(logits)_k`` with ``q = (1 - eps) * onehot(label) + eps / K``; metrics: accuracy. Images
arrive as ``uint8`` and are normalised on the device: ``x = (image / 255 - mean) / std``, with ``mean`` and ``std``
one number or one per channel. The model may be any image model, e.g. :class:`mmjax.vit.ViT` or a graph network over
image patches (:class:`mmjax.graph_models.PatchGCN`, ``experiments/fashion_mnist_graphs.py``).

Config (:meth:`ClassificationTask.default_config`): ``model`` (``name`` plus the model's constructor fields),
``data`` (``name``, ``data_dir``, ``train_split``, ``eval_split``, ``crop_padding``, ``flip``, ``mean``, ``std``) and
``label_smoothing``.

>>> import ml_collections
>>> build_model_class(ml_collections.ConfigDict({"name": "flax.linen:Dense"})).__name__
'Dense'
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.data.pipeline import eval_batches, load_source, train_batches
from mmjax.errors import ConfigError
from mmjax.losses import softmax_cross_entropy, softmax_cross_entropy_sum
from mmjax.train.config import is_number
from mmjax.train.task import (
    check_label_smoothing,
    constructor_keys,
    init_model_params,
    instantiate_model,
    resolve_named,
    with_defaults,
)

#: Model names -> "module:Class".
MODELS = {"vit": "mmjax.vit:ViT"}


def build_model_class(model_config):
    """The model class named by ``config.model.name`` (a key of :data:`MODELS` or ``"module:Class"``).

    >>> build_model_class({"name": "vit"}).__name__, build_model_class({"name": "flax.linen:Dense"}).__name__
    ('ViT', 'Dense')
    >>> build_model_class({"name": "resnet"})
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.model.name='resnet' is not valid; valid choices: ['vit'] or a 'package.module:Class' path
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


def normalisation(key: str, value, channels: int):
    """``config.data.mean`` / ``std`` as used on the device: a Python float for one number, else a float32
    ``[channels]`` array (one value per channel, broadcast over NHWC images).

    Raises:
      ConfigError: for anything else (naming the value and the accepted forms); a ``std`` must be > 0.

    >>> normalisation("mean", 0.5, 1), normalisation("mean", (0.4, 0.5, 0.6), 3).shape
    (0.5, (3,))
    >>> normalisation("mean", (0.4, 0.5), 3)
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.data.mean=(0.4, 0.5) is not valid; expected one number or 3 numbers (one per image channel), e.g. 0.5 or (0.5, 0.5, 0.5)
    """
    expected = f"one number or {channels} numbers (one per image channel), e.g. 0.5 or {(0.5,) * channels}"
    if is_number(value):
        values = [float(value)]
    else:
        try:
            values = [float(v) for v in value] if all(is_number(v) for v in value) else None
        except TypeError:
            values = None
        if values is None or len(values) not in (1, channels):
            raise ConfigError(f"config.data.{key}={value!r} is not valid; expected {expected}")
    if key == "std" and min(values) <= 0:
        raise ConfigError(f"config.data.std={value!r} is not valid; expected numbers > 0")
    return values[0] if is_number(value) else jnp.asarray(values, jnp.float32)


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
    >>> import jax
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

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's keys with their defaults (merged under the engine's by
        :func:`mmjax.train.config.prepare_config`).

        >>> ClassificationTask.default_config().data.name
        'fashion_mnist'
        """
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict({"name": "vit"})  # name ("vit" or "module:Class") + constructor kwargs
        c.data = ml_collections.ConfigDict(
            dict(
                name="fashion_mnist",  # "fashion_mnist" (IDX files) or any prepared TFDS image-classification dataset
                data_dir="",  # directory with the IDX files / TFDS data_dir ("" = defaults)
                train_split="train",
                eval_split="test",
                crop_padding=0,  # random crop after zero padding by this many pixels (0 = off)
                flip=False,  # random horizontal flip
                mean=0.5,  # images are (x / 255 - mean) / std on the device; one number or one per channel
                std=0.5,
            )
        )
        c.label_smoothing = 0.0
        return c

    @staticmethod
    def model_keys(model_config) -> frozenset[str] | None:
        """``config.model``'s valid keys: ``name`` and the model class's constructor fields.

        >>> sorted(ClassificationTask.model_keys({"name": "flax.linen:Dropout"}))
        ['broadcast_dims', 'deterministic', 'name', 'rate', 'rng_collection']
        """
        keys = constructor_keys(build_model_class(model_config))
        return None if keys is None else keys | {"name"}

    @staticmethod
    def check_config(config) -> None:
        """Checks the task's values that need no data (``label_smoothing``).

        >>> ClassificationTask.check_config({"label_smoothing": 0.0})  # valid: returns None
        """
        check_label_smoothing(config)

    def __init__(self, config):
        config = with_defaults(config, type(self))
        self.check_config(config)
        d = config.data
        data_dir = d.data_dir or None
        self.train_source, info = load_source(d.name, d.train_split, data_dir)
        self.eval_source, _ = load_source(d.name, d.eval_split, data_dir)
        self.num_classes = int(info["num_classes"])
        self.num_train_examples = len(self.train_source)
        self.model = build_model(config.model, self.num_classes)
        channels = int(tuple(info["image_shape"])[-1])
        self.mean, self.std = normalisation("mean", d.mean, channels), normalisation("std", d.std, channels)
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
        return init_model_params(self.model, {"params": rng, "dropout": rng}, images, train=False)

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """Mean label-smoothed cross-entropy and accuracy over this (device-local or global) batch."""
        del axis_name  # per-example loss: the engine's pmean of gradients is all that is needed
        logits = _logits(self.model.apply({"params": params}, self._images(batch), train=train, rngs={"dropout": rng}))
        logits = logits.astype(jnp.float32)
        labels = batch["label"]
        loss = softmax_cross_entropy(logits, labels, self.label_smoothing)
        accuracy = (jnp.argmax(logits, -1) == labels).mean()
        return loss, {"accuracy": accuracy}

    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums of cross-entropy (no smoothing) and correct predictions over real examples, and their count."""
        del axis_name
        logits = _logits(self.model.apply({"params": params}, self._images(batch), train=False)).astype(jnp.float32)
        mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        loss_sum = softmax_cross_entropy_sum(logits, batch["label"], where=mask)
        return {"loss": loss_sum, "accuracy": jnp.sum(correct * mask), "count": jnp.sum(mask)}
