"""Fashion-MNIST detection canvases (mmjax.data.detection): each box is exactly its item's ink, overlaps stay within
the set IoU, held-out combinations stay out of training, mosaics keep boxes in their cells, bad values are refused."""

import numpy as np
import pytest

from mmjax.data import detection as dd
from mmjax.data.captions import COLOUR_NAMES, COLOUR_RGB, ITEM_NAMES


@pytest.fixture(scope="module")
def source():
    """Small synthetic items of every class: a filled ellipse (its ink box is known) at varying grey levels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    images, labels = [], []
    for k in range(40):
        a, b = rng.integers(5, 13, size=2)
        ink = ((yy - 13.5) / a) ** 2 + ((xx - 13.5) / b) ** 2 <= 1
        images.append(np.where(ink, rng.integers(80, 256), 0).astype(np.uint8))
        labels.append(k % len(ITEM_NAMES))
    return np.stack(images), np.array(labels)


def test_a_single_item_box_is_the_bounding_box_of_its_ink(source):
    d = dd.make_detection("train", 30, seed=3, source=source, max_items=1)
    for image, box, colour in zip(d.images, d.boxes[:, 0], d.colour[:, 0]):
        ink = image.max(-1) > 0
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        # the tint: every ink pixel is a grey level times the item's colour
        rgb = image[ink].astype(np.float64)
        want = rgb.max(-1, keepdims=True) * COLOUR_RGB[colour] / 255.0
        assert np.abs(rgb - want).max() <= 1.0


def test_boxes_lie_in_the_image_and_overlap_at_most_max_overlap(source):
    d = dd.make_detection("train", 200, seed=1, source=source, max_items=4, max_overlap=0.1)
    assert d.boxes.shape == (200, 4, 4) and d.valid.sum(1).min() >= 1 and d.valid.sum(1).max() == 4
    for boxes, valid in zip(d.boxes, d.valid):
        b = boxes[valid]
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 64).all() and (b[:, 2:] > b[:, :2]).all()
        iou = dd.box_iou_matrix(b, b)
        np.fill_diagonal(iou, 0.0)
        assert iou.max() <= 0.1 + 1e-12
    assert (d.label[d.valid] == d.item[d.valid] * len(COLOUR_NAMES) + d.colour[d.valid]).all()
    assert (d.label[~d.valid] == -1).all() and (d.boxes[~d.valid] == 0).all()


def test_heldout_combinations_appear_only_in_the_heldout_split(source):
    held = set(dd.heldout_labels().tolist())
    for split in ("train", "test"):
        d = dd.make_detection(split, 300, seed=0, source=source)
        assert not held & set(d.label[d.valid].tolist()), split
    d = dd.make_detection("heldout", 100, seed=0, source=source)
    assert set(d.label[d.valid].tolist()) <= held and len(set(d.label[d.valid].tolist())) == len(held)


def test_the_same_seed_gives_the_same_canvases_and_another_seed_others(source):
    a = dd.make_detection("train", 8, seed=(0, 5), source=source)
    b = dd.make_detection("train", 8, seed=(0, 5), source=source)
    c = dd.make_detection("train", 8, seed=(0, 6), source=source)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)


def test_mosaic_boxes_stay_in_their_cells(source):
    d = dd.make_detection("train", 40, seed=2, source=source, mosaic_sizes=(1, 2, 3), max_items=2)
    assert d.boxes.shape == (40, 18, 4) and set(d.mosaic.tolist()) == {1, 2, 3}
    for boxes, valid, m in zip(d.boxes, d.valid, d.mosaic):
        cell = 64 // m
        for x0, y0, x1, y1 in boxes[valid]:
            assert int(x0 // cell) == int((x1 - 1) // cell) and int(y0 // cell) == int((y1 - 1) // cell)
        assert m * m <= valid.sum() <= 2 * m * m


def test_phrases_follow_the_label_order():
    assert len(dd.PHRASES) == 80 and dd.PHRASES[dd.combo_label(7, 0)] == "a red sneaker"
    assert dd.ITEM_PHRASES[9] == "a ankle boot" and dd.phrase(3, 1) == "a green dress"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"split": "validation"}, "split='validation' is not valid"),
        ({"max_overlap": 1.5}, "max_overlap must lie in"),
        ({"min_items": 3, "max_items": 2}, "max_items must be an int >= 3"),
        ({"mosaic_sizes": (1, 2), "mosaic_probs": (1.0,)}, "mosaic_probs"),
        ({"mosaic_sizes": (5,)}, "cells need at least 16 px"),
        ({"num_examples": -1}, "num_examples must be an int >= 0"),
    ],
)
def test_bad_values_are_refused_with_the_value(source, kwargs, match):
    kwargs = {"split": "train", "num_examples": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        dd.make_detection(kwargs.pop("split"), kwargs.pop("num_examples"), source=source, **kwargs)
