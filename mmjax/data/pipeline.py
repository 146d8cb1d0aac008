"""Image-classification input pipelines: random-access sources, grain shuffling/batching, augmentation, host sharding.

A *source* is random access (``len(src)``, ``src[i] -> {"image": uint8 [H, W, C], "label": int}``): an in-memory
:class:`ArraySource` (Fashion-MNIST from IDX files) or a TFDS ArrayRecord data source
(``tfds.builder(name).as_data_source(split)``, no TensorFlow needed). Both go through the same grain pipeline:

    order = MapDataset.range(N)[process_index::process_count]   # this host's share (HostShare)
        .shuffle(seed).repeat()                                 # a new permutation every epoch (seed + epoch)
    batch(step) = [src[order[step * b + j]] for j < b]          # b = global_batch // process_count; batches
        -> augment(batch, rng(seed, step))                      # cross epoch boundaries, none is dropped

so the batch of step ``s`` depends only on ``(seed, s)``: a resumed run reads exactly the batches an uninterrupted
run would have. Augmentation (random crop of a zero-padded image, horizontal flip) runs vectorised in numpy on the
uint8 batch; normalisation happens on the device (see the task). Evaluation batches keep the order, pad the last batch
to full size and mark real examples in ``batch["mask"]``. :class:`HostShare` (the sharding, shuffling and batching of
indices) and :func:`stack_records` serve the image-text pipeline (:mod:`mmjax.data.image_text`) too.

>>> import numpy as np
>>> src = ArraySource(np.zeros((10, 4, 4, 1), np.uint8), np.arange(10))
>>> b = next(train_batches(src, batch_size=4, seed=0, start_step=0))
>>> b["image"].shape, b["label"].dtype
((4, 4, 4, 1), dtype('int32'))
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import numpy as np

from mmjax.errors import ConfigError, UserError

EMBEDDED = ("fashion_mnist",)


class ArraySource:
    """Random-access source over in-memory arrays ``images uint8 [N, H, W, C]`` and ``labels int [N]``.

    >>> src = ArraySource(np.zeros((2, 3, 3, 1), np.uint8), np.array([4, 7]))
    >>> len(src), src[1]["label"]
    (2, 7)
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise UserError(f"ArraySource: images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise UserError(f"ArraySource: labels must have shape ({images.shape[0]},), got {labels.shape}")
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


class _TFDSRecords:
    """Adapts a TFDS data source to ``{"image": uint8 [H, W, C], "label": int}`` records."""

    def __init__(self, source, image_key: str = "image", label_key: str = "label"):
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        rec = self.source[i]
        image = np.asarray(rec[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image.astype(np.uint8), "label": int(rec[self.label_key])}


def tfds_source(name: str, split: str, data_dir: str | None = None):
    """A prepared TFDS image-classification dataset as ``(source, info)``, read with ``as_data_source`` (no TF).

    ``info`` is ``{"num_classes": int, "image_shape": (H, W, C)}``.

    Raises:
      FileNotFoundError: if the dataset is not prepared (with the command that prepares it).
      ValueError: if the dataset has no ``image``/``label`` features, or the split does not exist.

    Reading needs a prepared copy of a known TFDS dataset; an unknown name is refused:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     try:
    ...         tfds_source("no_such_dataset", "train", data_dir=d)
    ...     except ValueError as e:
    ...         print(str(e).split(";")[0])
    config.data.name='no_such_dataset': not a TFDS dataset (DatasetNotFoundError)
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError and friends
        raise UserError(
            f"config.data.name={name!r}: not a TFDS dataset ({type(e).__name__}); valid choices: "
            f"{list(EMBEDDED)} or a TFDS image-classification dataset name"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}: prepare it with "
            f"`tfds build {name} --file_format=array_record` (needs network) or pass "
            "`--config.data.data_dir=DIR` pointing at a prepared copy"
        )
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise UserError(f"TFDS dataset {name!r} has features {list(features)}; need 'image' and 'label'")
    if split not in builder.info.splits:
        raise UserError(
            f"config.data: TFDS dataset {name!r} has no split {split!r}; it has {list(builder.info.splits)}"
        )
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:
        raise UserError(
            f"TFDS dataset {name!r} in {builder.data_dir} cannot be read as a data source ({e}); it must be "
            "prepared with file_format='array_record'"
        ) from e
    info = {"num_classes": int(features["label"].num_classes), "image_shape": tuple(features["image"].shape)}
    return _TFDSRecords(source), info


def load_source(name: str, split: str, data_dir: str | None = None):
    """The source of ``split`` of dataset ``name`` as ``(source, info)``.

    ``"fashion_mnist"`` reads IDX files (``data_dir`` or the Debian package), falling back to a prepared TFDS copy;
    any other name is a TFDS dataset.

    >>> load_source("", "train")
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: config.data.name='' is not valid; valid choices: ['fashion_mnist'] or a TFDS name
    """
    if name == "fashion_mnist":
        from mmjax.data import fashion_mnist

        try:
            images, labels = fashion_mnist.load_fashion_mnist(split, data_dir)
            return ArraySource(images, labels), {"num_classes": 10, "image_shape": images.shape[1:]}
        except FileNotFoundError as idx_error:
            if data_dir:
                raise
            try:
                return tfds_source(name, split, None)
            except (FileNotFoundError, ValueError, ImportError):
                raise idx_error from None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config.data.name={name!r} is not valid; valid choices: {list(EMBEDDED)} or a TFDS name")
    return tfds_source(name, split, data_dir)


def augment_batch(images: np.ndarray, rng: np.random.Generator, crop_padding: int = 0, flip: bool = False):
    """Random crop after zero padding by ``crop_padding`` pixels, then random horizontal flip (p = 1/2), per example.

    Args:
      images: ``uint8 [B, H, W, C]``.
      rng: numpy generator (seeded from ``(seed, step)`` by the pipeline).

    >>> x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    >>> augment_batch(x, np.random.default_rng(0), crop_padding=1, flip=True).shape
    (2, 4, 4, 1)
    """
    b, h, w, _ = images.shape
    out = images
    if crop_padding > 0:
        p = crop_padding
        padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        dy = rng.integers(0, 2 * p + 1, size=b)
        dx = rng.integers(0, 2 * p + 1, size=b)
        rows = dy[:, None] + np.arange(h)[None, :]  # [B, H]
        cols = dx[:, None] + np.arange(w)[None, :]  # [B, W]
        out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        mask = rng.random(b) < 0.5
        out = np.where(mask[:, None, None, None], out[:, :, ::-1], out)
    return np.ascontiguousarray(out)


class HostShare:
    """This host's share of ``num_examples`` examples, batched: the one host-sharding code of mmjax's pipelines.

    Host ``process_index`` of ``process_count`` (``jax.process_index()`` / ``jax.process_count()`` by default) owns
    the examples ``process_index, process_index + process_count, ...`` and reads ``local_batch = batch_size //
    process_count`` of them per step. Training walks epochs of a shuffled order of the share (grain seeds each
    epoch with ``seed`` and the epoch number); evaluation walks the share in order, and every host yields the same
    number of batches (collectives need all hosts), the shorter shares ending in short or empty index lists.
    Both :func:`train_batches` here and :func:`mmjax.data.image_text.train_batches` batch through it.

    Args:
      num_examples: the size of the (global) source.
      batch_size: the global batch (all hosts together).
      process_index, process_count: this host and the number of hosts.
      name: how the batch size is named in errors (the config field).

    >>> share = HostShare(5, batch_size=4, process_index=1, process_count=2)
    >>> share.local_batch, share.indices.tolist(), list(share.eval_indices())
    (2, [1, 3], [[1, 3], []])
    >>> next(share.train_indices(seed=0, start_step=0))[1] in ([1, 3], [3, 1])
    True
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
        name: str = "config.batch_size",
    ):
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise UserError(
                f"process_index={self.process_index} must be in [0, process_count={self.process_count}); pass the "
                "index of this host (jax.process_index())."
            )
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"{name}={batch_size!r} must be a positive int (the global batch size).")
        if batch_size % self.process_count:
            raise UserError(
                f"{name}={batch_size} is not divisible by the number of hosts ({self.process_count}); use a "
                f"multiple of {self.process_count}."
            )
        self.num_examples, self.local_batch = int(num_examples), int(batch_size) // self.process_count
        share = grain.MapDataset.range(self.num_examples)
        self._share = share[self.process_index :: self.process_count] if self.process_count > 1 else share

    @property
    def indices(self) -> np.ndarray:
        """This host's example indices, in order (``int64 [share size]``)."""
        return np.arange(self.process_index, self.num_examples, self.process_count, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._share)

    def train_indices(self, seed: int, start_step: int = 0, order=None) -> Iterator[tuple[int, list[int]]]:
        """``(step, indices)`` from ``start_step`` on: the ``local_batch`` examples of each step (endless).

        Batches run through a shuffled, repeated order of the share (a function of ``seed`` only) and cross epoch
        boundaries; none is dropped. ``order`` replaces that order: anything with ``order[position] -> index``.
        """
        if len(self) == 0:
            raise UserError(
                f"the training source is empty (or this host's share of it is): {self.num_examples} examples for "
                f"{self.process_count} hosts; give a source with at least one example per host."
            )
        if order is None:
            order = self._share.shuffle(seed=int(seed) % 2**32).repeat(None)
        step, b = int(start_step), self.local_batch
        while True:
            yield step, [int(order[step * b + j]) for j in range(b)]
            step += 1

    def eval_indices(self) -> Iterator[list[int]]:
        """This host's evaluation batches of indices, in order; as many as the largest share needs on every host."""
        largest_share = -(-self.num_examples // self.process_count)  # ceil
        for start in range(0, largest_share, self.local_batch):
            yield [int(self._share[k]) for k in range(start, min(start + self.local_batch, len(self)))]


def stack_records(records: list[dict], exclude: tuple[str, ...] = ()) -> dict:
    """Records ``{"image": array, name: int, ...}`` -> a batch: images stacked, every other field ``int32 [B]``.

    Fields named in ``exclude`` are left out (the caller batches them).

    >>> b = stack_records([{"image": np.zeros((2, 2, 1), np.uint8), "label": 3}] * 2)
    >>> b["image"].shape, b["label"].tolist(), b["label"].dtype
    ((2, 2, 2, 1), [3, 3], dtype('int32'))
    """
    out = {"image": np.stack([r["image"] for r in records])}
    for key in records[0]:
        if key != "image" and key not in exclude:
            out[key] = np.asarray([r[key] for r in records], np.int32)
    return out


def padded_eval_batches(source, share: HostShare, pad: dict) -> Iterator[tuple[list[dict], np.ndarray]]:
    """``(records, mask)`` of each of ``share``'s evaluation batches, padded with ``pad`` to ``local_batch``.

    ``mask`` is ``float32 [local_batch]``, 1 for a real example and 0 for a padding record.

    >>> share = HostShare(3, batch_size=2, process_index=0, process_count=1)
    >>> [(len(r), m.tolist()) for r, m in padded_eval_batches([{"x": 1}] * 3, share, {"x": 0})]
    [(2, [1.0, 1.0]), (2, [1.0, 0.0])]
    """
    for indices in share.eval_indices():
        records = [source[i] for i in indices]
        real = len(records)
        records += [pad] * (share.local_batch - real)
        mask = np.concatenate([np.ones(real, np.float32), np.zeros(share.local_batch - real, np.float32)])
        yield records, mask


def train_batches(
    source,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    crop_padding: int = 0,
    flip: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """Yields this host's training batches ``{"image": uint8 [b, H, W, C], "label": int32 [b]}`` from ``start_step``.

    ``batch_size`` is the *global* batch; each of ``process_count`` hosts gets ``batch_size // process_count``
    examples of its own ``1 / process_count`` share of the data (:class:`HostShare`). Epochs are reshuffled (grain
    seeds each epoch with ``seed`` and the epoch number); the batch of step ``s`` is a function of ``(seed, s)`` only.

    >>> src = ArraySource(np.zeros((6, 2, 2, 1), np.uint8), np.arange(6))
    >>> it = train_batches(src, 4, seed=1)
    >>> sorted(next(it)["label"].tolist() + next(it)["label"].tolist()[:2]) == list(range(6))
    True
    """
    share = HostShare(len(source), batch_size, process_index, process_count)
    for step, indices in share.train_indices(seed, start_step):
        batch = stack_records([source[i] for i in indices])
        if crop_padding or flip:
            batch["image"] = augment_batch(batch["image"], np.random.default_rng([int(seed), step]), crop_padding, flip)
        yield batch


def eval_batches(
    source, batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> Iterator[dict]:
    """Yields this host's evaluation batches in order, the last one zero-padded, with ``mask`` (1 = real example).

    >>> src = ArraySource(np.zeros((5, 2, 2, 1), np.uint8), np.arange(5))
    >>> [b["mask"].sum() for b in eval_batches(src, 4)]
    [np.float32(4.0), np.float32(1.0)]
    """
    share = HostShare(len(source), batch_size, process_index, process_count, name="config.eval_batch_size")
    if len(source) == 0:
        return
    pad = {"image": np.zeros_like(np.asarray(source[0]["image"])), "label": 0}
    for records, mask in padded_eval_batches(source, share, pad):
        yield {**stack_records(records), "mask": mask}
