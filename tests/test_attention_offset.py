"""The shifted causal diagonal of ``dot_product_attention`` (``causal_offset``) and ``MultiHeadAttention``'s KV
cache, against a float64 NumPy oracle (every implementation, outputs and gradients) and float32 bounded by the
magnitudes involved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.attention import KVCache, MultiHeadAttention, chunked_dot_product_attention, dot_product_attention
from tests.tolerances import float32_atol


def _oracle(q, k, v, offset):
    """float64 softmax attention where query i sees keys j <= i + offset (rows with no key are zero)."""
    T, S, D = q.shape[1], k.shape[1], q.shape[-1]
    s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(D)
    valid = np.arange(S)[None, :] <= np.arange(T)[:, None] + offset
    s = np.where(valid, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    denom = p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p / np.where(denom == 0, 1.0, denom), v)


def _qkv(T, S, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(2, T, 2, 4)), r.normal(size=(2, S, 2, 4)), r.normal(size=(2, S, 2, 4))


# offsets: top-left 0, bottom-right S - T, negative (leading rows see nothing), past the end (all visible)
@pytest.mark.parametrize("T,S", [(5, 9), (1, 12), (12, 12), (19, 30)])
@pytest.mark.parametrize("which", ["zero", "bottom_right", "negative", "past_end"])
def test_causal_offset_equals_the_float64_oracle_for_every_implementation(T, S, which):
    offset = {"zero": 0, "bottom_right": S - T, "negative": -2, "past_end": S}[which]
    q, k, v = _qkv(T, S)
    want = _oracle(q, k, v, offset)
    with jax.enable_x64(True):
        for impl in ("reference", "chunked", "xla"):
            out = dot_product_attention(q, k, v, is_causal=True, causal_offset=offset, implementation=impl)
            # jax.nn's xla path computes its softmax in float32 even for float64 inputs (module docstring)
            tol = float32_atol(np.abs(v).max(), terms=S) if impl == "xla" else 1e-10
            np.testing.assert_allclose(np.asarray(out), want, atol=tol, rtol=0, err_msg=impl)
        tiles = chunked_dot_product_attention(q, k, v, is_causal=True, causal_offset=offset, block_q=4, block_k=8)
        np.testing.assert_allclose(np.asarray(tiles), want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("offset", [0, 7, -3, 21])
def test_chunked_gradients_with_an_offset_equal_the_reference_in_float64(offset):
    """The backward visits only the (key tile, query tile) pairs the shifted diagonal leaves: gradients equal
    autodiff of the plain formula exactly in float64."""
    q, k, v = _qkv(13, 21, seed=1)
    ct = np.random.default_rng(2).normal(size=q.shape)
    with jax.enable_x64(True):
        grads = {}
        for name, fn in {
            "reference": lambda q, k, v: dot_product_attention(
                q, k, v, is_causal=True, causal_offset=offset, implementation="reference"
            ),
            "chunked": lambda q, k, v: chunked_dot_product_attention(
                q, k, v, is_causal=True, causal_offset=offset, block_q=4, block_k=8
            ),
        }.items():
            grads[name] = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(grads["reference"], grads["chunked"]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-10, rtol=0)


def test_one_compiled_program_serves_every_traced_offset():
    q, k, v = _qkv(3, 20, seed=3)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    f = jax.jit(lambda o: chunked_dot_product_attention(q, k, v, is_causal=True, causal_offset=o, block_q=4, block_k=4))
    for offset in range(-4, 22, 3):
        want = _oracle(*(np.asarray(x, np.float64) for x in (q, k, v)), offset)
        np.testing.assert_allclose(np.asarray(f(jnp.int32(offset))), want, atol=float32_atol(3.0, terms=20))
    assert f._cache_size() == 1


def test_causal_offset_errors_name_the_value_and_the_fix():
    q = jnp.ones((1, 3, 1, 4))
    with pytest.raises(ValueError, match="is_causal=False.*pass is_causal=True"):
        dot_product_attention(q, q, q, causal_offset=1)
    with pytest.raises(ValueError, match=r"integer scalar.*shape \(2,\)"):
        dot_product_attention(q, q, q, is_causal=True, causal_offset=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="must be an integer, got dtype float"):
        dot_product_attention(q, q, q, is_causal=True, causal_offset=1.5)


def _mha_params(x):
    mha = MultiHeadAttention(num_heads=2)
    return mha, mha.init(jax.random.key(0), x)["params"]


@pytest.mark.parametrize("implementation", ["reference", "chunked", "xla"])
def test_kv_cache_prefill_then_steps_equal_one_causal_pass(implementation):
    """A prompt of 3 prefilled in one call, then one token per call, equals causal self-attention over all 7
    positions (float64 to 1e-10), and the cache holds exactly the projected keys of those positions."""
    x = np.random.default_rng(4).normal(size=(2, 7, 8))
    with jax.enable_x64(True):
        mha = MultiHeadAttention(num_heads=2, implementation=implementation, param_dtype=jnp.float64)
        params = mha.init(jax.random.key(0), x)["params"]
        full = mha.apply({"params": params}, x, is_causal=True)
        cache = KVCache.empty(2, 10, 2, 4, jnp.float64)
        outs = []
        for start, stop in [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]:
            y, cache = mha.apply({"params": params}, x[:, start:stop], is_causal=True, kv_cache=cache)
            outs.append(y)
        np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=1e-10, rtol=0)
        assert int(cache.index) == 7
        _, (k, _) = mha.apply({"params": params}, x, return_key_value=True)
        # heads-major [B, K, max_length, D]: position p of head n is cache.key[:, n, p]
        np.testing.assert_allclose(np.asarray(cache.key[:, :, :7]), np.asarray(k).swapaxes(1, 2), atol=1e-12)
        assert not np.asarray(cache.key[:, :, 7:]).any()


def test_precomputed_cross_key_values_equal_projecting_again():
    r = np.random.default_rng(5)
    x, e = jnp.asarray(r.normal(size=(2, 3, 8)), jnp.float32), jnp.asarray(r.normal(size=(2, 5, 6)), jnp.float32)
    mha = MultiHeadAttention(num_heads=2)
    params = mha.init(jax.random.key(0), x, e)["params"]
    y, kv = mha.apply({"params": params}, x, e, return_key_value=True)
    again = mha.apply({"params": params}, x, key_value=kv)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(y))
    with pytest.raises(ValueError, match="key_value .* cannot be combined"):
        mha.apply({"params": params}, x, e, key_value=kv)
    with pytest.raises(ValueError, match=r"expected \[2, S, 2, 4\]"):
        mha.apply({"params": params}, x, key_value=(kv[0][:, :, :1], kv[1][:, :, :1]))


def test_a_cache_from_another_batch_size_is_refused():
    x = jnp.ones((2, 1, 8))
    mha, params = _mha_params(x)
    with pytest.raises(ValueError, match="cache from another batch size"):
        mha.apply({"params": params}, x, is_causal=True, kv_cache=KVCache.empty(3, 4, 2, 4))
    with pytest.raises(ValueError, match="do not fit a KV cache of max_length 4"):
        mha.apply({"params": params}, jnp.ones((2, 5, 8)), is_causal=True, kv_cache=KVCache.empty(2, 4, 2, 4))
