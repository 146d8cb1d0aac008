"""Fashion-MNIST (Xiao et al., 2017): 70k 28x28 grayscale images of 10 clothing classes, read from IDX files.

Where the files come from, in order:

1. ``data_dir`` when given (``--config.data.data_dir=DIR``): must hold the four files
   ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
2. the Debian/Ubuntu package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which puts
   them in ``/usr/share/datasets/fashion-mnist/``;
3. a prepared TFDS ``fashion_mnist`` (see :func:`mmjax.data.pipeline.tfds_source`), used by the pipeline when 1-2 fail.

IDX format (LeCun): a big-endian header ``0x00 0x00 <dtype code> <ndim>``, ``ndim`` big-endian uint32 sizes, then the
data. Images: ``uint8 [N, 28, 28]``; labels: ``uint8 [N]``.

>>> import numpy as np, tempfile, os
>>> d = tempfile.mkdtemp()
>>> write_idx(os.path.join(d, "x-idx1-ubyte"), np.arange(3, dtype=np.uint8))
>>> read_idx(os.path.join(d, "x-idx1-ubyte")).tolist()
[0, 1, 2]
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from mmjax.errors import UserError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = 10
SPLITS = {"train": ("train", 60000), "test": ("t10k", 10000)}
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/), "
    "or download the four IDX files (train/t10k images/labels, .gz or raw) into a directory and pass "
    "`--config.data.data_dir=DIR`, or prepare the TFDS dataset `fashion_mnist`"
)

_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (raw or ``.gz``) into a numpy array of its stored shape and dtype.

    Raises:
      ValueError: naming ``path`` if the magic number, header or data length is wrong (corrupt or truncated file).

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "labels-idx1-ubyte")
    ...     write_idx(path, np.array([3, 1, 4], np.uint8))
    ...     read_idx(path)
    array([3, 1, 4], dtype=uint8)
    """
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"IDX file {path} is corrupt or truncated ({type(e).__name__}: {e}); re-download it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise UserError(
            f"IDX file {path} has a bad magic number {raw[:4].hex() if raw else '(empty file)'}; "
            "expected 0000<dtype 08..0e><ndim>: the file is corrupt or not IDX"
        )
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"IDX file {path} is truncated: {len(raw)} bytes, header alone needs {header}")
    shape = tuple(int(x) for x in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(
            f"IDX file {path} is corrupt or truncated: {len(raw)} bytes, but its header {shape} ({dtype}) "
            f"needs {expected}; re-download it"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes ``array`` (uint8, any rank) as an IDX file (gzipped if ``path`` ends in ``.gz``); used by tests.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a-idx3-ubyte.gz")
    >>> write_idx(p, np.zeros((2, 3, 3), np.uint8)); read_idx(p).shape
    (2, 3, 3)
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise UserError(f"write_idx: array dtype must be uint8, got {array.dtype}")
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def _find(directory: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def find_files(split: str, data_dir: str | None = None) -> tuple[str, str]:
    """Paths of the (images, labels) IDX files of ``split`` ("train" or "test").

    Raises:
      FileNotFoundError: with installation instructions, if the files are not found.
      ValueError: for an unknown split.

    >>> find_files("train", "/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: Fashion-MNIST train files (...) not found in data_dir='/nonexistent': install it with ...
    """
    if split not in SPLITS:
        raise UserError(f"Fashion-MNIST split={split!r} is not valid; valid choices: {sorted(SPLITS)}")
    prefix = SPLITS[split][0]
    dirs = [data_dir] if data_dir else [DEBIAN_DIR]
    for d in dirs:
        images = _find(d, f"{prefix}-images-idx3-ubyte")
        labels = _find(d, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    where = f"data_dir={data_dir!r}" if data_dir else DEBIAN_DIR
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
        f"not found in {where}: {INSTALL_HINT}"
    )


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split as ``(images uint8 [N, 28, 28, 1], labels int32 [N])``.

    Args:
      split: ``"train"`` (60000) or ``"test"`` (10000).
      data_dir: directory with the IDX files; default the Debian package's directory.

    Raises:
      FileNotFoundError: if the files are missing (the message says how to install them).
      ValueError: naming the file if it is corrupt, truncated, or images and labels disagree.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> write_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"), np.zeros((3, 28, 28), np.uint8))
    >>> write_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), np.array([9, 0, 3], np.uint8))
    >>> images, labels = load_fashion_mnist("test", d)
    >>> images.shape, labels.tolist()
    ((3, 28, 28, 1), [9, 0, 3])
    """
    images_path, labels_path = find_files(split, data_dir)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"IDX file {images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise UserError(
            f"IDX files {images_path} and {labels_path} disagree: {images.shape[0]} images vs labels {labels.shape}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise UserError(f"IDX file {labels_path}: label {int(labels.max())} out of range [0, {NUM_CLASSES})")
    return images[..., None], labels.astype(np.int32)
