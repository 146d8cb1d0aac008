"""Fashion-MNIST detection canvases: 1 to ``max_items`` coloured items per image, each with its box and its phrase.

Every item is a real Fashion-MNIST image (28x28 grey), resized to one of the two sizes of :mod:`mmjax.data.captions`
(``SIZE_SCALES`` x 28 px on a 64 px canvas, scaled with the canvas), tinted with one of its 8 colours
(``pixel = round(v / 255 * rgb)``) and placed at a uniformly random position inside the canvas. Items are drawn in
order; a later item covers an earlier one where it has ink (grey > 0). Two items may overlap, but the IoU of their
boxes stays at most ``max_overlap`` (positions are redrawn until it does, then the item is dropped). An item's box
is the bounding box of its ink, ``x0, y0, x1, y1`` in pixels with exclusive ends (``x1 - x0`` is its width in
pixels), measured before other items cover it. Its phrase is ``"a {colour} {item}"`` (:data:`PHRASE_TEMPLATE`); its
label is the (item, colour) combination ``item * 8 + colour`` (:func:`combo_label`).

Mosaics (as OWL-ViT trains): with ``mosaic=m`` an image is an ``m x m`` grid of canvases of side ``image_size // m``
(black margin where ``image_size`` is not a multiple of ``m``), each with its own 1 to ``max_items`` items; boxes
are in the mosaic's pixels. ``mosaic_sizes`` / ``mosaic_probs`` draw ``m`` per image.

Held-out (colour, item) combinations (:data:`mmjax.data.captions.HELDOUT_COMBOS`) never appear in ``"train"``
(Fashion-MNIST train images) nor in ``"test"`` (test images); ``"heldout"`` (test images) shows only them.

>>> src = (np.full((4, 28, 28), 255, np.uint8), np.array([0, 7, 8, 9]))
>>> d = make_detection("train", 3, seed=0, source=src, max_items=2)
>>> d.images.shape, d.boxes.shape, d.valid.sum(axis=1).tolist()
((3, 64, 64, 3), (3, 2, 4), [2, 1, 1])
>>> phrase(d.item[0, 0], d.colour[0, 0]) == PHRASES[d.label[0, 0]]
True
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mmjax.data.captions import (
    COLOUR_NAMES,
    COLOUR_RGB,
    HELDOUT_COMBOS,
    ITEM_NAMES,
    SIZE_SCALES,
    _check_combos,
    _resize_matrix,
    _source,
)
from mmjax.errors import UserError

__all__ = [
    "PHRASE_TEMPLATE",
    "ITEM_PHRASE_TEMPLATE",
    "PHRASES",
    "ITEM_PHRASES",
    "DetectionCanvases",
    "make_detection",
    "combo_label",
    "phrase",
    "heldout_labels",
    "box_iou_matrix",
]

PHRASE_TEMPLATE = "a {colour} {item}"
ITEM_PHRASE_TEMPLATE = "a {item}"
NUM_COMBOS = len(ITEM_NAMES) * len(COLOUR_NAMES)
#: The 80 combination phrases in label order: ``PHRASES[combo_label(item, colour)]``.
PHRASES = tuple(PHRASE_TEMPLATE.format(colour=c, item=i) for i in ITEM_NAMES for c in COLOUR_NAMES)
#: The 10 item-only phrases in item order: "a t-shirt", ..., "a ankle boot" (the grammar stays "a").
ITEM_PHRASES = tuple(ITEM_PHRASE_TEMPLATE.format(item=i) for i in ITEM_NAMES)
_SPLITS = {"train": ("train", 10), "test": ("test", 11), "heldout": ("test", 12)}  # Fashion-MNIST split, rng stream


class DetectionCanvases(NamedTuple):
    """One set of detection canvases (``N`` images, at most ``K`` items each; rows past an image's items are
    padding, ``valid`` False).

    Attributes:
      images: ``uint8 [N, S, S, 3]``.
      boxes: ``float32 [N, K, 4]`` ``x0, y0, x1, y1`` in pixels (exclusive ends); zeros for padding.
      item, colour: ``int32 [N, K]`` indices into ``ITEM_NAMES`` / ``COLOUR_NAMES``; -1 for padding.
      label: ``int32 [N, K]`` the combination ``item * 8 + colour`` (index into :data:`PHRASES`); -1 for padding.
      valid: ``bool [N, K]``.
      mosaic: ``int32 [N]`` the mosaic side ``m`` of each image.

    >>> d = make_detection("test", 2, source=(np.full((2, 28, 28), 200, np.uint8), np.array([1, 2])), max_items=1)
    >>> d.label.tolist() == (d.item * 8 + d.colour).tolist(), d.valid.all()
    (True, np.True_)
    """

    images: np.ndarray
    boxes: np.ndarray
    item: np.ndarray
    colour: np.ndarray
    label: np.ndarray
    valid: np.ndarray
    mosaic: np.ndarray


def combo_label(item, colour):
    """The label of an (item, colour) combination: ``item * 8 + colour``.

    >>> int(combo_label(7, 0)), PHRASES[combo_label(7, 0)]
    (56, 'a red sneaker')
    """
    return np.asarray(item) * len(COLOUR_NAMES) + np.asarray(colour)


def phrase(item, colour) -> str:
    """The phrase of one item: ``"a {colour} {item}"``.

    >>> phrase(7, 0)
    'a red sneaker'
    """
    return PHRASE_TEMPLATE.format(colour=COLOUR_NAMES[int(colour)], item=ITEM_NAMES[int(item)])


def heldout_labels(heldout=HELDOUT_COMBOS) -> np.ndarray:
    """The labels of the held-out (colour, item) combinations, in the order given.

    >>> heldout_labels([("red", "sneaker"), ("blue", "bag")]).tolist()
    [56, 66]
    """
    return np.array(
        [combo_label(ITEM_NAMES.index(i), COLOUR_NAMES.index(c)) for c, i in _check_combos(heldout)], np.int64
    )


def box_iou_matrix(a, b) -> np.ndarray:
    """IoU of every box in ``a [N, 4]`` with every box in ``b [M, 4]`` (``x0, y0, x1, y1``): ``[N, M]`` float64,
    ``|a & b| / |a | b|`` (0 where both are empty).

    >>> box_iou_matrix([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2]]).round(4).tolist()
    [[0.1429, 1.0]]
    """
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _tint():
    return np.rint(np.arange(256, dtype=np.float32)[None, :, None] * (COLOUR_RGB[:, None, :] / 255.0)).astype(np.uint8)


def _ink_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the pixels with grey > 0 in ``grey [h, w]`` (exclusive ends); the whole frame if none."""
    rows, cols = np.flatnonzero(grey.any(axis=1)), np.flatnonzero(grey.any(axis=0))
    if rows.size == 0:
        return 0, 0, grey.shape[1], grey.shape[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_int(name, value, low):
    if int(value) != value or value < low:
        raise UserError(f"{name} must be an int >= {low}, got {value!r}.")
    return int(value)


def make_detection(
    split: str = "train",
    num_examples: int = 1000,
    seed=0,
    *,
    image_size: int = 64,
    min_items: int = 1,
    max_items: int = 4,
    max_overlap: float = 0.2,
    mosaic_sizes=(1,),
    mosaic_probs=None,
    heldout=HELDOUT_COMBOS,
    data_dir: str | None = None,
    source=None,
) -> DetectionCanvases:
    """Generates detection canvases deterministically from ``(seed, split)``; see the module docstring.

    Args:
      split: ``"train"``, ``"test"`` or ``"heldout"``.
      num_examples: how many images.
      seed: an int or a sequence of ints (e.g. ``(seed, step)`` for a fresh batch per training step).
      image_size: the side of an image in pixels (at least 16 per mosaic cell).
      min_items, max_items: items per canvas (per mosaic cell), drawn uniformly in ``[min_items, max_items]``.
      max_overlap: the largest IoU allowed between two items' boxes, in ``[0, 1]``.
      mosaic_sizes, mosaic_probs: mosaic sides ``m`` and their probabilities (uniform when ``None``).
      heldout: the (colour, item) name pairs kept out of ``"train"`` and ``"test"``.
      data_dir, source: as :func:`mmjax.data.captions.make_captions`.

    Returns:
      :class:`DetectionCanvases` with ``K = max_items * max(mosaic_sizes) ** 2``.

    Raises:
      ValueError: a bad split, count, size, overlap or mosaic value, named with what is expected.

    >>> src = (np.full((2, 28, 28), 255, np.uint8), np.array([7, 7]))
    >>> d = make_detection("heldout", 2, seed=1, source=src, max_items=1)  # sneakers: the held-out colour is red
    >>> [phrase(i, c) for i, c in zip(d.item[:, 0], d.colour[:, 0])]
    ['a red sneaker', 'a red sneaker']
    >>> x0, y0, x1, y1 = d.boxes[0, 0].astype(int)  # a white square item: its box is its square
    >>> int(x1 - x0), bool((d.images[0, y0:y1, x0:x1].max(-1) > 0).all())
    (21, True)
    >>> make_detection("train", 4, source=src, mosaic_sizes=(2,), max_items=1).boxes.shape  # 4 cells, 1 item each
    (4, 4, 4)
    """
    if split not in _SPLITS:
        raise UserError(f"split={split!r} is not valid; choose one of {sorted(_SPLITS)}.")
    n = _check_int("num_examples", num_examples, 0)
    min_items = _check_int("min_items", min_items, 1)
    max_items = _check_int("max_items", max_items, min_items)
    if not 0.0 <= float(max_overlap) <= 1.0:
        raise UserError(f"max_overlap must lie in [0, 1] (an IoU), got {max_overlap!r}.")
    sizes = [_check_int("mosaic_sizes entry", m, 1) for m in mosaic_sizes]
    if not sizes:
        raise UserError("mosaic_sizes must name at least one mosaic side, e.g. (1,) or (1, 2, 3).")
    probs = np.full(len(sizes), 1.0 / len(sizes)) if mosaic_probs is None else np.asarray(mosaic_probs, np.float64)
    if probs.shape != (len(sizes),) or (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
        raise UserError(
            f"mosaic_probs={mosaic_probs!r} must be {len(sizes)} non-negative numbers summing to 1 (one per "
            f"mosaic size {tuple(sizes)})."
        )
    if int(image_size) // max(sizes) < 16:
        raise UserError(
            f"image_size={image_size} gives mosaic cells of {int(image_size) // max(sizes)} px for mosaic size "
            f"{max(sizes)}; cells need at least 16 px (raise image_size or lower the mosaic sizes)."
        )
    image_size = int(image_size)
    combos = _check_combos(heldout)
    held = np.zeros((len(ITEM_NAMES), len(COLOUR_NAMES)), bool)
    for c, i in combos:
        held[ITEM_NAMES.index(i), COLOUR_NAMES.index(c)] = True
    allowed = held if split == "heldout" else ~held
    images, labels = _source(split, data_dir, source)
    pool = np.flatnonzero(allowed.any(axis=1)[labels])
    if pool.size == 0 and n:
        raise UserError(f"split {split!r} has no usable source image among {len(labels)} (held-out: {combos}).")
    counts = allowed.sum(axis=1)
    cum = np.cumsum(allowed, axis=1)
    tint = _tint()
    seed_words = [int(s) for s in np.atleast_1d(seed)]
    rng = np.random.default_rng([*seed_words, _SPLITS[split][1]])

    K = max_items * max(sizes) ** 2
    out_images = np.zeros((n, image_size, image_size, 3), np.uint8)
    boxes = np.zeros((n, K, 4), np.float32)
    item = np.full((n, K), -1, np.int32)
    colour = np.full((n, K), -1, np.int32)
    mosaic = np.asarray(sizes, np.int32)[rng.choice(len(sizes), size=n, p=probs)] if n else np.zeros(0, np.int32)
    resize_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for e in range(n):
        m = int(mosaic[e])
        cell = image_size // m
        k = 0
        for cy in range(m):
            for cx in range(m):
                placed: list[tuple[int, int, int, int]] = []
                for _ in range(int(rng.integers(min_items, max_items + 1))):
                    src = int(pool[rng.integers(pool.size)])
                    it = int(labels[src])
                    col = int(np.argmax(cum[it] > np.floor(rng.random() * counts[it])))
                    side = max(4, int(round(28 * SIZE_SCALES[int(rng.integers(len(SIZE_SCALES)))] * cell / 64)))
                    if side not in resize_cache:
                        resize_cache[side] = (
                            _resize_matrix(images.shape[1], side),
                            _resize_matrix(images.shape[2], side),
                        )
                    rh, rw = resize_cache[side]
                    grey = np.clip(np.rint(rh @ images[src].astype(np.float32) @ rw.T), 0, 255).astype(np.uint8)
                    ix0, iy0, ix1, iy1 = _ink_box(grey)
                    for _attempt in range(20):
                        top, left = (int(v) for v in rng.integers(0, cell - side + 1, size=2))
                        box = (left + ix0, top + iy0, left + ix1, top + iy1)
                        if not placed or box_iou_matrix([box], placed).max() <= max_overlap:
                            break
                    else:
                        continue  # no free place for it: drop this item
                    placed.append(box)
                    oy, ox = cy * cell + top, cx * cell + left
                    region = out_images[e, oy : oy + side, ox : ox + side]
                    region[...] = np.where(grey[..., None] > 0, tint[col][grey], region)
                    boxes[e, k] = (cx * cell + box[0], cy * cell + box[1], cx * cell + box[2], cy * cell + box[3])
                    item[e, k], colour[e, k] = it, col
                    k += 1
    valid = item >= 0
    label = np.where(valid, combo_label(item, colour), -1).astype(np.int32)
    return DetectionCanvases(out_images, boxes, item, colour, label, valid, mosaic)
