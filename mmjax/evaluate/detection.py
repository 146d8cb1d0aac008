"""COCO box average precision, computed exactly as pycocotools' ``COCOeval`` (``iouType="bbox"``) computes it.

For each category ``c``, area range ``a`` and IoU threshold ``t`` (0.50, 0.55, ..., 0.95):

1. **Match, per image.** Detections of ``c`` are ranked by score (stable for ties) and cut to the best
   ``max_detections`` (100). Each detection, in that order, takes the still unmatched ground-truth box with the
   highest IoU ``>= t`` (among equal IoUs the later box), preferring boxes that count in range ``a`` over ignored
   ones; a crowd box (``iscrowd``) can take any number of detections. IoU is COCO's on ``(x, y, w, h)`` boxes:
   ``inter / (area_d + area_g - inter)``, ``inter / area_d`` against a crowd box. A ground-truth box is *ignored*
   when it is a crowd or its area ``w * h`` lies outside ``a``; a detection matched to an ignored box, or unmatched
   with its area outside ``a``, is ignored too.
2. **Accumulate over images.** All non-ignored detections of ``c``, ranked by score: precision and recall after
   each (``recall = TP / #non-ignored ground truth``), precision made non-increasing from the right, then read at
   the 101 recall points ``0, 0.01, ..., 1`` (the first detection whose recall reaches the point; 0 past the last).
3. **Average.** ``AP`` is the mean over thresholds, recall points and categories; ``AP50`` / ``AP75`` at one
   threshold; ``APs`` / ``APm`` / ``APl`` over areas ``[0, 32^2]``, ``[32^2, 96^2]``, ``[96^2, 1e10]`` (pixels^2,
   both ends inclusive). A category without non-ignored ground truth in a range does not count there; a value
   with no category left is ``-1``, as pycocotools prints it.

Boxes come as ``x0, y0, x1, y1`` in pixels and are turned into COCO's ``x, y, w = x1 - x0, h = y1 - y0`` first, so
the IoUs are the ones pycocotools computes from the same boxes. Everything runs in float64 NumPy on the host.

>>> gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 60, 60]], "labels": [0, 1]}]
>>> det = [{"boxes": [[0, 0, 10, 9], [20, 20, 60, 60], [0, 0, 5, 5]], "labels": [0, 1, 1], "scores": [0.9, 0.8, 0.95]}]
>>> {k: round(v, 4) for k, v in coco_ap(gt, det).items()}
{'AP': 0.7, 'AP50': 0.75, 'AP75': 0.75, 'APs': 0.9, 'APm': 1.0, 'APl': -1.0}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["coco_ap", "IOU_THRESHOLDS", "RECALL_THRESHOLDS", "AREA_RANGES"]

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's iouThrs
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs
AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}


def _boxes(where: str, value, n: int | None = None) -> np.ndarray:
    """``[N, 4]`` float64 ``x0, y0, x1, y1`` -> ``[N, 4]`` COCO ``x, y, w, h``; refuses bad shapes and inverted boxes."""
    b = np.asarray(value, dtype=np.float64) if len(np.shape(value)) else np.zeros((0, 4))
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4 or (n is not None and len(b) != n):
        raise ValueError(
            f"{where}['boxes'] must have shape [N, 4] (x0, y0, x1, y1 in pixels) with N matching 'labels', "
            f"got shape {np.shape(value)}."
        )
    if not np.isfinite(b).all():
        raise ValueError(f"{where}['boxes'] holds non-finite values; every box needs 4 finite coordinates.")
    wh = b[:, 2:] - b[:, :2]
    if (wh < 0).any():
        i = int(np.flatnonzero((wh < 0).any(axis=1))[0])
        raise ValueError(
            f"{where}['boxes'][{i}] = {b[i].tolist()} has x1 < x0 or y1 < y0; boxes are x0, y0, x1, y1 (corners)."
        )
    return np.concatenate([b[:, :2], wh], axis=1)


def _vector(where: str, key: str, value, n: int, kind: str) -> np.ndarray:
    v = np.asarray(value)
    if v.size == 0:
        v = v.reshape(0)
    if v.shape != (n,):
        raise ValueError(f"{where}[{key!r}] must have shape [{n}] (one per box), got {v.shape}.")
    if kind == "int" and not (np.issubdtype(v.dtype, np.integer) or v.size == 0):
        raise ValueError(f"{where}[{key!r}] must be integer category ids, got dtype {v.dtype}.")
    if kind == "float":
        v = v.astype(np.float64)
        if not np.isfinite(v).all():
            raise ValueError(f"{where}[{key!r}] holds non-finite scores.")
    return v


def _read(kind: str, images: Sequence[dict]) -> list[dict]:
    out = []
    for i, image in enumerate(images):
        where = f"{kind}[{i}]"
        if not isinstance(image, dict):
            raise ValueError(f"{where} must be a dict with 'boxes' and 'labels', got {type(image).__name__}.")
        need = ("boxes", "labels", "scores") if kind == "detections" else ("boxes", "labels")
        missing = [k for k in need if k not in image]
        if missing:
            raise ValueError(f"{where} has no {missing}; each image needs {list(need)}.")
        labels = np.asarray(image["labels"])
        n = labels.size
        rec = {"boxes": _boxes(where, image["boxes"], n), "labels": _vector(where, "labels", labels, n, "int")}
        if kind == "detections":
            rec["scores"] = _vector(where, "scores", image["scores"], n, "float")
        else:
            crowd = image.get("iscrowd", np.zeros(n, bool))
            rec["iscrowd"] = _vector(where, "iscrowd", crowd, n, "any").astype(bool)
        out.append(rec)
    return out


def _iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """``[D, G]`` COCO IoU of ``x, y, w, h`` boxes (the operation order of pycocotools' ``bbIou``)."""
    d, g = dt[:, None, :], gt[None, :, :]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_d, area_g = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
    union = np.where(crowd[None, :], area_d, area_d + area_g - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def _match(ious, gt_ignore, crowd, thresholds):
    """Greedy matching of score-ranked detections, every IoU threshold at once -> (matched, ignored) ``[T, D]``."""
    num_t, (num_d, num_g) = len(thresholds), ious.shape
    taken = np.zeros((num_t, num_g), bool)
    matched = np.zeros((num_t, num_d), bool)
    ignored = np.zeros((num_t, num_d), bool)
    rows = np.arange(num_t)
    if num_g == 0:
        return matched, ignored
    for d in range(num_d):
        ok = (~taken | crowd[None, :]) & (ious[d][None, :] >= thresholds[:, None])  # [T, G]
        best = np.full(num_t, -1)
        for group in (~gt_ignore, gt_ignore):  # boxes that count first; ignored ones only if none of those matched
            score = np.where(ok & group[None, :], ious[d][None, :], -np.inf)
            last = num_g - 1 - np.argmax(score[:, ::-1], axis=1)  # the later box among equal IoUs
            found = (best < 0) & np.isfinite(score[rows, last])
            best = np.where(found, last, best)
        hit = best >= 0
        matched[hit, d] = True
        ignored[hit, d] = gt_ignore[best[hit]]
        taken[rows[hit], best[hit]] = True
    return matched, ignored


def _precision_at_recalls(matched, ignored, num_gt):
    """``[T, R]`` interpolated precision at :data:`RECALL_THRESHOLDS` from score-ranked detections of one category."""
    tp = np.cumsum(matched & ~ignored, axis=1, dtype=np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=1, dtype=np.float64)
    out = np.zeros((len(tp), len(RECALL_THRESHOLDS)))
    for t in range(len(tp)):
        recall = tp[t] / num_gt
        precision = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # non-increasing from the right
        at = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
        valid = at < len(recall)
        out[t, valid] = precision[at[valid]]
    return out


def coco_ap(ground_truth: Sequence[dict], detections: Sequence[dict], *, max_detections: int = 100) -> dict:
    """COCO box AP, AP50, AP75, APs, APm, APl, equal to pycocotools' ``COCOeval`` (bbox, ``maxDets=100``).

    Args:
      ground_truth: one dict per image: ``boxes`` ``[N, 4]`` as ``x0, y0, x1, y1`` in pixels, ``labels`` ``[N]``
        integer categories, optionally ``iscrowd`` ``[N]`` booleans (COCO's crowd regions; default all False).
      detections: one dict per image, in the same order: ``boxes`` ``[M, 4]``, ``labels`` ``[M]``, ``scores``
        ``[M]`` (higher is more confident).
      max_detections: the best-scoring detections kept per image and category (COCO: 100).

    Returns:
      ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` as floats in ``[0, 1]``, or ``-1.0`` where no category has
      ground truth in that range (see the module docstring for the exact procedure).

    Raises:
      ValueError: naming the image and the field, for lists of different lengths, missing keys, boxes that are not
        ``[N, 4]`` or have ``x1 < x0`` / ``y1 < y0``, non-integer labels, non-finite scores.

    One image, one true box, found at IoU 0.8 (a hit at thresholds 0.50-0.80, 7 of 10): AP 0.7.

    >>> gt = [{"boxes": [[0, 0, 50, 50]], "labels": [3]}]
    >>> found = [{"boxes": [[0, 0, 50, 40]], "labels": [3], "scores": [0.9]}]
    >>> {k: round(v, 6) for k, v in coco_ap(gt, found).items()}
    {'AP': 0.7, 'AP50': 1.0, 'AP75': 1.0, 'APs': -1.0, 'APm': 0.7, 'APl': -1.0}
    """
    if isinstance(ground_truth, dict) or isinstance(detections, dict):
        raise ValueError("ground_truth and detections must be lists with one dict per image, not a single dict.")
    if len(ground_truth) != len(detections):
        raise ValueError(
            f"ground_truth has {len(ground_truth)} images but detections has {len(detections)}; give one entry per "
            "image in the same order (an image without detections gets empty arrays)."
        )
    if int(max_detections) < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}.")
    gts, dts = _read("ground_truth", ground_truth), _read("detections", detections)
    categories = sorted({int(c) for g in gts for c in g["labels"]})
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
    num_a = len(AREA_RANGES)
    precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(categories), num_a))
    for k, c in enumerate(categories):
        per_area = [[] for _ in range(num_a)]  # (scores, matched, ignored, gt_ignore) per image
        for g, d in zip(gts, dts):
            gi, di = g["labels"] == c, d["labels"] == c
            if not gi.any() and not di.any():
                continue
            gt_boxes, crowd = g["boxes"][gi], g["iscrowd"][gi]
            order = np.argsort(-d["scores"][di], kind="mergesort")[: int(max_detections)]
            dt_boxes, scores = d["boxes"][di][order], d["scores"][di][order]
            gt_area, dt_area = gt_boxes[:, 2] * gt_boxes[:, 3], dt_boxes[:, 2] * dt_boxes[:, 3]
            for a, (lo, hi) in enumerate(AREA_RANGES.values()):
                gt_ignore = crowd | (gt_area < lo) | (gt_area > hi)
                by_ignore = np.argsort(gt_ignore, kind="mergesort")
                ious = _iou(dt_boxes, gt_boxes[by_ignore], crowd[by_ignore])
                matched, ignored = _match(ious, gt_ignore[by_ignore], crowd[by_ignore], thresholds)
                ignored |= ~matched & ((dt_area < lo) | (dt_area > hi))[None, :]
                per_area[a].append((scores, matched, ignored, gt_ignore))
        for a, records in enumerate(per_area):
            if not records:
                continue
            num_gt = sum(int((~r[3]).sum()) for r in records)
            if num_gt == 0:
                continue
            scores = np.concatenate([r[0] for r in records])
            rank = np.argsort(-scores, kind="mergesort")
            matched = np.concatenate([r[1] for r in records], axis=1)[:, rank]
            ignored = np.concatenate([r[2] for r in records], axis=1)[:, rank]
            precision[:, :, k, a] = _precision_at_recalls(matched, ignored, num_gt)

    def mean(values):
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else -1.0

    t50, t75 = (int(np.argmin(np.abs(IOU_THRESHOLDS - t))) for t in (0.5, 0.75))
    return {
        "AP": mean(precision[..., 0]),
        "AP50": mean(precision[t50, ..., 0]),
        "AP75": mean(precision[t75, ..., 0]),
        "APs": mean(precision[..., 1]),
        "APm": mean(precision[..., 2]),
        "APl": mean(precision[..., 3]),
    }
