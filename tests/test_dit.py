"""Tests of mmjax.dit: variants and sizes, shapes of each conditioning mode, adaLN-Zero at init, the patch / position /
timestep embeddings, dropping to the null condition, jit and grad, the text padding mask, and the errors.

Compiling is what costs here (eager flax dispatches hundreds of small ops), so the tests share one tiny model with
every condition (``_model("all")``), one set of inputs, and one compiled ``apply`` per kind of call (:func:`_apply`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.dit import VARIANTS, DiT, decode_variant, posemb_sincos_2d_mae, timestep_embedding
from mmjax.errors import UserError

TINY = dict(variant=None, width=16, depth=1, num_heads=2, patch_size=2)
CLASSES, POOLED, TOKEN_DIM, LENGTH = 5, 6, 7, 5
MODES = {
    "unconditional": dict(),
    "class": dict(num_classes=CLASSES),
    "pooled": dict(pooled_text_dim=POOLED),
    "tokens": dict(text_token_dim=TOKEN_DIM),
    "all": dict(num_classes=CLASSES, pooled_text_dim=POOLED, text_token_dim=TOKEN_DIM),
}
X = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
T = np.array([3, 999])


def _model(mode="all", **kw):
    return DiT(**{**TINY, **MODES[mode], **kw})


def _conditions(model, batch=2, seed=0):
    rng = np.random.RandomState(seed + 100)
    cond = {}
    if model.num_classes:
        cond["labels"] = rng.randint(0, model.num_classes, batch)
    if model.pooled_text_dim:
        cond["text_pooled"] = rng.randn(batch, model.pooled_text_dim).astype(np.float32)
    if model.text_token_dim:
        cond["text_tokens"] = rng.randn(batch, LENGTH, model.text_token_dim).astype(np.float32)
        cond["text_mask"] = np.arange(LENGTH)[None, :] < np.where(np.arange(batch) % 2, LENGTH, 3)[:, None]
    return cond


@functools.cache
def _jitted(model, deterministic, drop):
    """One compiled ``model.apply`` per (model, deterministic, kind of drop); jax caches per input structure."""

    def run(params, x, t, cond, drop_array, rngs):
        kw = dict(cond, drop=drop_array if drop == "array" else drop)
        return model.apply({"params": params}, x, t, deterministic=deterministic, rngs=rngs, **kw)

    return jax.jit(run)


def _apply(model, params, x=X, t=T, *, deterministic=True, rngs=None, drop=None, **cond):
    kind = drop if drop is None or isinstance(drop, bool) else "array"
    return _jitted(model, deterministic, kind)(params, x, t, cond, drop if kind == "array" else None, rngs)


@functools.cache
def _init(mode="all"):
    """The model's real initial parameters (adaLN-Zero zeros included), compiled once per mode."""
    model = _model(mode)
    cond = _conditions(model)
    return jax.jit(lambda x, t, cond: model.init(jax.random.key(0), x, t, **cond))(X, T, cond)["params"]


def _random_params(model, seed=0, scale=0.3):
    """Parameters of the model's shapes drawn from N(0, scale^2), every zero-initialised weight included."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), X, T, **_conditions(model)))["params"]
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.randn(*s.shape), s.dtype), shapes)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------------- sizes


def test_variants_and_the_paper_parameter_count():
    assert [VARIANTS[k] for k in ("S", "B", "L", "XL")] == [(384, 12, 6), (768, 12, 12), (1024, 24, 16), (1152, 28, 16)]
    assert decode_variant("XL/2") == dict(width=1152, depth=28, num_heads=16, mlp_dim=4608, patch_size=2)
    assert decode_variant("S") == dict(width=384, depth=12, num_heads=6, mlp_dim=1536)
    assert DiT(variant="L/4", depth=3, mlp_dim=100).sizes() == dict(
        width=1024, depth=3, num_heads=16, mlp_dim=100, patch_size=4
    )
    for bad in ("XXL/2", "B-2", "B/2/2", "", None):
        with pytest.raises(UserError, match="not a DiT variant"):
            decode_variant(bad)
    # DiT-XL/2 on 256x256 images (32x32x4 latents), learn_sigma, 1000 classes: the DiT repository prints
    # "DiT Parameters: 675,129,632", which counts its fixed pos_embed (an nn.Parameter, 256 tokens x 1152) as well.
    model = DiT(variant="XL/2", num_classes=1000, learn_sigma=True)
    x, t, y = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), int)
    assert _count(jax.eval_shape(model.init, jax.random.key(0), x, t, labels=y)["params"]) == 675_129_632 - 256 * 1152


def test_bad_options_raise_at_construction():
    cases = [
        (dict(variant="Q/2"), "variant='Q/2'"),
        (dict(TINY, num_heads=3), "width=16 is not divisible by num_heads=3"),
        (dict(TINY, width=6, num_heads=2), "width=6 must be a multiple of 4"),
        (dict(TINY, learn_sigma=True, out_channels=6), "out_channels=6"),
        (dict(TINY, num_classes=-1), "num_classes"),
        (dict(TINY, class_dropout_prob=1.0), "class_dropout_prob=1.0"),
        (dict(TINY, text_token_dim=0), "text_token_dim=0"),
        (dict(TINY, activation="gleu"), "activation='gleu'"),
        (dict(TINY, timestep_freq_shift=200.0), "timestep_freq_shift=200.0"),
        (dict(variant=None, width=16, depth=1, num_heads=2), "patch_size is not set"),
    ]
    for options, message in cases:
        with pytest.raises(UserError, match=message):
            DiT(**options)


# ---------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("mode", list(MODES))
def test_shapes_of_each_conditioning_mode(mode):
    model = _model(mode, depth=2)
    cond = _conditions(model)
    assert model.conditions() == tuple(k for k in ("labels", "text_pooled", "text_tokens") if k in cond)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), X, T, **cond))["params"]
    expected = {"embedding", "timestep_embedder", "block_0", "block_1", "final_modulation", "final_linear"}
    expected |= {"label_embedding"} if "labels" in cond else set()
    expected |= {"text_embedder", "null_text_pooled"} if "text_pooled" in cond else set()
    expected |= {"null_text_token"} if "text_tokens" in cond else set()
    assert set(params) == expected
    cross = {"ln_cross", "cross_attn", "cross_gate"} if "text_tokens" in cond else set()
    assert set(params["block_0"]) == {"modulation", "attn", "mlp"} | cross
    if "labels" in cond:
        assert params["label_embedding"].shape == (CLASSES + 1, 16)  # one extra row: the null class
    assert params["embedding"]["kernel"].shape == (2, 2, 3, 16)
    out, aux = jax.eval_shape(lambda p: model.apply({"params": p}, X, T, **cond), params)
    assert out.shape == X.shape and out.dtype == jnp.float32
    keys = {"patch_tokens", "embedded", "timestep_embedding", "conditioning", "block_0", "block_1", "final_tokens"}
    assert set(aux) == keys | ({"dropped"} if cond else set())
    assert aux["patch_tokens"].shape == (2, 16, 16) and aux["conditioning"].shape == (2, 16)
    assert aux["final_tokens"].shape == (2, 16, 2 * 2 * 3)


def test_learn_sigma_and_out_channels():
    x = np.zeros((2, 8, 8, 4), np.float32)
    for kw, channels in ((dict(learn_sigma=True), 8), (dict(out_channels=5), 5), ({}, 4)):
        model = DiT(**TINY, **kw)
        params = jax.eval_shape(model.init, jax.random.key(0), x, T)
        assert jax.eval_shape(model.apply, params, x, T)[0].shape == (2, 8, 8, channels)


# ---------------------------------------------------------------------------------------------------- adaLN-Zero


def test_adaln_zero_init_output_is_zero_and_blocks_are_identity():
    model, params = _model(), _init()
    cond = _conditions(model)
    out, aux = _apply(model, params, **cond)
    np.testing.assert_array_equal(out, np.zeros_like(out))
    # the block is the identity, the cross-attention sub-block included (its gate starts at zero)
    np.testing.assert_array_equal(aux["block_0"], aux["embedded"])
    assert float(jnp.abs(aux["embedded"]).max()) > 0.1 and float(jnp.abs(aux["conditioning"]).max()) > 0
    # the zero-initialised weights are the only reason: with them randomised the output and the blocks move
    rand = _random_params(model)
    moved = dict(params, final_linear=rand["final_linear"], block_0=rand["block_0"])
    out, aux = _apply(model, moved, **cond)
    assert float(jnp.abs(out).max()) > 1e-3
    assert float(jnp.abs(aux["block_0"] - aux["embedded"]).max()) > 1e-3


def test_output_depends_on_timestep_and_every_condition():
    model = _model()
    params, cond = _random_params(model), _conditions(model)
    base = _apply(model, params, **cond)[0]
    changes = [
        dict(t=T + 1),
        dict(labels=(cond["labels"] + 1) % CLASSES),
        dict(text_pooled=cond["text_pooled"] + 1),
        dict(text_tokens=cond["text_tokens"] + 1),
    ]
    for change in changes:
        inputs = dict(cond, t=T)
        inputs.update(change)
        other = _apply(model, params, X, inputs.pop("t"), **inputs)[0]
        assert float(jnp.abs(other - base).max(axis=(1, 2, 3)).min()) > 1e-4, change.keys()  # both examples move


# ---------------------------------------------------------------------------------------------------- embeddings


def test_patchify_is_the_conv_and_unpatchify_is_its_inverse_layout():
    model = _model()
    params, cond = _random_params(model), _conditions(model)
    out, aux = _apply(model, params, **cond)
    k, b = params["embedding"]["kernel"], params["embedding"]["bias"]
    conv = jax.lax.conv_general_dilated(X, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    np.testing.assert_allclose(aux["patch_tokens"], conv.reshape(2, 16, 16), rtol=1e-5, atol=1e-5)
    # out[b, r p + u, q p + v, c] = final_tokens[b, r gw + q, (u p + v) C + c]
    y = np.asarray(aux["final_tokens"])
    for r, q, u, v, c in [(0, 0, 0, 0, 0), (1, 2, 0, 1, 2), (3, 1, 1, 0, 1), (2, 3, 1, 1, 0)]:
        assert out[1, 2 * r + u, 2 * q + v, c] == y[1, 4 * r + q, (2 * u + v) * 3 + c]
    # the position embedding is what is added to the patch tokens
    np.testing.assert_allclose(
        aux["embedded"] - aux["patch_tokens"], np.repeat(posemb_sincos_2d_mae(4, 4, 16), 2, 0), atol=1e-6
    )


def test_position_embedding_is_the_mae_sincos():
    height, width, dim = 3, 4, 16

    def mae_1d(d, pos):  # MAE's get_1d_sincos_pos_embed_from_grid, float64
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    expected = np.concatenate([mae_1d(dim // 2, cols), mae_1d(dim // 2, rows)], axis=1)  # MAE: width coordinate first
    np.testing.assert_allclose(posemb_sincos_2d_mae(height, width, dim)[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim, shift, cos_first", [(256, 0.0, True), (255, 1.0, True), (8, 0.0, False)])
def test_timestep_embedding_formula(dim, shift, cos_first):
    t = np.array([0.0, 1.0, 3.5, 250.0, 999.0])
    half = dim // 2
    w = np.exp(-math.log(10000.0) * np.arange(half) / (half - shift))
    args = t[:, None] * w[None, :]
    parts = [np.cos(args), np.sin(args)] if cos_first else [np.sin(args), np.cos(args)]
    expected = np.concatenate(parts + [np.zeros((len(t), dim % 2))], axis=1)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), dim, freq_shift=shift, cos_first=cos_first))
    assert got.shape == (5, dim) and got.dtype == np.float32
    # float32 round-off: t * w_k is rounded (relative 2**-24) and the frequencies carry a few roundings of the
    # exponent; sin/cos then move by about |t w_k| times that.
    bound = 8 * 2.0**-24 * np.concatenate([args, args] + [np.zeros((len(t), dim % 2))], axis=1) + 2e-7
    assert np.all(np.abs(got - expected) <= bound)
    with pytest.raises(UserError, match="freq_shift=4"):
        timestep_embedding(jnp.zeros(2), 8, freq_shift=4)


# ---------------------------------------------------------------------------------------------------- null condition


def test_explicit_drop_mask_gives_the_null_condition():
    model = _model()
    params, cond = _random_params(model), _conditions(model)
    full, _ = _apply(model, params, **cond)
    null, aux_null = _apply(model, params, drop=True, **cond)
    mixed, aux_mixed = _apply(model, params, drop=np.array([True, False]), **cond)
    np.testing.assert_array_equal(aux_null["dropped"], [True, True])
    np.testing.assert_array_equal(aux_mixed["dropped"], [True, False])
    np.testing.assert_allclose(mixed[0], null[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[1], full[1], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(null - full).max(axis=(1, 2, 3)).min()) > 1e-4
    # drop=True needs no condition inputs (the unconditional branch of classifier-free guidance)
    np.testing.assert_allclose(_apply(model, params, drop=True)[0], null, rtol=1e-6, atol=1e-6)
    # the null condition ignores the inputs it replaces
    other = dict(labels=cond["labels"][::-1], text_pooled=cond["text_pooled"] + 3, text_tokens=cond["text_tokens"] * 2)
    np.testing.assert_allclose(_apply(model, params, drop=True, **dict(cond, **other))[0], null, atol=1e-6)
    # an explicit mask wins over the random dropping (no rng needed)
    np.testing.assert_allclose(
        _apply(model, params, drop=np.array([True, False]), deterministic=False, **cond)[0], mixed, atol=1e-6
    )


def test_null_label_is_the_extra_row():
    model = _model("class")
    params = _random_params(model)
    by_label = _apply(model, params, labels=np.array([CLASSES, CLASSES]))[0]
    by_drop, aux = _apply(model, params, drop=True, labels=np.array([0, 1]))
    np.testing.assert_array_equal(by_label, by_drop)
    null_row = np.broadcast_to(params["label_embedding"][CLASSES], (2, 16))
    np.testing.assert_allclose(aux["conditioning"] - aux["timestep_embedding"], null_row, atol=1e-6)
    # compiled, the labels are not checked: one out of range poisons its own example (NaN), not the others
    for bad in (-1, CLASSES + 1):
        out = np.asarray(_apply(model, params, labels=np.array([bad, 2]))[0])
        assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_random_dropping_rate_and_rng():
    p, calls = 0.1, 1000
    model = _model()
    assert model.class_dropout_prob == p  # DiT's default
    params, cond = _random_params(model), _conditions(model)
    null = _apply(model, params, drop=True, **cond)[1]["conditioning"]
    kept = _apply(model, params, **cond)[1]
    assert not np.asarray(kept["dropped"]).any()  # deterministic: nothing is dropped
    kept = kept["conditioning"]
    masks = []
    for seed in range(calls):
        aux = _apply(model, params, deterministic=False, rngs={"cond_dropout": jax.random.key(seed)}, **cond)[1]
        dropped = np.asarray(aux["dropped"])
        if seed < 20:  # the dropped examples got the null condition, the others their own
            expected = np.where(dropped[:, None], null, kept)
            np.testing.assert_allclose(aux["conditioning"], expected, atol=1e-6)
        masks.append(dropped)
    masks = np.stack(masks)
    sigma = math.sqrt(p * (1 - p) / masks.size)
    assert abs(masks.mean() - p) < 4 * sigma, masks.mean()
    assert abs(masks[:, 0].mean() - masks[:, 1].mean()) < 8 * sigma  # each example on its own
    again = _apply(model, params, deterministic=False, rngs={"cond_dropout": jax.random.key(7)}, **cond)[1]
    np.testing.assert_array_equal(again["dropped"], masks[7])  # reproducible from the key
    with pytest.raises(UserError, match="cond_dropout"):
        _apply(model, params, deterministic=False, **cond)


# ---------------------------------------------------------------------------------------------------- jit, grad, mask


def test_jit_and_grad():
    model = _model()
    params, cond = _random_params(model), _conditions(model)
    out = _apply(model, params, **cond)[0]  # compiled with the labels and texts traced
    assert bool(jnp.isfinite(out).all()) and float(jnp.abs(out).max()) > 1e-3

    def loss(params):
        return jnp.mean((model.apply({"params": params}, X, T, **cond)[0] - 1.0) ** 2)

    grad = jax.jit(jax.grad(loss))
    grads = grad(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    paths = [
        ("embedding", "kernel"),
        ("timestep_embedder", "fc1", "kernel"),
        ("label_embedding",),
        ("text_embedder", "fc1", "kernel"),
        ("block_0", "attn", "query", "kernel"),
        ("block_0", "cross_attn", "key", "kernel"),
        ("block_0", "cross_gate"),
        ("block_0", "modulation", "kernel"),
        ("final_linear", "kernel"),
    ]
    get = lambda tree, path: functools.reduce(lambda node, key: node[key], path, tree)  # noqa: E731
    for path in paths:
        assert float(jnp.abs(get(grads, path)).max()) > 0, path
    # at init only the zero-initialised output layer has a gradient (adaLN-Zero)
    grads = grad(_init())
    assert float(jnp.abs(grads["final_linear"]["kernel"]).max()) > 0
    for path in paths[:-1]:
        assert float(jnp.abs(get(grads, path)).max()) == 0, path


def test_text_padding_mask_is_respected():
    model = _model()
    params, cond = _random_params(model), _conditions(model)
    mask = cond["text_mask"]  # example 0: tokens 3, 4 are padding
    assert not mask[0, 3:].any() and mask[1].all()
    base = _apply(model, params, **cond)[0]
    tokens = cond["text_tokens"].copy()
    tokens[0, 3:] = 100.0 * np.random.RandomState(1).randn(2, TOKEN_DIM)
    np.testing.assert_array_equal(_apply(model, params, **dict(cond, text_tokens=tokens))[0], base)
    tokens = cond["text_tokens"].copy()
    tokens[0, 1] += 1.0  # a real token
    changed = _apply(model, params, **dict(cond, text_tokens=tokens))[0]
    assert float(jnp.abs(changed[0] - base[0]).max()) > 1e-3
    np.testing.assert_array_equal(changed[1], base[1])
    # without a mask every token counts
    unmasked = _apply(model, params, **{k: v for k, v in cond.items() if k != "text_mask"})[0]
    assert float(jnp.abs(unmasked[0] - base[0]).max()) > 1e-3


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_naming_the_value():
    def check(mode, message, x=X, t=T, **kw):
        model = _model(mode)
        params = _random_params(model)
        with pytest.raises(UserError, match=message):
            model.apply({"params": params}, x, t, **kw)

    labels = np.array([1, 2])
    check("class", r"shape \(8, 8, 3\)", x=X[0], labels=labels)
    check("class", r"7x7.*patch_size=2", x=X[:, :7, :7], labels=labels)
    check("class", "dtype int32", x=X.astype(np.int32), labels=labels)
    check("class", "4 channels.*expects 3", x=np.zeros((2, 8, 8, 4), np.float32), labels=labels)
    check("class", r"t has shape \(3,\)", t=np.arange(3), labels=labels)
    check("class", r"labels \[6\] are out of range.*num_classes=5", labels=np.array([0, 6]))
    check("class", r"labels \[-1\] are out of range", labels=np.array([-1, 2]))
    check("class", "labels have dtype float", labels=np.array([1.0, 2.0]))
    check("class", r"labels have shape \(1,\)", labels=np.array([1]))
    check("class", "labels is None")
    check("class", "pooled_text_dim=None", labels=labels, text_pooled=np.zeros((2, POOLED), np.float32))
    check("class", "text_token_dim=None", labels=labels, text_tokens=np.zeros((2, 3, TOKEN_DIM), np.float32))
    check("class", r"drop has shape \(3,\)", labels=labels, drop=np.array([True, False, True]))
    check("class", "drop has shape .* dtype int", labels=labels, drop=np.array([1, 0]))
    check("unconditional", "num_classes=0", labels=labels)
    check("unconditional", "unconditional", drop=True)
    c = _conditions(_model("all"))
    check("all", "text_pooled is None", labels=labels, text_tokens=c["text_tokens"])
    check("all", "text_tokens is None", labels=labels, text_pooled=c["text_pooled"])
    check("all", r"text_pooled has shape \(2, 3\)", **dict(c, text_pooled=c["text_pooled"][:, :3]))
    check("all", r"text_tokens has shape \(2, 5, 4\)", **dict(c, text_tokens=c["text_tokens"][..., :4]))
    check("all", "text_mask has shape .* dtype int32", **dict(c, text_mask=c["text_mask"].astype(np.int32)))
    check("all", "without text_tokens", labels=labels, text_pooled=c["text_pooled"], text_mask=c["text_mask"])
