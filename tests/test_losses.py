"""Losses: formulas against float64 NumPy; pmap, shard_map, sharded-jit and chunked forms against one device."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax import losses

D = 8  # devices (tests/conftest.py)
B = 16  # global batch
DIM = 6


def _embeds(seed, batch=B, dim=DIM):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, batch, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x[0].astype(np.float32), x[1].astype(np.float32)


def _np_logsumexp(z, axis):
    m = z.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_softmax_loss(img, txt, logit_scale):
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    logits = np.exp(float(logit_scale)) * img @ txt.T
    n = len(img)
    ce_img = _np_logsumexp(logits, 1) - np.diag(logits)
    ce_txt = _np_logsumexp(logits, 0) - np.diag(logits)
    return (ce_img.sum() + ce_txt.sum()) / (2 * n)


def np_sigmoid_loss(img, txt, logit_scale, logit_bias):
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    logits = np.exp(float(logit_scale)) * img @ txt.T + float(logit_bias)
    z = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-z * logits))) / len(img)


SCALE = np.float32(np.log(10.0))
BIAS = np.float32(-3.0)


def _global(kind, chunk_size=None):
    """Scalar loss of (img, txt, scale, bias) on global arrays; `kind` picks softmax or sigmoid."""
    if kind == "softmax":
        return lambda i, t, s, b: losses.softmax_contrastive_loss(i, t, s)
    return lambda i, t, s, b: losses.sigmoid_contrastive_loss(i, t, s, b, chunk_size=chunk_size)


def _local(kind, chunk_size=None):
    if kind == "softmax":
        return lambda i, t, s, b: losses.softmax_contrastive_loss(i, t, s, axis_name="d")
    return lambda i, t, s, b: losses.sigmoid_contrastive_loss(i, t, s, b, axis_name="d", chunk_size=chunk_size)


VARIANTS = [("softmax", None), ("sigmoid", None), ("sigmoid", 1), ("sigmoid", 3)]


# ------------------------------------------------------------------------------------- single device


@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_matches_numpy_float64(seed):
    img, txt = _embeds(seed)
    got = jax.jit(losses.softmax_contrastive_loss)(img, txt, SCALE)
    np.testing.assert_allclose(got, np_softmax_loss(img, txt, SCALE), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5, 16, 40])
def test_sigmoid_matches_numpy_float64(chunk_size):
    img, txt = _embeds(2)
    fn = jax.jit(functools.partial(losses.sigmoid_contrastive_loss, chunk_size=chunk_size))
    got = fn(img, txt, SCALE, BIAS)
    np.testing.assert_allclose(got, np_sigmoid_loss(img, txt, SCALE, BIAS), rtol=1e-5)


def test_bfloat16_embeddings_are_computed_in_float32():
    img, txt = _embeds(11)
    got = losses.sigmoid_contrastive_loss(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), SCALE, BIAS)
    assert got.dtype == jnp.float32
    want = np_sigmoid_loss(
        np.asarray(jnp.asarray(img, jnp.bfloat16), np.float64),
        np.asarray(jnp.asarray(txt, jnp.bfloat16), np.float64),
        SCALE,
        BIAS,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_perfect_alignment_gives_small_softmax_loss_and_swapping_pairs_raises_it():
    img = np.eye(4, dtype=np.float32)
    good = losses.softmax_contrastive_loss(img, img, 5.0)
    bad = losses.softmax_contrastive_loss(img, img[::-1], 5.0)
    assert float(good) < 0.05 < 1.0 < float(bad)


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunked_sigmoid_gradients_equal_full(chunk_size):
    img, txt = _embeds(3)
    argnums = (0, 1, 2, 3)
    full = jax.grad(_global("sigmoid"), argnums)(img, txt, SCALE, BIAS)
    chunked = jax.jit(jax.grad(_global("sigmoid", chunk_size), argnums))(img, txt, SCALE, BIAS)
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_chunked_sigmoid_never_builds_the_full_matrix():
    """No intermediate of the chunked loss (forward and backward) has B*B elements."""
    n, chunk = 64, 4
    img, txt = _embeds(4, batch=n)
    fn = jax.grad(_global("sigmoid", chunk), (0, 1))
    jaxpr = jax.make_jaxpr(fn)(img, txt, SCALE, BIAS)

    def sizes(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    biggest = max(sizes(jaxpr.jaxpr))
    assert biggest < n * n, biggest
    full = max(sizes(jax.make_jaxpr(jax.grad(_global("sigmoid"), (0, 1)))(img, txt, SCALE, BIAS).jaxpr))
    assert full >= n * n


def test_chunked_sigmoid_under_pmap_passes_shards_round_a_ring():
    img, txt = _embeds(10)
    args = (img.reshape(D, -1, DIM), txt.reshape(D, -1, DIM), SCALE, BIAS)
    ring = str(jax.make_jaxpr(jax.pmap(_local("sigmoid", 2), axis_name="d", in_axes=(0, 0, None, None)))(*args))
    gather = str(jax.make_jaxpr(jax.pmap(_local("sigmoid"), axis_name="d", in_axes=(0, 0, None, None)))(*args))
    assert "ppermute" in ring and "all_gather" not in ring
    assert "all_gather" in gather and "ppermute" not in gather


def test_softmax_cross_entropy_with_label_smoothing_matches_numpy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=7)
    eps = 0.1
    target = np.full((7, 5), eps / 5) + (1 - eps) * np.eye(5)[labels]
    z = logits.astype(np.float64)
    logp = z - _np_logsumexp(z, 1)[:, None]
    want = -(target * logp).sum(1).mean()
    got = jax.jit(losses.softmax_cross_entropy, static_argnums=2)(logits, labels, eps)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "img_shape, txt_shape, match",
    [((4,), (4,), "rank 2"), ((2, 3, 4), (2, 3, 4), "rank 2"), ((4, 3), (5, 3), "same"), ((4, 3), (4, 2), "same")],
)
def test_bad_embedding_shapes_raise(img_shape, txt_shape, match):
    img, txt = np.zeros(img_shape, np.float32), np.zeros(txt_shape, np.float32)
    with pytest.raises(ValueError, match=match):
        losses.softmax_contrastive_loss(img, txt, 0.0)
    with pytest.raises(ValueError, match=match):
        losses.sigmoid_contrastive_loss(img, txt, 0.0, 0.0)


def test_non_scalar_scale_and_bias_raise():
    img, txt = _embeds(0)
    with pytest.raises(ValueError, match="logit_scale"):
        losses.softmax_contrastive_loss(img, txt, np.zeros(2))
    with pytest.raises(ValueError, match="logit_bias"):
        losses.sigmoid_contrastive_loss(img, txt, 0.0, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="chunk_size"):
        losses.sigmoid_contrastive_loss(img, txt, 0.0, 0.0, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        losses.softmax_cross_entropy(np.zeros((3, 4)), np.zeros((4,), np.int32))


# ------------------------------------------------------------------------------- distributed parity


def _global_value_and_grads(kind, chunk_size, img, txt):
    return jax.value_and_grad(_global(kind, chunk_size), (0, 1, 2, 3))(img, txt, SCALE, BIAS)


@pytest.mark.parametrize("kind, chunk_size", VARIANTS)
def test_pmap_loss_and_grads_equal_global(kind, chunk_size):
    img, txt = _embeds(6)
    want_loss, want_grads = _global_value_and_grads(kind, chunk_size, img, txt)

    def per_device(i, t, s, b):
        loss, grads = jax.value_and_grad(_local(kind, chunk_size), (0, 1, 2, 3))(i, t, s, b)
        g_i, g_t, g_s, g_b = grads
        # the engine's data-parallel reduction for replicated parameters
        return loss, g_i, g_t, lax.pmean(g_s, "d"), lax.pmean(g_b, "d")

    fn = jax.pmap(per_device, axis_name="d", in_axes=(0, 0, None, None))
    loss, g_i, g_t, g_s, g_b = fn(img.reshape(D, -1, DIM), txt.reshape(D, -1, DIM), SCALE, BIAS)
    np.testing.assert_allclose(loss, np.full(D, want_loss), rtol=1e-5)
    # each device's gradient w.r.t. its own shard is D times its share of the global gradient
    np.testing.assert_allclose(g_i.reshape(B, DIM) / D, want_grads[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_t.reshape(B, DIM) / D, want_grads[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_s, np.full(D, want_grads[2]), rtol=1e-4, atol=1e-6)
    if kind == "sigmoid":
        np.testing.assert_allclose(g_b, np.full(D, want_grads[3]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, chunk_size", [("softmax", None), ("sigmoid", None), ("sigmoid", 2)])
def test_pmap_pmean_of_replicated_parameter_grads_equals_global_grad(kind, chunk_size):
    """Towers as replicated projections: pmean of per-device grads == grad of the global-batch loss."""
    rng = np.random.default_rng(7)
    x_img = rng.normal(size=(B, 5)).astype(np.float32)
    x_txt = rng.normal(size=(B, 4)).astype(np.float32)
    params = {
        "w_img": rng.normal(size=(5, DIM)).astype(np.float32),
        "w_txt": rng.normal(size=(4, DIM)).astype(np.float32),
        "scale": SCALE,
        "bias": BIAS,
    }

    def normalize(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def objective(loss_fn, p, xi, xt):
        return loss_fn(normalize(xi @ p["w_img"]), normalize(xt @ p["w_txt"]), p["scale"], p["bias"])

    want = jax.grad(functools.partial(objective, _global(kind, chunk_size)))(params, x_img, x_txt)

    def per_device(p, xi, xt):
        g = jax.grad(functools.partial(objective, _local(kind, chunk_size)))(p, xi, xt)
        return lax.pmean(g, "d")

    # as in mmjax.train.parallel's "pmap" mode: the replicated state carries a leading device axis
    stacked = jax.tree.map(lambda x: np.stack([x] * D), params)
    got = jax.pmap(per_device, axis_name="d")(stacked, x_img.reshape(D, -1, 5), x_txt.reshape(D, -1, 4))
    for name in ["w_img", "w_txt", "scale"] + (["bias"] if kind == "sigmoid" else []):
        np.testing.assert_allclose(got[name][0], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[name][-1], want[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind, chunk_size", VARIANTS)
@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_loss_and_grads_equal_global(kind, chunk_size, check_vma):
    img, txt = _embeds(8)
    want_loss, want_grads = _global_value_and_grads(kind, chunk_size, img, txt)
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def body(i, t, s, b):
        loss, (g_i, g_t, g_s, g_b) = jax.value_and_grad(_local(kind, chunk_size), (0, 1, 2, 3))(i, t, s, b)
        if not check_vma:  # pmap semantics: per-device grads, the engine pmeans them
            g_s, g_b = lax.pmean(g_s, "d"), lax.pmean(g_b, "d")
            g_i, g_t = g_i / D, g_t / D
        return loss, g_i, g_t, g_s, g_b

    fn = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P("d"), P("d"), P(), P()),
            out_specs=(P(), P("d"), P("d"), P(), P()),
            check_vma=check_vma,
        )
    )
    loss, g_i, g_t, g_s, g_b = fn(img, txt, SCALE, BIAS)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip((g_i, g_t, g_s, g_b), want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, chunk_size", VARIANTS)
def test_sharded_jit_loss_and_grads_equal_single_device(kind, chunk_size):
    img, txt = _embeds(9)
    want_loss, want_grads = _global_value_and_grads(kind, chunk_size, img, txt)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    img_s, txt_s = jax.device_put(img, rows), jax.device_put(txt, rows)
    assert len(img_s.sharding.device_set) == D
    fn = jax.jit(jax.value_and_grad(_global(kind, chunk_size), (0, 1, 2, 3)))
    loss, grads = fn(img_s, txt_s, SCALE, BIAS)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
