"""Datasets and input pipelines.

* :mod:`mmjax.data.fashion_mnist`: the IDX reader and Fashion-MNIST loader (Debian package, a directory, or TFDS).
* :mod:`mmjax.data.pipeline`: random-access sources (in memory, TFDS ArrayRecord), grain shuffling and batching,
  augmentation, per-host sharding, padded evaluation batches.
"""

from mmjax.data.fashion_mnist import load_fashion_mnist, read_idx, write_idx
from mmjax.data.pipeline import (
    ArraySource,
    augment_batch,
    eval_batches,
    load_source,
    tfds_source,
    train_batches,
)

__all__ = [
    "ArraySource",
    "augment_batch",
    "eval_batches",
    "load_fashion_mnist",
    "load_source",
    "read_idx",
    "tfds_source",
    "train_batches",
    "write_idx",
]
