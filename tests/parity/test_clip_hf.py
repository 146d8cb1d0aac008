"""mmjax CLIP against transformers.CLIPModel (random weights, several small configs, no download).

Tolerances: float32 forward agrees to 1e-5 of the output's magnitude (``tests.tolerances.assert_matches_reference``);
bfloat16 compute (float32 params) is compared with the float32 reference within BF16_ATOL on the unit-norm embeddings
and BF16_LOGIT_ATOL on the logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mmjax.convert
from mmjax.clip import CLIP, CLIPConfig
from mmjax.convert.hf_clip import (
    convert_hf_dir,
    from_hf_state_dict,
    hf_shapes,
    load_dir,
    params_from_hf,
    to_hf_dir,
    to_hf_state_dict,
)
from mmjax.preprocess import preprocess
from tests.tolerances import assert_matches_reference

pytestmark = pytest.mark.parity

BF16_ATOL = 2e-2  # on unit-norm embeddings (measured max 7e-3)
BF16_LOGIT_ATOL = 0.2  # on logits of magnitude <= exp(2.6592) = 14.3 (measured max 0.075)

HF_CONFIGS = {
    # eot pooling at eos_token_id (current HF configs); quick_gelu
    "a": dict(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            eos_token_id=98,
            bos_token_id=97,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=20,
    ),
    # legacy eos_token_id == 2 (argmax pooling, as openai/clip-vit-base-patch32's config); exact gelu; 4x4 patches of 7
    "b": dict(
        text_config=dict(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=10,
            eos_token_id=2,
            bos_token_id=1,
            hidden_act="gelu",
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            hidden_act="gelu",
        ),
        projection_dim=8,
    ),
    # one patch per image, three text layers, different LayerNorm eps
    "c": dict(
        text_config=dict(
            vocab_size=40,
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=8,
            eos_token_id=39,
            bos_token_id=38,
            layer_norm_eps=1e-6,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=16,
            patch_size=16,
        ),
        projection_dim=12,
    ),
}


def make_hf(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(**HF_CONFIGS[name])).eval()
    with torch.no_grad():  # random LayerNorm affines and biases too, so every mapping is exercised
        for pname, p in model.named_parameters():
            if pname != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    return model


def make_inputs(hf, batch_images=3, seed=0):
    """Images [B, H, W, 3] and ids with one or several end-of-text tokens and padding after them."""
    tc, vc = hf.config.text_config, hf.config.vision_config
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_images, vc.image_size, vc.image_size, 3)).astype(np.float32)
    T, V = tc.max_position_embeddings, tc.vocab_size
    eot = V - 1 if tc.eos_token_id == 2 else tc.eos_token_id
    ids = rng.integers(3, V - 3, (4, T))
    lengths = [T, 3, T - 2, 2]
    mask = np.zeros((4, T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, n - 1] = eot
        ids[b, n:] = eot  # Hugging Face pads with <|endoftext|>: several eot positions per row
        mask[b, :n] = 1
    ids[2, 1] = eot  # an eot early in the row: pooling picks the first
    return images, ids.astype(np.int64), mask


def hf_forward(hf, images, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)), **kw)
        f_img = hf.get_image_features(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
        f_txt = hf.get_text_features(input_ids=torch.tensor(ids), **kw)
    f_img = f_img.pooler_output if hasattr(f_img, "pooler_output") else f_img
    f_txt = f_txt.pooler_output if hasattr(f_txt, "pooler_output") else f_txt
    return {
        "image_embeds": out.image_embeds.numpy(),
        "text_embeds": out.text_embeds.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
        "logits_per_text": out.logits_per_text.numpy(),
        "image_features": f_img.numpy(),
        "text_features": f_txt.numpy(),
    }


def our_forward(model, params, images, ids, mask=None):
    @jax.jit
    def run(p, images, ids, mask):
        out = model.apply({"params": p}, images, ids, mask)
        f_img = model.apply({"params": p}, images, method="encode_image")
        f_txt = model.apply({"params": p}, ids, mask, method="encode_text")
        return out, f_img, f_txt

    out, f_img, f_txt = run(
        params, jnp.asarray(images), jnp.asarray(ids, jnp.int32), None if mask is None else jnp.asarray(mask)
    )
    res = {
        k: np.asarray(getattr(out, k)) for k in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")
    }
    res.update(image_features=np.asarray(f_img), text_features=np.asarray(f_txt))
    return res


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def case(request):
    hf = make_hf(request.param)
    model, params = mmjax.convert.from_hf(hf)
    return request.param, hf, model, params


def test_config_translation(case):
    name, hf, model, _ = case
    cfg = model.config
    assert isinstance(cfg, CLIPConfig)
    assert cfg.text_pooling == ("argmax" if name == "b" else "eot")
    assert cfg.embed_dim == hf.config.projection_dim
    assert cfg.vision_mlp_dim == hf.config.vision_config.intermediate_size
    assert cfg.text_layer_norm_eps == hf.config.text_config.layer_norm_eps
    hf2 = transformers.CLIPConfig(**cfg.to_hf_dict())
    assert CLIPConfig.from_hf(hf2) == cfg


@pytest.mark.parametrize("with_mask", [False, True])
def test_float32_matches_transformers(case, with_mask):
    _, hf, model, params = case
    images, ids, mask = make_inputs(hf)
    mask = mask if with_mask else None
    want = hf_forward(hf, images, ids, mask)
    got = our_forward(model, params, images, ids, mask)
    for key in want:
        assert_matches_reference(got[key], want[key], err_msg=key)
    # the inputs exercise the pooling: different rows give different text embeddings
    assert np.abs(want["text_embeds"][0] - want["text_embeds"][1]).max() > 1e-3


def test_bfloat16_is_close_to_float32_reference(case):
    _, hf, model, params = case
    images, ids, mask = make_inputs(hf)
    want = hf_forward(hf, images, ids, mask)
    got = our_forward(CLIP(model.config, dtype=jnp.bfloat16), params, images, ids, mask)
    for key in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(got[key], want[key], atol=BF16_ATOL, err_msg=key)
    np.testing.assert_allclose(got["logits_per_image"], want["logits_per_image"], atol=BF16_LOGIT_ATOL)


def test_round_trip_is_exact(case):
    _, hf, model, params = case
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = to_hf_state_dict(params, model.config)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    assert hf_shapes(model.config) == {k: tuple(v.shape) for k, v in sd.items()}


def test_scan_layout_converts_and_matches():
    hf = make_hf("a")
    model, params = mmjax.convert.from_hf(hf)
    scanned, sparams = from_hf_state_dict(hf.state_dict(), hf.config, scan=True)
    assert "encoderblock" in sparams["text"]["encoder"]
    assert sparams["text"]["encoder"]["encoderblock"]["mlp"]["fc1"]["kernel"].shape[0] == model.config.text_depth
    images, ids, _ = make_inputs(hf)
    a = our_forward(model, params, images, ids)
    b = our_forward(scanned, sparams, images, ids)
    np.testing.assert_allclose(b["logits_per_image"], a["logits_per_image"], rtol=1e-5, atol=1e-5)
    back = to_hf_state_dict(sparams, scanned.config)
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_to_hf_dir_loads_in_transformers(tmp_path):
    hf = make_hf("a", seed=1)
    model, params = mmjax.convert.from_hf(hf)
    to_hf_dir(model.config, params, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    loaded = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    images, ids, mask = make_inputs(hf)
    want, got = hf_forward(hf, images, ids, mask), hf_forward(loaded, images, ids, mask)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # and back through the directory reader of mmjax.convert
    model2, params2 = mmjax.convert.from_hf(tmp_path / "out")
    assert model2.config == model.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_from_hf_directory_safetensors_and_pytorch_bin(tmp_path):
    hf = make_hf("c", seed=2)
    _, ref = mmjax.convert.from_hf(hf)
    hf.save_pretrained(tmp_path / "st")
    _, from_st = mmjax.convert.from_hf(tmp_path / "st")
    jax.tree.map(np.testing.assert_array_equal, from_st, ref)
    _, from_sd = mmjax.convert.from_hf(hf.state_dict(), config=hf.config)  # a state dict with its config
    jax.tree.map(np.testing.assert_array_equal, from_sd, ref)
    # an old-style checkpoint: pickle (read with weights_only=True) with the position_ids buffers
    (tmp_path / "bin").mkdir()
    sd = dict(hf.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(8)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(2)[None]
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    _, from_bin = mmjax.convert.from_hf(tmp_path / "bin")
    jax.tree.map(np.testing.assert_array_equal, from_bin, ref)


def test_convert_hf_dir_and_load_dir(tmp_path):
    hf = make_hf("b", seed=3)
    hf.save_pretrained(tmp_path / "hf")
    cfg = convert_hf_dir(tmp_path / "hf", tmp_path / "ours")
    cfg2, params = load_dir(tmp_path / "ours")
    assert cfg2 == cfg and cfg.text_pooling == "argmax"
    jax.tree.map(np.testing.assert_array_equal, params, mmjax.convert.from_hf(hf)[1])
    to_hf_dir(CLIP(cfg2), params, tmp_path / "hf2")
    again = transformers.CLIPModel.from_pretrained(tmp_path / "hf2")
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def test_bad_keys_are_named():
    hf = make_hf("c")
    cfg = CLIPConfig.from_hf(hf.config)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    extra = dict(sd, **{"text_model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unknown keys \['text_model.extra.weight'\]"):
        params_from_hf(extra, cfg)
    missing = {k: v for k, v in sd.items() if k != "visual_projection.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['visual_projection.weight'\]"):
        params_from_hf(missing, cfg)
    bad = dict(sd, **{"text_projection.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"text_projection.weight: got \(3, 3\), expected \(12, 24\)"):
        params_from_hf(bad, cfg)
    buf = dict(sd, **{"text_model.embeddings.position_ids": np.zeros((1, 8), np.int64)})
    with pytest.raises(ValueError, match="position_ids"):
        params_from_hf(buf, cfg)
    with pytest.raises(ValueError, match="unknown model options"):
        from_hf_state_dict(sd, hf.config, depth=3)
    _, params = mmjax.convert.from_hf(hf)
    with pytest.raises(ValueError, match="logit_bias"):
        to_hf_state_dict({**params, "logit_bias": np.zeros(())}, cfg)
    with pytest.raises(ValueError, match="mis-shaped"):
        to_hf_state_dict(params, cfg.replace(vocab_size=41))


def test_preprocess_matches_clip_image_processor():
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(300, 400), (257, 231), (50, 500)]]
    images = [Image.fromarray(a) for a in arrays] + [Image.fromarray(arrays[0][..., 0])]  # + a grayscale one
    reference = transformers.CLIPImageProcessorPil()
    for image in images:
        want = reference(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        assert_matches_reference(preprocess(image), want)
    small = transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    want = small(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert_matches_reference(preprocess(images, size=40, crop_size=32), want)
