"""mmjax.data.matching: each kind of hard negative changes exactly what it names, never reproduces the true
caption, never names an avoided combination, and draws the new value uniformly."""

import numpy as np
import pytest

from mmjax.data.captions import COLOUR_NAMES, HELDOUT_COMBOS, ITEM_NAMES, caption
from mmjax.data.matching import NEGATIVE_KINDS, heldout_table, negative_attributes, negative_captions
from mmjax.errors import UserError

ATTRS = ("item", "colour", "size", "position")


def _truth(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "item": rng.integers(0, 10, n),
        "colour": rng.integers(0, 8, n),
        "size": rng.integers(0, 2, n),
        "position": rng.integers(0, 5, n),
    }


@pytest.mark.parametrize("kind", NEGATIVE_KINDS)
def test_each_kind_changes_what_it_names_and_keeps_the_rest(kind):
    true = _truth()
    avoid = heldout_table()
    neg = negative_attributes(*(true[a] for a in ATTRS), kind, np.random.default_rng(1), avoid)
    changed = {a: neg[a] != true[a] for a in ATTRS}
    assert np.all(np.any([changed[a] for a in ATTRS], axis=0))  # never the true caption
    new_combo = changed["item"] | changed["colour"]
    assert not np.any(avoid[neg["item"], neg["colour"]] & new_combo)  # never a new held-out combination
    if kind != "random":
        assert np.all(changed[kind])
        for a in ATTRS:
            if a != kind:
                assert not np.any(changed[a]), a


def test_new_values_are_uniform_over_the_allowed_ones():
    n = 20000
    true = {"item": np.full(n, 7), "colour": np.full(n, 1), "size": np.zeros(n, int), "position": np.zeros(n, int)}
    neg = negative_attributes(*(true[a] for a in ATTRS), "colour", np.random.default_rng(2), heldout_table())
    held = [COLOUR_NAMES.index(c) for c, i in HELDOUT_COMBOS if i == ITEM_NAMES[7]]  # sneaker's held-out colour
    allowed = [c for c in range(8) if c != 1 and c not in held]
    counts = np.bincount(neg["colour"], minlength=8)
    assert set(np.flatnonzero(counts)) == set(allowed)
    expected = n / len(allowed)
    assert np.all(np.abs(counts[allowed] - expected) < 5 * np.sqrt(expected))


def test_captions_follow_the_attributes_and_bad_kinds_are_refused():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    caps = negative_captions([7, 0], [0, 3], [0, 1], [0, 4], "item", rng_a)
    neg = negative_attributes(np.array([7, 0]), np.array([0, 3]), np.array([0, 1]), np.array([0, 4]), "item", rng_b)
    assert caps == [caption(*a) for a in zip(neg["item"], neg["colour"], neg["size"], neg["position"])]
    with pytest.raises(UserError, match=r"negative kind 'shape' is not valid"):
        negative_captions([0], [0], [0], [0], "shape", rng_a)
