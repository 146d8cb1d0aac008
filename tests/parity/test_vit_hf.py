"""Parity of mmjax.vit.ViT (via mmjax.convert.from_hf) with transformers' ViTModel / ViTForImageClassification.

Random-initialised reference models (no download) of several small configs; every weight is re-drawn at a visible
scale so that zero-initialised biases and unit LayerNorm scales are exercised too.
"""

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from mmjax.convert import from_hf, hf_vit, load_state_dict, to_numpy_state_dict
from mmjax.layers import unstack_layers
from tests.tolerances import assert_matches_reference

pytestmark = pytest.mark.parity

CONFIGS = [
    dict(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
        num_channels=3,
    ),
    dict(
        hidden_size=24,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=40,
        image_size=12,
        patch_size=6,
        hidden_act="gelu_new",
        layer_norm_eps=1e-6,
        qkv_bias=False,
        num_channels=1,
    ),
    dict(
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=3,
        intermediate_size=96,
        image_size=20,
        patch_size=5,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        qkv_bias=True,
        num_channels=3,
        pooler_output_size=20,
        pooler_act="tanh",
    ),
]


def _config(cfg, num_labels=5):
    return transformers.ViTConfig(num_labels=num_labels, attn_implementation="eager", **cfg)


def _reference(cls, cfg, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(_config(cfg), **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if p.ndim == 1 else 0.0) * 0.5)
    return model


def _images(cfg, batch=2, seed=0):
    size, channels = cfg["image_size"], cfg["num_channels"]
    return np.random.RandomState(seed).randn(batch, channels, size, size).astype(np.float32)  # NCHW


def _run(model, params, nchw):
    return model.apply({"params": params}, np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["gelu-qkvbias", "gelu_new-noqkvbias-1ch", "pooler20"])
def test_vit_model_last_hidden_state_and_pooler(cfg):
    ref = _reference(transformers.ViTModel, cfg)
    x = _images(cfg)
    with torch.no_grad():
        out = ref(torch.from_numpy(x))
    model, params = from_hf(ref)
    assert model.num_classes == 0 and model.representation_size == cfg.get("pooler_output_size", cfg["hidden_size"])
    pooled, aux = _run(model, params, x)
    assert_matches_reference(aux["encoded"], out.last_hidden_state.numpy())
    assert_matches_reference(pooled, out.pooler_output.numpy())


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["gelu-qkvbias", "gelu_new-noqkvbias-1ch"])
def test_vit_for_image_classification_logits(cfg):
    ref = _reference(transformers.ViTForImageClassification, cfg, seed=1)
    x = _images(cfg, batch=3, seed=1)
    with torch.no_grad():
        logits = ref(torch.from_numpy(x)).logits.numpy()
    model, params = from_hf(ref)
    assert model.num_classes == 5 and model.representation_size is None
    got, aux = _run(model, params, x)
    assert_matches_reference(got, logits)
    with torch.no_grad():
        hidden = ref.vit(torch.from_numpy(x)).last_hidden_state.numpy()
    assert_matches_reference(aux["encoded"], hidden)


def test_from_saved_directory_and_state_dict_forms(tmp_path):
    cfg = CONFIGS[0]
    ref = _reference(transformers.ViTForImageClassification, cfg, seed=2)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    x = _images(cfg, seed=2)
    with torch.no_grad():
        logits = ref(torch.from_numpy(x)).logits.numpy()
    model, params = from_hf(str(tmp_path))
    assert_matches_reference(_run(model, params, x)[0], logits)
    # the files use the Hub names (encoder.layer.N.attention.attention.query ...), memory the new ones
    assert any(".attention.attention.query." in k for k in load_state_dict(tmp_path))
    model2, params2 = from_hf(ref.state_dict(), config=ref.config)
    assert_matches_reference(_run(model2, params2, x)[0], logits)
    model3, params3 = from_hf((load_state_dict(tmp_path), ref.config.to_dict()), scan=True)
    assert model3.scan
    assert_matches_reference(_run(model3, params3, x)[0], logits)
    unstacked = dict(params3, encoder=unstack_layers(params3["encoder"]))
    np.testing.assert_array_equal(
        unstacked["encoder"]["encoderblock_1"]["mlp"]["fc1"]["kernel"],
        params["encoder"]["encoderblock_1"]["mlp"]["fc1"]["kernel"],
    )


def test_bad_keys_are_named():
    cfg = CONFIGS[0]
    ref = _reference(transformers.ViTModel, cfg)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    conf = ref.config
    extra = dict(sd, **{"layers.0.attention.extra_proj.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unknown keys \['layers.0.attention.extra_proj.weight'\]"):
        from_hf(extra, config=conf)
    missing = {k: v for k, v in sd.items() if k != "layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.mlp.fc2.bias'\]"):
        from_hf(missing, config=conf)
    bad = dict(sd, **{"layers.0.attention.k_proj.weight": np.zeros((32, 31), np.float32)})
    with pytest.raises(ValueError, match=r"layers.0.attention.k_proj.weight: got \(32, 31\), expected \(32, 32\)"):
        from_hf(bad, config=conf)
    # legacy names are reported as the checkpoint wrote them
    legacy = {"vit.encoder.layer.0.intermediate.dense.weight": np.zeros((64, 30), np.float32)}
    legacy.update({"vit." + k: v for k, v in sd.items() if k != "layers.0.mlp.fc1.weight"})
    with pytest.raises(
        ValueError,
        match=r"vit.encoder.layer.0.intermediate.dense.weight \(= layers.0.mlp.fc1"
        r".weight\): got \(64, 30\), expected \(64, 32\)",
    ):
        from_hf(legacy, config=conf)


def test_unsupported_model_type_and_activation():
    cfg = CONFIGS[0]
    ref = _reference(transformers.ViTModel, cfg)
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="model_type='bert'.*'vit'"):
        from_hf(sd, config=dict(ref.config.to_dict(), model_type="bert"))
    with pytest.raises(ValueError, match="hidden_act='mish'"):
        from_hf(sd, config=dict(ref.config.to_dict(), hidden_act="mish"))
    with pytest.raises(ValueError, match="config="):
        from_hf(sd)


def test_pytorch_bin_directory_and_bfloat16_tensors(tmp_path):
    cfg = CONFIGS[1]
    ref = _reference(transformers.ViTForImageClassification, cfg, seed=3)
    ref.save_pretrained(tmp_path)  # transformers 5 writes safetensors only: turn it into a legacy pickle
    weights = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    x = _images(cfg, seed=3)
    with torch.no_grad():
        logits = ref(torch.from_numpy(x)).logits.numpy()
    model, params = from_hf(tmp_path)
    assert_matches_reference(_run(model, params, x)[0], logits)
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    got = to_numpy_state_dict({"w": bf16})["w"]
    assert str(got.dtype) == "bfloat16"
    np.testing.assert_array_equal(got.astype(np.float32), bf16.float().numpy())


@pytest.mark.parametrize("cls", [transformers.ViTModel, transformers.ViTForImageClassification])
def test_round_trip_to_hf_state_dict_and_from_pretrained(cls, tmp_path):
    cfg = CONFIGS[2] if cls is transformers.ViTModel else CONFIGS[0]
    ref = _reference(cls, cfg, seed=4)
    ref.save_pretrained(tmp_path / "ref")
    files = load_state_dict(tmp_path / "ref")
    model, params = from_hf(ref, scan=True)
    back = hf_vit.to_hf_state_dict(model, params)
    assert set(back) == set(files)
    for k in files:
        np.testing.assert_array_equal(back[k], files[k], err_msg=k)
    hf_vit.to_hf_dir(model, params, str(tmp_path / "ours"))
    loaded = cls.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = _images(cfg, seed=4)
    with torch.no_grad():
        a, b = ref(torch.from_numpy(x)), loaded(torch.from_numpy(x))
    key = "pooler_output" if cls is transformers.ViTModel else "logits"
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_to_hf_rejects_options_hf_lacks():
    import jax
    import jax.numpy as jnp

    from mmjax.vit import ViT

    model = ViT(variant="mu/4", num_classes=3, pool_type="gap")
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    with pytest.raises(ValueError, match="pool_type"):
        hf_vit.to_hf_state_dict(model, params)
