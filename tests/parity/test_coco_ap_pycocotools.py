"""Parity of mmjax.evaluate.coco_ap with pycocotools' COCOeval (bbox, maxDets 100): every summary value to 1e-6."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmjax.evaluate import coco_ap

pytestmark = pytest.mark.parity
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _xywh(boxes):
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def _pycocotools(ground_truth, detections):
    """COCOeval's stats[0:6] (AP, AP50, AP75, APs, APm, APl) for the same images, boxes converted to x, y, w, h."""
    images, annotations, results = [], [], []
    categories = sorted(
        {int(c) for g in ground_truth for c in g["labels"]} | {int(c) for d in detections for c in d["labels"]}
    )
    for i, (g, d) in enumerate(zip(ground_truth, detections)):
        images.append({"id": i + 1, "width": 1000, "height": 1000})
        crowd = g.get("iscrowd", np.zeros(len(g["labels"]), bool))
        for box, label, c in zip(_xywh(g["boxes"]), g["labels"], crowd):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(c),
                }
            )
        for box, label, score in zip(_xywh(d["boxes"]), d["labels"], d["scores"]):
            results.append({"image_id": i + 1, "category_id": int(label), "bbox": box.tolist(), "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in categories]}
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        if not results:
            dt.dataset = {"images": images, "annotations": [], "categories": gt.dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(KEYS, ev.stats[:6]))


def _random_images(rng, num_images, num_classes, max_gt, max_det, scale, ties=False, crowd=False):
    """Images with gt boxes of every COCO size range and detections near them (jittered), plus false positives."""
    gts, dts = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, max_gt + 1))
        xy = rng.uniform(0, 600, (n, 2))
        wh = np.exp(rng.uniform(np.log(4), np.log(scale), (n, 2)))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, num_classes, n)
        g = {"boxes": boxes, "labels": labels}
        if crowd:
            g["iscrowd"] = rng.random(n) < 0.15
        gts.append(g)
        m = int(rng.integers(0, max_det + 1))
        src = rng.integers(0, max(n, 1), m)
        jitter = rng.normal(0, 0.12, (m, 4)) * np.tile(wh[src] if n else np.full((m, 2), 30.0), 2)
        det = (boxes[src] if n else rng.uniform(0, 600, (m, 4))) + jitter
        fake = rng.random(m) < 0.25
        det[fake] = np.concatenate(
            [xy_ := rng.uniform(0, 600, (fake.sum(), 2)), xy_ + rng.uniform(4, 200, (fake.sum(), 2))], 1
        )
        det = np.concatenate([np.minimum(det[:, :2], det[:, 2:]), np.maximum(det[:, :2], det[:, 2:])], axis=1)
        det_labels = np.where(rng.random(m) < 0.85, labels[src] if n else 0, rng.integers(0, num_classes, m))
        scores = rng.integers(0, 5, m) / 4.0 if ties else rng.random(m)
        dts.append({"boxes": det, "labels": det_labels.astype(np.int64), "scores": scores})
    return gts, dts


@pytest.mark.parametrize(
    "seed, num_images, num_classes, max_gt, max_det, scale, ties, crowd",
    [
        (0, 20, 3, 6, 10, 300, False, False),
        (1, 40, 5, 4, 12, 150, True, False),  # many equal scores: the stable ranking decides
        (2, 15, 2, 8, 130, 250, False, False),  # more than 100 detections per image: the cut
        (3, 30, 4, 6, 10, 300, False, True),  # crowd regions
        (4, 25, 6, 3, 5, 40, True, True),  # small boxes only: medium and large have no gt (-1)
    ],
)
def test_coco_ap_equals_cocoeval(seed, num_images, num_classes, max_gt, max_det, scale, ties, crowd):
    gts, dts = _random_images(np.random.default_rng(seed), num_images, num_classes, max_gt, max_det, scale, ties, crowd)
    want, got = _pycocotools(gts, dts), coco_ap(gts, dts)
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)
    assert len({round(v, 6) for v in want.values()}) > 2  # the case exercises distinct values, not all 0 or -1


def test_coco_ap_equals_cocoeval_on_exact_ties_of_iou_and_duplicates():
    """Duplicate gt boxes (equal IoUs: the later one is taken), duplicate detections, a detection on two gts."""
    box = [10.0, 10.0, 50.0, 50.0]
    gts = [
        {"boxes": [box, box, [12.0, 10.0, 52.0, 50.0]], "labels": [1, 1, 1]},
        {"boxes": [[0.0, 0.0, 200.0, 120.0]], "labels": [2]},
        {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)},
    ]
    dts = [
        {"boxes": [box, box, box, [11.0, 10.0, 51.0, 50.0]], "labels": [1, 1, 1, 1], "scores": [0.5, 0.5, 0.9, 0.7]},
        {"boxes": [[0.0, 0.0, 200.0, 100.0], [5.0, 5.0, 20.0, 20.0]], "labels": [2, 2], "scores": [0.6, 0.95]},
        {"boxes": [[1.0, 1.0, 30.0, 30.0]], "labels": [1], "scores": [0.99]},
    ]
    want, got = _pycocotools(gts, dts), coco_ap(gts, dts)
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)


def test_coco_ap_of_images_without_detections_is_zero_as_cocoeval():
    gts = [{"boxes": [[0.0, 0.0, 40.0, 40.0]], "labels": [0]}]
    dts = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64), "scores": np.zeros(0)}]
    want, got = _pycocotools(gts, dts), coco_ap(gts, dts)
    assert got == pytest.approx(want, abs=1e-6)
    assert got["AP"] == 0.0 and got["APs"] == -1.0
