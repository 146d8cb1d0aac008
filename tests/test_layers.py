"""Tests of mmjax.layers: activations, Mlp, EncoderBlock, Encoder (scan / remat / drop path), position embeddings."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import layers
from mmjax.layers import (
    ACTIVATIONS,
    Encoder,
    EncoderBlock,
    EncoderConfig,
    LearnedPositionEmbedding,
    Mlp,
    add_learned_posemb,
    drop_path,
    get_activation,
    posemb_sincos_2d,
    stack_layers,
    unstack_layers,
)
from mmjax.layers import l2_normalize as l2_normalize_layers

X = np.linspace(-4.0, 4.0, 41)


def _block(**kw):
    return EncoderBlock(EncoderConfig(**kw))


def _encoder(**kw):
    return Encoder(EncoderConfig(**kw))


def _np_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _np_attention(x, p, mask=None):
    q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + np.asarray(p["query"]["bias"])
    k = np.einsum("btd,dhk->bthk", x, p["key"]["kernel"]) + np.asarray(p["key"]["bias"])
    v = np.einsum("btd,dhk->bthk", x, p["value"]["kernel"]) + np.asarray(p["value"]["bias"])
    s = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    y = np.einsum("bhts,bshk->bthk", w, v)
    return np.einsum("bthk,hkd->btd", y, p["out"]["kernel"]) + np.asarray(p["out"]["bias"])


def _np_block(x, p, eps, act):
    x = x + _np_attention(_np_layer_norm(x, p["ln1"], eps), p["attn"])
    y = _np_layer_norm(x, p["ln2"], eps)
    h = act(y @ np.asarray(p["mlp"]["fc1"]["kernel"]) + np.asarray(p["mlp"]["fc1"]["bias"]))
    return x + h @ np.asarray(p["mlp"]["fc2"]["kernel"]) + np.asarray(p["mlp"]["fc2"]["bias"])


def _np_gelu(x):
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.ravel(x)]).reshape(np.shape(x))


def _randomize(params, seed=0):
    """Replace every parameter (incl. zero-initialised biases and unit LayerNorm scales) with random values."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) + (x.ndim == 1) for k, x in zip(keys, leaves)]
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gelu", _np_gelu(X)),
        ("gelu_tanh", 0.5 * X * (1 + np.tanh(math.sqrt(2 / math.pi) * (X + 0.044715 * X**3)))),
        ("quick_gelu", X / (1 + np.exp(-1.702 * X))),
        ("relu", np.maximum(X, 0)),
        ("silu", X / (1 + np.exp(-X))),
        ("identity", X),
    ],
)
def test_activations_match_formulas(name, expected):
    got = jax.jit(get_activation(name))(jnp.asarray(X, jnp.float32))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)


def test_gelu_exact_differs_from_tanh_approximation():
    x = jnp.asarray(X, jnp.float32)
    assert float(jnp.max(jnp.abs(get_activation("gelu")(x) - get_activation("gelu_tanh")(x)))) > 1e-4


def test_get_activation_bad_name_lists_valid_names():
    with pytest.raises(ValueError, match="activation='gelu2'.*quick_gelu"):
        get_activation("gelu2")


def test_mlp_matches_formula_and_dropout():
    mlp = Mlp(hidden_dim=12, activation="quick_gelu", dropout_rate=0.5)
    x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
    params = _randomize(mlp.init(jax.random.key(0), x)["params"])
    assert set(params) == {"fc1", "fc2"} and params["fc1"]["kernel"].shape == (5, 12)
    h = x @ params["fc1"]["kernel"] + params["fc1"]["bias"]
    want = (h / (1 + np.exp(-1.702 * h))) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x), want, atol=1e-5, rtol=1e-5)
    train = mlp.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train, want, atol=1e-3)
    assert Mlp(hidden_dim=4, out_dim=7).init(jax.random.key(0), x)["params"]["fc2"]["kernel"].shape == (4, 7)


def test_drop_path_zeroes_whole_examples_and_rescales():
    x = jnp.ones((4000, 3))
    y = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
    assert np.all(y == y[:, :1])  # one draw per example
    np.testing.assert_allclose(np.unique(y), [0.0, 4 / 3], rtol=1e-6)
    assert abs((y[:, 0] == 0).mean() - 0.25) < 0.03  # drop probability
    assert abs(y.mean() - 1.0) < 0.05  # unbiased


def test_encoder_block_matches_numpy_reference():
    block = _block(num_heads=2, mlp_dim=16, layer_norm_eps=1e-5)
    x = np.random.RandomState(1).randn(2, 5, 8).astype(np.float32)
    params = _randomize(block.init(jax.random.key(0), x)["params"])
    assert set(params) == {"ln1", "attn", "ln2", "mlp"}
    got = jax.jit(lambda p, x: block.apply({"params": p}, x))(params, x)
    want = _np_block(x, jax.tree.map(np.asarray, params), 1e-5, _np_gelu)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_encoder_block_causal_and_mask():
    block = _block(num_heads=2, mlp_dim=16)
    x = np.random.RandomState(2).randn(1, 6, 8).astype(np.float32)
    params = _randomize(block.init(jax.random.key(0), x)["params"])
    apply = lambda x, **kw: np.asarray(block.apply({"params": params}, x, **kw))  # noqa: E731
    x2 = x.copy()
    x2[:, 4:] = np.random.RandomState(9).randn(1, 2, 8)  # change the future tokens
    causal, causal2 = apply(x, is_causal=True), apply(x2, is_causal=True)
    np.testing.assert_allclose(causal[:, :4], causal2[:, :4], atol=1e-5)
    assert not np.allclose(apply(x)[:, :4], apply(x2)[:, :4], atol=1e-3)
    tril = np.tril(np.ones((6, 6), bool))[None, None]
    np.testing.assert_allclose(apply(x, mask=tril), causal, atol=1e-5)
    np.testing.assert_allclose(apply(x, mask=np.ones((1, 1, 1, 6), bool)), apply(x), atol=1e-6)


def test_encoder_block_bad_input_raises():
    block = _block(num_heads=3, mlp_dim=8)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        block.init(jax.random.key(0), jnp.ones((1, 2, 8)))
    with pytest.raises(ValueError, match=r"\[batch, tokens, width\].*\(2, 9\)"):
        block.init(jax.random.key(0), jnp.ones((2, 9)))


DEPTH = 2


def _encoder_and_params(**kw):
    enc = _encoder(depth=DEPTH, num_heads=2, mlp_dim=16, **kw)
    x = np.random.RandomState(3).randn(2, 4, 8).astype(np.float32)
    return enc, x, _randomize(_encoder(depth=DEPTH, num_heads=2, mlp_dim=16).init(jax.random.key(0), x)["params"])


def test_encoder_stack_equals_sequential_blocks_and_names():
    enc, x, params = _encoder_and_params()
    assert set(params) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
    y, aux = enc.apply({"params": params}, x)
    h = x
    for i in range(DEPTH):
        h = np.asarray(_block(num_heads=2, mlp_dim=16).apply({"params": params[f"encoderblock_{i}"]}, h))
        np.testing.assert_allclose(aux[f"encoderblock_{i}"], h, atol=1e-5)
    np.testing.assert_allclose(y, _np_layer_norm(h, params["encoder_norm"], 1e-6), atol=1e-4)
    no_norm = _encoder(depth=1, num_heads=2, mlp_dim=16, final_norm=False).init(jax.random.key(0), x)["params"]
    assert "encoder_norm" not in no_norm


def test_encoder_scan_equals_loop_with_stacked_params():
    enc, x, params = _encoder_and_params()
    scan_enc = _encoder(depth=DEPTH, num_heads=2, mlp_dim=16, scan=True)
    stacked = stack_layers(params, DEPTH)
    init_shapes = jax.eval_shape(scan_enc.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, stacked)
    y_loop, _ = enc.apply({"params": params}, x, is_causal=True)
    y_scan, aux = scan_enc.apply({"params": stacked}, x, is_causal=True)
    np.testing.assert_allclose(y_scan, y_loop, atol=1e-5)
    pad = np.array([[True, True, True, False], [True, True, False, False]])[:, None, None, :]
    m_loop, m_scan = enc.apply({"params": params}, x, mask=pad)[0], scan_enc.apply({"params": stacked}, x, mask=pad)[0]
    np.testing.assert_allclose(m_scan, m_loop, atol=1e-5)
    assert not np.allclose(m_loop, enc.apply({"params": params}, x)[0], atol=1e-3)
    assert aux == {}
    back = unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), back, params))


def test_encoder_remat_same_output_and_gradient():
    enc, x, params = _encoder_and_params()
    remat = _encoder(depth=DEPTH, num_heads=2, mlp_dim=16, remat=True)
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply({"params": p}, x)[0] ** 2)))  # noqa
    (v1, g1), (v2, g2) = loss(enc)(params), loss(remat)(params)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g1, g2)
    scan_remat = _encoder(depth=DEPTH, num_heads=2, mlp_dim=16, remat=True, scan=True)
    v3, g3 = loss(scan_remat)(stack_layers(params, DEPTH))
    np.testing.assert_allclose(v3, v1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g3, stack_layers(g1, DEPTH))


def test_encoder_drop_path_rates_and_training_randomness():
    enc = _encoder(depth=5, num_heads=2, mlp_dim=8, drop_path_rate=0.4)
    np.testing.assert_allclose(enc.config.drop_path_rates(), [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-7)
    x = np.random.RandomState(4).randn(64, 3, 8).astype(np.float32)
    for scan in (False, True):
        # depth 1: the only block has rate 0.5 on each of its two residual branches
        enc = _encoder(depth=1, num_heads=2, mlp_dim=8, drop_path_rate=0.5, scan=scan, final_norm=False)
        # compiled: one program each, not op by op
        params = jax.jit(enc.init)(jax.random.key(0), x)["params"]
        det = jax.jit(lambda p: enc.apply({"params": p}, x)[0])(params)
        train = jax.jit(lambda p, key: enc.apply({"params": p}, x, deterministic=False, rngs={"dropout": key})[0])
        tr1, tr2 = train(params, jax.random.key(1)), train(params, jax.random.key(2))
        assert not np.allclose(tr1, tr2) and not np.allclose(tr1, det)
        # examples whose two branches were both dropped pass through unchanged (probability 1/4 each)
        identity = np.all(np.isclose(tr1, x, atol=1e-6), axis=(1, 2))
        assert 0 < identity.sum() < 40
    with pytest.raises(ValueError, match="drop_path_rate"):
        _encoder(depth=2, num_heads=2, mlp_dim=8, drop_path_rate=1.0).init(jax.random.key(0), x)


def test_encoder_bfloat16_compute_float32_params():
    enc = _encoder(depth=1, num_heads=2, mlp_dim=8, dtype=jnp.bfloat16)
    x = jnp.ones((1, 3, 8), jnp.float32)
    variables = enc.init(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert enc.apply(variables, x)[0].dtype == jnp.bfloat16


def test_posemb_sincos_2d_formula():
    pe = np.asarray(posemb_sincos_2d(3, 4, 16, temperature=100.0))[0]
    assert pe.shape == (12, 16)
    omega = 100.0 ** (-np.arange(4) / 3)
    r, c = 2, 1
    token = r * 4 + c
    want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
    np.testing.assert_allclose(pe[token], want, atol=1e-6)
    assert len({tuple(np.round(row, 5)) for row in pe}) == 12  # every position distinct
    with pytest.raises(ValueError, match="dim=10"):
        posemb_sincos_2d(2, 2, 10)


def test_learned_position_embedding_and_size_error():
    pe = LearnedPositionEmbedding()
    x = jnp.zeros((2, 5, 4))
    params = pe.init(jax.random.key(0), x)["params"]
    np.testing.assert_allclose(pe.apply({"params": params}, x), np.broadcast_to(params["pos_embedding"], (2, 5, 4)))
    with pytest.raises(ValueError, match="6 tokens.*\\(1, 5, 4\\)"):
        pe.apply({"params": params}, jnp.zeros((2, 6, 4)))


def test_public_names_exported():
    for name in layers.__all__:
        assert hasattr(layers, name)


def test_encoder_config_is_one_frozen_validated_dataclass():
    cfg = EncoderConfig(num_heads=2, mlp_dim=16, depth=3, width=8)
    with pytest.raises(AttributeError):  # frozen: a model cannot change it behind the others' backs
        cfg.depth = 4  # type: ignore[misc]
    assert hash(cfg) == hash(EncoderConfig(num_heads=2, mlp_dim=16, depth=3, width=8))
    assert cfg.replace(scan=True).scan and not cfg.scan
    for bad, match in [
        (dict(depth=0), "depth must be a positive int, got depth=0"),
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
        (dict(width=9), "width=9 is not divisible by num_heads=2"),
        (dict(activation="gelu2"), "activation='gelu2'"),
    ]:
        with pytest.raises(ValueError, match=match):
            cfg.replace(**bad)
    # a set width is checked against the inputs
    with pytest.raises(ValueError, match="x has width 6.*width=8"):
        EncoderBlock(cfg).init(jax.random.key(0), jnp.ones((1, 3, 6)))


def test_one_activation_table_gelu_exact_and_tanh_named_apart():
    # "gelu" is the exact erf GELU (PyTorch / HF), "gelu_tanh" the approximation; the graph models use this table
    from mmjax import graph_models

    assert graph_models.ACTIVATIONS is ACTIVATIONS
    x = jnp.linspace(-3.0, 3.0, 13)
    assert np.array_equal(get_activation("gelu")(x), jax.nn.gelu(x, approximate=False))
    assert np.array_equal(get_activation("gelu_tanh")(x), jax.nn.gelu(x, approximate=True))
    assert np.array_equal(get_activation("elu")(x), jax.nn.elu(x))


def test_learned_posemb_one_implementation_module_and_function_agree():
    class AddPos(nn.Module):
        @nn.compact
        def __call__(self, x):
            return add_learned_posemb(self, x, owner="AddPos")

    x = jnp.zeros((2, 5, 4))
    p_mod = LearnedPositionEmbedding().init(jax.random.key(0), x)["params"]
    p_fun = AddPos().init(jax.random.key(0), x)["params"]
    assert np.array_equal(p_mod["pos_embedding"], p_fun["pos_embedding"])  # same init, same rng use
    with pytest.raises(ValueError, match=r"AddPos: the inputs give 6 tokens.*\(1, 5, 4\)"):
        AddPos().apply({"params": p_fun}, jnp.zeros((2, 6, 4)))


def test_one_l2_normalize_for_models_and_evaluation():
    from mmjax import clip, evaluate

    assert clip.l2_normalize is l2_normalize_layers and evaluate.l2_normalize is l2_normalize_layers
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    got_np = l2_normalize_layers(x)  # NumPy in: NumPy float64 out (host evaluation)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float64
    np.testing.assert_array_equal(got_np, [[0.6, 0.8], [0.0, 0.0]])
    got_jax = jax.jit(l2_normalize_layers)(jnp.asarray(x, jnp.bfloat16))  # jax in (traced): float32 jax out
    assert isinstance(got_jax, jax.Array) and got_jax.dtype == jnp.float32
    np.testing.assert_allclose(got_jax, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
