"""Evaluation functions against hand-computed tiny cases and direct NumPy computations."""

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from mmjax import evaluate


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -------------------------------------------------------------------------------------------- top-k


def test_topk_accuracy_hand_case():
    scores = [[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]]
    # ranks of the true class: 0, 1, 1
    assert evaluate.topk_accuracy(scores, [0, 1, 0], k=(1, 2, 3)) == {"top1": 1 / 3, "top2": 1.0, "top3": 1.0}
    assert evaluate.topk_accuracy(jnp.asarray(scores), jnp.asarray([0, 1, 0])) == pytest.approx(1 / 3)
    assert evaluate.topk_accuracy(scores, [2, 2, 2], k=5) == 1.0  # k clipped to the number of classes


def test_topk_accuracy_matches_argsort():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, size=50)
    order = np.argsort(-scores, axis=1)
    for k in range(1, 8):
        want = np.mean([labels[i] in order[i, :k] for i in range(50)])
        assert evaluate.topk_accuracy(scores, labels, k) == pytest.approx(want)


# ---------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_classifier_ensembles_normalised_template_embeddings():
    table = {
        "a cat": [2.0, 0.0, 0.0],
        "the cat!": [0.0, 3.0, 0.0],
        "a dog": [0.0, 0.0, 5.0],
        "the dog!": [1.0, 0.0, 1.0],
    }
    seen = []

    def tokenizer(texts):
        seen.append(list(texts))
        return texts

    def encode(texts):
        return jnp.asarray([table[t] for t in texts])

    templates = ["a {}", lambda c: f"the {c}!"]
    got = evaluate.zero_shot_classifier(encode, tokenizer, ["cat", "dog"], templates)
    assert seen == [["a cat", "the cat!"], ["a dog", "the dog!"]]
    want = np.stack(
        [
            _unit(_unit([2.0, 0, 0]) + _unit([0, 3.0, 0])),
            _unit(_unit([0, 0, 5.0]) + _unit([1.0, 0, 1.0])),
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32


def test_zero_shot_accuracy_hand_case():
    classes = np.eye(3)
    images = np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.9], [0.1, 0.0, 2.0], [0.5, 0.6, 0.0]])
    labels = np.array([0, 2, 2, 0])
    # predictions: 0, 1, 2, 1 -> top1 = 2/4; second choices: -, 2, -, 0 -> top2 = 4/4
    assert evaluate.zero_shot_accuracy(images, classes, labels, k=(1, 2)) == {"top1": 0.5, "top2": 1.0}
    assert evaluate.zero_shot_accuracy(images * 7.0, classes, labels)["top1"] == 0.5  # cosine, scale-free


def test_zero_shot_bad_inputs_raise():
    enc = lambda toks: np.ones((len(toks), 2))  # noqa: E731
    with pytest.raises(ValueError, match="exactly one"):
        evaluate.zero_shot_classifier(enc, list, ["a"], ["no placeholder"])
    with pytest.raises(ValueError, match="templates"):
        evaluate.zero_shot_classifier(enc, list, ["a"], "a {}")
    with pytest.raises(ValueError, match="one per text"):
        evaluate.zero_shot_classifier(lambda t: np.ones((1, 2)), list, ["a"], ["{}", "x {}"])
    with pytest.raises(ValueError, match="same embedding width"):
        evaluate.zero_shot_accuracy(np.ones((2, 3)), np.ones((4, 2)), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        evaluate.zero_shot_accuracy(np.ones((2, 3)), np.ones((4, 3)), [0, 4])


# ----------------------------------------------------------------------------------------- retrieval


def test_retrieval_recall_hand_case_with_two_captions_per_image():
    images = np.eye(3)
    texts = np.array(
        [
            [1.0, 0.0, 0.0],  # caption of image 0, exact
            [0.0, 0.2, 1.0],  # caption of image 0, but closest to image 2 (rank 2 among images)
            [0.0, 1.0, 0.1],  # image 1
            [0.9, 0.0, 1.0],  # image 2, second closest image is 0 -> rank 0 (1.0 > 0.9)
        ]
    )
    t2i = [0, 0, 1, 2]
    r = evaluate.retrieval_recall(images, texts, k=(1, 2, 3), text_to_image=t2i)
    # text->image ranks: 0, 2, 0, 0
    assert r["text_to_image_R@1"] == 0.75 and r["text_to_image_R@2"] == 0.75 and r["text_to_image_R@3"] == 1.0
    # image->text: image0 best own caption text0 (rank 0); image1: text2 (rank 0);
    # image2: texts score 0, .98, .1, .74 -> own text3 at .74 is beaten by text1 -> rank 1
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3) and r["image_to_text_R@2"] == 1.0


def test_retrieval_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    n_img, per = 20, 3
    images = rng.normal(size=(n_img, 8))
    t2i = np.repeat(np.arange(n_img), per)
    texts = images[t2i] + 1.5 * rng.normal(size=(n_img * per, 8))
    got = evaluate.retrieval_recall(jnp.asarray(images), texts, k=(1, 5, 10), text_to_image=t2i, block_size=7)
    sim = _unit(images) @ _unit(texts).T
    for k in (1, 5, 10):
        i2t = np.mean([np.any(t2i[np.argsort(-sim[i])[:k]] == i) for i in range(n_img)])
        t2i_hit = np.mean([t2i[j] in np.argsort(-sim[:, j])[:k] for j in range(len(texts))])
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i_hit)
    assert 0.0 < got["text_to_image_R@1"] < got["text_to_image_R@10"] < 1.0


def test_retrieval_recall_counts_copies_of_a_sentence_as_ties_despite_round_off():
    # 30 images, 6 sentences: each image's caption is one of them (as in the captions data, where ~800 sentences
    # describe 4000 images). Copies of a sentence have one embedding in exact arithmetic; in float32 they come out
    # a few ulp apart, as a batched text tower's rows do. A copy that belongs to another image must not outrank
    # the image's own copy by that round-off.
    rng = np.random.default_rng(0)
    sentences = _unit(rng.normal(size=(6, 16)))
    caption = rng.integers(0, 6, 30)
    images = _unit(sentences[caption] + 0.3 * rng.normal(size=(30, 16))).astype(np.float32)
    exact = sentences[caption].astype(np.float32)
    noisy = exact * (1 + rng.choice([-1, 1], size=exact.shape) * np.finfo(np.float32).eps).astype(np.float32)
    sim = _unit(images.astype(np.float64)) @ sentences.T  # exact: the image's own sentence vs the other sentences
    want = np.mean([np.sum(sim[i] > sim[i, caption[i]]) < 1 for i in range(30)])
    t2i = np.arange(30)
    got = evaluate.retrieval_recall(images, noisy, k=(1,), text_to_image=t2i)["image_to_text_R@1"]
    assert got == pytest.approx(want) and want > 0.3
    strict = evaluate.retrieval_recall(images, noisy, k=(1,), text_to_image=t2i, tie_tolerance=0.0)
    assert strict["image_to_text_R@1"] < want  # a strict > breaks the ties by round-off
    with pytest.raises(ValueError, match="tie_tolerance must be >= 0"):
        evaluate.retrieval_recall(images, noisy, text_to_image=t2i, tie_tolerance=-1.0)


def test_retrieval_recall_bad_inputs_raise():
    with pytest.raises(ValueError, match="text_to_image"):
        evaluate.retrieval_recall(np.eye(2, 3), np.eye(3))
    with pytest.raises(ValueError, match="no caption"):
        evaluate.retrieval_recall(np.eye(3), np.eye(3), text_to_image=[0, 0, 1])
    with pytest.raises(ValueError, match="rank 2"):
        evaluate.retrieval_recall(np.ones(3), np.eye(3))


# -------------------------------------------------------------------------------------- linear probe


def _ridge_predict(xtr, ytr, xte, l2, c):
    mx, y = xtr.mean(0), np.eye(c)[ytr]
    my = y.mean(0)
    xc = xtr - mx
    gram = xc.T @ xc
    w = np.linalg.solve(gram + l2 * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0]), xc.T @ (y - my))
    return np.argmax((xte - mx) @ w + my, axis=1)


def test_linear_probe_matches_explicit_ridge_solution():
    rng = np.random.default_rng(2)
    c, d = 4, 6
    centres = rng.normal(size=(c, d))
    ytr, yte = rng.integers(0, c, 80), rng.integers(0, c, 40)
    xtr = centres[ytr] + 1.2 * rng.normal(size=(80, d))
    xte = centres[yte] + 1.2 * rng.normal(size=(40, d))
    accs = []
    for l2 in (1e-4, 0.3, 30.0):
        want = np.mean(_ridge_predict(xtr, ytr, xte, l2, c) == yte)
        got = evaluate.linear_probe(xtr.astype(np.float32), ytr, xte, yte, l2=l2)
        assert got["accuracy"] == pytest.approx(want) and got["l2"] == l2
        accs.append(want)
    assert 0.4 < accs[0] < 1.0 and len(set(accs)) > 1  # a non-trivial case where l2 matters


def test_linear_probe_chooses_l2_on_validation_split():
    rng = np.random.default_rng(3)
    ytr, yte = rng.integers(0, 3, 90), rng.integers(0, 3, 30)
    centres = 4 * np.eye(3, 5)
    xtr, xte = centres[ytr] + rng.normal(size=(90, 5)), centres[yte] + rng.normal(size=(30, 5))
    grid = (1e-3, 1e-1, 1e1, 1e5)
    got = evaluate.linear_probe(xtr, ytr, xte, yte, l2_grid=grid, seed=0)
    assert got["l2"] in grid and got["l2"] != 1e5  # a huge penalty predicts the majority class only
    assert got["accuracy"] > 0.9 and got["val_accuracy"] > 0.9
    order = np.random.default_rng(0).permutation(90)
    val, fit = order[:18], order[18:]
    val_accs = {l2: np.mean(_ridge_predict(xtr[fit], ytr[fit], xtr[val], l2, 3) == ytr[val]) for l2 in grid}
    assert got["val_accuracy"] == pytest.approx(max(val_accs.values()))
    assert val_accs[got["l2"]] == max(val_accs.values())


def test_linear_probe_bad_inputs_raise():
    with pytest.raises(ValueError, match="same embedding width"):
        evaluate.linear_probe(np.ones((4, 2)), [0, 1, 0, 1], np.ones((2, 3)), [0, 1], l2=1.0)
    with pytest.raises(ValueError, match="train_labels"):
        evaluate.linear_probe(np.ones((4, 2)), [0, 1, 0], np.ones((2, 2)), [0, 1], l2=1.0)
    with pytest.raises(ValueError, match="l2"):
        evaluate.linear_probe(np.ones((4, 2)), [0, 1, 0, 1], np.ones((2, 2)), [0, 1], l2=-1.0)


# ------------------------------------------------------------------------------------ confusion, plots


def test_confusion_matrix_matches_counting():
    rng = np.random.default_rng(4)
    labels, preds = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    want = np.zeros((5, 5), int)
    for t, p in zip(labels, preds):
        want[t, p] += 1
    got = evaluate.confusion_matrix(labels, preds, 5)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 200
    with pytest.raises(ValueError, match="predictions"):
        evaluate.confusion_matrix([0, 1], [0, 5], 5)


def test_plot_confusion_matrix_writes_png(tmp_path):
    cm = evaluate.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    path = evaluate.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "sub" / "cm.png", title="t")
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0.05  # not a blank image
    with pytest.raises(ValueError, match="square"):
        evaluate.plot_confusion_matrix(cm, ["a", "b"], tmp_path / "x.png")


def test_plot_retrieval_grid_writes_png(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    image_embeds = rng.normal(size=(6, 4))
    queries = image_embeds[[1, 4]] + 0.01
    relevant = np.zeros((2, 6), bool)
    relevant[0, 1] = relevant[1, 4] = True
    path = evaluate.plot_retrieval_grid(
        ["one", "four"], queries, image_embeds, images, tmp_path / "g.png", k=3, relevant=relevant
    )
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200
    gray = evaluate.plot_retrieval_grid(["q"], queries[:1], image_embeds, images[..., 0], tmp_path / "h.png", k=10)
    assert matplotlib.image.imread(gray).shape[1] > 300  # k clipped to 6 images
    with pytest.raises(ValueError, match="queries"):
        evaluate.plot_retrieval_grid(["a"], queries, image_embeds, images, tmp_path / "x.png")


def test_linear_probe_tie_break_picks_the_smallest_tied_l2_in_any_grid_order():
    # well-separated classes: every l2 in the grid reaches validation accuracy 1.0, a tie
    rng = np.random.default_rng(5)
    ytr = np.tile([0, 1], 30)
    xtr = 10.0 * np.eye(2)[ytr] + 0.01 * rng.normal(size=(60, 2))
    for grid in ((1e-3, 1e-2, 1e-1), (1e-1, 1e-3, 1e-2)):
        got = evaluate.linear_probe(xtr, ytr, xtr, ytr, l2_grid=grid, seed=0)
        assert got["val_accuracy"] == 1.0
        assert got["l2"] == 1e-3, got


# ------------------------------------------------------------------------------------------ frechet distance


def _scipy_frechet(a, b):
    """The usual FID formula with scipy.linalg.sqrtm of the product (pytorch-fid's computation), float64."""
    import scipy.linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(c_a @ c_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(c_a + c_b - 2 * root))


@pytest.mark.parametrize("dim, n_a, n_b", [(4, 50, 80), (16, 300, 200), (32, 100, 1000)])
def test_frechet_distance_equals_the_sqrtm_formula(dim, n_a, n_b):
    rng = np.random.default_rng(dim)
    mix = rng.standard_normal((dim, dim))
    a = rng.standard_normal((n_a, dim)) @ mix
    b = rng.standard_normal((n_b, dim)) @ (mix + 0.3 * rng.standard_normal((dim, dim))) + 0.5
    want = _scipy_frechet(a, b)
    np.testing.assert_allclose(evaluate.frechet_distance(a, b), want, rtol=1e-8)
    np.testing.assert_allclose(evaluate.frechet_distance(b, a), want, rtol=1e-8)  # symmetric


def test_frechet_distance_of_gaussians_has_the_closed_form():
    """Isotropic Gaussians N(m, s^2 I) and N(m', t^2 I): d^2 = |m - m'|^2 + D (s - t)^2, up to sampling error."""
    rng = np.random.default_rng(0)
    dim = 3
    a = rng.standard_normal((200_000, dim)) * 1.0
    b = rng.standard_normal((200_000, dim)) * 2.0 + np.array([1.0, 0.0, -1.0])
    assert abs(evaluate.frechet_distance(a, b) - (2.0 + dim * 1.0)) < 0.05
    assert abs(evaluate.frechet_distance(a, a)) < 1e-9


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), "same embedding width"),
        (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2 rows"),
        (np.zeros(5), np.zeros((5, 3)), "rank 2"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), "non-finite"),
    ],
)
def test_frechet_distance_refuses_bad_features(a, b, match):
    with pytest.raises(ValueError, match=match):
        evaluate.frechet_distance(a, b)


# ----------------------------------------------------------------------------------------------- COCO AP


def _image(boxes, labels, scores=None):
    out = {"boxes": np.asarray(boxes, np.float64).reshape(-1, 4), "labels": np.asarray(labels, np.int64)}
    if scores is not None:
        out["scores"] = np.asarray(scores, np.float64)
    return out


def test_coco_ap_by_hand():
    """Perfect boxes give 1; a confident false positive before the one true box halves precision at every recall."""
    gt = [_image([[0, 0, 40, 40]], [0]), _image([[10, 10, 110, 110]], [1])]
    perfect = [_image([[0, 0, 40, 40]], [0], [0.9]), _image([[10, 10, 110, 110]], [1], [0.8])]
    want = {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": -1.0, "APm": 1.0, "APl": 1.0}
    assert evaluate.coco_ap(gt, perfect) == pytest.approx(want, abs=1e-12)  # precision tp / (tp + fp + 2^-52)
    fp_first = [_image([[0, 0, 40, 40], [300, 300, 340, 340]], [0, 0], [0.5, 0.9]), perfect[1]]
    got = evaluate.coco_ap(gt, fp_first)
    assert got["APm"] == pytest.approx(0.5) and got["APl"] == pytest.approx(1.0) and got["AP"] == pytest.approx(0.75)
    shifted = [_image([[0, 0, 40, 30]], [0], [0.9]), perfect[1]]  # IoU 0.75: a hit at 0.50-0.75, a miss above
    assert evaluate.coco_ap(gt, shifted)["APm"] == pytest.approx(6 / 10)
    assert evaluate.coco_ap(gt, [_image([], [], []), _image([], [], [])])["AP"] == 0.0


@pytest.mark.parametrize(
    "gt, det, match",
    [
        ([_image([[0, 0, 1, 1]], [0])], [], "1 images but detections has 0"),
        ([_image([[5, 0, 1, 1]], [0])], [_image([], [], [])], r"ground_truth\[0\]\['boxes'\]\[0\].*x1 < x0"),
        ([_image([[0, 0, 1, 1]], [0])], [{"boxes": np.zeros((1, 4)), "labels": [0]}], r"no \['scores'\]"),
        ([{"boxes": np.zeros((2, 3)), "labels": [0, 1]}], [_image([], [], [])], r"shape \[N, 4\]"),
        ([_image([[0, 0, 1, 1]], [0])], [_image([[0, 0, 1, 1]], [0], [np.nan])], "non-finite scores"),
        ([{"boxes": np.zeros((1, 4)), "labels": [0.5]}], [_image([], [], [])], "integer category ids"),
    ],
)
def test_coco_ap_refuses_bad_input(gt, det, match):
    with pytest.raises(ValueError, match=match):
        evaluate.coco_ap(gt, det)
