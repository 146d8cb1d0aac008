"""Tests of mmjax.vit: variants, exact parameter counts, pooling, heads, scan/remat equivalence, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers import posemb_sincos_2d, stack_layers
from mmjax.vit import VARIANTS, ViT, decode_variant

TINY = dict(variant="mu/4", width=16, num_heads=2, mlp_dim=32, depth=1)


def _images(batch=2, size=8, channels=3, seed=0):
    return np.random.RandomState(seed).randn(batch, size, size, channels).astype(np.float32)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _randomize(params, seed=0):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize(
    "variant, expected",
    [("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656), ("B/32", 88_224_232), ("L/16", 304_326_632)],
)
def test_parameter_counts_match_the_literature(variant, expected):
    shapes = jax.eval_shape(ViT(variant=variant).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert _count(shapes["params"]) == expected


def test_decode_variant_table_and_errors():
    assert decode_variant("Ti/4") == dict(width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=4)
    assert decode_variant("H") == dict(width=1280, depth=32, mlp_dim=5120, num_heads=16)
    assert [VARIANTS[k][0] for k in ("mu", "Ti", "S", "M", "B", "L", "H")] == [32, 192, 384, 512, 768, 1024, 1280]
    for bad in ("X/16", "B-16", "B/16/2", "", None):
        with pytest.raises(ValueError, match="not a ViT variant"):
            decode_variant(bad)
    with pytest.raises(ValueError, match="not a ViT variant"):
        ViT(variant="Q/16")
    with pytest.raises(ValueError, match="patch_size is not set"):
        ViT(variant="B")
    assert ViT(variant="B", patch_size=8).sizes()["patch_size"] == 8
    assert ViT(variant="S/16", depth=3, width=96).sizes() == dict(
        width=96, depth=3, mlp_dim=1536, num_heads=6, patch_size=16
    )


def test_bad_options_raise():
    with pytest.raises(ValueError, match="pool_type='tok'"):
        ViT(pool_type="tok")
    with pytest.raises(ValueError, match="class_token=True"):
        ViT(pool_type="token", class_token=False)
    with pytest.raises(ValueError, match="final_norm='both'"):
        ViT(final_norm="both")
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        ViT(variant="mu/4", num_heads=5)
    with pytest.raises(ValueError, match="activation='gleu'"):
        ViT(activation="gleu")


def test_shapes_and_intermediates():
    model = ViT(num_classes=7, **TINY)
    x = _images()
    params = model.init(jax.random.key(0), x)["params"]
    assert set(params) == {"embedding", "cls", "pos_embedding", "encoder", "head"}
    assert params["pos_embedding"].shape == (1, 5, 16) and params["embedding"]["kernel"].shape == (4, 4, 3, 16)
    logits, aux = model.apply({"params": params}, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert set(aux) == {"patch_tokens", "embedded", "encoderblock_0", "encoded", "pooled", "pre_logits", "logits"}
    assert aux["patch_tokens"].shape == (2, 4, 16) and aux["encoded"].shape == (2, 5, 16)
    np.testing.assert_array_equal(aux["pooled"], aux["encoded"][:, 0])
    # the patch embedding is a per-patch linear map: check patch (row 1, col 0) by hand
    k = np.asarray(params["embedding"]["kernel"]).reshape(48, 16)
    patch = x[:, 4:8, 0:4, :].reshape(2, 48)
    np.testing.assert_allclose(aux["patch_tokens"][:, 2], patch @ k + params["embedding"]["bias"], atol=1e-5)
    # learned posemb covers the class token: embedded = [cls, patches] + pos_embedding
    want = np.concatenate([np.broadcast_to(params["cls"], (2, 1, 16)), aux["patch_tokens"]], 1)
    np.testing.assert_allclose(aux["embedded"], want + params["pos_embedding"], atol=1e-6)


def test_pooling_types():
    # compiled, not op by op: one program for the two inits, one per model's forward pass; each forward program
    # also computes the other side of the equalities checked below, from the same values in the same program
    x = _images()
    gap = ViT(num_classes=0, pool_type="gap", **TINY)
    no_cls = ViT(num_classes=3, pool_type="gap", class_token=False, **TINY)
    params, p2 = jax.jit(lambda key: (gap.init(key, x)["params"], no_cls.init(key, x)["params"]))(jax.random.key(0))

    @jax.jit
    def gap_outputs(p):
        pooled, aux = gap.apply({"params": p}, x)
        return pooled, aux["encoded"][:, 1:].mean(1)

    pooled, mean_of_patches = gap_outputs(params)
    np.testing.assert_allclose(pooled, mean_of_patches, atol=1e-6)  # class token excluded
    assert "cls" not in p2 and p2["pos_embedding"].shape == (1, 4, 16)

    @jax.jit
    def no_cls_outputs(p):
        aux2 = no_cls.apply({"params": p}, x)[1]
        return aux2["pooled"], aux2["encoded"].mean(1)

    pooled2, mean_of_tokens = no_cls_outputs(p2)
    np.testing.assert_allclose(pooled2, mean_of_tokens, atol=1e-6)
    mapm = ViT(num_classes=3, pool_type="map", **TINY)
    p3 = _randomize(jax.eval_shape(mapm.init, jax.random.key(0), x)["params"])  # _randomize reads shapes and dtypes
    assert set(p3["map_head"]) == {"probe", "attn", "ln", "mlp"}
    # the MAP probe attends over all tokens: permuting tokens of the encoder output leaves it unchanged
    from mmjax.vit import MAPHead

    head = MAPHead(mapm.get_encoder_config())  # the tower's config, passed whole

    @jax.jit
    def map_outputs(p):
        logits, aux3 = mapm.apply({"params": p}, x)
        enc = aux3["encoded"]
        pooled_map = head.apply({"params": p["map_head"]}, enc)
        return logits, aux3["pooled"], pooled_map, head.apply({"params": p["map_head"]}, enc[:, ::-1])

    logits, pooled3, pooled_map, pooled_reversed = map_outputs(p3)
    assert logits.shape == (2, 3) and pooled3.shape == (2, 16)
    np.testing.assert_allclose(pooled_map, pooled3, atol=1e-6)
    np.testing.assert_allclose(pooled_reversed, pooled_map, atol=1e-5)


def test_num_classes_zero_and_representation_layer():
    x = _images()
    model = ViT(num_classes=0, representation_size=12, **TINY)
    params = _randomize(model.init(jax.random.key(0), x)["params"])
    assert "head" not in params and params["pre_logits"]["kernel"].shape == (16, 12)
    out, aux = model.apply({"params": params}, x)
    want = np.tanh(np.asarray(aux["pooled"]) @ params["pre_logits"]["kernel"] + params["pre_logits"]["bias"])
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_array_equal(out, aux["pre_logits"])
    assert "logits" not in aux


def test_clip_style_options():
    x = _images()
    model = ViT(
        num_classes=0,
        pre_norm=True,
        final_norm="pooled",
        patch_bias=False,
        activation="quick_gelu",
        layer_norm_eps=1e-5,
        **TINY,
    )
    params = _randomize(model.init(jax.random.key(0), x)["params"])
    assert "bias" not in params["embedding"] and "encoder_norm" not in params["encoder"]
    assert {"pre_norm", "post_norm"} <= set(params)
    out, aux = model.apply({"params": params}, x)
    cls = np.asarray(aux["encoded"][:, 0])  # encoded is NOT normalised here
    mu, var = cls.mean(-1, keepdims=True), cls.var(-1, keepdims=True)
    want = (cls - mu) / np.sqrt(var + 1e-5) * params["post_norm"]["scale"] + params["post_norm"]["bias"]
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_sincos_posemb_and_big_vision_cls_placement():
    x = _images()
    model = ViT(num_classes=0, posemb="sincos2d", **TINY)
    params = model.init(jax.random.key(0), x)["params"]
    assert "pos_embedding" not in params
    _, aux = model.apply({"params": params}, x)
    np.testing.assert_allclose(aux["embedded"][:, 1:], aux["patch_tokens"] + posemb_sincos_2d(2, 2, 16), atol=1e-6)
    np.testing.assert_allclose(aux["embedded"][:, 0], np.broadcast_to(params["cls"][0], (2, 16)), atol=0)
    bv = ViT(num_classes=0, cls_posemb=False, **TINY)
    p2 = bv.init(jax.random.key(0), x)["params"]
    assert p2["pos_embedding"].shape == (1, 4, 16)


def test_scan_equals_loop_with_stacked_params_and_remat_same_output():
    x = _images()
    two = dict(TINY, depth=2)
    model = ViT(num_classes=5, **two)
    params = _randomize(model.init(jax.random.key(0), x)["params"])
    ref, aux = model.apply({"params": params}, x)
    assert {"encoderblock_0", "encoderblock_1"} <= set(aux)
    scan = ViT(num_classes=5, scan=True, **two)
    stacked = dict(params, encoder=stack_layers(params["encoder"], 2))
    want_shapes = jax.tree.map(jnp.shape, jax.eval_shape(scan.init, jax.random.key(0), x)["params"])
    assert jax.tree.map(jnp.shape, stacked) == want_shapes
    np.testing.assert_allclose(scan.apply({"params": stacked}, x)[0], ref, atol=1e-5, rtol=1e-5)
    remat = ViT(num_classes=5, remat=True, **two)
    np.testing.assert_allclose(remat.apply({"params": params}, x)[0], ref, atol=1e-6)


def test_train_mode_uses_dropout_rng():
    x = _images()
    model = ViT(num_classes=5, dropout_rate=0.3, drop_path_rate=0.2, **TINY)
    params = _randomize(model.init(jax.random.key(0), x)["params"])
    ev1, ev2 = model.apply({"params": params}, x)[0], model.apply({"params": params}, x, train=False)[0]
    np.testing.assert_array_equal(ev1, ev2)
    t1 = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})[0]
    t2 = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})[0]
    assert not np.allclose(t1, t2) and not np.allclose(t1, ev1)


def test_bfloat16_compute_float32_params():
    x = _images()
    model = ViT(num_classes=5, dtype=jnp.bfloat16, **TINY)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    ref = ViT(num_classes=5, **TINY)
    p = _randomize(ref.init(jax.random.key(0), x)["params"])
    f32 = ref.apply({"params": p}, x)[1]["encoded"]
    logits, aux = jax.jit(model.apply)({"params": p}, x)
    assert aux["encoded"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(aux["encoded"], np.float32), f32, atol=0.1, rtol=0.05)


def test_bad_images_raise():
    model = ViT(num_classes=5, **TINY)
    params = model.init(jax.random.key(0), _images())["params"]
    with pytest.raises(ValueError, match=r"NHWC.*\(8, 8, 3\)"):
        model.apply({"params": params}, _images()[0])
    with pytest.raises(ValueError, match="10x10.*patch_size=4"):
        model.apply({"params": params}, _images(size=10))
    with pytest.raises(ValueError, match="17 tokens.*\\(1, 5, 16\\)"):
        model.apply({"params": params}, _images(size=16))
    with pytest.raises(ValueError, match="1 channels"):
        model.apply({"params": params}, _images(channels=1))


def test_jit_and_grad():
    x = _images()
    model = ViT(num_classes=5, **TINY)
    params = model.init(jax.random.key(0), x)["params"]
    loss = lambda p: jnp.mean(model.apply({"params": p}, x)[0] ** 2 + model.apply({"params": p}, x)[0])  # noqa
    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
    assert float(jnp.abs(grads["head"]["bias"]).sum()) > 0


def test_conv_stem_hybrid_vit():
    """stem_features: 3x3 stride-2 convs (+GELU) before the patch embedding; tokens shrink by 2 per conv."""
    model = ViT(num_classes=5, stem_features=(4, 8), **{**TINY, "variant": "mu/1"})
    x = _images(size=8)
    params = model.init(jax.random.key(0), x)["params"]
    assert params["stem_conv_0"]["kernel"].shape == (3, 3, 3, 4)
    assert params["stem_conv_1"]["kernel"].shape == (3, 3, 4, 8)
    assert params["embedding"]["kernel"].shape == (1, 1, 8, 16)
    logits, aux = model.apply({"params": params}, x)
    assert logits.shape == (2, 5) and aux["patch_tokens"].shape == (2, 4, 16)  # 8x8 -> 4x4 -> 2x2 tokens
    # The stem is really used: the output depends on the first conv.
    p2 = jax.tree.map(lambda a: a, params)
    p2["stem_conv_0"] = {"kernel": params["stem_conv_0"]["kernel"] * 2.0, "bias": params["stem_conv_0"]["bias"]}
    p2["head"] = {"kernel": jnp.ones_like(params["head"]["kernel"]), "bias": params["head"]["bias"]}
    p1 = {**params, "head": p2["head"]}
    assert not np.allclose(model.apply({"params": p1}, x)[0], model.apply({"params": p2}, x)[0])
    # 'SAME' stride-2 convs round up: 7x7 -> 4x4 -> 2x2, so sizes need not divide by the stem stride ...
    assert model.apply({"params": params}, _images(size=7))[1]["patch_tokens"].shape == (2, 4, 16)
    # ... but the stem output must divide by the patch size.
    model2 = ViT(num_classes=5, stem_features=(4,), **{**TINY, "variant": "mu/2"})
    params2 = model2.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"maps images 10x10 .* to 5x5, which is not divisible by patch_size=2"):
        model2.apply({"params": params2}, _images(size=10))
    with pytest.raises(ValueError, match="1 channels .* but the conv stem expects 3"):
        model.apply({"params": params}, _images(size=8, channels=1))
    with pytest.raises(ValueError, match="stem_features must be a tuple of positive ints"):
        ViT(num_classes=5, stem_features=(4, 0), **TINY)


@pytest.mark.parametrize("size", [8, 7, 5])
def test_matmul_stem_equals_conv_stem(size):
    """stem_impl="matmul" (im2col StemConv) has the same parameters, initial values and outputs as nn.Conv,
    gradients included, for even and odd image sizes ('SAME' padding)."""
    kw = dict(num_classes=5, stem_features=(4, 8), **{**TINY, "variant": "mu/1"})
    conv, matmul = ViT(**kw), ViT(**kw, stem_impl="matmul")
    x = _images(size=size)
    # compiled: one program for both inits, not op by op; the two parameter trees are the same computation on the
    # same key in that program, so they stay bit-identical
    params, same_init = jax.jit(lambda key: (conv.init(key, x)["params"], matmul.init(key, x)["params"]))(
        jax.random.key(0)
    )
    jax.tree.map(np.testing.assert_array_equal, params, same_init)
    params = {**params, "head": {"kernel": jnp.ones_like(params["head"]["kernel"]), "bias": params["head"]["bias"]}}

    def apply(model):  # compiled: one program, not op by op
        return jax.jit(lambda p: model.apply({"params": p}, x))

    conv_out = apply(conv)(params)
    np.testing.assert_allclose(apply(matmul)(params)[0], conv_out[0], rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.key(2), conv_out[1]["patch_tokens"].shape)

    def grad(model):  # a well-conditioned loss on the tokens the stem feeds: O(1) gradients for stem + embedding
        # compiled: one program, not op by op
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[1]["patch_tokens"] * weights)))(params)

    g_matmul, g_conv = grad(matmul), grad(conv)
    for name in ("stem_conv_0", "stem_conv_1", "embedding"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_matmul[name], g_conv[name])
    assert float(jnp.abs(g_conv["stem_conv_0"]["kernel"]).max()) > 1e-2
    with pytest.raises(ValueError, match=r"stem_impl must be one of \('conv', 'matmul'\), got 'im2col'"):
        ViT(**kw, stem_impl="im2col")


def test_integer_images_raise_naming_the_dtype_and_the_fix():
    model = ViT(**TINY, num_classes=3)
    pixels = (np.random.RandomState(0).rand(2, 8, 8, 3) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match=r"dtype uint8 \(shape \(2, 8, 8, 3\)\).*NHWC.*astype\(jnp.float32\) / 255"):
        model.init(jax.random.key(0), pixels)
    params = model.init(jax.random.key(0), pixels.astype(np.float32) / 255)["params"]
    with pytest.raises(ValueError, match="dtype int32"):
        jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(pixels, jnp.int32))


def test_float64_images_run_in_float64_under_x64_and_are_downcast_without():
    images = _images().astype(np.float64)
    model = ViT(**TINY, num_classes=3, head_zero_init=False)
    params = model.init(jax.random.key(0), images)["params"]
    logits32, _ = model.apply({"params": params}, images.astype(np.float32))
    logits, _ = model.apply({"params": params}, images)  # no x64: jax downcasts float64 to float32 silently
    assert logits.dtype == jnp.float32 and np.array_equal(logits, logits32)
    with jax.enable_x64(True):
        m64 = ViT(**TINY, num_classes=3, head_zero_init=False, param_dtype=jnp.float64)
        p64 = m64.init(jax.random.key(0), images)["params"]
        out64, aux = m64.apply({"params": p64}, images)
        assert aux["encoded"].dtype == jnp.float64


def test_encoder_config_whole_equals_the_keywords():
    from mmjax.layers import EncoderConfig

    kw = dict(width=16, depth=2, num_heads=2, mlp_dim=32, activation="quick_gelu", layer_norm_eps=1e-5)
    flat = ViT(variant=None, patch_size=4, num_classes=3, head_zero_init=False, dropout_rate=0.1, **kw)
    whole = ViT(
        variant=None,
        patch_size=4,
        num_classes=3,
        head_zero_init=False,
        encoder_config=EncoderConfig(dropout_rate=0.1, **kw),
    )
    assert flat.get_encoder_config() == whole.get_encoder_config()
    images = _images()
    p1, p2 = flat.init(jax.random.key(0), images)["params"], whole.init(jax.random.key(0), images)["params"]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), p1, p2))
    rng = {"dropout": jax.random.key(1)}
    o1 = flat.apply({"params": p1}, images, train=True, rngs=rng)[0]
    o2 = whole.apply({"params": p1}, images, train=True, rngs=rng)[0]
    assert np.array_equal(o1, o2)
    with pytest.raises(ValueError, match="encoder_config is given together with the encoder keywords width=16"):
        ViT(variant=None, patch_size=4, width=16, encoder_config=EncoderConfig(width=16, num_heads=2, mlp_dim=8))
    with pytest.raises(ValueError, match="encoder_config.width is None"):
        ViT(variant=None, patch_size=4, encoder_config=EncoderConfig(num_heads=2, mlp_dim=8))
