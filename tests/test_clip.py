"""Unit tests for mmjax.clip (the two-tower model, configs) and mmjax.preprocess."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.clip import CLIP, CONFIGS, CLIPConfig, CLIPOutput, get_config, l2_normalize
from mmjax.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, preprocess, resize_shortest_side

CFG = get_config("tiny", vision_depth=1, text_depth=1)  # 16x16 images, patch 8, vocab 64, context 12, eot 63


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32)
    ids = np.zeros((2, 12), np.int32)
    ids[0, :4] = [62, 5, 9, 63]
    ids[1, :6] = [62, 7, 7, 8, 2, 63]
    return images, jnp.asarray(ids)


@pytest.fixture(scope="module")
def params(inputs):
    return jax.jit(CLIP(CFG).init)(jax.random.key(0), *inputs)["params"]


def forward(cfg=CFG, **module_kw):
    """A jitted ``(params, images, ids) -> CLIPOutput`` (eager flax dispatch is slow on a loaded CPU)."""
    model = CLIP(cfg, **module_kw)
    return jax.jit(lambda p, images, ids: model.apply({"params": p}, images, ids))


FORWARD = forward()


def test_output_shapes_and_normalisation(inputs, params):
    out = FORWARD(params, *inputs)
    assert isinstance(out, CLIPOutput)
    assert out.image_embeds.shape == (3, 16) and out.text_embeds.shape == (2, 16)
    assert out.logits_per_image.shape == (3, 2) and out.logits_per_text.shape == (2, 3)
    np.testing.assert_allclose(jnp.linalg.norm(out.image_embeds, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out.text_embeds, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out.logits_per_text, out.logits_per_image.T)
    scale = math.exp(CFG.logit_scale_init)
    np.testing.assert_allclose(out.logits_per_image, scale * out.image_embeds @ out.text_embeds.T, rtol=1e-5)
    assert out.logit_bias is None and "logit_bias" not in params


def test_param_tree(params):
    assert params["visual_projection"]["kernel"].shape == (32, 16)
    assert params["text_projection"]["kernel"].shape == (32, 16)
    assert params["logit_scale"].shape == ()
    np.testing.assert_allclose(params["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
    v = params["vision"]
    assert "bias" not in v["embedding"] and {"pre_norm", "post_norm", "cls", "pos_embedding"} <= set(v)
    assert "encoder_norm" not in v["encoder"]  # CLIP normalises the pooled token only
    assert params["text"]["pos_embedding"].shape == (12, 32)


def test_encode_methods(inputs, params):
    model = CLIP(CFG)
    images, ids = inputs

    @jax.jit
    def encode(p, images, ids):
        f_img = model.apply({"params": p}, images, method="encode_image")
        f_txt = model.apply({"params": p}, ids, method="encode_text")
        normed = model.apply({"params": p}, ids, normalize=True, method=CLIP.encode_text)
        pooled, _ = model.apply({"params": p}, ids, method=lambda m, i: m.text(i))
        return f_img, f_txt, normed, pooled

    f_img, f_txt, normed, pooled = encode(params, images, ids)
    assert f_img.shape == (3, 16) and f_txt.shape == (2, 16) and f_img.dtype == jnp.float32
    out = FORWARD(params, images, ids)
    np.testing.assert_allclose(l2_normalize(f_img), out.image_embeds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l2_normalize(f_txt), out.text_embeds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normed, out.text_embeds, rtol=1e-5, atol=1e-6)
    # the text features equal projecting the pooled text tower output by hand
    np.testing.assert_allclose(f_txt, pooled @ params["text_projection"]["kernel"], rtol=1e-5, atol=1e-5)


def test_logit_scale_is_clamped(inputs, params):
    big = {**params, "logit_scale": jnp.asarray(10.0)}
    out = FORWARD(big, *inputs)
    np.testing.assert_allclose(out.logit_scale, 100.0, rtol=1e-6)
    np.testing.assert_allclose(out.logits_per_image, 100.0 * out.image_embeds @ out.text_embeds.T, rtol=1e-5)
    unclamped = forward(CFG.replace(max_logit_scale=None))(big, *inputs)
    np.testing.assert_allclose(unclamped.logit_scale, math.exp(10.0), rtol=1e-6)
    # the clamp also stops the gradient of the scale above log(100), not below
    scale = lambda p: CLIP(CFG).apply({"params": p}, method="scale_and_bias")[0]  # noqa: E731
    assert float(jax.grad(scale)({"logit_scale": jnp.asarray(10.0)})["logit_scale"]) == 0.0
    np.testing.assert_allclose(jax.grad(scale)({"logit_scale": jnp.asarray(1.0)})["logit_scale"], math.e, rtol=1e-6)


def test_logit_bias(inputs, params):
    cfg = get_config("tiny-siglip", vision_depth=1, text_depth=1)
    head = CLIP(cfg).init(jax.random.key(1), method="scale_and_bias")["params"]  # only the scalars
    assert set(head) == {"logit_scale", "logit_bias"}
    np.testing.assert_allclose(head["logit_bias"], -10.0)
    np.testing.assert_allclose(head["logit_scale"], math.log(10.0), rtol=1e-6)
    p = {**params, **head}
    fwd = forward(cfg)
    out = fwd(p, *inputs)
    want = 10.0 * out.image_embeds @ out.text_embeds.T - 10.0
    np.testing.assert_allclose(out.logits_per_image, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logit_bias, -10.0)
    shifted = fwd({**p, "logit_bias": jnp.asarray(2.5)}, *inputs)
    np.testing.assert_allclose(shifted.logits_per_image - out.logits_per_image, 12.5, rtol=1e-5)


def test_bf16_compute_is_close_to_float32(inputs, params):
    eager = FORWARD(params, *inputs)
    bf16 = forward(dtype=jnp.bfloat16)(params, *inputs)
    assert bf16.image_embeds.dtype == jnp.float32
    np.testing.assert_allclose(bf16.image_embeds, eager.image_embeds, atol=5e-2)


def test_configs():
    assert set(CONFIGS) >= {"ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14-336", "tiny"}
    b32, l14 = get_config("ViT-B/32"), get_config("ViT-L/14-336")
    assert (b32.embed_dim, b32.vision_width, b32.vision_heads, b32.text_width, b32.text_heads) == (512, 768, 12, 512, 8)
    assert (l14.embed_dim, l14.image_size, l14.patch_size, l14.vision_depth, l14.text_width) == (768, 336, 14, 24, 768)
    assert get_config("ViT-B/16").num_patches == 196
    cd = ml_collections.ConfigDict(CFG.to_dict())
    assert CLIPConfig.from_dict(cd) == CFG
    for config in (cd, CFG.to_dict(), "tiny"):  # setup() accepts a ConfigDict, a dict and a name
        head = CLIP(config).init(jax.random.key(0), method="scale_and_bias")["params"]
        np.testing.assert_allclose(head["logit_scale"], CFG.logit_scale_init, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown keys"):
        CLIPConfig.from_dict({"embed_dim": 8, "widht": 3})
    with pytest.raises(ValueError, match="not divisible"):
        CFG.replace(vision_heads=5)
    with pytest.raises(ValueError, match="unknown CLIP config"):
        get_config("ViT-Q/3")
    with pytest.raises(ValueError, match="text_pooling"):
        CFG.replace(text_pooling="max")


def test_bad_images(inputs, params):
    with pytest.raises(ValueError, match="NHWC"):
        FORWARD(params, jnp.zeros((2, 3, 16, 16)), inputs[1])


def test_preprocess_steps():
    image = Image.new("RGB", (50, 20), (255, 0, 128))
    assert resize_shortest_side(image, 10).size == (25, 10)
    assert resize_shortest_side(Image.new("RGB", (20, 51)), 10).size == (10, 25)
    x = preprocess(image, size=10)
    assert x.shape == (1, 10, 10, 3) and x.dtype == np.float32
    want = (np.array([255, 0, 128]) / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    np.testing.assert_allclose(x[0, 5, 5], want, rtol=1e-5)
    arr = np.arange(7 * 6).reshape(7, 6, 1)
    np.testing.assert_array_equal(center_crop(arr, 4), arr[1:5, 1:5])
    gray = np.zeros((12, 12), np.uint8)
    assert preprocess([gray, gray], size=8, crop_size=6).shape == (2, 6, 6, 3)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="crop size"):
        preprocess(gray, size=8, crop_size=9)


def test_hybrid_image_tower_config():
    """vision_stem_features gives a hybrid (conv-stem) image tower; it has no Hugging Face equivalent."""
    cfg = get_config("tiny", image_size=32, vision_stem_features=[8, 16])
    assert cfg.vision_stem_features == (8, 16) and cfg.token_stride == 32 and cfg.num_patches == 1
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    model = CLIP(cfg)
    images, ids = jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 4), jnp.int32)
    # shapes only: traced by jax.eval_shape, not run op by op
    params = jax.eval_shape(model.init, jax.random.key(0), images, ids)["params"]
    assert params["vision"]["stem_conv_1"]["kernel"].shape == (3, 3, 8, 16)
    assert params["vision"]["pos_embedding"].shape == (1, 2, 32)  # class token + 1 patch
    out = jax.eval_shape(lambda p: model.apply({"params": p}, images, ids), params)
    assert out.logits_per_image.shape == (2, 2)
    with pytest.raises(ValueError, match="no Hugging Face CLIP equivalent"):
        cfg.to_hf_dict()
    with pytest.raises(ValueError, match="not divisible by patch_size=8 x stem stride 4"):
        get_config("tiny", image_size=16, vision_stem_features=(8, 16))
    with pytest.raises(ValueError, match="vision_stem_features must be a tuple of positive ints"):
        get_config("tiny", vision_stem_features=(8, -1))


def test_clip_output_keeps_both_towers_intermediates():
    model = CLIP("tiny")
    images = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    ids = np.array([[1, 5, 63, 0], [1, 63, 0, 0]], np.int32)
    params = model.init(jax.random.key(0), images, ids)["params"]
    out = model.apply({"params": params}, images, ids)
    img_aux, txt_aux = out.image_intermediates, out.text_intermediates
    assert {"patch_tokens", "embedded", "encoderblock_0", "encoderblock_1", "encoded", "pooled"} <= set(img_aux)
    assert {"embeddings", "encoderblock_0", "encoderblock_1", "tokens"} <= set(txt_aux)
    assert img_aux["encoded"].shape == (2, 5, 32) and txt_aux["tokens"].shape == (2, 4, 32)
    # the intermediates are those of the towers that made the embeddings
    feats = model.apply({"params": params}, images, method="encode_image")
    pooled = img_aux["pooled"] @ params["visual_projection"]["kernel"]
    np.testing.assert_allclose(pooled, feats, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l2_normalize(feats), out.image_embeds, rtol=1e-6, atol=1e-7)
    # still a pytree that jit returns
    jitted = jax.jit(lambda p: model.apply({"params": p}, images, ids))(params)
    # jit fuses differently from eager: LayerNorm-ed features of magnitude ~2 agree to a few float32 ulps
    np.testing.assert_allclose(jitted.text_intermediates["tokens"], txt_aux["tokens"], rtol=0, atol=2e-5)


def test_clip_towers_get_one_encoder_config_each():
    cfg = get_config("tiny", remat=True, vision_activation="gelu")
    v, t = cfg.vision_encoder_config(jnp.bfloat16), cfg.text_encoder_config()
    assert (v.width, v.depth, v.num_heads, v.mlp_dim, v.activation, v.remat, v.dtype) == (
        32,
        2,
        4,
        128,
        "gelu",
        True,
        jnp.bfloat16,
    )
    assert (t.activation, t.layer_norm_eps, t.dtype) == ("quick_gelu", 1e-5, None)
