"""Box maths: every function against a float64 NumPy oracle (loops over the textbook formulas), degenerate boxes
with finite values and gradients, the focal loss at extreme logits, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mmjax import boxes
from tests.tolerances import assert_float32_close, assert_float64_equal, float64

# ------------------------------------------------------------------------------------------------ oracles


def np_cxcywh_to_xyxy(b):
    b = np.asarray(b, np.float64)
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def np_xyxy_to_cxcywh(b):
    b = np.asarray(b, np.float64)
    x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def np_iou_giou(a, b):
    """IoU and GIoU of two single boxes, one scalar at a time (Rezatofighi et al., algorithm 1)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(min(ax1, bx1) - max(ax0, bx0), 0.0) * max(min(ay1, by1) - max(ay0, by0), 0.0)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    enclosing = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    iou = inter / union if union > 0 else 0.0
    giou = iou - ((enclosing - union) / enclosing if enclosing > 0 else 0.0)
    return iou, giou


def np_pairwise(a, b):
    """``[..., N, 4]`` x ``[..., M, 4]`` -> (iou, giou) ``[..., N, M]``, by loops."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lead = a.shape[:-2]
    a2, b2 = a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:])
    out = np.zeros((2, len(a2), a.shape[-2], b.shape[-2]))
    for k in range(len(a2)):
        for i in range(a.shape[-2]):
            for j in range(b.shape[-2]):
                out[:, k, i, j] = np_iou_giou(a2[k, i], b2[k, j])
    return out[0].reshape(lead + out.shape[-2:]), out[1].reshape(lead + out.shape[-2:])


def np_focal(x, t, alpha, gamma):
    """The formula in float64 with ``p = 1 / (1 + exp(-x))``, ``1 - p = 1 / (1 + exp(x))``, ``log p = -log1p(exp(-x))``
    and ``log(1 - p) = -log1p(exp(x))``, each computed directly (``1 - p`` by subtraction loses ``e^|x|`` ulps), so
    every term is accurate to a few ulps for ``|x| <~ 30``."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    p, q = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(x))
    log_p, log_q = -np.log1p(np.exp(-x)), -np.log1p(np.exp(x))
    ce = -(t * log_p + (1 - t) * log_q)
    one_minus_p_t = p * (1 - t) + q * t  # = 1 - (p t + (1 - p)(1 - t))
    loss = ce * one_minus_p_t**gamma
    if alpha is not None and alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def random_xyxy(rng, shape, min_side=0.0):
    """Boxes in [0, 1]^2 with sides in [min_side, 0.6]: overlapping, nested and disjoint pairs all occur."""
    lo = rng.uniform(0, 0.5, size=shape + (2,))
    side = rng.uniform(min_side, 0.6, size=shape + (2,))
    return np.concatenate([lo, lo + side], -1)


# -------------------------------------------------------------------------------------------- conversions


def test_conversions_match_numpy_and_round_trip():
    rng = np.random.default_rng(0)
    cxcywh = rng.uniform(0, 1, size=(3, 5, 4))
    with float64():
        xyxy = jax.jit(boxes.cxcywh_to_xyxy)(cxcywh)
        assert_float64_equal(xyxy, np_cxcywh_to_xyxy(cxcywh))
        assert_float64_equal(boxes.xyxy_to_cxcywh(xyxy), cxcywh)
        assert_float64_equal(jax.jit(boxes.xyxy_to_cxcywh)(cxcywh), np_xyxy_to_cxcywh(cxcywh))
    got = boxes.cxcywh_to_xyxy(cxcywh.astype(np.float32))
    assert got.dtype == jnp.float32
    assert_float32_close(got, np_cxcywh_to_xyxy(cxcywh), terms=2)


def test_conversions_keep_floating_dtypes_and_make_integers_float32():
    assert boxes.cxcywh_to_xyxy(jnp.ones(4, jnp.bfloat16)).dtype == jnp.bfloat16
    got = boxes.xyxy_to_cxcywh(jnp.array([[0, 0, 3, 4]]))
    assert got.dtype == jnp.float32 and got.tolist() == [[1.5, 2.0, 3.0, 4.0]]


def test_box_area():
    rng = np.random.default_rng(1)
    b = random_xyxy(rng, (4, 3))
    with float64():
        assert_float64_equal(boxes.box_area(b), (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))
    assert boxes.box_area(jnp.array([0, 0, 2, 3])).dtype == jnp.float32
    assert float(boxes.box_area(jnp.array([0.0, 0.0, 2.0, 3.0]))) == 6.0


# -------------------------------------------------------------------------------------------- IoU, GIoU


@pytest.mark.parametrize("shape_a, shape_b", [((1, 4), (1, 4)), ((7, 4), (5, 4)), ((3, 6, 4), (3, 2, 4))])
def test_pairwise_iou_and_giou_match_numpy_float64(shape_a, shape_b):
    rng = np.random.default_rng(2)
    a, b = random_xyxy(rng, shape_a[:-1]), random_xyxy(rng, shape_b[:-1])
    b[..., 0, :] = a[..., 0, :]  # an identical pair
    want_iou, want_giou = np_pairwise(a, b)
    with float64():
        assert_float64_equal(jax.jit(boxes.pairwise_iou)(a, b), want_iou, scale=1.0)
        assert_float64_equal(jax.jit(boxes.pairwise_giou)(a, b), want_giou, scale=1.0)
    assert boxes.pairwise_iou(a, b).shape == shape_a[:-1] + shape_b[-2:-1]
    np.testing.assert_allclose(want_iou[..., 0, 0], 1.0)


def test_pairwise_float32_is_close():
    rng = np.random.default_rng(3)
    min_side = 0.05
    a = random_xyxy(rng, (40,), min_side).astype(np.float32)
    b = random_xyxy(rng, (30,), min_side).astype(np.float32)
    want_iou, want_giou = np_pairwise(a, b)
    # A side x1 - x0 >= min_side of coordinates <= 1.1 carries a relative round-off <= eps / min_side; areas,
    # intersections and unions inherit a few of those, so the ratios do too: terms = 4 / min_side.
    terms = int(4 / min_side)
    assert_float32_close(boxes.pairwise_iou(a, b), want_iou, terms=terms, scale=1.0)
    assert_float32_close(boxes.pairwise_giou(a, b), want_giou, terms=terms, scale=1.0)


def test_elementwise_iou_giou_are_the_diagonal_and_vmap():
    rng = np.random.default_rng(4)
    a, b = random_xyxy(rng, (2, 9)), random_xyxy(rng, (2, 9))
    with float64():
        diag = lambda m: np.diagonal(np.asarray(m), axis1=-2, axis2=-1)
        assert_float64_equal(boxes.iou(a, b), diag(boxes.pairwise_iou(a, b)), scale=1.0)
        assert_float64_equal(jax.jit(boxes.giou)(a, b), diag(boxes.pairwise_giou(a, b)), scale=1.0)
        assert_float64_equal(jax.vmap(boxes.giou)(a, b), boxes.giou(a, b), scale=1.0)
        assert_float64_equal(jax.vmap(boxes.pairwise_giou)(a, b), boxes.pairwise_giou(a, b), scale=1.0)


def test_giou_known_values():
    unit = [0.0, 0.0, 1.0, 1.0]
    cases = [
        (unit, unit, 1.0, 1.0),
        (unit, [0.0, 0.0, 0.5, 0.5], 0.25, 0.25),  # nested: the enclosing box is the union
        (unit, [2.0, 0.0, 3.0, 1.0], 0.0, -1 / 3),  # disjoint: C = 3, union = 2
        (unit, [1.0, 0.0, 2.0, 1.0], 0.0, 0.0),  # touching edges
        ([0.0, 0.0, 0.1, 0.1], [99.9, 99.9, 100.0, 100.0], 0.0, 0.02 / 100.0**2 - 1),  # far apart: towards -1
    ]
    a = np.array([c[0] for c in cases])
    b = np.array([c[1] for c in cases])
    with float64():
        assert_float64_equal(boxes.iou(a, b), [c[2] for c in cases], scale=1.0)
        assert_float64_equal(boxes.giou(a, b), [c[3] for c in cases], scale=1.0)


# ---------------------------------------------------------------------------------------- degenerate boxes

DEGENERATE = [
    # (a, b, iou, giou)
    ([0.2, 0.2, 0.2, 0.6], [0.0, 0.0, 1.0, 1.0], 0.0, 0.0),  # zero-width inside a box: C = union = 1
    ([0.2, 0.2, 0.6, 0.2], [0.0, 0.0, 1.0, 1.0], 0.0, 0.0),  # zero-height
    ([0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], 0.0, 0.0),  # a point inside
    ([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], 0.0, 0.0),  # two identical points: union = C = 0
    ([0.3, 0.1, 0.3, 0.9], [0.3, 0.2, 0.3, 0.5], 0.0, 0.0),  # two zero-width boxes on one line: C = 0
    ([0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9], 0.0, -1.0),  # two points apart: union 0, C = 0.64
    ([0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0], 0.0, -1.0),  # two parallel lines apart
    ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], 0.0, 0.0),  # all zeros (padding)
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_degenerate_boxes_have_finite_values_and_gradients(dtype):
    a = np.array([c[0] for c in DEGENERATE], dtype)
    b = np.array([c[1] for c in DEGENERATE], dtype)
    with float64():
        np.testing.assert_allclose(jax.jit(boxes.iou)(a, b), [c[2] for c in DEGENERATE], atol=1e-7)
        np.testing.assert_allclose(jax.jit(boxes.giou)(a, b), [c[3] for c in DEGENERATE], atol=1e-7)
        for fn in (boxes.iou, boxes.giou, boxes.pairwise_iou, boxes.pairwise_giou):
            value = jax.jit(fn)(a, b)  # compiled: one program, not op by op
            assert np.isfinite(np.asarray(value)).all(), fn.__name__
            grads = jax.jit(jax.grad(lambda x, y: jnp.sum(1 - fn(x, y)), argnums=(0, 1)))(a, b)
            for g in grads:
                assert g.dtype == dtype and np.isfinite(np.asarray(g)).all(), fn.__name__


def test_gradients_through_the_conversion_are_finite_at_zero_size():
    """A head that predicts w = h = 0 (cxcywh), trained with the GIoU loss."""
    pred = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.3], [0.5, 0.5, 0.2, 0.2]])
    target = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.3, 0.3], [0.5, 0.5, 0.2, 0.2]])

    def loss(p):
        return jnp.sum(1 - boxes.giou(boxes.cxcywh_to_xyxy(p), boxes.cxcywh_to_xyxy(target)))

    g = jax.grad(loss)(pred)
    assert np.isfinite(np.asarray(g)).all()
    assert float(jnp.abs(g[1]).sum()) > 0  # the zero-width box is pulled towards its target


def test_iou_giou_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    a, b = random_xyxy(rng, (6,), 0.1), random_xyxy(rng, (6,), 0.1)
    with float64():
        # compiled: the function and its VJP each run as one program, not op by op
        check_grads(jax.jit(boxes.giou), (a, b), order=1, modes=("rev",), eps=1e-6)
        check_grads(jax.jit(boxes.pairwise_iou), (a, b), order=1, modes=("rev",), eps=1e-6)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fn",
    [boxes.cxcywh_to_xyxy, boxes.xyxy_to_cxcywh, boxes.box_area],
)
def test_single_input_needs_four_numbers(fn):
    with pytest.raises(ValueError, match=r"last axis \[\.\.\., 4\].*\(2, 5\)"):
        fn(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"last axis"):
        fn(np.float32(1.0))


@pytest.mark.parametrize("fn", [boxes.iou, boxes.giou, boxes.pairwise_iou, boxes.pairwise_giou])
def test_pairs_need_four_numbers(fn):
    with pytest.raises(ValueError, match=r"b must have 4 numbers.*\(3, 3\)"):
        fn(np.zeros((3, 4)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"a must have 4 numbers.*\(3, 2\)"):
        fn(np.zeros((3, 2)), np.zeros((3, 4)))


@pytest.mark.parametrize("fn", [boxes.iou, boxes.giou])
def test_elementwise_needs_equal_shapes(fn):
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\) and \(2, 4\)"):
        fn(np.zeros((3, 4)), np.zeros((2, 4)))


@pytest.mark.parametrize("fn", [boxes.pairwise_iou, boxes.pairwise_giou])
def test_pairwise_needs_sets_with_equal_leading_axes(fn):
    with pytest.raises(ValueError, match=r"a must be a set of boxes .*\(4,\)"):
        fn(np.zeros(4), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"leading .*\(2, 3, 4\) and \(3, 3, 4\)"):
        fn(np.zeros((2, 3, 4)), np.zeros((3, 3, 4)))


def test_focal_loss_errors():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\) and \(3,\)"):
        boxes.sigmoid_focal_loss(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"gamma must be >= 0, got -1.0"):
        boxes.sigmoid_focal_loss(np.zeros(3), np.zeros(3), gamma=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\].*got 1.5"):
        boxes.sigmoid_focal_loss(np.zeros(3), np.zeros(3), alpha=1.5)


# ------------------------------------------------------------------------------------------- focal loss

FOCAL_SETTINGS = [(0.25, 2.0), (0.5, 1.5), (None, 2.0), (-1.0, 0.0), (0.25, 0.5), (0.9, 3.0)]


@pytest.mark.parametrize("alpha, gamma", FOCAL_SETTINGS)
def test_focal_loss_matches_numpy_float64(alpha, gamma):
    rng = np.random.default_rng(6)
    x = rng.uniform(-15, 15, size=(4, 50))
    hard = (rng.random((4, 50)) < 0.3).astype(np.float64)
    soft = rng.random((4, 50))
    fn = jax.jit(lambda x, t: boxes.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma))
    for t in (hard, soft):
        want = np_focal(x, t, alpha, gamma)
        with float64():
            got = fn(x, t)
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
        x32, t32 = x.astype(np.float32), t.astype(np.float32)
        got32 = fn(x32, t32)
        assert got32.dtype == jnp.float32
        # The same float32 inputs: log-sigmoids, products and a power, a few roundings each, relative to each value
        # (the values span 1e-25..15, so atol only covers float32's underflow).
        want32 = np_focal(x32, t32, alpha, gamma)
        np.testing.assert_allclose(got32, want32, rtol=16 * np.finfo(np.float32).eps, atol=1e-37)


def test_focal_loss_alpha_none_and_negative_agree_and_gamma_zero_is_bce():
    rng = np.random.default_rng(7)
    x, t = rng.normal(size=20) * 4, rng.random(20)
    with float64():
        a = boxes.sigmoid_focal_loss(x, t, alpha=None)
        b = boxes.sigmoid_focal_loss(x, t, alpha=-1)
        assert_float64_equal(a, b)
        bce = np.logaddexp(0, x) - x * t  # softplus(x) - x t
        assert_float64_equal(boxes.sigmoid_focal_loss(x, t, alpha=None, gamma=0.0), bce)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_loss_is_stable_for_huge_logits(gamma):
    """Wrong and confident: loss ~ alpha_t |x| and gradient alpha_t sign; right and confident: loss and gradient 0."""
    alpha = 0.25
    x = jnp.array([-1e4, 1e4, 1e4, -1e4, -100.0, 100.0, 3e38, -3e38], jnp.float32)
    t = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0], jnp.float32)
    loss = boxes.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)
    want = [alpha * 1e4, (1 - alpha) * 1e4, 0, 0, alpha * 100, (1 - alpha) * 100, 0, 0]
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-30)
    g = jax.grad(lambda x: jnp.sum(boxes.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)))(x)
    np.testing.assert_allclose(g, [-alpha, 1 - alpha, 0, 0, -alpha, 1 - alpha, 0, 0], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("alpha, gamma", FOCAL_SETTINGS)
def test_focal_loss_gradients_match_finite_differences(alpha, gamma):
    rng = np.random.default_rng(8)
    x, t = rng.normal(size=12) * 3, rng.random(12)
    with float64():
        check_grads(
            lambda x, t: boxes.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma),
            (x, t),
            order=1,
            modes=("rev",),
            eps=1e-6,
        )


def test_focal_loss_computes_narrow_dtypes_in_float32_and_vmaps():
    x = jnp.linspace(-5, 5, 8, dtype=jnp.bfloat16)
    t = jnp.array([0, 1] * 4, jnp.bfloat16)
    got = boxes.sigmoid_focal_loss(x, t)
    assert got.dtype == jnp.float32
    want = np_focal(np.asarray(x, np.float64), np.asarray(t, np.float64), 0.25, 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    xs = jnp.stack([x, -x]).astype(jnp.float32)
    ts = jnp.stack([t, t]).astype(jnp.float32)
    np.testing.assert_allclose(jax.vmap(boxes.sigmoid_focal_loss)(xs, ts), boxes.sigmoid_focal_loss(xs, ts))
    assert boxes.sigmoid_focal_loss(jnp.array([1, 2]), jnp.array([0, 1])).dtype == jnp.float32
