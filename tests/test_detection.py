"""mmjax.detection: OWL-ViT's heads on CLIP recomputed by hand from CLIP's own outputs (float64), the loss recomputed
in NumPy with SciPy's assignment, both matchers giving the same loss, and bad shapes refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from mmjax.clip import CLIP, CLIPConfig
from mmjax.detection import OWLViT, box_bias, detection_loss, matching_cost
from tests.tolerances import float64

CFG = CLIPConfig(
    embed_dim=8, image_size=16, patch_size=4, vision_width=16, vision_depth=1, vision_heads=2, vision_mlp_dim=32,
    vocab_size=20, context_length=5, text_width=16, text_depth=1, text_heads=2, text_mlp_dim=32, eot_id=19,
    attention_implementation="reference",
)  # fmt: skip


def _ln(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


@pytest.fixture(scope="module")
def model_and_params():
    with float64():
        model = OWLViT(CFG, param_dtype=jnp.float64)
        rng = np.random.default_rng(0)
        images = rng.normal(size=(2, 16, 16, 3))
        ids = np.array([[1, 4, 5, 19, 0], [1, 7, 19, 0, 0], [1, 3, 3, 9, 19]], np.int32)
        params = jax.jit(model.init)(jax.random.key(0), images, ids)["params"]  # compiled (op by op: half a minute)
        # random heads (the init has zero biases and a prior shift): every term of the formula matters
        params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape), params)
    return model, params, images, ids


def test_a_trained_clip_drops_in_and_the_heads_follow_owl_vit(model_and_params):
    model, params, images, ids = model_and_params
    with float64():
        clip = CLIP(CFG, param_dtype=jnp.float64)
        assert jax.tree.structure(jax.eval_shape(clip.init, jax.random.key(1), images, ids)["params"]) == (
            jax.tree.structure(params["clip"])
        )
        ref = jax.jit(clip.apply)({"params": params["clip"]}, images, ids)
        # CLIP's encode_text (text_projection of the pooled token) without its float32 cast
        encode_text = lambda v, i: clip.apply(v, i, method=lambda m, i: m.text_projection(m.text(i, None)[0]))  # noqa: E731
        text = np.asarray(jax.jit(encode_text)({"params": params["clip"]}, ids))
        out = jax.jit(model.apply)({"params": params}, images, ids)
    p = jax.tree.map(np.asarray, params)
    eps = CFG.vision_layer_norm_eps
    x = _ln(np.asarray(ref.image_intermediates["encoded"]), **p["clip"]["vision"]["post_norm"], eps=eps)
    t = _ln(x[:, 1:] * x[:, :1], **p["merge_norm"], eps=eps)
    np.testing.assert_allclose(out.tokens, t, rtol=1e-12, atol=1e-12)
    ch = p["class_head"]
    c = t @ ch["dense0"]["kernel"] + ch["dense0"]["bias"]
    c = c / (np.linalg.norm(c, axis=-1, keepdims=True) + 1e-6)
    q = text / (np.linalg.norm(text, axis=-1, keepdims=True) + 1e-6)
    shift = t @ ch["logit_shift"]["kernel"] + ch["logit_shift"]["bias"]
    s = t @ ch["logit_scale"]["kernel"] + ch["logit_scale"]["bias"]
    scale = np.where(s > 0, s, np.expm1(s)) + 1
    np.testing.assert_allclose(out.logits, (c @ q.T + shift) * scale, rtol=1e-12, atol=1e-12)
    bh = p["box_head"]
    h = _gelu(t @ bh["dense0"]["kernel"] + bh["dense0"]["bias"])
    h = _gelu(h @ bh["dense1"]["kernel"] + bh["dense1"]["bias"])
    raw = h @ bh["dense2"]["kernel"] + bh["dense2"]["bias"] + np.asarray(box_bias(4, jnp.float32), np.float64)
    np.testing.assert_allclose(out.boxes, 1 / (1 + np.exp(-raw)), rtol=1e-6, atol=1e-7)  # box_bias is float32 here


def test_per_image_queries_and_query_masks(model_and_params):
    model, params, images, ids = model_and_params
    apply = jax.jit(model.apply, static_argnames="method")  # each call one compiled program (float64: 1e-12 holds)
    with float64():
        shared = apply({"params": params}, images, ids)
        per_image = apply({"params": params}, images, np.stack([ids, ids[::-1]]))
        q = apply({"params": params}, ids, method="embed_queries")
        masked = apply({"params": params}, images, query_embeds=q, query_mask=np.array([True, False, True]))
    np.testing.assert_allclose(per_image.logits[0], shared.logits[0], rtol=1e-12)
    np.testing.assert_allclose(per_image.logits[1], shared.logits[1][:, ::-1], rtol=1e-12)
    np.testing.assert_allclose(masked.logits[..., [0, 2]], shared.logits[..., [0, 2]], rtol=1e-12)
    assert (np.asarray(masked.logits[..., 1]) == np.finfo(np.float64).min).all()


def test_an_untrained_box_head_predicts_each_tokens_cell(model_and_params):
    model, params, images, ids = model_and_params
    zero = jax.tree.map(np.zeros_like, params["box_head"])
    out = model.apply({"params": {**params, "box_head": zero}}, images, ids)
    cells = [[(j + 0.5) / 4, (i + 0.5) / 4, 0.25, 0.25] for i in range(4) for j in range(4)]
    np.testing.assert_allclose(out.boxes[0], cells, atol=1e-6)


def _loss_by_hand(logits, boxes, targets, tboxes, valid, qmask, alpha=0.3, gamma=2.0):
    """float64 NumPy: scipy's optimal assignment of the cost, then the normalised focal + L1 + GIoU."""
    sig = 1 / (1 + np.exp(-logits))
    pos = alpha * (1 - sig) ** gamma * -np.log(sig)
    neg = (1 - alpha) * sig**gamma * -np.log(1 - sig)

    def corners(b):
        return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

    def giou(a, b):
        lo, hi = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), -1)
        area = lambda x: np.prod(x[..., 2:] - x[..., :2], -1)  # noqa: E731
        union = area(a) + area(b) - inter
        enc = np.prod(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]), -1)
        return inter / union - (enc - union) / enc

    losses = []
    for i in range(len(logits)):
        real = np.flatnonzero(valid[i])
        t = targets[i] * qmask[i]
        cc = (pos[i] - neg[i]) @ t.T / np.maximum(t.sum(-1), 1)
        cb = np.abs(boxes[i][:, None] - tboxes[i][None]).sum(-1)
        cg = -giou(corners(boxes[i])[:, None], corners(tboxes[i])[None])
        rows, cols = linear_sum_assignment((cc + cb + cg)[:, real])
        y = np.zeros_like(logits[i])
        y[rows] = targets[i][real[cols]]
        ce = -y * np.log(sig[i]) - (1 - y) * np.log(1 - sig[i])
        p_t = sig[i] * y + (1 - sig[i]) * (1 - y)
        focal = (alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma
        n = max(len(real), 1)
        l1 = np.abs(boxes[i][rows] - tboxes[i][real[cols]]).sum()
        g = (1 - giou(corners(boxes[i][rows]), corners(tboxes[i][real[cols]]))).sum()
        losses.append(((focal * qmask[i]).sum() + l1 + g) / n)
    return np.mean(losses)


def _random_problem(seed, b=3, p=9, q=5, k=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, p, q)) * 2
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, p, 2)), rng.uniform(0.05, 0.4, (b, p, 2))], -1)
    tboxes = np.concatenate([rng.uniform(0.2, 0.8, (b, k, 2)), rng.uniform(0.05, 0.4, (b, k, 2))], -1)
    targets = (rng.random((b, k, q)) < 0.4).astype(np.float64)
    valid = np.arange(k)[None] < np.array([[4], [2], [0]])[:b]
    qmask = rng.random((b, q)) < 0.8
    return logits, boxes, targets, tboxes, valid, qmask


@pytest.mark.parametrize("matcher", ["jax", "scipy"])
def test_the_loss_is_the_matched_focal_l1_giou_recomputed_in_numpy(matcher):
    args = _random_problem(0)
    with float64():
        loss, aux = jax.jit(lambda *a: detection_loss(*a, matcher=matcher))(*args)
    assert float(loss) == pytest.approx(_loss_by_hand(*args), rel=1e-10)
    assigned = np.asarray(aux["assigned"])
    assert [(assigned[i] >= 0).sum() for i in range(3)] == [4, 2, 0]


def test_the_two_matchers_give_the_same_assignment_and_gradients():
    args = [jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else jnp.asarray(a) for a in _random_problem(1)]
    grads = {}
    for matcher in ("jax", "scipy"):
        fn = lambda lg, bx: detection_loss(lg, bx, *args[2:], matcher=matcher)[0]  # noqa: E731
        grads[matcher] = jax.grad(fn, argnums=(0, 1))(*args[:2])
        assert all(np.isfinite(g).all() for g in grads[matcher])
    for a, b in zip(grads["jax"], grads["scipy"]):
        np.testing.assert_array_equal(a, b)


def test_the_matching_cost_prefers_the_right_box_and_class():
    boxes = jnp.array([[[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]])
    logits = jnp.array([[[4.0, -4.0], [-4.0, 4.0]]])  # token 0 says query 0, token 1 says query 1
    targets = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])  # box 0 answers query 1, box 1 query 0
    cost = matching_cost(logits, boxes, targets, boxes[:, ::-1])
    assert np.argmin(cost[0], axis=0).tolist() == [1, 0]


def test_bad_shapes_are_refused_with_the_shape(model_and_params):
    model, params, images, ids = model_and_params

    def apply(*args, **kwargs):  # traced only (the checks are on shapes and dtypes): nothing is computed
        with float64():  # the fixture's model is a float64 model
            return jax.eval_shape(lambda: model.apply({"params": params}, *args, **kwargs))

    with pytest.raises(ValueError, match="images must be NHWC"):
        apply(images[:, :8], ids)
    with pytest.raises(ValueError, match="exactly one of query_ids"):
        apply(images)
    with pytest.raises(ValueError, match=r"query_mask must have shape \(3,\)"):
        apply(images, ids, query_mask=np.ones(4, bool))
    with pytest.raises(ValueError, match="query ids must be int"):
        apply(images, np.ones(5, np.int32))
    args = list(_random_problem(2))
    args[3] = args[3][:, :2]
    with pytest.raises(ValueError, match=r"target_boxes must have shape \(3, 4, 4\)"):
        jax.eval_shape(detection_loss, *args)
