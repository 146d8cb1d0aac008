"""Evaluation on embeddings: accuracy, zero-shot classification, retrieval, linear probe, plots.

Every function takes NumPy or JAX arrays, computes on the host in NumPy (float64 where it matters), and returns
plain Python floats / NumPy arrays, so the results can go straight into metrics writers and JSON files.

* :func:`topk_accuracy` and :func:`confusion_matrix` on scores and labels.
* :func:`zero_shot_classifier` (prompt-ensembled class embeddings) and :func:`zero_shot_accuracy`.
* :func:`retrieval_recall`: image->text and text->image Recall@K with several captions per image.
* :func:`linear_probe`: closed-form ridge regression on frozen features.
* :func:`plot_confusion_matrix`, :func:`plot_retrieval_grid`: PNG files via matplotlib's Agg canvas (no pyplot,
  no global backend change).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from mmjax.layers import l2_normalize

__all__ = [
    "l2_normalize",
    "topk_accuracy",
    "zero_shot_classifier",
    "zero_shot_accuracy",
    "retrieval_recall",
    "linear_probe",
    "confusion_matrix",
    "plot_confusion_matrix",
    "plot_retrieval_grid",
]


# -------------------------------------------------------------------------------------------- helpers


def _as_2d(name, x):
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have rank 2 [n, dim], got shape {x.shape}; stack the embeddings row-wise.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}.")
    return x


def _as_labels(name, y, n, num_classes=None):
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one per row), got {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}.")
    if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}].")
    return y.astype(np.int64)


def _check_same_dim(name_a, a, name_b, b):
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} {a.shape} and {name_b} {b.shape} must have the same embedding width; "
            "project both towers into the shared space first."
        )


def topk_accuracy(scores, labels, k: int | Sequence[int] = 1):
    """Fraction of rows whose label is among the ``k`` highest scores.

    A row counts as a hit when fewer than ``k`` classes score strictly higher than the true class (ties are
    resolved in the label's favour). ``k`` larger than the number of classes is clipped (accuracy 1).

    Args:
      scores: ``[n, C]`` logits or similarities.
      labels: ``[n]`` integer classes.
      k: one ``k`` or a sequence of them.

    Returns:
      A float for one ``k``, else a dict ``{"top{k}": float}``.

    >>> topk_accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1], k=(1, 2))
    {'top1': 0.5, 'top2': 1.0}
    """
    scores = _as_2d("scores", scores)
    labels = _as_labels("labels", labels, scores.shape[0], scores.shape[1])
    true = scores[np.arange(len(labels)), labels]
    rank = np.sum(scores > true[:, None], axis=1)  # classes strictly better than the true one
    ks = (k,) if np.isscalar(k) else tuple(k)
    for kk in ks:
        if int(kk) < 1:
            raise ValueError(f"k must be >= 1, got {kk}.")
    out = {f"top{int(kk)}": float(np.mean(rank < int(kk))) if len(labels) else 0.0 for kk in ks}
    return out[f"top{int(k)}"] if np.isscalar(k) else out


# ----------------------------------------------------------------------------------------- zero-shot


def zero_shot_classifier(
    encode_text_fn: Callable,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
) -> np.ndarray:
    """Class embeddings from prompt templates, ensembled as in CLIP.

    For class ``c``: ``w_c = normalize(mean_t normalize(encode_text(tokenizer(template_t(c)))))``.

    Args:
      encode_text_fn: maps the tokenizer's output for ``T`` texts to ``[T, dim]`` embeddings.
      tokenizer: maps a list of strings to whatever ``encode_text_fn`` takes (e.g. ``int32 [T, L]``).
      classnames: ``C`` class names.
      templates: ``T`` format strings with one ``{}`` (``"a photo of a {}."``) or callables ``str -> str``.

    Returns:
      ``float32 [C, dim]`` unit-norm class embeddings (rows in ``classnames`` order).

    >>> enc = lambda toks: np.asarray(toks, np.float32)
    >>> tok = lambda texts: [[len(t), 1.0] for t in texts]
    >>> zero_shot_classifier(enc, tok, ["ab", "abcd"], ["{}"]).astype(float).round(3).tolist()
    [[0.894, 0.447], [0.97, 0.243]]
    """
    if isinstance(classnames, str) or not len(classnames):
        raise ValueError(f"classnames must be a non-empty sequence of strings, got {classnames!r}.")
    if isinstance(templates, str) or not len(templates):
        raise ValueError(f"templates must be a non-empty sequence of format strings or callables, got {templates!r}.")
    for t in templates:
        if isinstance(t, str) and t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name.")
    rows = []
    for name in classnames:
        texts = [t(name) if callable(t) else t.format(name) for t in templates]
        emb = _as_2d("encode_text_fn output", np.asarray(encode_text_fn(tokenizer(texts))))
        if emb.shape[0] != len(texts):
            raise ValueError(
                f"encode_text_fn returned {emb.shape[0]} rows for {len(texts)} prompts; it must return one per text."
            )
        rows.append(l2_normalize(l2_normalize(emb.astype(np.float64)).mean(axis=0)))
    return np.stack(rows).astype(np.float32)


def zero_shot_accuracy(image_embeds, class_embeds, labels, k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of classifying images by cosine similarity to class embeddings.

    ``prediction_i = argmax_c <normalize(image_i), normalize(class_c)>``.

    Args:
      image_embeds: ``[n, dim]`` image embeddings (normalised here).
      class_embeds: ``[C, dim]`` class embeddings, e.g. from :func:`zero_shot_classifier`.
      labels: ``[n]`` integer classes.
      k: the ``k`` values to report.

    Returns:
      ``{"top1": float, "top5": float}`` (keys follow ``k``).

    >>> zero_shot_accuracy([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.1], [0.1, 1.0]], [0, 0], k=(1,))
    {'top1': 0.5}
    """
    img = l2_normalize(_as_2d("image_embeds", image_embeds))
    cls = l2_normalize(_as_2d("class_embeds", class_embeds))
    _check_same_dim("image_embeds", img, "class_embeds", cls)
    return topk_accuracy(img @ cls.T, labels, tuple(k))


# ----------------------------------------------------------------------------------------- retrieval


def retrieval_recall(
    image_embeds,
    text_embeds,
    k: Sequence[int] = (1, 5, 10),
    text_to_image=None,
    block_size: int = 1024,
    tie_tolerance: float | None = None,
) -> dict[str, float]:
    """Image->text and text->image Recall@K on cosine similarity, with several captions per image.

    Image->text: image ``i`` is a hit at ``K`` if any of its captions ``{j : text_to_image[j] == i}`` is among
    the ``K`` most similar texts. Text->image: caption ``j`` is a hit if ``text_to_image[j]`` is among the ``K``
    most similar images. "Among the top K" means fewer than ``K`` candidates score higher than the best correct
    one by more than ``tie_tolerance``: ties go in the query's favour. Ties are real in caption data: the same
    sentence describes many images, its copies have the same embedding, and their cosines with an image are equal
    in exact arithmetic but differ by round-off in float (by how the matmul kernel of this CPU tiles the rows), so
    a strict ``>`` would break those ties at random: on the Fashion-MNIST captions (4000 captions, about 800
    distinct sentences) image->text R@1 moved between 0.74 and 0.83 with the processor model.

    Args:
      image_embeds: ``[N_img, dim]``.
      text_embeds: ``[N_txt, dim]``.
      k: the ``K`` values.
      text_to_image: ``int [N_txt]`` image index of each caption; default ``arange(N_txt)`` (needs
        ``N_txt == N_img``).
      block_size: queries scored at a time (memory ``block_size x N`` floats).
      tie_tolerance: cosines within this of the best correct one count as ties; default ``dim * eps`` of the
        embeddings' dtype (float32: ``dim * 1.2e-7``), the round-off bound of a dot product of unit vectors.

    Returns:
      ``{"image_to_text_R@K": float, "text_to_image_R@K": float, ...}`` in ``[0, 1]``.

    >>> r = retrieval_recall(np.eye(2), [[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], k=(1,), text_to_image=[0, 1, 1])
    >>> r["image_to_text_R@1"], r["text_to_image_R@1"]
    (1.0, 0.6666666666666666)
    """
    img = l2_normalize(_as_2d("image_embeds", image_embeds))
    txt = l2_normalize(_as_2d("text_embeds", text_embeds))
    _check_same_dim("image_embeds", img, "text_embeds", txt)
    n_img, n_txt = len(img), len(txt)
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(
                f"with {n_img} images and {n_txt} texts, pass text_to_image (the image index of each text)."
            )
        text_to_image = np.arange(n_txt)
    t2i = _as_labels("text_to_image", text_to_image, n_txt, n_img)
    ks = tuple(int(x) for x in k)
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be a non-empty sequence of positive ints, got {k!r}.")
    missing = np.setdiff1d(np.arange(n_img), t2i)
    if missing.size:
        raise ValueError(f"images {missing[:5].tolist()}... have no caption in text_to_image; every image needs one.")
    if tie_tolerance is None:
        tie_tolerance = img.shape[1] * float(np.finfo(np.promote_types(img.dtype, txt.dtype)).eps)
    elif not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance!r}.")

    # text -> image: rank of the caption's own image
    t2i_rank = np.empty(n_txt, np.int64)
    for s in range(0, n_txt, block_size):
        sim = txt[s : s + block_size] @ img.T  # [b, N_img]
        own = sim[np.arange(len(sim)), t2i[s : s + block_size]]
        t2i_rank[s : s + block_size] = np.sum(sim > own[:, None] + tie_tolerance, axis=1)
    # image -> text: rank of the best-scoring own caption
    i2t_rank = np.empty(n_img, np.int64)
    for s in range(0, n_img, block_size):
        sim = img[s : s + block_size] @ txt.T  # [b, N_txt]
        own = np.where(t2i[None, :] == np.arange(s, s + len(sim))[:, None], sim, -np.inf).max(axis=1)
        i2t_rank[s : s + block_size] = np.sum(sim > own[:, None] + tie_tolerance, axis=1)
    out = {}
    for kk in ks:
        out[f"image_to_text_R@{kk}"] = float(np.mean(i2t_rank < kk))
        out[f"text_to_image_R@{kk}"] = float(np.mean(t2i_rank < kk))
    return out


# -------------------------------------------------------------------------------------- linear probe


def _ridge_fit(x, y_onehot, l2s):
    """Centred ridge solutions for several l2 values via one eigendecomposition of X^T X."""
    mean_x, mean_y = x.mean(0), y_onehot.mean(0)
    xc, yc = x - mean_x, y_onehot - mean_y
    gram = xc.T @ xc
    evals, evecs = np.linalg.eigh(gram)
    scale = max(np.trace(gram) / gram.shape[0], 1e-12)  # l2 is relative to the mean eigenvalue
    proj = evecs.T @ (xc.T @ yc)  # [d, C]
    for l2 in l2s:
        w = evecs @ (proj / (np.maximum(evals, 0.0) + l2 * scale)[:, None])
        yield l2, w, mean_y - mean_x @ w


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    l2: float | None = None,
    l2_grid: Sequence[float] = tuple(10.0 ** np.arange(-6, 3)),
    val_fraction: float = 0.2,
    num_classes: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of a ridge-regression classifier on frozen features (closed form, no training loop).

    Targets are one-hot ``Y``; with centred features ``Xc`` and targets ``Yc``::

        W = (Xc^T Xc + l2 * s * I)^-1 Xc^T Yc,   b = mean(Y) - mean(X) W,   prediction = argmax(X W + b)

    where ``s = trace(Xc^T Xc) / dim`` makes ``l2`` independent of the feature scale. With ``l2=None`` the value
    in ``l2_grid`` with the best accuracy on a held-out ``val_fraction`` of the training set is chosen (among
    values that tie on that accuracy, the smallest ``l2``, whatever the order of ``l2_grid``), then the
    classifier is refitted on the whole training set.

    Args:
      train_features: ``[n, dim]``; train_labels: ``int [n]``.
      test_features: ``[m, dim]``; test_labels: ``int [m]``.
      l2: ridge strength, or ``None`` to choose it on a validation split.
      l2_grid: candidates when ``l2`` is ``None``.
      val_fraction: share of the training rows held out for the choice.
      num_classes: default ``max(label) + 1``.
      seed: shuffles the validation split.

    Returns:
      ``{"accuracy": test accuracy, "l2": the ridge strength used, "val_accuracy": (when chosen)}``.

    >>> x = np.array([[0.0], [1.0], [4.0], [5.0]])
    >>> linear_probe(x, [0, 0, 1, 1], [[0.5], [4.5]], [0, 1], l2=1e-3)["accuracy"]
    1.0
    """
    xtr = _as_2d("train_features", train_features).astype(np.float64)
    xte = _as_2d("test_features", test_features).astype(np.float64)
    _check_same_dim("train_features", xtr, "test_features", xte)
    ytr_raw, yte_raw = np.asarray(train_labels), np.asarray(test_labels)
    if num_classes is None:
        num_classes = int(max(ytr_raw.max(initial=0), yte_raw.max(initial=0))) + 1
    ytr = _as_labels("train_labels", ytr_raw, len(xtr), num_classes)
    yte = _as_labels("test_labels", yte_raw, len(xte), num_classes)
    if len(xtr) < 2:
        raise ValueError(f"linear_probe needs at least 2 training rows, got {len(xtr)}.")
    onehot = np.eye(num_classes)

    def acc(x, y, w, b):
        return float(np.mean(np.argmax(x @ w + b, axis=1) == y)) if len(y) else 0.0

    out = {}
    if l2 is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        order = np.random.default_rng(seed).permutation(len(xtr))
        n_val = min(max(1, int(round(val_fraction * len(xtr)))), len(xtr) - 1)
        val, fit = order[:n_val], order[n_val:]
        scores = [
            (acc(xtr[val], ytr[val], w, b), -lam, lam) for lam, w, b in _ridge_fit(xtr[fit], onehot[ytr[fit]], l2_grid)
        ]
        best_acc, _, l2 = max(scores)  # ties in accuracy -> the larger -l2, i.e. the SMALLER l2 wins
        out["val_accuracy"] = best_acc
    elif l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}.")
    ((_, w, b),) = _ridge_fit(xtr, onehot[ytr], [l2])
    out["accuracy"] = acc(xte, yte, w, b)
    out["l2"] = float(l2)
    return out


# ------------------------------------------------------------------------------------------- confusion


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """``cm[t, p]`` = number of rows with true class ``t`` predicted as ``p``.

    >>> confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist()
    [[1, 0], [1, 1]]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must have rank 1 [n], got shape {labels.shape}.")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    labels = _as_labels("labels", labels, len(labels), num_classes)
    preds = _as_labels("predictions", predictions, len(labels), num_classes)
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _agg_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return str(path)


def plot_confusion_matrix(
    cm,
    classnames: Sequence[str],
    path: str | os.PathLike,
    normalize: bool = True,
    title: str | None = None,
    dpi: int = 100,
) -> str:
    """Writes a confusion matrix heat map (rows true, columns predicted) as a PNG; returns ``path``.

    With ``normalize`` each row is divided by its count, so the diagonal reads as per-class recall.

    >>> import tempfile, os
    >>> p = plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], os.path.join(tempfile.mkdtemp(), "cm.png"))
    >>> open(p, "rb").read(4) == b"\\x89PNG"
    True
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(classnames):
        raise ValueError(
            f"cm must be square [C, C] with C = len(classnames) = {len(classnames)}, got shape {cm.shape}."
        )
    values = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    c = len(classnames)
    fig = _agg_figure(1.5 + 0.55 * c, 1.2 + 0.5 * c)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), labels=classnames, rotation=45, ha="right")
    ax.set_yticks(range(c), labels=classnames)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    threshold = np.nanmax(values) / 2 if values.size else 0
    for t in range(c):
        for p in range(c):
            text = f"{values[t, p]:.2f}" if normalize else str(int(values[t, p]))
            ax.text(
                p, t, text, ha="center", va="center", fontsize=7, color="white" if values[t, p] > threshold else "black"
            )
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_retrieval_grid(
    queries: Sequence[str],
    query_embeds,
    image_embeds,
    images,
    path: str | os.PathLike,
    k: int = 5,
    relevant=None,
    dpi: int = 100,
) -> str:
    """Writes a PNG grid: one row per text query, its ``k`` most similar images left to right.

    Args:
      queries: ``Q`` query strings (row titles).
      query_embeds: ``[Q, dim]`` text embeddings of the queries.
      image_embeds: ``[N, dim]`` image embeddings.
      images: ``[N, H, W]`` or ``[N, H, W, 3]`` images, uint8 or float in ``[0, 1]``.
      path: output PNG path.
      k: images per row.
      relevant: optional ``bool [Q, N]``; retrieved images marked relevant get a green frame, others red.

    Returns:
      ``path``.

    >>> import tempfile, os
    >>> imgs = np.zeros((3, 4, 4, 3), np.uint8)
    >>> p = plot_retrieval_grid(["q"], [[1.0, 0.0]], np.eye(3, 2), imgs, os.path.join(tempfile.mkdtemp(), "g.png"), k=2)
    >>> os.path.getsize(p) > 0
    True
    """
    q = l2_normalize(_as_2d("query_embeds", query_embeds))
    img = l2_normalize(_as_2d("image_embeds", image_embeds))
    _check_same_dim("query_embeds", q, "image_embeds", img)
    images = np.asarray(images)
    if len(queries) != len(q):
        raise ValueError(f"queries has {len(queries)} strings but query_embeds has {len(q)} rows.")
    if images.shape[0] != len(img) or images.ndim not in (3, 4):
        raise ValueError(
            f"images must be [N, H, W] or [N, H, W, C] with N = {len(img)} (rows of image_embeds), got {images.shape}."
        )
    k = min(int(k), len(img))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    top = np.argsort(-(q @ img.T), axis=1, kind="stable")[:, :k]
    fig = _agg_figure(1.3 * k, 1.5 * len(q))
    axes = fig.subplots(len(q), k, squeeze=False)
    for r, query in enumerate(queries):
        for c in range(k):
            ax = axes[r, c]
            idx = top[r, c]
            ax.imshow(images[idx], cmap="gray" if images.ndim == 3 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if relevant is not None:
                colour = "green" if np.asarray(relevant)[r, idx] else "red"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
        axes[r, 0].set_title(query, loc="left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)
