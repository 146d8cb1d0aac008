"""Model-agnostic evaluation: every function takes NumPy or JAX arrays, computes on the host in NumPy (float64
where it matters), and returns plain Python floats, dicts and NumPy arrays, ready for metrics writers and JSON.

One concept per submodule, every public name re-exported here (``mmjax.evaluate.coco_ap``, ...):

* :mod:`~mmjax.evaluate.embeddings`: :func:`topk_accuracy`, :func:`confusion_matrix`, zero-shot classification
  (:func:`zero_shot_classifier`, :func:`zero_shot_accuracy`), image<->text :func:`retrieval_recall`, the ridge
  :func:`linear_probe`, and the plots :func:`plot_confusion_matrix`, :func:`plot_retrieval_grid` (matplotlib's Agg
  canvas: no pyplot, no global backend change).
* :mod:`~mmjax.evaluate.captioning`: :func:`bleu` (BLEU-1..4) and :func:`cider_d` (CIDEr-D) of captions, exactly
  as pycocoevalcap's ``Bleu(4)`` and ``Cider()`` score already tokenised text.
* :mod:`~mmjax.evaluate.detection`: :func:`coco_ap`, COCO box average precision exactly as pycocotools' ``COCOeval``.
* :mod:`~mmjax.evaluate.matching`: two-stage retrieval (:func:`top_candidates`, :func:`rerank`, :func:`recall_at_k`),
  :func:`pairwise_accuracy` of a matching model against hard negatives, :func:`plot_patch_word_attention`.
* :mod:`~mmjax.evaluate.generation`: :func:`frechet_distance` (FID on any feature extractor).
* :mod:`~mmjax.evaluate.judge`: :func:`train_judge`, a small CNN trained on real labelled images that judges what a
  generator drew (:class:`Judge` ``predict``) and gives the features of its Frechet distance; the one submodule that
  trains a model (in JAX).

>>> from mmjax import evaluate
>>> evaluate.topk_accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1])
0.5
"""

from mmjax.evaluate.captioning import bleu, cider_d
from mmjax.evaluate.detection import coco_ap
from mmjax.evaluate.embeddings import (
    confusion_matrix,
    l2_normalize,
    linear_probe,
    plot_confusion_matrix,
    plot_retrieval_grid,
    retrieval_recall,
    topk_accuracy,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from mmjax.evaluate.generation import frechet_distance
from mmjax.evaluate.judge import Judge, JudgeCNN, train_judge
from mmjax.evaluate.matching import pairwise_accuracy, plot_patch_word_attention, recall_at_k, rerank, top_candidates

__all__ = [
    "Judge",
    "JudgeCNN",
    "bleu",
    "cider_d",
    "coco_ap",
    "confusion_matrix",
    "frechet_distance",
    "l2_normalize",
    "linear_probe",
    "pairwise_accuracy",
    "plot_confusion_matrix",
    "plot_patch_word_attention",
    "plot_retrieval_grid",
    "recall_at_k",
    "rerank",
    "retrieval_recall",
    "top_candidates",
    "topk_accuracy",
    "train_judge",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
