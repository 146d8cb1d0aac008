"""Parity of mmjax.dit.DiT (via mmjax.convert.diffusers_dit) with diffusers' DiTTransformer2DModel.

Small randomly initialised class-conditional references (no download); every weight is re-drawn, the adaLN-Zero
zeros included, so a wrong mapping shows. diffusers gives each block its own copy of the timestep and label
embedders; the references hold one set of weights in every copy, as the checkpoints converted from DiT do (a
differing copy is an error of the converter, tested below).

The timestep embedding: diffusers computes ``exp`` of the frequency exponent in float32, and torch's float32 ``exp``
is one unit in the last place off for some exponents (1 of the 128 here), which moves ``sin(t w)`` by up to
``t w * 2**-23`` (about 6e-5 at t = 1000); mmjax rounds that ``exp`` correctly. The embedding is compared with
diffusers' own module within exactly that bound, and the whole model at 1e-5 of the output's magnitude
(:func:`tests.tolerances.assert_matches_reference`; the outputs reach about 8) with the reference's embedding module
replaced by the same formula with a correctly rounded ``exp`` (and, unchanged, at small timesteps, where the bound is
below 1e-6).
"""

import json
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from mmjax.convert import diffusers_dit
from mmjax.dit import posemb_sincos_2d_mae, timestep_embedding
from mmjax.errors import UserError
from tests.tolerances import assert_matches_reference

pytestmark = pytest.mark.parity

CONFIGS = {
    "base": dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_embeds_ada_norm=10,
    ),
    "sigma-noqkvbias-gelu": dict(
        sample_size=8,
        patch_size=4,
        in_channels=3,
        out_channels=6,
        num_layers=3,
        num_attention_heads=4,
        attention_head_dim=8,
        num_embeds_ada_norm=5,
        attention_bias=False,
        activation_fn="gelu",
        norm_eps=1e-6,
    ),
}
TIMESTEPS = np.array([0, 1, 10, 250, 500, 999])
SMALL_TIMESTEPS = np.array([0, 1, 2, 3, 5, 10])


def _reference(cfg, seed=0):
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        params = dict(model.named_parameters())
        for name, p in params.items():
            if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
                p.copy_(params["transformer_blocks.0." + name.split(".", 2)[2]])
    return model


class _RoundedExpTimesteps(torch.nn.Module):
    """diffusers' ``Timesteps`` (get_timestep_embedding) with the frequencies' exp rounded correctly to float32."""

    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, t):
        o = self.original
        half = o.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - o.downscale_freq_shift)
        freqs = torch.exp(exponent.double()).float()
        args = o.scale * (t[:, None].float() * freqs[None, :])
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        if o.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return emb


def _round_exp(model):
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj = _RoundedExpTimesteps(block.norm1.emb.time_proj)
    return model


def _inputs(cfg, t, seed=0):
    rng = np.random.RandomState(seed)
    batch = len(t)
    x = rng.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]).astype(np.float32)  # NCHW
    classes = cfg["num_embeds_ada_norm"]
    labels = rng.randint(0, classes, batch)
    labels[::3] = classes  # the null class (what DiTPipeline passes for the unconditional half)
    return x, labels


def _ref_out(model, x, t, labels):
    with torch.no_grad():
        out = model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(labels))
    return out.sample.numpy().transpose(0, 2, 3, 1)  # NHWC


def _convert(model):
    ours, params = diffusers_dit.from_diffusers_state_dict(model.state_dict(), dict(model.config))
    run = jax.jit(lambda p, x, t, y, drop: ours.apply({"params": p}, x, t, labels=y, drop=drop))
    return (
        ours,
        params,
        lambda x, t, y, drop=None: run(params, np.ascontiguousarray(x.transpose(0, 2, 3, 1)), t, y, drop),
    )


def test_timestep_embedding_matches_diffusers_within_the_float32_exp_ulp():
    time_proj = _reference(CONFIGS["base"]).transformer_blocks[0].norm1.emb.time_proj
    t = np.concatenate([np.arange(0, 1000, 37), [999, 0.5, 12.25]]).astype(np.float32)
    with torch.no_grad():
        ref = time_proj(torch.from_numpy(t)).numpy()
        rounded = _RoundedExpTimesteps(time_proj)(torch.from_numpy(t)).numpy()
    ours = np.asarray(timestep_embedding(jnp.asarray(t), 256, freq_shift=1.0))
    np.testing.assert_allclose(ours, rounded, rtol=0, atol=3e-7)
    w = np.exp(-math.log(10000) * np.arange(128) / 127)
    tw = np.abs(t[:, None] * w[None, :])
    # one ulp of a frequency, times t, plus the product t w rounded to the neighbouring float32 (one ulp of t w)
    bound = 2 * 2.0**-23 * np.concatenate([tw, tw], axis=1) + 3e-7
    assert np.all(np.abs(ours - ref) <= bound)
    assert np.abs(ours - ref)[t <= 1].max() <= 3e-7


def test_position_embedding_is_diffusers_buffer():
    for cfg in CONFIGS.values():
        ref = _reference(cfg)
        grid = cfg["sample_size"] // cfg["patch_size"]
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        np.testing.assert_allclose(posemb_sincos_2d_mae(grid, grid, width), ref.pos_embed.pos_embed.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_for_timesteps_labels_and_the_null_class(name):
    cfg = CONFIGS[name]
    ref = _reference(cfg, seed=1)
    ours, params, run = _convert(ref)
    assert ours.num_classes == cfg["num_embeds_ada_norm"] and ours.timestep_freq_shift == 1.0
    assert ours.mlp_layer_norm_eps == cfg.get("norm_eps", 1e-5)
    out_channels = cfg.get("out_channels", cfg["in_channels"])
    # unchanged reference, small timesteps (the float32 exp's ulp moves the embedding by < 1e-6 there)
    x, labels = _inputs(cfg, SMALL_TIMESTEPS, seed=2)
    assert_matches_reference(run(x, SMALL_TIMESTEPS, labels)[0], _ref_out(ref, x, SMALL_TIMESTEPS, labels))
    # every timestep, the reference's exp rounded as mmjax rounds it
    _round_exp(ref)
    for seed, t in enumerate([TIMESTEPS, TIMESTEPS[::-1].copy()]):
        x, labels = _inputs(cfg, t, seed=seed)
        expected = _ref_out(ref, x, t, labels)
        got, aux = run(x, t, labels)
        assert got.shape == expected.shape == (len(t), cfg["sample_size"], cfg["sample_size"], out_channels)
        assert np.abs(expected).max() > 0.5  # the randomised zero-initialised layers make the output non-trivial
        assert_matches_reference(got, expected)
        with torch.no_grad():
            cond = ref.transformer_blocks[0].norm1.emb(torch.from_numpy(t), torch.from_numpy(labels), torch.float32)
        assert_matches_reference(aux["conditioning"], cond.numpy())
        # mmjax's drop mask = diffusers' null label for those examples
        drop = np.arange(len(t)) % 2 == 1
        nulled = np.where(drop, cfg["num_embeds_ada_norm"], labels)
        assert_matches_reference(run(x, t, labels, drop)[0], _ref_out(ref, x, t, nulled))


def test_from_saved_files_and_numpy_arrays(tmp_path):
    cfg = CONFIGS["base"]
    ref = _round_exp(_reference(cfg, seed=3))
    ref.save_pretrained(tmp_path)
    state_dict = safetensors.numpy.load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel"
    model, params = diffusers_dit.from_diffusers_state_dict(state_dict, config, attention_implementation="reference")
    assert model.attention_implementation == "reference"
    x, labels = _inputs(cfg, TIMESTEPS, seed=3)
    got = model.apply({"params": params}, x.transpose(0, 2, 3, 1), TIMESTEPS, labels=labels)[0]
    assert_matches_reference(got, _ref_out(ref, x, TIMESTEPS, labels))


def test_converter_errors_name_the_weight_or_setting():
    ref = _reference(CONFIGS["base"])
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    config = dict(ref.config)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    per_block = dict(sd, **{key: sd[key] + 1.0})
    with pytest.raises(UserError, match=rf"{key} differs from transformer_blocks.0.norm1.emb"):
        diffusers_dit.from_diffusers_state_dict(per_block, config)
    missing = {k: v for k, v in sd.items() if k != "proj_out_2.bias"}
    with pytest.raises(UserError, match=r"missing keys \['proj_out_2.bias'\]"):
        diffusers_dit.from_diffusers_state_dict(missing, config)
    bad = dict(sd, **{"transformer_blocks.0.attn1.to_k.weight": np.zeros((32, 31), np.float32)})
    with pytest.raises(UserError, match=r"to_k.weight: got \(32, 31\), expected \(32, 32\)"):
        diffusers_dit.from_diffusers_state_dict(bad, config)
    for change, message in [
        (dict(activation_fn="geglu"), "activation_fn='geglu'"),
        (dict(norm_elementwise_affine=True), "norm_elementwise_affine=True"),
        (dict(norm_type="ada_norm"), "norm_type='ada_norm'"),
    ]:
        with pytest.raises(UserError, match=message):
            diffusers_dit.from_diffusers_state_dict(sd, dict(config, **change))
