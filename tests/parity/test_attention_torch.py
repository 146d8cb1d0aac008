"""Parity of mmjax.attention with torch.nn.functional.scaled_dot_product_attention and jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmjax import attention
from mmjax.attention import dot_product_attention

pytestmark = pytest.mark.parity

IMPLS = ["reference", "chunked", "xla", None]

# name: (B, T, S, N, K, D, mask kind, bias, causal)
CASES = {
    "plain": (2, 12, 12, 2, 2, 8, None, False, False),
    "padding_mask": (2, 12, 19, 2, 2, 8, "padding", False, False),
    "full_mask_with_empty_rows": (2, 12, 12, 2, 2, 8, "full", False, False),
    "causal": (1, 21, 21, 2, 2, 8, None, False, True),
    "causal_T_ne_S": (1, 13, 27, 2, 2, 8, None, False, True),
    "gqa_causal": (2, 17, 17, 4, 2, 8, "padding", False, True),
    "bias": (2, 12, 15, 2, 2, 8, None, True, False),
}


@pytest.fixture(autouse=True)
def _tiny_tiles(monkeypatch):
    monkeypatch.setattr(attention, "DEFAULT_BLOCK_Q", 8)
    monkeypatch.setattr(attention, "DEFAULT_BLOCK_K", 8)


def _make(case, seed=0):
    B, T, S, N, K, D, mask_kind, with_bias, causal = CASES[case]
    r = np.random.default_rng(seed)
    q, k, v, ct = (
        r.normal(size=s).astype(np.float32) for s in ((B, T, N, D), (B, S, K, D), (B, S, K, D), (B, T, N, D))
    )
    mask = None
    if mask_kind == "padding":
        mask = (np.arange(S)[None, :] < r.integers(S // 2, S + 1, size=B)[:, None])[:, None, None, :]
    elif mask_kind == "full":
        mask = r.random((B, N, T, S)) > 0.5
        mask[1, 0, 4] = False
    bias = r.normal(size=(B, N, T, S)).astype(np.float32) if with_bias else None
    return q, k, v, ct, mask, bias, causal


def _torch(q, k, v, ct, mask, bias, causal, dtype=torch.float32):
    """Torch SDPA in [B, N, T, D] layout; returns output and grads (q, k, v, bias) in mmjax layout."""
    t = lambda x: torch.tensor(np.asarray(x, np.float32)).to(dtype).transpose(1, 2).contiguous().requires_grad_(True)
    tq, tk, tv = t(q), t(k), t(v)
    attn_mask = None
    tb = None
    if bias is not None:
        tb = torch.tensor(bias).to(dtype).requires_grad_(True)
        attn_mask = tb
    elif mask is not None:
        attn_mask = torch.tensor(np.asarray(mask))
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa)
    out.backward(t(ct).detach())
    back = lambda x: x.transpose(1, 2).float().numpy()
    grads = (back(tq.grad), back(tk.grad), back(tv.grad), None if tb is None else tb.grad.float().numpy())
    return back(out.detach()), grads


def _mmjax(impl, q, k, v, ct, mask, bias, causal):
    def loss(q, k, v, bias):
        out = dot_product_attention(q, k, v, bias, mask, is_causal=causal, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)
    return out, grads


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_torch_sdpa(case):
    q, k, v, ct, mask, bias, causal = _make(case)
    want, want_grads = _torch(q, k, v, ct, mask, bias, causal)
    for impl in IMPLS:
        out, grads = _mmjax(impl, q, k, v, ct, mask, bias, causal)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=f"{case}/{impl} output")
        for name, g, w in zip("q k v bias".split(), grads, want_grads):
            if w is not None:
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{case}/{impl} d{name}")


def test_fully_masked_rows_are_zero_in_torch_too():
    """torch 2.13 SDPA returns zeros for a query row with no attended key, as mmjax does (older torch: NaN)."""
    q, k, v, ct, mask, bias, causal = _make("full_mask_with_empty_rows")
    want, _ = _torch(q, k, v, ct, mask, None, False)
    np.testing.assert_array_equal(want[1, 4, 0], 0.0)


@pytest.mark.parametrize("case", ["gqa_causal", "causal_T_ne_S", "full_mask_with_empty_rows"])
def test_bfloat16_matches_torch_sdpa(case):
    """bf16 inputs on both sides; torch computes in bf16 with float accumulation, mmjax in float32 then rounds.
    Tolerance: 2e-2 absolute+relative on O(1) values (bf16 has an 8-bit mantissa, eps 2^-7 = 7.8e-3)."""
    q, k, v, ct, mask, bias, causal = _make(case)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    q, k, v = bf(q), bf(k), bf(v)
    want, want_grads = _torch(q, k, v, ct, mask, bias, causal, dtype=torch.bfloat16)
    for impl in ["reference", "chunked", "xla"]:
        out, grads = _mmjax(impl, *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), ct, mask, bias, causal)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2, err_msg=f"{case}/{impl}")
        for g, w in zip(grads[:3], want_grads[:3]):
            np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=5e-2, atol=5e-2, err_msg=f"{case}/{impl} grad")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_jax_nn_on_rows_with_a_key(case):
    q, k, v, ct, mask, bias, causal = _make(case)
    jm = None if mask is None else jnp.asarray(mask)
    want = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=jm, is_causal=causal)
    has_key = (
        np.ones(q.shape[:3], bool)
        if mask is None
        else np.broadcast_to(np.asarray(mask), (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        .any(-1)
        .transpose(0, 2, 1)
    )
    for impl in IMPLS:
        out = np.asarray(dot_product_attention(q, k, v, bias, mask, is_causal=causal, implementation=impl))
        np.testing.assert_allclose(out[has_key], np.asarray(want)[has_key], rtol=1e-5, atol=1e-6, err_msg=impl)
        np.testing.assert_array_equal(out[~has_key], 0.0)
    if (~has_key).any():  # the documented difference: jax.nn averages v over the masked keys
        np.testing.assert_allclose(np.asarray(want)[1, 4, 0], v[1, :, 0].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,S", [(5, 19), (13, 27), (1, 17), (16, 16)])
def test_bottom_right_causal_matches_torch_causal_lower_right(T, S):
    """``causal_offset = S - T`` is torch's ``causal_lower_right`` (the queries are the last T of S positions):
    outputs and gradients of every implementation, with tiles of 8 so the chunked kernel skips tiles."""
    from torch.nn.attention.bias import causal_lower_right

    r = np.random.default_rng(T * 100 + S)
    q, ct = (r.normal(size=(2, T, 2, 8)).astype(np.float32) for _ in range(2))
    k, v = (r.normal(size=(2, S, 2, 8)).astype(np.float32) for _ in range(2))
    want, want_grads = _torch(q, k, v, ct, causal_lower_right(T, S)._materialize(), None, False)
    for impl in IMPLS:

        def loss(q, k, v):
            out = dot_product_attention(q, k, v, is_causal=True, causal_offset=S - T, implementation=impl)
            return jnp.sum(out * ct), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=f"{impl} output")
        for name, g, w in zip("qkv", grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{impl} d{name}")
