"""mmjax.decoder and mmjax.captioner: the KV-cached decode path equals the teacher-forced forward at every
position (float64 to 1e-10, float32 to 1e-5, every attention implementation), the cross-attention keys/values are
computed once, CapPa's parallel rows, the parameter layout, and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.captioner import Captioner
from mmjax.decoder import DecoderConfig, TextDecoder, init_cache, reorder_cache
from mmjax.vit import ViT
from tests.tolerances import assert_float32_close

CFG = DecoderConfig(vocab_size=23, width=16, depth=2, num_heads=2, mlp_dim=32, max_length=12)


def _tokens(B=2, T=9, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


def _cached_logits(dec, params, ids, encoded, prompt_len):
    """Prefill the first ``prompt_len`` tokens in one call, then one token per call."""
    cache = init_cache(dec.config, ids.shape[0], dec.config.max_length, encoded.shape[1])
    decode = jax.jit(
        lambda tokens, cache, encoded: dec.apply({"params": params}, tokens, cache, encoded, method="decode")
    )
    first, cache = decode(ids[:, :prompt_len], cache, encoded)
    outs = [first]
    for t in range(prompt_len, ids.shape[1]):
        step, cache = decode(ids[:, t : t + 1], cache, None)
        outs.append(step)
    assert int(cache.index) == ids.shape[1]
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("implementation", ["reference", "chunked", "xla"])
@pytest.mark.parametrize("prompt_len", [1, 4])
def test_cached_decoding_equals_teacher_forcing_in_float64(implementation, prompt_len):
    cfg = CFG.replace(attention_implementation=implementation, dtype=jnp.float64, param_dtype=jnp.float64)
    ids = _tokens()
    with jax.enable_x64(True):
        encoded = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 16)))
        dec = TextDecoder(cfg)
        params = dec.init(jax.random.key(0), ids, encoded)["params"]
        full, _ = dec.apply({"params": params}, ids, encoded)
        cached = _cached_logits(dec, params, ids, encoded, prompt_len)
        scale = float(jnp.abs(full).max())
        np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-10 * scale, rtol=0)


@pytest.mark.parametrize("implementation", ["reference", "chunked", "xla"])
def test_cached_decoding_equals_teacher_forcing_in_float32(implementation):
    """Logits are O(1) here (|logits| < 2): 1e-5 is about 40 float32 ulps of the largest."""
    cfg = CFG.replace(attention_implementation=implementation)
    ids = _tokens(seed=2)
    encoded = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 16)), jnp.float32)
    dec = TextDecoder(cfg)
    params = dec.init(jax.random.key(1), ids, encoded)["params"]
    full, _ = dec.apply({"params": params}, ids, encoded)
    assert float(jnp.abs(full).max()) < 2.0
    cached = _cached_logits(dec, params, ids, encoded, 3)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=0)


def test_cross_attention_keys_values_are_computed_once_at_prefill():
    """After the prefill the cache holds the projected encoder keys/values; a step never reads ``encoded``:
    feeding garbage encoder tokens at a step would change nothing since none are passed."""
    ids = _tokens(T=4, seed=4)
    encoded = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 16)), jnp.float32)
    dec = TextDecoder(CFG)
    params = dec.init(jax.random.key(2), ids, encoded)["params"]
    cache = init_cache(CFG, 2, 8, 5)
    _, cache = dec.apply({"params": params}, ids[:, :2], cache, encoded=encoded, method="decode")
    for i in range(CFG.depth):
        attn = params[f"decoderblock_{i}"]["cross_attn"]
        k = jnp.einsum("bsf,fnh->bnsh", encoded, attn["key"]["kernel"]) + attn["key"]["bias"][:, None]  # heads-major
        np.testing.assert_allclose(np.asarray(cache.cross_key_value[i][0]), np.asarray(k), atol=1e-5)
    # a step whose cache holds other encoder keys gives other logits: the step reads the cache, not a recompute
    step, _ = dec.apply({"params": params}, ids[:, 2:3], cache, method="decode")
    zeroed = cache._replace(cross_key_value=tuple((0 * k, 0 * v) for k, v in cache.cross_key_value))
    other, _ = dec.apply({"params": params}, ids[:, 2:3], zeroed, method="decode")
    assert float(jnp.abs(step - other).max()) > 1e-3


def test_jitted_step_compiles_once_for_every_position():
    ids = _tokens(T=6, seed=6)
    encoded = jnp.ones((2, 5, 16))
    dec = TextDecoder(CFG)
    params = dec.init(jax.random.key(3), ids, encoded)["params"]
    step = jax.jit(lambda p, tok, c: dec.apply({"params": p}, tok, c, method="decode"))
    cache = init_cache(CFG, 2, 8, 5)
    _, cache = dec.apply({"params": params}, ids[:, :1], cache, encoded=encoded, method="decode")
    for t in range(1, 6):
        _, cache = step(params, ids[:, t : t + 1], cache)
    assert step._cache_size() == 1 and int(cache.index) == 6


def test_parallel_rows_see_every_position_and_causal_rows_do_not():
    """CapPa: a row marked parallel has no causal mask (its first logits move when a later token changes), the
    other rows keep it (their first logits do not)."""
    ids = _tokens(T=5, seed=7)
    changed = ids.at[:, 4].set((ids[:, 4] + 1) % CFG.vocab_size)
    encoded = jnp.ones((2, 5, 16))
    dec = TextDecoder(CFG)
    params = dec.init(jax.random.key(4), ids, encoded)["params"]
    parallel = jnp.array([True, False])
    a, _ = dec.apply({"params": params}, ids, encoded, parallel=parallel)
    b, _ = dec.apply({"params": params}, changed, encoded, parallel=parallel)
    assert float(jnp.abs(a[0, 0] - b[0, 0]).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(a[1, :4]), np.asarray(b[1, :4]))
    causal, _ = dec.apply({"params": params}, ids, encoded)
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(causal[1]), atol=1e-6)


def test_parameter_tree_tied_and_untied():
    ids, encoded = _tokens(T=3), jnp.ones((2, 4, 10))
    tied = TextDecoder(CFG).init(jax.random.key(0), ids, encoded)["params"]
    assert "head" not in tied and tied["token_embedding"]["embedding"].shape == (23, 16)
    assert tied["pos_embedding"].shape == (12, 16)
    block = tied["decoderblock_0"]
    assert sorted(block) == ["cross_attn", "ln1", "ln2", "ln3", "mlp", "self_attn"]
    assert block["cross_attn"]["key"]["kernel"].shape == (10, 2, 8)  # encoder width 10 -> heads x head_dim
    untied = TextDecoder(CFG.replace(tie_embeddings=False, head_bias=True)).init(jax.random.key(0), ids, encoded)
    assert untied["params"]["head"]["kernel"].shape == (16, 23) and "bias" in untied["params"]["head"]
    lm = TextDecoder(CFG.replace(cross_attention=False)).init(jax.random.key(0), ids)["params"]
    assert "cross_attn" not in lm["decoderblock_0"] and "ln2" not in lm["decoderblock_0"]


def test_reorder_cache_gathers_rows():
    ids, encoded = _tokens(B=3, T=2), jnp.asarray(np.random.default_rng(8).normal(size=(3, 4, 16)), jnp.float32)
    dec = TextDecoder(CFG)
    params = dec.init(jax.random.key(0), ids, encoded)["params"]
    _, cache = dec.apply({"params": params}, ids, init_cache(CFG, 3, 6, 4), encoded=encoded, method="decode")
    re = reorder_cache(cache, jnp.array([2, 0]))
    np.testing.assert_array_equal(np.asarray(re.self_attention[1].key), np.asarray(cache.self_attention[1].key)[[2, 0]])
    np.testing.assert_array_equal(np.asarray(re.cross_key_value[0][1]), np.asarray(cache.cross_key_value[0][1])[[2, 0]])
    assert int(re.index) == 2


def test_errors_name_the_value_and_the_fix():
    dec = TextDecoder(CFG)
    ids, encoded = _tokens(T=3), jnp.ones((2, 4, 16))
    params = dec.init(jax.random.key(0), ids, encoded)["params"]
    with pytest.raises(ValueError, match="cache was made for batch 3 but tokens have batch 2"):
        dec.apply({"params": params}, ids, init_cache(CFG, 3, 6, 4), encoded=encoded, method="decode")
    with pytest.raises(ValueError, match="13 tokens do not fit 12 positions"):
        dec.apply({"params": params}, _tokens(T=13), encoded)
    with pytest.raises(ValueError, match="needs encoded="):
        dec.apply({"params": params}, ids)
    with pytest.raises(ValueError, match="integer ids"):
        dec.apply({"params": params}, ids.astype(jnp.float32), encoded)
    with pytest.raises(ValueError, match="max_length=13 must be in"):
        init_cache(CFG, 2, 13, 4)
    with pytest.raises(ValueError, match="eos_id=23 must be a token id"):
        CFG.replace(eos_id=23)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        CFG.replace(width=15)


def _captioner(**kw):
    vit = ViT(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4, num_classes=0, pool_type="gap")
    return Captioner(vision=vit, decoder=CFG, **kw)


@pytest.mark.parametrize("options", [{}, {"num_map_queries": 3}, {"project_encoder": True}])
def test_captioner_cached_decoding_equals_its_forward(options):
    model = _captioner(**options)
    images = jnp.asarray(np.random.default_rng(9).random((2, 8, 8, 3)), jnp.float32)
    ids = _tokens(T=6, seed=10)
    params = model.init(jax.random.key(5), images, ids)["params"]
    logits, aux = model.apply({"params": params}, images, ids)
    encoded = model.apply({"params": params}, images, method="encode")
    np.testing.assert_array_equal(np.asarray(encoded), np.asarray(aux["encoded"]))
    want_tokens = 3 if options.get("num_map_queries") else 5  # the class token and 2x2 patches of 4 px
    assert encoded.shape == (2, want_tokens, 16)
    assert ("map_pooler" in params) == ("num_map_queries" in options)
    assert ("encoder_proj" in params) == bool(options.get("project_encoder"))
    cache = model.init_cache(2, 10, encoded.shape[1])
    decode = jax.jit(
        lambda tokens, cache, encoded: model.apply({"params": params}, tokens, encoded, cache, method="decode")
    )
    first, cache = decode(ids[:, :2], cache, encoded)
    rest = [first]
    for t in range(2, 6):
        step, cache = decode(ids[:, t : t + 1], cache, None)
        rest.append(step)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(rest, 1)), np.asarray(logits), atol=1e-5, rtol=0)
    teacher, none = model.apply({"params": params}, ids, encoded=encoded, method="decode")
    assert none is None
    np.testing.assert_allclose(np.asarray(teacher), np.asarray(logits), atol=1e-6, rtol=0)


def test_captioner_rejects_images_of_the_wrong_size_and_dtype():
    model = _captioner()
    ids = _tokens(T=3)
    params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), ids)["params"]
    with pytest.raises(ValueError, match="dtype uint8.*expected floating images"):
        model.apply({"params": params}, jnp.zeros((2, 8, 8, 3), jnp.uint8), ids)
    with pytest.raises(ValueError):
        model.apply({"params": params}, jnp.zeros((2, 12, 12, 3)), ids)


def test_beams_of_an_image_share_its_cross_keys():
    """A cache whose cross-attention keys/values hold one row per image serves K rows per image (beams): a step
    equals the step over a cache with the keys copied to every row (float64 to 1e-12; float32 bounded), and the
    rows' self-attention caches are reordered as usual."""
    B, K = 2, 3
    ids, encoded = _tokens(B=B, T=3, seed=9), np.random.default_rng(10).normal(size=(B, 5, 16))
    rows = jnp.repeat(jnp.arange(B), K)
    nxt = _tokens(B=B * K, T=1, seed=11)

    def prefilled(dtype):
        """The decoder, its params and its cache after the prompt, in ``dtype``."""
        dec = TextDecoder(CFG.replace(param_dtype=dtype))
        params = jax.jit(dec.init)(jax.random.key(3), ids, jnp.asarray(encoded, dtype))["params"]
        cache = init_cache(CFG.replace(dtype=dtype), B, 8, 5)
        decode = jax.jit(functools.partial(dec.apply, method="decode"))  # compiled (op by op: 40 s for this test)
        _, cache = decode({"params": params}, ids, cache, encoded=jnp.asarray(encoded, dtype))
        return dec, params, cache

    def step(dtype):
        dec, params, cache = prefilled(dtype)
        shared = reorder_cache(cache, rows, cross=False)
        copied = reorder_cache(cache, rows)
        assert shared.cross_key_value[0][0].shape[0] == B and copied.cross_key_value[0][0].shape[0] == B * K
        decode = jax.jit(functools.partial(dec.apply, method="decode"))
        got, new = decode({"params": params}, nxt, shared)
        want, _ = decode({"params": params}, nxt, copied)
        assert new.cross_key_value[0][0].shape[0] == B and int(new.index) == 4
        return np.asarray(got), np.asarray(want)

    with jax.enable_x64(True):
        got, want = step(jnp.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    got, want = step(jnp.float32)
    assert_float32_close(got, want, terms=4 * 16 * CFG.depth)
    dec, params, cache = prefilled(jnp.float32)
    odd = reorder_cache(cache, jnp.array([0, 0, 1]), cross=False)  # 3 rows over 2 images: not K rows per image
    with pytest.raises(ValueError, match="does not divide the tokens' batch 3"):
        dec.apply({"params": params}, _tokens(B=3, T=1), odd, method="decode")
