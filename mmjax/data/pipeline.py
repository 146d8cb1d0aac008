"""Image-classification input pipelines: random-access sources, grain shuffling/batching, augmentation, host sharding.

A *source* is random access (``len(src)``, ``src[i] -> {"image": uint8 [H, W, C], "label": int}``): an in-memory
:class:`ArraySource` (Fashion-MNIST from IDX files) or a TFDS ArrayRecord data source
(``tfds.builder(name).as_data_source(split)``, no TensorFlow needed). Both go through the same grain pipeline:

    MapDataset.source(src)[process_index::process_count]   # this host's share
        .shuffle(seed).repeat()                            # a new permutation every epoch (seed + epoch)
        .batch(global_batch // process_count)              # batches cross epoch boundaries; none is dropped
    batch(step) = dataset[step]  ->  augment(batch, rng(seed, step))

so the batch of step ``s`` depends only on ``(seed, s)``: a resumed run reads exactly the batches an uninterrupted
run would have. Augmentation (random crop of a zero-padded image, horizontal flip) runs vectorised in numpy on the
uint8 batch; normalisation happens on the device (see the task). Evaluation batches keep the order, pad the last batch
to full size and mark real examples in ``batch["mask"]``.

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
            raise ValueError(f"ArraySource: images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"ArraySource: labels must have shape ({images.shape[0]},), got {labels.shape}")
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
        raise ValueError(
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
        raise ValueError(f"TFDS dataset {name!r} has features {list(features)}; need 'image' and 'label'")
    if split not in builder.info.splits:
        raise ValueError(
            f"config.data: TFDS dataset {name!r} has no split {split!r}; it has {list(builder.info.splits)}"
        )
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:
        raise ValueError(
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
    ValueError: config.data.name='' is not valid; valid choices: ['fashion_mnist'] or a TFDS name
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
        raise ValueError(f"config.data.name={name!r} is not valid; valid choices: {list(EMBEDDED)} or a TFDS name")
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


def _host_share(ds, process_index: int | None, process_count: int | None):
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return (ds[index::count] if count > 1 else ds), count


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
    examples of its own ``1 / process_count`` share of the data. Epochs are reshuffled (grain seeds each epoch with
    ``seed`` and the epoch number); the batch of step ``s`` is a function of ``(seed, s)`` only.

    >>> src = ArraySource(np.zeros((6, 2, 2, 1), np.uint8), np.arange(6))
    >>> it = train_batches(src, 4, seed=1)
    >>> sorted(next(it)["label"].tolist() + next(it)["label"].tolist()[:2]) == list(range(6))
    True
    """
    ds, count = _host_share(grain.MapDataset.source(source), process_index, process_count)
    if batch_size % count:
        raise ValueError(f"config.batch_size={batch_size} is not divisible by the number of hosts ({count})")
    local = batch_size // count
    if len(ds) == 0:
        raise ValueError("the training source is empty")
    ds = ds.shuffle(seed=int(seed) % 2**32).repeat(None).batch(local, drop_remainder=True)
    step = int(start_step)
    while True:
        batch = ds[step]
        images = np.asarray(batch["image"])
        if crop_padding or flip:
            images = augment_batch(images, np.random.default_rng([int(seed), step]), crop_padding, flip)
        yield {"image": images, "label": np.asarray(batch["label"], np.int32)}
        step += 1


def eval_batches(
    source, batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> Iterator[dict]:
    """Yields this host's evaluation batches in order, the last one zero-padded, with ``mask`` (1 = real example).

    >>> src = ArraySource(np.zeros((5, 2, 2, 1), np.uint8), np.arange(5))
    >>> [b["mask"].sum() for b in eval_batches(src, 4)]
    [np.float32(4.0), np.float32(1.0)]
    """
    ds, count = _host_share(grain.MapDataset.source(source), process_index, process_count)
    if batch_size % count:
        raise ValueError(f"config.eval_batch_size={batch_size} is not divisible by the number of hosts ({count})")
    local = batch_size // count
    n = len(ds)
    # Every host yields the same number of batches (collectives need all hosts): pad up to the largest share.
    largest_share = -(-len(source) // count)  # ceil
    num_batches = -(-largest_share // local)
    batched = ds.batch(local, drop_remainder=False)
    for i in range(num_batches):
        if i < len(batched):
            b = batched[i]
            images, labels = np.asarray(b["image"]), np.asarray(b["label"], np.int32)
        else:
            first = ds[0] if n else source[0]
            images = np.zeros((0,) + np.shape(first["image"]), np.uint8)
            labels = np.zeros((0,), np.int32)
        real = labels.shape[0]
        pad = local - real
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
        mask = np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])
        yield {"image": images, "label": labels, "mask": mask}
