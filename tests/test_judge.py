"""The judge of generated images (mmjax.evaluate.judge): it learns, sees shapes not colours, refuses bad input."""

import numpy as np
import pytest

from mmjax.data.captions import COLOUR_RGB, render_full
from mmjax.evaluate import Judge, frechet_distance, train_judge


def _shapes(n, seed=0):
    """Two classes of 12x12 grey items: a horizontal bar (0) or a vertical bar (1), at random places."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    items = np.zeros((n, 12, 12), np.uint8)
    for k, (label, b) in enumerate(zip(labels, rng.integers(0, 9, n))):
        if label:
            items[k, :, b : b + 3] = 255
        else:
            items[k, b : b + 3, :] = 255
    return items, labels


@pytest.fixture(scope="module")
def judge():
    items, labels = _shapes(256)
    images = render_full(items, np.zeros(256, np.int64), image_size=12)  # trained on red items only
    test_items, test_labels = _shapes(64, seed=1)
    test = (render_full(test_items, np.zeros(64, np.int64), image_size=12), test_labels)
    return train_judge(images, labels, num_classes=2, test=test, num_steps=60, batch_size=32, seed=0)


def test_the_judge_learns_and_reports_its_accuracy(judge):
    assert isinstance(judge, Judge) and judge.accuracy == 1.0
    items, labels = _shapes(64, seed=2)
    assert np.mean(judge.predict(render_full(items, np.zeros(64, np.int64), image_size=12)) == labels) == 1.0


def test_the_judge_sees_brightness_not_colour(judge):
    items, _ = _shapes(16, seed=3)
    red = judge.features(render_full(items, np.zeros(16, np.int64), image_size=12))
    for colour in range(1, len(COLOUR_RGB)):  # every palette colour has a 255 channel: the same brightness
        np.testing.assert_array_equal(judge.features(render_full(items, np.full(16, colour), image_size=12)), red)
    np.testing.assert_array_equal(judge.features(items), red)  # grey [N, S, S] images are read the same way


def test_chunked_and_whole_batches_agree(judge):
    items, _ = _shapes(1300, seed=4)
    images = render_full(items, np.zeros(1300, np.int64), image_size=12)
    chunked = judge.features(images)  # 1000 + 300 (padded to 1000)
    _, whole = judge._run(images, batch_size=2000)
    # the same float32 ops per row; batching may only reorder XLA's reductions: bound by the features' magnitude
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5 * float(np.abs(whole).max()))
    assert frechet_distance(chunked[:600], chunked[600:1200]) > 0.0  # two samples of one distribution


def test_the_same_seed_trains_the_same_judge():
    items, labels = _shapes(64)
    images = render_full(items, np.zeros(64, np.int64), image_size=12)
    a = train_judge(images, labels, num_classes=2, num_steps=3, batch_size=16, seed=5)
    b = train_judge(images, labels, num_classes=2, num_steps=3, batch_size=16, seed=5)
    c = train_judge(images, labels, num_classes=2, num_steps=3, batch_size=16, seed=6)
    np.testing.assert_array_equal(a.features(images), b.features(images))
    assert not np.array_equal(a.features(images), c.features(images))
    assert a.accuracy is None  # no test set given


@pytest.mark.parametrize(
    "images, labels, kw, match",
    [
        (np.zeros((8, 6, 5, 3), np.uint8), np.zeros(8, int), {}, r"square\), got shape \(8, 6, 5, 3\)"),
        (np.zeros((8, 6, 6, 3), np.float32), np.zeros(8, int), {}, "dtype float32"),
        (np.zeros((8, 6, 6, 3), np.uint8), np.zeros(7, int), {}, r"labels must be int \[8\]"),
        (np.zeros((8, 6, 6, 3), np.uint8), np.full(8, 2), {}, r"labels must lie in \[0, 2\), got \[2, 2\]"),
        (np.zeros((8, 6, 6, 3), np.uint8), np.zeros(8, int), {"batch_size": 16}, "8 training images"),
        (np.zeros((8, 6, 6, 3), np.uint8), np.zeros(8, int), {"num_steps": 0}, "num_steps and batch_size"),
    ],
)
def test_bad_input_is_refused_with_the_value(images, labels, kw, match):
    with pytest.raises(ValueError, match=match):
        train_judge(images, labels, num_classes=2, **{"batch_size": 4, "num_steps": 1, **kw})


def test_images_of_another_size_are_refused(judge):
    with pytest.raises(ValueError, match="images are 16x16, the judge was trained on 12x12"):
        judge.predict(np.zeros((2, 16, 16, 3), np.uint8))
