"""Unit tests for mmjax.text: pooling modes, causality, padding mask, shapes, jit, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.text import POOLING_MODES, TextTransformer, pool_tokens
from tests.tolerances import assert_trees_float32_close, assert_trees_float64_equal, float64, to_float64

EOT = 19
# Round-off chain of this tower (tests/tolerances.py): 2 blocks of ~6 rounded stages (LN, QKV, softmax, attention
# sum, MLP), the longest reduction the MLP's 64 inputs; the outputs are LayerNorm-ed, O(1).
TERMS = 2 * 6 * 64


def assert_orders_agree(f, g, params, *args):
    """``f(params, *args)`` and ``g(params, *args)``, two computation orders of the same pytree of arrays, agree: to
    1e-10 in float64 (the equality) and within float32 round-off of :data:`TERMS` roundings (float32 is fine)."""
    with float64():
        p64 = to_float64(params)
        assert_trees_float64_equal(f(p64, *args), g(p64, *args), scale="tree")
    assert_trees_float32_close(f(params, *args), g(params, *args), terms=TERMS, scale="tree")


def make(**kw):
    args = dict(vocab_size=20, width=16, depth=2, num_heads=2, context_length=8, eot_id=EOT)
    args.update(kw)
    return TextTransformer(**args)


@pytest.fixture(scope="module")
def ids():
    return jnp.array([[1, 5, 7, EOT, 0, 0, 0, 0], [1, EOT, 3, EOT, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, EOT]], jnp.int32)


@pytest.fixture(scope="module")
def params(ids):
    return jax.jit(make().init)(jax.random.key(0), ids)["params"]


def test_pool_tokens_modes_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    ids = np.array([[3, 9, 2, 9, 0], [3, 1, 2, 4, 9], [3, 4, 1, 1, 1]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(pool_tokens(x, ids, "eot", eot_id=9), x[[0, 1, 2], [1, 4, 0]])  # no eot -> 0
    np.testing.assert_array_equal(pool_tokens(x, ids, "argmax"), x[[0, 1, 2], [1, 4, 1]])
    np.testing.assert_array_equal(pool_tokens(x, ids, "first"), x[:, 0])
    np.testing.assert_array_equal(pool_tokens(x, ids, "last"), x[:, -1])
    np.testing.assert_array_equal(pool_tokens(x, ids, "last", attention_mask=mask), x[[0, 1, 2], [3, 4, 1]])
    np.testing.assert_allclose(pool_tokens(x, ids, "mean"), x.mean(1), rtol=1e-6)
    want = np.stack([x[b, mask[b]].mean(0) for b in range(3)])
    np.testing.assert_allclose(pool_tokens(x, ids, "mean", attention_mask=mask), want, rtol=1e-6)
    with pytest.raises(ValueError, match="pooling mode"):
        pool_tokens(x, ids, "max")


def test_shapes_and_intermediates(ids, params):
    pooled, aux = make().apply({"params": params}, ids)
    assert pooled.shape == (3, 16) and aux["tokens"].shape == (3, 8, 16)
    assert set(aux) >= {"embeddings", "tokens", "encoderblock_0", "encoderblock_1"}
    assert params["pos_embedding"].shape == (8, 16)
    assert params["token_embedding"]["embedding"].shape == (20, 16)
    # eot pooling picks the first eot token of each row
    np.testing.assert_array_equal(pooled, aux["tokens"][jnp.arange(3), jnp.array([3, 1, 7])])


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_modes_follow_pool_tokens(ids, params, mode):
    pooled, aux = make(pooling=mode).apply({"params": params}, ids)
    np.testing.assert_allclose(pooled, pool_tokens(aux["tokens"], ids, mode, EOT), rtol=1e-6, atol=1e-6)


def test_causal_tokens_do_not_see_the_future(ids, params):
    model = make()
    _, a = model.apply({"params": params}, ids)
    changed = ids.at[:, 5:].set(11)
    pooled, b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a["tokens"][:, :5], b["tokens"][:, :5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["tokens"][:, 5:], b["tokens"][:, 5:])
    # without causality the prefix would change
    _, c = make(causal=False).apply({"params": params}, changed)
    _, d = make(causal=False).apply({"params": params}, ids)
    assert not np.allclose(c["tokens"][:, :5], d["tokens"][:, :5])


def test_attention_mask_hides_padding_from_later_tokens(ids, params):
    model = make(pooling="mean")
    mask = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
    # with the mask, the masked-out tokens do not change the valid ones nor the mean over valid tokens
    noisy = jnp.where(mask.astype(bool), ids, 13)
    # compiled: one program each, not op by op (assert_orders_agree checks the equality in float64 and float32)
    masked = jax.jit(lambda p, i: model.apply({"params": p}, i, mask))
    assert_orders_agree(
        lambda p, i: masked(p, i)[0],
        lambda p, i: masked(p, noisy)[0],
        params,
        ids,
    )
    # a shorter sequence without padding gives the same valid-token features
    unpadded = jax.jit(lambda p, i: model.apply({"params": p}, i[:2, :4])[1]["tokens"])
    assert_orders_agree(
        lambda p, i: masked(p, i)[1]["tokens"][:2, :4],
        unpadded,
        params,
        ids,
    )


def test_jit_and_grad(ids, params):
    model = make()
    fn = jax.jit(lambda p, i: model.apply({"params": p}, i)[0])
    assert_orders_agree(fn, lambda p, i: model.apply({"params": p}, i)[0], params, ids)
    g = jax.grad(lambda p: jnp.sum(fn(p, ids) ** 2))(params)
    assert float(jnp.abs(g["token_embedding"]["embedding"][EOT]).sum()) > 0
    assert float(jnp.abs(g["token_embedding"]["embedding"][18]).sum()) == 0  # id 18 is unused


def test_scan_matches_unrolled(ids, params):
    scanned = make(scan=True)

    def apply_scanned(p, i):
        enc = p["encoder"]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), enc["encoderblock_0"], enc["encoderblock_1"])
        p = {**p, "encoder": {"encoderblock": stacked, "encoder_norm": enc["encoder_norm"]}}
        return scanned.apply({"params": p}, i)[0]

    assert_orders_agree(apply_scanned, lambda p, i: make().apply({"params": p}, i)[0], params, ids)


def test_bad_inputs(ids, params):
    model = make()
    with pytest.raises(ValueError, match="integer array"):
        model.apply({"params": params}, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="context_length=8"):
        model.apply({"params": params}, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply({"params": params}, ids, jnp.ones((3, 7), bool))
    with pytest.raises(ValueError, match="pooling"):
        make(pooling="max").apply({"params": params}, ids)


def test_encoder_config_whole_equals_the_keywords_and_clashes_raise():
    from mmjax.layers import EncoderConfig

    ids = np.array([[1, 4, 9, 0, 0]], np.int32)
    flat = TextTransformer(vocab_size=10, width=8, depth=2, num_heads=2, context_length=5, eot_id=9)
    cfg = flat.get_encoder_config()
    assert cfg == EncoderConfig(width=8, depth=2, num_heads=2, mlp_dim=32, activation="quick_gelu", layer_norm_eps=1e-5)
    whole = TextTransformer(vocab_size=10, encoder_config=cfg, context_length=5, eot_id=9)
    p1, p2 = flat.init(jax.random.key(0), ids)["params"], whole.init(jax.random.key(0), ids)["params"]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), p1, p2))
    assert np.array_equal(flat.apply({"params": p1}, ids)[0], whole.apply({"params": p1}, ids)[0])
    with pytest.raises(ValueError, match="encoder_config is given together with the encoder keywords depth=3"):
        TextTransformer(vocab_size=10, depth=3, encoder_config=cfg).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="width is not set"):
        TextTransformer(vocab_size=10).init(jax.random.key(0), ids)
