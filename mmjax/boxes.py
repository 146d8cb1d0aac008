"""Box maths for detection: format conversions, areas, IoU and generalized IoU, and the sigmoid focal loss.

Boxes are the last axis of an array, 4 numbers in one of two formats:

* ``xyxy``: corners ``x0, y0, x1, y1`` with ``x0 <= x1`` and ``y0 <= y1`` (what the IoUs take);
* ``cxcywh``: centre and size ``cx, cy, w, h`` with ``w, h >= 0`` (what OWL-ViT / DETR heads predict, in ``[0, 1]``
  image coordinates).

Every function is pure ``jnp``: it can be ``jit``-ed, ``grad``-ed and ``vmap``-ed. The IoUs are safe against
zero-area boxes (a zero-width prediction, a point, two identical points): a ratio whose denominator is zero is
defined as 0 and computed with a double ``where``, so neither the value nor its gradient is ever NaN. Boxes with
``x1 < x0`` or ``y1 < y0`` are not valid input (their IoUs are finite but meaningless); convert predictions with
:func:`cxcywh_to_xyxy` from non-negative sizes.

The formulas follow DETR's ``box_ops`` (Carion et al., 2020) and scenic's ``box_utils``; the generalized IoU is
Rezatofighi et al., 2019 (https://giou.stanford.edu), the focal loss Lin et al., 2017 (RetinaNet), as OWL-ViT
(Minderer et al., 2022) trains its class head.

>>> import jax.numpy as jnp, numpy as np
>>> pred = cxcywh_to_xyxy(jnp.array([[0.5, 0.5, 0.5, 0.5]]))
>>> pred.tolist()
[[0.25, 0.25, 0.75, 0.75]]
>>> target = jnp.array([[0.25, 0.25, 0.75, 0.75], [0.5, 0.25, 1.0, 0.75]])
>>> np.round(np.asarray(pairwise_giou(pred, target), np.float64), 4).tolist()
[[1.0, 0.3333]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "box_area",
    "pairwise_iou",
    "pairwise_giou",
    "iou",
    "giou",
    "sigmoid_focal_loss",
]


# ----------------------------------------------------------------------------------------------- checks


def _float(x, minimum=None):
    """``x`` as a floating array: integers become float32; with ``minimum``, narrower floats widen to it."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.float32)
    if minimum is not None:
        return x.astype(jnp.promote_types(x.dtype, minimum))
    return x


def _check_boxes(name, boxes, minimum=None):
    boxes = _float(boxes, minimum)
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name} must have 4 numbers on its last axis [..., 4] (x0, y0, x1, y1 or cx, cy, w, h), got shape "
            f"{boxes.shape}."
        )
    return boxes


def _check_pair(a, b):
    """Two boxes arrays for an elementwise op: same shape ``[..., 4]``, computed in float32 or wider."""
    a, b = _check_boxes("a", a), _check_boxes("b", b)
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape [..., 4] (box i of a is compared with box i of b), got {a.shape} "
            f"and {b.shape}; for all pairs use pairwise_iou / pairwise_giou, or jnp.broadcast_to first."
        )
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return a.astype(dtype), b.astype(dtype)


def _check_sets(a, b):
    """Sets of boxes ``[..., N, 4]``, ``[..., M, 4]`` with equal leading axes, broadcast to ``[..., N, M, 4]``."""
    a, b = _check_boxes("a", a), _check_boxes("b", b)
    for name, x in (("a", a), ("b", b)):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must be a set of boxes [..., N, 4], got shape {x.shape}; add an axis with {name}[None]."
            )
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"a [..., N, 4] and b [..., M, 4] must have the same leading (batch) axes, got shapes {a.shape} and "
            f"{b.shape}."
        )
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return a.astype(dtype)[..., :, None, :], b.astype(dtype)[..., None, :, :]


def _safe_div(num, den):
    """``num / den`` where ``den > 0``, else 0; the gradient is 0 (not NaN) where ``den <= 0``."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# ------------------------------------------------------------------------------------------- formats


def cxcywh_to_xyxy(boxes):
    """Centre-size boxes to corners: ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``.

    Args:
      boxes: ``[..., 4]`` as ``cx, cy, w, h`` (integers are converted to float32).

    Returns:
      ``[..., 4]`` as ``x0, y0, x1, y1``, in the input's floating dtype.

    >>> import jax.numpy as jnp, numpy as np
    >>> xyxy = cxcywh_to_xyxy(jnp.array([0.5, 0.5, 0.2, 0.4]))
    >>> np.round(np.asarray(xyxy, np.float64), 6).tolist()
    [0.4, 0.3, 0.6, 0.7]
    """
    boxes = _check_boxes("boxes", boxes)
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes):
    """Corner boxes to centre-size: ``((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0)``.

    Args:
      boxes: ``[..., 4]`` as ``x0, y0, x1, y1`` (integers are converted to float32).

    Returns:
      ``[..., 4]`` as ``cx, cy, w, h``, in the input's floating dtype.

    >>> import jax.numpy as jnp, numpy as np
    >>> xyxy_to_cxcywh(jnp.array([[0, 0, 10, 4]])).tolist()
    [[5.0, 2.0, 10.0, 4.0]]
    """
    boxes = _check_boxes("boxes", boxes)
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0], axis=-1)


# --------------------------------------------------------------------------------------- areas, IoUs


def box_area(boxes):
    """Area of corner boxes: ``(x1 - x0) * (y1 - y0)``.

    Args:
      boxes: ``[..., 4]`` as ``x0, y0, x1, y1``.

    Returns:
      ``[...]`` areas (negative for an inverted box, which is not valid input).

    >>> import jax.numpy as jnp, numpy as np
    >>> box_area(jnp.array([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])).tolist()
    [6.0, 0.0]
    """
    boxes = _check_boxes("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_parts(a, b):
    """IoU, union and enclosing-box area of boxes that broadcast against each other."""
    lo = jnp.maximum(a[..., :2], b[..., :2])
    hi = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(hi - lo, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    enclosing_wh = jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2])
    enclosing = enclosing_wh[..., 0] * enclosing_wh[..., 1]
    return _safe_div(inter, union), union, enclosing


def _giou(a, b):
    iou_, union, enclosing = _iou_parts(a, b)
    return iou_ - _safe_div(enclosing - union, enclosing)


def pairwise_iou(a, b):
    """IoU of every box of ``a`` with every box of ``b``: ``inter / union``, 0 where ``union = 0``.

    ``inter = max(min(x1a, x1b) - max(x0a, x0b), 0) * max(min(y1a, y1b) - max(y0a, y0b), 0)`` and
    ``union = area(a) + area(b) - inter``.

    Args:
      a: ``[..., N, 4]`` corner boxes.
      b: ``[..., M, 4]`` corner boxes, with the same leading axes ``...`` as ``a``.

    Returns:
      ``[..., N, M]`` IoUs in ``[0, 1]`` (float32 or wider).

    >>> import jax.numpy as jnp, numpy as np
    >>> a = jnp.array([[0.0, 0.0, 2.0, 2.0]])
    >>> b = jnp.array([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    >>> np.round(np.asarray(pairwise_iou(a, b), np.float64), 4).tolist()
    [[0.3333, 1.0, 0.0]]
    """
    return _iou_parts(*_check_sets(a, b))[0]


def pairwise_giou(a, b):
    """Generalized IoU of every box of ``a`` with every box of ``b``: ``iou - (C - union) / C``.

    ``C`` is the area of the smallest box enclosing both; the correction is 0 where ``C = 0`` (two boxes on one
    point or one line). The GIoU lies in ``[-1, 1]``: 1 for identical boxes, towards -1 for small boxes far apart.
    DETR's and OWL-ViT's matching cost and box loss use ``-giou`` and ``1 - giou``.

    Args:
      a: ``[..., N, 4]`` corner boxes.
      b: ``[..., M, 4]`` corner boxes, with the same leading axes ``...`` as ``a``.

    Returns:
      ``[..., N, M]`` generalized IoUs (float32 or wider).

    >>> import jax.numpy as jnp, numpy as np
    >>> a = jnp.array([[0.0, 0.0, 1.0, 1.0]])
    >>> b = jnp.array([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    >>> np.round(np.asarray(pairwise_giou(a, b), np.float64), 4).tolist()  # disjoint: 0 - (3 - 2) / 3
    [[1.0, -0.3333]]
    """
    return _giou(*_check_sets(a, b))


def iou(a, b):
    """IoU of matched pairs: box ``i`` of ``a`` with box ``i`` of ``b`` (the diagonal of :func:`pairwise_iou`).

    Args:
      a: ``[..., 4]`` corner boxes.
      b: ``[..., 4]`` corner boxes, the same shape as ``a``.

    Returns:
      ``[...]`` IoUs in ``[0, 1]`` (float32 or wider).

    >>> import jax.numpy as jnp, numpy as np
    >>> a, b = jnp.array([[0.0, 0.0, 2.0, 2.0]]), jnp.array([[1.0, 0.0, 3.0, 2.0]])
    >>> np.round(np.asarray(iou(a, b), np.float64), 4).tolist()
    [0.3333]
    """
    return _iou_parts(*_check_pair(a, b))[0]


def giou(a, b):
    """Generalized IoU of matched pairs: ``iou - (C - union) / C`` for box ``i`` of ``a`` and box ``i`` of ``b``.

    The diagonal of :func:`pairwise_giou` (see there for the formula); the box loss of a matched prediction is
    ``1 - giou(pred, target)``. Value and gradient are finite for zero-area boxes.

    Args:
      a: ``[..., 4]`` corner boxes.
      b: ``[..., 4]`` corner boxes, the same shape as ``a``.

    Returns:
      ``[...]`` generalized IoUs in ``[-1, 1]`` (float32 or wider).

    >>> import jax.numpy as jnp, numpy as np
    >>> a = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    >>> b = jnp.array([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    >>> np.round(np.asarray(giou(a, b), np.float64), 4).tolist()
    [1.0, -0.3333]
    """
    return _giou(*_check_pair(a, b))


# ------------------------------------------------------------------------------------------ focal loss


def sigmoid_focal_loss(logits, targets, alpha: float | None = 0.25, gamma: float = 2.0):
    """Elementwise sigmoid focal loss (RetinaNet; OWL-ViT's class loss), stable for any logit.

    With ``p = sigmoid(x)`` and target ``t`` (0/1, or soft in ``[0, 1]``)::

        ce      = -t log p - (1 - t) log(1 - p)          (binary cross-entropy with logits)
        1 - p_t = p (1 - t) + (1 - p) t                  (p_t = p t + (1 - p)(1 - t))
        loss    = alpha_t * ce * (1 - p_t) ** gamma,     alpha_t = alpha t + (1 - alpha)(1 - t)

    ``alpha_t = 1`` when ``alpha`` is ``None`` or negative (torchvision's convention); ``gamma = 0`` gives plain
    (alpha-weighted) binary cross-entropy. ``log p`` and ``log(1 - p)`` are computed as ``log_sigmoid(x)`` and
    ``log_sigmoid(-x)``, and ``1 - p_t`` from ``sigmoid(x)`` and ``sigmoid(-x)`` (no ``1 - p`` cancellation), so a
    logit of ``+-1e4`` gives the right finite loss and gradient. Reduce the result yourself (DETR / OWL-ViT divide
    the sum by the number of ground-truth boxes).

    Args:
      logits: ``[...]`` raw scores ``x``.
      targets: ``[...]`` targets ``t``, the same shape as ``logits``.
      alpha: weight of the positives in ``[0, 1]`` (negatives get ``1 - alpha``); ``None`` or ``< 0``: no weighting.
      gamma: focusing exponent ``>= 0``.

    Returns:
      ``[...]`` losses, float32 or wider.

    >>> import jax.numpy as jnp, numpy as np
    >>> x, t = jnp.array([0.0, 0.0, 20.0]), jnp.array([1.0, 0.0, 0.0])
    >>> loss = sigmoid_focal_loss(x, t)  # 0.25 * log 2 / 4, 0.75 * log 2 / 4, 0.75 * 20
    >>> np.round(np.asarray(loss, np.float64), 4).tolist()
    [0.0433, 0.13, 15.0]
    >>> bce = sigmoid_focal_loss(x, t, alpha=None, gamma=0.0)  # binary cross-entropy
    >>> np.round(np.asarray(bce, np.float64), 4).tolist()
    [0.6931, 0.6931, 20.0]
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape (one target per logit), got {logits.shape} and "
            f"{targets.shape}."
        )
    gamma = float(gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}.")
    if alpha is not None and float(alpha) > 1:
        raise ValueError(f"alpha must be in [0, 1] (or None / negative for no weighting), got {alpha}.")
    dtype = jnp.promote_types(jnp.result_type(logits, targets), jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x, t = logits.astype(dtype), targets.astype(dtype)
    ce = -t * jax.nn.log_sigmoid(x) - (1 - t) * jax.nn.log_sigmoid(-x)
    loss = ce
    if gamma != 0:
        m = jax.nn.sigmoid(x) * (1 - t) + jax.nn.sigmoid(-x) * t  # 1 - p_t
        if gamma == 2:
            modulation = jnp.square(m)
        else:  # 0 ** gamma with a zero (not NaN, for gamma < 1) gradient where the sigmoid saturates
            modulation = jnp.where(m > 0, jnp.where(m > 0, m, 1) ** gamma, 0)
        loss = loss * modulation
    if alpha is not None and float(alpha) >= 0:
        alpha = float(alpha)
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss
