"""Fashion-MNIST captions: real clothing items, coloured, sized and placed on a canvas, with a caption.

Each example takes one Fashion-MNIST image (28x28 grey), resizes it to a size, tints it with a colour, and places
it at a position on a black RGB canvas (64x64 by default). Its caption names the attributes::

    "a small red sneaker in the top left"        (CAPTION_TEMPLATE = "a {size} {colour} {item} in the {position}")

Attributes: 10 items (the Fashion-MNIST classes), 8 colours, 2 sizes, 5 positions. Everything is decided by
``seed`` and generated with vectorised NumPy (60 000 examples take a few seconds).

Compositional generalisation: a set of (colour, item) combinations (:data:`HELDOUT_COMBOS`, one colour per item)
never occurs in the ``"train"`` split, although every colour and every item does, with other partners. The
``"heldout"`` split is made of test images showing only those combinations; ``"test"`` holds test images with
the combinations seen in training. Zero-shot accuracy on ``"heldout"`` therefore measures whether a model
composes "red" and "sneaker" without having seen a red sneaker.

Zero-shot classes and prompts: :data:`ATTRIBUTES` (names per attribute) and :data:`ZERO_SHOT_TEMPLATES`
(prompt templates per attribute), usable with :func:`mmjax.evaluate.zero_shot_classifier`.

>>> imgs = np.full((4, 28, 28), 255, np.uint8)
>>> data = make_captions("train", 3, seed=0, source=(imgs, np.array([0, 7, 8, 9])))
>>> data.images.shape, data.images.dtype, len(data.captions)
((3, 64, 64, 3), dtype('uint8'), 3)
>>> data.captions[0] == caption(data.item[0], data.colour[0], data.size[0], data.position[0])
True
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mmjax.data.fashion_mnist import load_fashion_mnist
from mmjax.errors import UserError

__all__ = [
    "ITEM_NAMES",
    "COLOUR_NAMES",
    "COLOUR_RGB",
    "SIZE_NAMES",
    "SIZE_SCALES",
    "POSITION_NAMES",
    "ATTRIBUTES",
    "HELDOUT_COMBOS",
    "CAPTION_TEMPLATE",
    "FULL_CAPTION_TEMPLATE",
    "LAYOUTS",
    "ZERO_SHOT_TEMPLATES",
    "CaptionedImages",
    "caption",
    "make_captions",
    "render",
    "render_full",
    "item_boxes",
    "measure_attributes",
    "combo_names",
]

ITEM_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
COLOUR_NAMES = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "white")
COLOUR_RGB = np.array(
    [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [0, 255, 255],
        [255, 0, 255],
        [255, 128, 0],
        [255, 255, 255],
    ],
    np.uint8,
)
SIZE_NAMES = ("small", "large")
SIZE_SCALES = (0.75, 1.25)  # x 28 px on a 64 px canvas: 21 px and 35 px items
POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right", "center")
ATTRIBUTES = {"item": ITEM_NAMES, "colour": COLOUR_NAMES, "size": SIZE_NAMES, "position": POSITION_NAMES}

# One held-out colour per item; every colour stays in training with at least 8 other items.
HELDOUT_COMBOS = (
    ("yellow", "t-shirt"),
    ("magenta", "trouser"),
    ("red", "pullover"),
    ("green", "dress"),
    ("orange", "coat"),
    ("white", "sandal"),
    ("blue", "shirt"),
    ("red", "sneaker"),
    ("blue", "bag"),
    ("cyan", "ankle boot"),
)

CAPTION_TEMPLATE = "a {size} {colour} {item} in the {position}"
FULL_CAPTION_TEMPLATE = "a {colour} {item}"  # layout="full": the item fills the canvas; no size, no position
LAYOUTS = ("canvas", "full")


def _caption_templates(attribute: str) -> tuple[str, ...]:
    """Prompts in the caption grammar with ``{}`` for ``attribute``, one per value of every other attribute."""
    if attribute == "combo":  # "{colour} {item}" fills the slot of the colour and the item together
        return tuple(f"a {s} {{}} in the {p}" for s in SIZE_NAMES for p in POSITION_NAMES)
    slots = {a: ("{}",) if a == attribute else ATTRIBUTES[a] for a in ATTRIBUTES}
    return tuple(
        CAPTION_TEMPLATE.format(size=s, colour=c, item=i, position=p)
        for s in slots["size"]
        for c in slots["colour"]
        for i in slots["item"]
        for p in slots["position"]
    )


# Zero-shot prompts per attribute, ensembled over the other (nuisance) attributes: the class embedding of "sneaker"
# is the mean of the normalised embeddings of "a small red sneaker in the top left", ... (2 x 8 x 5 = 80 prompts),
# as CLIP ensembles its 80 ImageNet templates. "combo" classes come from combo_names(): "red sneaker".
ZERO_SHOT_TEMPLATES = {a: _caption_templates(a) for a in (*ATTRIBUTES, "combo")}

SPLITS = {"train": ("train", 0), "test": ("test", 1), "heldout": ("test", 2)}  # (Fashion-MNIST split, rng stream)


class CaptionedImages(NamedTuple):
    """One split of the captions dataset (``N`` examples).

    Attributes:
      images: ``uint8 [N, H, W, 3]``.
      captions: ``N`` strings, ``CAPTION_TEMPLATE`` filled with the attribute names.
      item, colour, size, position: ``int32 [N]`` indices into ``ITEM_NAMES``, ``COLOUR_NAMES``, ``SIZE_NAMES``,
        ``POSITION_NAMES``.
      source_index: ``int32 [N]`` row of the Fashion-MNIST split the item was taken from.

    >>> src = (np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 7]))
    >>> data = make_captions("train", 3, source=src, image_size=32)
    >>> data.images.shape, len(data.captions), data.item.dtype, sorted(data.source_index.tolist())
    ((3, 32, 32, 3), 3, dtype('int32'), [0, 1, 2])
    >>> data.captions[0] == caption(data.item[0], data.colour[0], data.size[0], data.position[0])
    True
    """

    images: np.ndarray
    captions: list
    item: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    position: np.ndarray
    source_index: np.ndarray


def caption(item, colour, size, position) -> str:
    """The caption of one example from attribute indices.

    >>> caption(7, 0, 0, 0)
    'a small red sneaker in the top left'
    """
    return CAPTION_TEMPLATE.format(
        size=SIZE_NAMES[int(size)],
        colour=COLOUR_NAMES[int(colour)],
        item=ITEM_NAMES[int(item)],
        position=POSITION_NAMES[int(position)],
    )


def parse_caption(text: str) -> dict[str, int]:
    """The attribute indices a (generated) caption names: ``{"item", "colour", "size", "position"}``, -1 where it
    names none. Words are compared after :meth:`mmjax.tokenizer.WordTokenizer.split` (so ``"t - shirt"``, as a word
    tokenizer decodes it, is ``"t-shirt"``); each attribute is read on its own (the first size and colour word, the
    item and position names that occur, the longest when several do), so a caption off the grammar in one place
    still counts for the attributes it gets right.

    >>> parse_caption("a small red sneaker in the top left")
    {'item': 7, 'colour': 0, 'size': 0, 'position': 0}
    >>> parse_caption("a large white t - shirt in the")
    {'item': 0, 'colour': 7, 'size': 1, 'position': -1}
    """
    from mmjax.tokenizer import WordTokenizer

    words = WordTokenizer.split(text)

    def find(names):
        best, best_len = -1, 0
        for index, name in enumerate(names):
            target = WordTokenizer.split(name)
            n = len(target)
            if n > best_len and any(words[i : i + n] == target for i in range(len(words) - n + 1)):
                best, best_len = index, n
        return best

    position_words = words[words.index("the") + 1 :] if "the" in words else []
    position = -1
    for index, name in enumerate(POSITION_NAMES):
        if position_words == WordTokenizer.split(name):
            position = index
    return {"item": find(ITEM_NAMES), "colour": find(COLOUR_NAMES), "size": find(SIZE_NAMES), "position": position}


def combo_names(combos=HELDOUT_COMBOS) -> list[str]:
    """Class names ``"colour item"`` for zero-shot classification over (colour, item) combinations.

    >>> combo_names([("red", "sneaker")])
    ['red sneaker']
    """
    return [f"{c} {i}" for c, i in _check_combos(combos)]


def _check_combos(combos):
    combos = [tuple(c) for c in combos]
    for c in combos:
        if len(c) != 2 or c[0] not in COLOUR_NAMES or c[1] not in ITEM_NAMES:
            raise UserError(
                f"held-out combination {c!r} must be (colour, item) with colour in {COLOUR_NAMES} and item in "
                f"{ITEM_NAMES}."
            )
    return combos


def _resize_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` rows of triangle-filter weights (bilinear when enlarging, area-like when shrinking)."""
    support = max(src / dst, 1.0)
    centres = (np.arange(dst) + 0.5) * src / dst - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(src)[None, :] - centres[:, None]) / support)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def item_boxes(image_size: int = 64) -> np.ndarray:
    """``int [num_sizes, num_positions, 4]`` boxes ``(top, left, height, width)`` where items are drawn.

    >>> item_boxes(64)[0, 0].tolist(), item_boxes(64)[1, 4].tolist()  # small top left, large center
    ([2, 2, 21, 21], [14, 14, 35, 35])
    """
    margin = max(1, round(image_size / 32))
    boxes = np.zeros((len(SIZE_SCALES), len(POSITION_NAMES), 4), np.int64)
    for s, scale in enumerate(SIZE_SCALES):
        side = int(round(28 * scale * image_size / 64))
        far = image_size - margin - side
        mid = (image_size - side) // 2
        corners = [(margin, margin), (margin, far), (far, margin), (far, far), (mid, mid)]
        for p, (top, left) in enumerate(corners):
            boxes[s, p] = (top, left, side, side)
    return boxes


def render(items, colour, size, position, image_size: int = 64) -> np.ndarray:
    """Draws grey items onto black RGB canvases.

    ``pixel = round(v / 255 * COLOUR_RGB[colour])`` inside the item's box (:func:`item_boxes`), where ``v`` is the
    item resized (triangle filter) to the box and rounded to a grey level in ``[0, 255]``; 0 elsewhere.

    Args:
      items: ``uint8 [N, h, w]`` or ``[N, h, w, 1]`` grey images.
      colour, size, position: ``int [N]`` attribute indices.
      image_size: canvas side in pixels (at least 16).

    Returns:
      ``uint8 [N, image_size, image_size, 3]``.

    >>> render(np.full((1, 28, 28), 255, np.uint8), [2], [0], [4])[0, 32, 32].tolist()  # blue, centre
    [0, 0, 255]
    """
    items = np.asarray(items)
    if items.ndim == 4 and items.shape[-1] == 1:
        items = items[..., 0]
    if items.ndim != 3:
        raise UserError(f"items must be grey images [N, h, w] or [N, h, w, 1], got shape {items.shape}.")
    n = items.shape[0]
    attrs = {}
    for name, values, names in (
        ("colour", colour, COLOUR_NAMES),
        ("size", size, SIZE_NAMES),
        ("position", position, POSITION_NAMES),
    ):
        values = np.asarray(values)
        if values.shape != (n,) or not np.issubdtype(values.dtype, np.integer):
            raise UserError(f"{name} must be int [{n}] (one per item), got {values.dtype} {values.shape}.")
        if n and (values.min() < 0 or values.max() >= len(names)):
            raise UserError(f"{name} indices must lie in [0, {len(names)}), got [{values.min()}, {values.max()}].")
        attrs[name] = values
    if int(image_size) < 16:
        raise UserError(f"image_size must be at least 16 pixels, got {image_size}.")
    canvas = np.zeros((n, image_size, image_size, 3), np.uint8)
    # tint[c, v] = round(v / 255 * COLOUR_RGB[c]) for every grey level v: one gather colours a whole group
    tint = np.rint(np.arange(256, dtype=np.float32)[None, :, None] * (COLOUR_RGB[:, None, :] / 255.0))
    tint = tint.astype(np.uint8)
    boxes = item_boxes(image_size)
    for s in range(len(SIZE_NAMES)):
        in_size = np.flatnonzero(attrs["size"] == s)
        if not in_size.size:
            continue
        side = int(boxes[s, 0, 2])
        rh, rw = _resize_matrix(items.shape[1], side), _resize_matrix(items.shape[2], side)
        grey = np.matmul(np.matmul(rh, items[in_size].astype(np.float32)), rw.T)  # [m, side, side]
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        tinted = tint[attrs["colour"][in_size][:, None, None], grey]  # [m, side, side, 3]
        for p in range(len(POSITION_NAMES)):
            here = attrs["position"][in_size] == p
            top, left = int(boxes[s, p, 0]), int(boxes[s, p, 1])
            canvas[in_size[here], top : top + side, left : left + side] = tinted[here]
    return canvas


def render_full(items, colour, image_size: int = 28) -> np.ndarray:
    """Items resized (triangle filter) to fill an ``image_size`` canvas and tinted: ``round(v / 255 * rgb)``.

    The ``layout="full"`` rendering of :func:`make_captions`; ``items uint8 [N, h, w]``, ``colour int [N]``;
    returns ``uint8 [N, image_size, image_size, 3]``.

    >>> render_full(np.full((1, 28, 28), 255, np.uint8), [5])[0, 0, 0].tolist()  # magenta
    [255, 0, 255]
    """
    items = np.asarray(items)
    if items.ndim == 4 and items.shape[-1] == 1:
        items = items[..., 0]
    colour = np.asarray(colour)
    if items.ndim != 3 or colour.shape != (items.shape[0],) or not np.issubdtype(colour.dtype, np.integer):
        raise UserError(
            f"render_full needs grey items [N, h, w] and int colour [N], got {items.shape} and {colour.dtype} "
            f"{colour.shape}."
        )
    if items.shape[0] and (colour.min() < 0 or colour.max() >= len(COLOUR_NAMES)):
        raise UserError(f"colour indices must lie in [0, {len(COLOUR_NAMES)}), got [{colour.min()}, {colour.max()}].")
    if int(image_size) < 8:
        raise UserError(f"image_size must be at least 8 pixels, got {image_size}.")
    rh, rw = _resize_matrix(items.shape[1], int(image_size)), _resize_matrix(items.shape[2], int(image_size))
    grey = np.clip(np.rint(np.matmul(np.matmul(rh, items.astype(np.float32)), rw.T)), 0, 255).astype(np.uint8)
    tint = np.rint(np.arange(256, dtype=np.float32)[None, :, None] * (COLOUR_RGB[:, None, :] / 255.0))
    return tint.astype(np.uint8)[colour[:, None, None], grey]


def measure_attributes(images, threshold: float = 0.25) -> dict[str, np.ndarray]:
    """Reads colour, size and position back from canvases: the inverse of :func:`render`, for generated images.

    A pixel belongs to the item where its brightness ``v = max(R, G, B)`` exceeds ``threshold`` times the image's
    brightest pixel. Its *colour* is the palette entry (:data:`COLOUR_RGB`, scaled to ``[0, 1]``) nearest to the
    brightness-weighted mean chroma ``sum(v * rgb / v) / sum(v)`` of those pixels (rendering multiplies one grey
    level by one colour, so ``rgb / max(rgb)`` is the colour at every pixel of a real item). Its *size and position*
    are those of the box of :func:`item_boxes` nearest to the item pixels' bounding box: the size whose side is
    nearest (in ratio) to the bounding box's longer side, then the position whose centre is nearest to its centre
    (Fashion-MNIST items are centred in their frame and span it along their longer side).

    Args:
      images: ``[N, S, S, 3]`` canvases, ``uint8`` or floats in ``[0, 255]`` (a generator's ``[-1, 1]`` output
        rescaled as ``(x + 1) * 127.5``).
      threshold: item pixels are those brighter than this fraction of the brightest pixel.

    Returns:
      ``{"colour": int [N], "size": int [N], "position": int [N]}`` (indices into :data:`COLOUR_NAMES`,
      :data:`SIZE_NAMES`, :data:`POSITION_NAMES`). An all-black image gets colour, size and position ``-1``.

    >>> imgs = render(np.full((2, 28, 28), 200, np.uint8), [0, 6], [0, 1], [1, 4])
    >>> {k: v.tolist() for k, v in measure_attributes(imgs).items()}
    {'colour': [0, 6], 'size': [0, 1], 'position': [1, 4]}
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise UserError(f"images must be square RGB canvases [N, S, S, 3], got shape {images.shape}.")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise UserError(f"images must be uint8 or float in [0, 255], got dtype {images.dtype}.")
    if not 0.0 < float(threshold) < 1.0:
        raise UserError(f"threshold must lie in (0, 1), got {threshold}.")
    x = np.clip(images.astype(np.float64), 0.0, 255.0) / 255.0
    v = x.max(axis=-1)  # [N, S, S]
    peak = v.reshape(len(v), -1).max(axis=1) if len(v) else np.zeros(0)
    mask = (v > threshold * peak[:, None, None]) & (peak[:, None, None] > 0)
    weight = np.where(mask, v, 0.0)
    chroma = x / np.maximum(v, 1e-12)[..., None]  # rgb / max(rgb): the colour, whatever the grey level
    mass = weight.sum(axis=(1, 2))
    mean_chroma = (weight[..., None] * chroma).sum(axis=(1, 2)) / np.maximum(mass, 1e-12)[:, None]
    palette = COLOUR_RGB.astype(np.float64) / 255.0
    colour = np.argmin(((mean_chroma[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    boxes = item_boxes(images.shape[1])  # [sizes, positions, 4] (top, left, h, w)
    rows, cols = mask.any(axis=2), mask.any(axis=1)  # [N, S]
    idx = np.arange(images.shape[1])
    first = lambda m: np.where(m.any(1), np.argmax(m, axis=1), 0)
    last = lambda m: np.where(m.any(1), len(idx) - 1 - np.argmax(m[:, ::-1], axis=1), 0)
    top, bottom, left, right = first(rows), last(rows), first(cols), last(cols)
    extent = np.maximum(bottom - top, right - left) + 1.0  # the item's longer side, in pixels
    sides = boxes[:, 0, 2].astype(np.float64)
    size = np.argmin(np.abs(np.log(extent[:, None] / sides[None, :])), axis=1)
    centre = np.stack([(top + bottom) / 2.0, (left + right) / 2.0], axis=1)  # [N, 2]
    box_centres = boxes[..., :2] + (boxes[..., 2:] - 1) / 2.0  # [sizes, positions, 2]
    position = np.argmin(((centre[:, None, :] - box_centres[size]) ** 2).sum(-1), axis=1)
    empty = mass <= 0
    out = {"colour": colour, "size": size, "position": position}
    return {k: np.where(empty, -1, a).astype(np.int64) for k, a in out.items()}


def _source(split, data_dir, source):
    if source is None:
        images, labels = load_fashion_mnist(SPLITS[split][0], data_dir)
    else:
        images, labels = (np.asarray(a) for a in source)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"source images must be uint8 [N, h, w], got {images.dtype} {images.shape}.")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"source labels must be int [{images.shape[0]}], got {labels.dtype} {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(ITEM_NAMES)):
        raise UserError(f"source labels must lie in [0, {len(ITEM_NAMES)}), got [{labels.min()}, {labels.max()}].")
    return images, labels.astype(np.int64)


def make_captions(
    split: str = "train",
    num_examples: int | None = None,
    seed: int = 0,
    *,
    image_size: int = 64,
    heldout=HELDOUT_COMBOS,
    data_dir: str | None = None,
    source=None,
    layout: str = "canvas",
) -> CaptionedImages:
    """Generates one split of Fashion-MNIST captions, deterministically from ``seed``.

    Args:
      split: ``"train"`` (Fashion-MNIST train images, never a held-out combination), ``"test"`` (test images,
        combinations seen in training) or ``"heldout"`` (test images, only the held-out combinations; items
        without a held-out colour are left out).
      num_examples: how many; default one per usable source image (each used once). More than that reuses
        source images (drawn with replacement).
      seed: the same ``(seed, split)`` always gives the same examples; splits use separate random streams.
      image_size: canvas side (64 by default).
      heldout: the (colour, item) name pairs kept out of training.
      data_dir: Fashion-MNIST IDX directory (default: the Debian package's, see
        :mod:`mmjax.data.fashion_mnist`).
      source: optional ``(images uint8 [M, 28, 28], labels int [M])`` used instead of reading files.
      layout: ``"canvas"`` (items of 2 sizes at 5 positions, :data:`CAPTION_TEMPLATE`) or ``"full"`` (the item
        resized to fill the whole canvas, captioned :data:`FULL_CAPTION_TEMPLATE` "a red sneaker"; ``size`` and
        ``position`` are ``-1``). Items and colours are the same in both layouts for the same seed.

    Returns:
      :class:`CaptionedImages`.

    Raises:
      ValueError: for an unknown split or layout, bad ``heldout`` names, a negative ``num_examples``, or when the
        split has no usable source image.

    >>> src = (np.full((2, 28, 28), 255, np.uint8), np.array([7, 0]))
    >>> held = make_captions("heldout", 2, seed=0, source=src)  # only sneakers have a held-out colour: red
    >>> held.captions[0].split()[2:4], held.images.shape
    (['red', 'sneaker'], (2, 64, 64, 3))
    >>> full = make_captions("heldout", 2, seed=0, source=src, image_size=28, layout="full")
    >>> full.captions[0], full.size.tolist(), full.images[0, :, :, 0].min()  # the white item fills the canvas
    ('a red sneaker', [-1, -1], np.uint8(255))
    """
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not valid; choose one of {sorted(SPLITS)}.")
    if layout not in LAYOUTS:
        raise UserError(f"layout={layout!r} is not valid; choose one of {LAYOUTS}.")
    if num_examples is not None and (int(num_examples) != num_examples or num_examples < 0):
        raise UserError(f"num_examples must be a non-negative int or None, got {num_examples!r}.")
    combos = _check_combos(heldout)
    held = np.zeros((len(ITEM_NAMES), len(COLOUR_NAMES)), bool)
    for c, i in combos:
        held[ITEM_NAMES.index(i), COLOUR_NAMES.index(c)] = True
    allowed = held if split == "heldout" else ~held  # [item, colour]
    images, labels = _source(split, data_dir, source)

    rng = np.random.default_rng([int(seed), SPLITS[split][1]])
    pool = np.flatnonzero(allowed.any(axis=1)[labels])
    if pool.size == 0 and num_examples != 0:
        raise UserError(
            f"split {split!r} has no usable source image: no label of the {len(labels)} source images has an "
            f"allowed colour (held-out combinations: {combos})."
        )
    n = pool.size if num_examples is None else int(num_examples)
    if n <= pool.size:
        index = pool[rng.permutation(pool.size)[:n]]
    else:
        index = pool[rng.integers(0, pool.size, n)]
    item = labels[index]
    # colour: uniform over the colours allowed for the item, via the k-th True of its row
    counts = allowed.sum(axis=1)
    k = np.floor(rng.random(n) * counts[item]).astype(np.int64)
    colour = np.argmax(np.cumsum(allowed, axis=1)[item] > k[:, None], axis=1)
    size = rng.integers(0, len(SIZE_NAMES), n)
    position = rng.integers(0, len(POSITION_NAMES), n)

    if layout == "full":
        out = render_full(images[index], colour, image_size)
        captions = [
            FULL_CAPTION_TEMPLATE.format(colour=COLOUR_NAMES[c], item=ITEM_NAMES[i]) for i, c in zip(item, colour)
        ]
        size, position = np.full(n, -1), np.full(n, -1)
    else:
        out = render(images[index], colour, size, position, image_size)
        captions = [caption(*a) for a in zip(item.tolist(), colour.tolist(), size.tolist(), position.tolist())]
    as32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return CaptionedImages(out, captions, as32(item), as32(colour), as32(size), as32(position), as32(index))
