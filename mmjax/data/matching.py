"""Hard negative captions for image-text matching on the Fashion-MNIST captions (:mod:`mmjax.data.captions`).

For an example with attributes ``(item, colour, size, position)`` and caption "a small red sneaker in the top
left", a negative of each kind (:data:`NEGATIVE_KINDS`) changes what the kind names and keeps the rest:

* ``"colour"``: another colour ("a small *blue* sneaker in the top left");
* ``"item"``: another item ("a small red *sandal* ...");
* ``"size"``: the other size; ``"position"``: another position;
* ``"random"``: the caption of random attributes (any caption but the true one).

The new value is uniform over the values allowed: with ``avoid`` (a boolean ``[item, colour]`` table, e.g. the
held-out combinations during training) a negative never names a (colour, item) combination marked there unless the
true caption does (a size or position negative keeps it), so training never teaches that an unseen combination is
always wrong.

>>> rng = np.random.default_rng(0)
>>> neg = negative_attributes(np.array([7]), np.array([0]), np.array([0]), np.array([0]), "colour", rng)
>>> int(neg["item"][0]), int(neg["colour"][0]) != 0, int(neg["size"][0]), int(neg["position"][0])
(7, True, 0, 0)
"""

from __future__ import annotations

import numpy as np

from mmjax.data.captions import COLOUR_NAMES, HELDOUT_COMBOS, ITEM_NAMES, POSITION_NAMES, SIZE_NAMES, caption
from mmjax.errors import UserError

__all__ = ["NEGATIVE_KINDS", "negative_attributes", "negative_captions", "heldout_table"]

NEGATIVE_KINDS = ("colour", "item", "size", "position", "random")
_SIZES = {
    "item": len(ITEM_NAMES),
    "colour": len(COLOUR_NAMES),
    "size": len(SIZE_NAMES),
    "position": len(POSITION_NAMES),
}


def heldout_table(combos=HELDOUT_COMBOS) -> np.ndarray:
    """Boolean ``[10 items, 8 colours]``, True at the held-out (colour, item) combinations.

    >>> t = heldout_table([("red", "sneaker")])
    >>> int(t.sum()), bool(t[7, 0])
    (1, True)
    """
    table = np.zeros((len(ITEM_NAMES), len(COLOUR_NAMES)), bool)
    for c, i in combos:
        table[ITEM_NAMES.index(i), COLOUR_NAMES.index(c)] = True
    return table


def negative_attributes(item, colour, size, position, kind: str, rng: np.random.Generator, avoid=None) -> dict:
    """The attributes of one negative of ``kind`` per example (all int ``[N]``); see the module docstring.

    Args:
      item, colour, size, position: int ``[N]`` attribute indices of the true captions.
      kind: one of :data:`NEGATIVE_KINDS`.
      rng: the generator the new values come from.
      avoid: optional bool ``[10, 8]`` table of (item, colour) combinations a negative must not newly name.

    Returns:
      ``{"item", "colour", "size", "position"}`` int32 ``[N]``; the caption differs from the true one.

    >>> rng = np.random.default_rng(0)
    >>> neg = negative_attributes(np.array([7, 7]), np.array([0, 1]), np.array([0, 1]), np.array([0, 4]), "size", rng)
    >>> neg["size"].tolist()
    [1, 0]
    """
    if kind not in NEGATIVE_KINDS:
        raise UserError(f"negative kind {kind!r} is not valid; choose from {NEGATIVE_KINDS}.")
    true = {k: np.asarray(v, np.int64) for k, v in zip(_SIZES, (item, colour, size, position))}
    n = true["item"].shape[0]
    out = {k: v.copy() for k, v in true.items()}
    bad = np.ones(n, bool)
    for _ in range(1000):  # redraw the rows that repeat the truth or name an avoided combination
        if kind == "random":
            for k, size_k in _SIZES.items():
                out[k][bad] = rng.integers(0, size_k, bad.sum())
            same = np.all([out[k] == true[k] for k in _SIZES], axis=0)
        else:
            # uniform over the other values: shift by 1 .. size-1 (mod size)
            out[kind][bad] = (true[kind][bad] + rng.integers(1, _SIZES[kind], bad.sum())) % _SIZES[kind]
            same = np.zeros(n, bool)
        if avoid is not None:  # a new (item, colour) combination must not be an avoided one
            new_combo = (out["item"] != true["item"]) | (out["colour"] != true["colour"])
            same = same | (avoid[out["item"], out["colour"]] & new_combo)
        bad = same
        if not bad.any():
            return {k: v.astype(np.int32) for k, v in out.items()}
    raise UserError(
        f"could not draw {kind!r} negatives outside the avoided combinations for {int(bad.sum())} examples."
    )


def negative_captions(item, colour, size, position, kind: str, rng: np.random.Generator, avoid=None) -> list[str]:
    """The captions of :func:`negative_attributes`.

    >>> negative_captions([7], [0], [0], [0], "item", np.random.default_rng(0), avoid=None)[0] != caption(7, 0, 0, 0)
    True
    """
    neg = negative_attributes(
        np.asarray(item), np.asarray(colour), np.asarray(size), np.asarray(position), kind, rng, avoid
    )
    return [caption(*a) for a in zip(neg["item"], neg["colour"], neg["size"], neg["position"])]
