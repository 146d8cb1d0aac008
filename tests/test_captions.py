"""Fashion-MNIST captions on tiny synthetic IDX files: determinism, held-out combinations, captions, pixels."""

import os

import numpy as np
import pytest

from mmjax.data import captions as C
from mmjax.data.fashion_mnist import load_fashion_mnist, write_idx


def _solid_items(labels):
    """Items that fill their whole 28x28 frame at full intensity (so their box is exactly their pixels)."""
    return np.full((len(labels), 28, 28), 255, np.uint8)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """Four tiny IDX files in the Fashion-MNIST layout: 30 train and 20 test images, every class present."""
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return str(d)


def _combos(data):
    return {(C.COLOUR_NAMES[c], C.ITEM_NAMES[i]) for c, i in zip(data.colour, data.item)}


def test_same_seed_same_data_other_seed_other_data(idx_dir):
    a = C.make_captions("train", 40, seed=3, data_dir=idx_dir)
    b = C.make_captions("train", 40, seed=3, data_dir=idx_dir)
    c = C.make_captions("train", 40, seed=4, data_dir=idx_dir)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    for field in ("item", "colour", "size", "position", "source_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.captions != c.captions
    assert not np.array_equal(a.images, c.images)


def test_shapes_dtypes_and_default_size(idx_dir):
    data = C.make_captions("train", seed=0, data_dir=idx_dir, image_size=32)
    assert data.images.shape == (30, 32, 32, 3) and data.images.dtype == np.uint8
    assert len(data.captions) == 30
    for field in ("item", "colour", "size", "position", "source_index"):
        assert getattr(data, field).shape == (30,) and getattr(data, field).dtype == np.int32
    # by default every source image is used exactly once (no held-out colour makes an item unusable in train)
    assert sorted(data.source_index.tolist()) == list(range(30))


def test_heldout_combinations_never_in_train_and_only_in_heldout(idx_dir):
    held = set(C.HELDOUT_COMBOS)
    train = C.make_captions("train", 3000, seed=1, data_dir=idx_dir)  # reuses the 30 images many times
    test = C.make_captions("test", 500, seed=1, data_dir=idx_dir)
    heldout = C.make_captions("heldout", 200, seed=1, data_dir=idx_dir)
    assert not (_combos(train) & held) and not (_combos(test) & held)
    assert _combos(heldout) == held  # all of them show up, nothing else
    # every colour and every item is still seen in training, with other partners
    assert set(train.colour.tolist()) == set(range(8)) and set(train.item.tolist()) == set(range(10))
    assert len(_combos(train)) == 80 - len(held)


def test_labels_follow_the_source_images(idx_dir):
    data = C.make_captions("test", 50, seed=2, data_dir=idx_dir)
    np.testing.assert_array_equal(data.item, data.source_index % 10)  # the fixture's labels are index % 10


def test_captions_match_attributes(idx_dir):
    data = C.make_captions("train", 100, seed=5, data_dir=idx_dir)
    for text, i, c, s, p in zip(data.captions, data.item, data.colour, data.size, data.position):
        assert text == f"a {C.SIZE_NAMES[s]} {C.COLOUR_NAMES[c]} {C.ITEM_NAMES[i]} in the {C.POSITION_NAMES[p]}"
    assert C.caption(9, 3, 1, 4) == "a large yellow ankle boot in the center"


def test_items_drawn_in_their_box_with_their_colour():
    n = 80
    labels = np.arange(n) % 10
    rng = np.random.default_rng(6)
    colour, size, position = rng.integers(0, 8, n), rng.integers(0, 2, n), rng.integers(0, 5, n)
    images = C.render(_solid_items(labels), colour, size, position, image_size=64)
    boxes = C.item_boxes(64)
    for k in range(n):
        top, left, h, w = boxes[size[k], position[k]]
        inside = np.zeros((64, 64), bool)
        inside[top : top + h, left : left + w] = True
        np.testing.assert_array_equal(images[k][inside], np.broadcast_to(C.COLOUR_RGB[colour[k]], (h * w, 3)))
        assert not images[k][~inside].any()


def test_position_and_size_semantics():
    """Top/bottom/left/right/center and small/large mean what they say, for any canvas size."""
    for image_size in (32, 64, 96):
        boxes = C.item_boxes(image_size)
        half = image_size / 2
        centre = lambda b: (b[0] + b[2] / 2, b[1] + b[3] / 2)  # noqa: E731
        for s in range(2):
            y, x = zip(*(centre(b) for b in boxes[s]))
            assert y[0] < half and x[0] < half  # top left
            assert y[1] < half and x[1] > half  # top right
            assert y[2] > half and x[2] < half  # bottom left
            assert y[3] > half and x[3] > half  # bottom right
            assert abs(y[4] - half) <= 1 and abs(x[4] - half) <= 1  # center
            assert (boxes[s, :, :2] >= 0).all() and (boxes[s, :, :2] + boxes[s, :, 2:] <= image_size).all()
        assert (boxes[1, :, 2] > boxes[0, :, 2]).all()  # large > small


def test_real_looking_items_keep_their_shape_and_tint():
    """A grey item with a dark background: only its bright pixels are lit, channels in the colour's ratio."""
    item = np.zeros((1, 28, 28), np.uint8)
    item[0, 4:24, 10:18] = 200  # a bar
    for colour in range(8):
        img = C.render(item, [colour], [1], [0], image_size=64)[0].astype(int)
        lit = img.max(axis=-1) > 0
        top, left, h, w = C.item_boxes(64)[1, 0]
        rows, cols = np.nonzero(lit)
        assert rows.min() >= top and rows.max() < top + h and cols.min() >= left and cols.max() < left + w
        # the bar is taller than wide, as in the source
        assert rows.max() - rows.min() > 2 * (cols.max() - cols.min())
        rgb = C.COLOUR_RGB[colour].astype(int)
        np.testing.assert_array_equal(img[lit][:, rgb == 0], 0)  # channels absent from the colour stay dark
        bright = img[lit].max(axis=0)
        np.testing.assert_allclose(bright, np.rint(200 / 255 * rgb), atol=1)


def test_source_arrays_instead_of_files():
    labels = np.array([7, 7, 8])
    data = C.make_captions("heldout", 6, seed=0, source=(_solid_items(labels)[..., None], labels))
    assert set(data.item.tolist()) <= {7, 8}
    assert all(C.COLOUR_NAMES[c] == {7: "red", 8: "blue"}[i] for c, i in zip(data.colour, data.item))


def test_zero_shot_names_and_templates():
    assert C.ATTRIBUTES["item"] == C.ITEM_NAMES and len(C.ATTRIBUTES["colour"]) == 8
    assert C.combo_names(C.HELDOUT_COMBOS)[7] == "red sneaker"
    for attribute, templates in C.ZERO_SHOT_TEMPLATES.items():
        assert attribute in C.ATTRIBUTES or attribute == "combo"
        assert all(t.count("{}") == 1 for t in templates)


def test_bad_arguments_raise(idx_dir):
    with pytest.raises(ValueError, match="split"):
        C.make_captions("validation", 2, data_dir=idx_dir)
    with pytest.raises(ValueError, match="held-out"):
        C.make_captions("train", 2, data_dir=idx_dir, heldout=[("purple", "sneaker")])
    with pytest.raises(ValueError, match="num_examples"):
        C.make_captions("train", -1, data_dir=idx_dir)
    with pytest.raises(ValueError, match="no usable source"):
        C.make_captions("heldout", 2, source=(_solid_items([0]), np.array([0])), heldout=[("red", "bag")])
    with pytest.raises(ValueError, match="colour"):
        C.render(_solid_items([0]), [8], [0], [0])
    with pytest.raises(ValueError, match="image_size"):
        C.render(_solid_items([0]), [0], [0], [0], image_size=8)
    with pytest.raises(FileNotFoundError):
        C.make_captions("train", 2, data_dir=os.path.join(idx_dir, "missing"))


# ---------------------------------------------------------------------------- reading attributes back from pixels


@pytest.mark.parametrize("image_size", [48, 64])
def test_measure_attributes_reads_real_renders_back(image_size):
    """On real Fashion-MNIST items (the Debian package), colour, size and position come back from the pixels."""
    data = C.make_captions("test", 1500, seed=0, image_size=image_size)
    got = C.measure_attributes(data.images)
    assert (got["colour"] == data.colour).mean() == 1.0
    # an item thinner than its frame along both axes (a few sandals, t-shirts) reads as small: under 1% here
    assert (got["size"] == data.size).mean() >= 0.99
    assert (got["position"] == data.position).mean() >= 0.995
    as_float = C.measure_attributes(data.images[:50].astype(np.float32) * 0.8)  # dimmer, float: the same reading
    for key in got:
        np.testing.assert_array_equal(as_float[key], got[key][:50])


def test_measure_attributes_tells_each_palette_colour_and_place_apart():
    n = len(C.COLOUR_NAMES) * len(C.SIZE_NAMES) * len(C.POSITION_NAMES)
    colour, size, position = (a.ravel() for a in np.indices((8, 2, 5)))
    images = C.render(_solid_items(range(n)), colour, size, position, image_size=48)
    got = C.measure_attributes(images)
    np.testing.assert_array_equal(got["colour"], colour)
    np.testing.assert_array_equal(got["size"], size)
    np.testing.assert_array_equal(got["position"], position)
    black = C.measure_attributes(np.zeros((2, 48, 48, 3), np.uint8))
    assert all((v == -1).all() for v in black.values())


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 48, 48)), r"\[N, S, S, 3\]"),
        (np.zeros((2, 48, 40, 3)), "square"),
        (np.zeros((1, 8, 8, 3), bool), "dtype"),
    ],
)
def test_measure_attributes_refuses_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        C.measure_attributes(images)


# ------------------------------------------------------------------------------------------------- layout="full"


def test_full_layout_has_the_canvas_layouts_items_and_colours_filling_the_canvas(idx_dir):
    canvas = C.make_captions("train", 40, seed=3, data_dir=idx_dir, image_size=28)
    full = C.make_captions("train", 40, seed=3, data_dir=idx_dir, image_size=28, layout="full")
    for field in ("item", "colour", "source_index"):
        np.testing.assert_array_equal(getattr(full, field), getattr(canvas, field))
    assert full.size.tolist() == [-1] * 40 and full.position.tolist() == [-1] * 40
    assert full.captions == [f"a {C.COLOUR_NAMES[c]} {C.ITEM_NAMES[i]}" for c, i in zip(full.colour, full.item)]
    # at 28 px the item is not resized, and every palette colour has a 255 channel: max(R, G, B) is the item itself
    source = np.asarray(load_fashion_mnist("train", idx_dir)[0]).reshape(-1, 28, 28)
    np.testing.assert_array_equal(full.images.max(axis=-1), np.asarray(source)[full.source_index])
    # each channel is the item scaled by the colour: round(v / 255 * rgb)
    rgb = C.COLOUR_RGB[full.colour][:, None, None, :]
    expected = np.rint(np.asarray(source)[full.source_index][..., None].astype(np.float32) * (rgb / 255.0))
    np.testing.assert_array_equal(full.images, expected.astype(np.uint8))


def test_full_layout_resizes_and_its_colour_reads_back():
    items = np.zeros((8, 28, 28), np.uint8)
    items[:, 4:24, 6:22] = 255  # a solid block on black
    images = C.render_full(items, np.arange(8), image_size=48)
    assert images.shape == (8, 48, 48, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[np.arange(8), 24, 24], C.COLOUR_RGB)  # the block's centre, exact colour
    assert images[:, 0, 0].max() == 0  # the black background stays black
    np.testing.assert_array_equal(C.measure_attributes(images)["colour"], np.arange(8))


def test_full_layout_bad_arguments_raise(idx_dir):
    with pytest.raises(ValueError, match="layout='tiles'"):
        C.make_captions("train", 2, data_dir=idx_dir, layout="tiles")
    with pytest.raises(ValueError, match=r"colour indices must lie in \[0, 8\)"):
        C.render_full(_solid_items([0]), [8])
    with pytest.raises(ValueError, match="int colour"):
        C.render_full(_solid_items([0]), [0.5])
    with pytest.raises(ValueError, match="image_size"):
        C.render_full(_solid_items([0]), [0], image_size=4)
