"""Tests of mmjax.attention: every CPU implementation against a float64 NumPy oracle and against "reference"."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mmjax import attention
from mmjax.attention import MultiHeadAttention, chunked_dot_product_attention, dot_product_attention

# --------------------------------------------------------------------------------------------------------------
# float64 NumPy oracle: forward and the gradients of sum(out * w)
# --------------------------------------------------------------------------------------------------------------


def _np_attention(q, k, v, bias, mask, w, scale, causal):
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, kr) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    valid = np.ones((B, N, T, S), bool)
    if mask is not None:
        valid &= np.asarray(mask)
    if causal:
        valid &= np.tril(np.ones((T, S), bool))
    s = np.where(valid, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l == 0, 1.0, l)
    out = np.einsum("bnts,bsnd->btnd", p, vr)
    dp = np.einsum("btnd,bsnd->bnts", w, vr)
    dv = np.einsum("bnts,btnd->bsnd", p, w).reshape(B, S, K, G, -1).sum(3)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = np.einsum("bnts,bsnd->btnd", ds, kr) * scale
    dk = (np.einsum("bnts,btnd->bsnd", ds, q) * scale).reshape(B, S, K, G, D).sum(3)
    db = None
    if bias is not None:
        shape = (1,) * (4 - np.ndim(bias)) + np.shape(bias)
        db = ds.sum(axis=tuple(a for a in range(4) if shape[a] == 1), keepdims=True).reshape(np.shape(bias))
    return out, (dq, dk, dv, db)


# --------------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------------

CASES = {
    # name: (B, T, S, N, K, D, mask kind, bias kind, causal)
    "plain": (2, 16, 16, 2, 2, 8, None, None, False),
    "padding_mask": (2, 16, 24, 2, 2, 8, "padding", None, False),
    "full_mask_empty_rows": (2, 16, 16, 2, 2, 8, "full", None, False),
    "causal": (1, 32, 32, 2, 2, 8, None, None, True),
    "causal_T_lt_S": (1, 13, 40, 2, 2, 8, None, None, True),
    "causal_T_gt_S": (1, 40, 13, 2, 2, 8, "padding", None, True),
    "gqa": (2, 16, 20, 4, 2, 8, None, None, False),
    "mqa_causal": (1, 24, 24, 4, 1, 8, None, "heads", True),
    "odd_lengths": (1, 37, 29, 2, 2, 8, "padding", None, False),
    "bias_full": (2, 17, 19, 2, 2, 8, None, "full", False),
    "bias_rank2": (1, 17, 19, 2, 2, 8, None, "rank2", True),
    "everything": (2, 37, 29, 4, 2, 8, "full", "keys", True),
}

BLOCK_Q, BLOCK_K = 8, 16  # tiny tiles so the chunked kernel tiles and pads in every case


def _make(case, dtype=np.float32, seed=0):
    B, T, S, N, K, D, mask_kind, bias_kind, causal = CASES[case]
    r = np.random.default_rng(seed)
    q, k, v = (r.normal(size=shape).astype(dtype) for shape in ((B, T, N, D), (B, S, K, D), (B, S, K, D)))
    w = r.normal(size=(B, T, N, D)).astype(dtype)
    mask = None
    if mask_kind == "padding":
        lengths = r.integers(S // 2, S + 1, size=B)
        mask = (np.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    elif mask_kind == "full":
        mask = r.random((B, N, T, S)) > 0.4
        mask[0, 0, 3] = False  # a fully masked query row
        mask[-1, -1, -1] = False
    bias = {
        None: None,
        "full": r.normal(size=(B, N, T, S)),
        "heads": r.normal(size=(1, N, 1, 1)),
        "keys": r.normal(size=(B, 1, 1, S)),
        "rank2": r.normal(size=(T, S)),
    }[bias_kind]
    if bias is not None:
        bias = bias.astype(dtype)
    return q, k, v, bias, mask, w, causal


def _run(impl, q, k, v, bias, mask, w, causal):
    """jit(value_and_grad) of sum(out * w) w.r.t. (q, k, v, bias); returns out and the four gradients."""

    def loss(q, k, v, bias):
        if impl == "chunked_direct":
            out = chunked_dot_product_attention(q, k, v, bias, mask, is_causal=causal, block_q=16, block_k=8)
        else:
            out = dot_product_attention(q, k, v, bias, mask, is_causal=causal, implementation=impl)
        ct = jnp.promote_types(out.dtype, jnp.float32)
        return jnp.sum(out.astype(ct) * w.astype(ct)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)
    return out, grads


@pytest.fixture(autouse=True)
def _tiny_tiles(monkeypatch):
    monkeypatch.setattr(attention, "DEFAULT_BLOCK_Q", BLOCK_Q)
    monkeypatch.setattr(attention, "DEFAULT_BLOCK_K", BLOCK_K)


def _assert_close(got, want, atol, rtol, what):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=rtol, err_msg=what)


# the default dispatch (None) and the chunked kernel with other tile sizes, on a few cases
EXTRA = {
    "everything": [None, "chunked_direct"],
    "odd_lengths": ["chunked_direct"],
    "causal_T_gt_S": ["chunked_direct"],
    "gqa": [None],
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_numpy_and_reference(case):
    """Forward and gradients (q, k, v, bias) of every CPU implementation, jitted, against float64 NumPy and
    against "reference"."""
    q, k, v, bias, mask, w, causal = _make(case)
    D = q.shape[-1]
    want_out, want_grads = _np_attention(q, k, v, bias, mask, w, 1 / np.sqrt(D), causal)
    ref_out, ref_grads = None, None
    for impl in ["reference", "chunked", "xla"] + EXTRA.get(case, []):
        out, grads = _run(impl, q, k, v, bias, mask, w, causal)
        assert out.shape == q.shape and out.dtype == jnp.float32
        _assert_close(out, want_out, 2e-6, 2e-5, f"{case}/{impl} output vs numpy")
        for name, g, want in zip("q k v bias".split(), grads, want_grads):
            if want is None:
                assert g is None
                continue
            assert g.shape == want.shape, (name, g.shape, want.shape)
            _assert_close(g, want, 1e-5, 1e-4, f"{case}/{impl} d{name} vs numpy")
        if impl == "reference":
            ref_out, ref_grads = out, grads
            continue
        _assert_close(out, np.asarray(ref_out), 2e-6, 2e-5, f"{case}/{impl} output vs reference")
        for g, rg in zip(grads, ref_grads):
            if g is not None:
                _assert_close(g, np.asarray(rg), 1e-5, 1e-4, f"{case}/{impl} grads vs reference")


@pytest.mark.parametrize("impl", ["reference", "chunked", "xla"])
def test_fully_masked_rows_are_zero_with_zero_grads(impl):
    q, k, v, bias, mask, w, causal = _make("full_mask_empty_rows")
    out, (dq, dk, dv, _) = _run(impl, q, k, v, None, mask, w, False)
    empty = ~mask.any(-1)  # [B, N, T]
    assert empty.sum() >= 2
    b, n, t = np.nonzero(empty)
    np.testing.assert_array_equal(np.asarray(out)[b, t, n], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[b, t, n], 0.0)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))


def test_all_minus_inf_bias_row_is_zero():
    q, k, v, _, _, w, _ = _make("plain")
    bias = np.zeros((1, 1, q.shape[1], k.shape[1]), np.float32)
    bias[..., 5, :] = -np.inf
    for impl in ("reference", "chunked"):
        out, (dq, dk, dv, _) = _run(impl, q, k, v, jnp.asarray(bias), None, w, False)
        np.testing.assert_array_equal(np.asarray(out)[:, 5], 0.0)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in (dq, dk, dv))


@pytest.mark.parametrize("impl", ["reference", "chunked", "xla"])
@pytest.mark.parametrize("case", ["everything", "causal_T_lt_S"])
def test_bfloat16(case, impl):
    q, k, v, bias, mask, w, causal = _make(case)
    bf = lambda x: None if x is None else jnp.asarray(x, jnp.bfloat16)
    qb, kb, vb, bb = bf(q), bf(k), bf(v), bf(bias)
    f64 = lambda x: None if x is None else np.asarray(x.astype(jnp.float32), np.float64)
    want_out, want_grads = _np_attention(f64(qb), f64(kb), f64(vb), f64(bb), mask, w, 1 / np.sqrt(q.shape[-1]), causal)
    out, grads = _run(impl, qb, kb, vb, bb, mask, w, causal)
    assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa: the output rounding alone is up to 2^-8 relative.
    _assert_close(out.astype(jnp.float32), want_out, 2e-2, 2e-2, f"{case}/{impl} bf16 output")
    for g, want in zip(grads, want_grads):
        if want is not None:
            _assert_close(g.astype(jnp.float32), want, 5e-2, 5e-2, f"{case}/{impl} bf16 grads")


@pytest.mark.parametrize("impl", ["reference", "chunked", "xla"])
@pytest.mark.parametrize("case", ["everything", "odd_lengths"])
def test_float64(case, impl):
    # jax.nn computes its softmax in float32 even for float64 inputs, so "xla" is float32-accurate only.
    tol = (1e-6, 1e-5) if impl == "xla" else (1e-12, 1e-10)
    with jax.enable_x64(True):
        q, k, v, bias, mask, w, causal = _make(case, np.float64)
        want_out, want_grads = _np_attention(q, k, v, bias, mask, w, 1 / np.sqrt(q.shape[-1]), causal)
        out, grads = _run(impl, q, k, v, bias, mask, w, causal)
        assert out.dtype == jnp.float64
        _assert_close(out, want_out, *tol, f"{case}/{impl} f64 output")
        for g, want in zip(grads, want_grads):
            if want is not None:
                assert g.dtype == jnp.float64
                _assert_close(g, want, *tol, f"{case}/{impl} f64 grads")


def test_chunked_check_grads_float64():
    with jax.enable_x64(True):
        q, k, v, bias, mask, _, causal = _make("everything", np.float64)
        f = jax.jit(functools.partial(chunked_dot_product_attention, mask=mask, is_causal=causal, block_q=8, block_k=8))
        check_grads(f, (q, k, v, bias), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def test_default_scale_and_explicit_scale():
    q, k, v, _, _, w, _ = _make("gqa")
    for impl in ("reference", "chunked", "xla"):
        out = dot_product_attention(q, k, v, scale=0.3, implementation=impl)
        want, _ = _np_attention(q, k, v, None, None, w, 0.3, False)
        _assert_close(out, want, 2e-6, 2e-5, f"{impl} scale=0.3")


def test_causal_skips_tiles_above_the_diagonal():
    """NaN values that only tiles above the diagonal would read leave the chunked result finite (tiles skipped),
    while the reference (which multiplies the zero weights with them) turns NaN."""
    B, T, N, D = 1, 64, 2, 8
    r = np.random.default_rng(1)
    q, k, v = (r.normal(size=(B, T, N, D)).astype(np.float32) for _ in range(3))
    v[:, 48:] = np.nan
    out = chunked_dot_product_attention(q, k, v, is_causal=True, block_q=16, block_k=16)
    assert np.all(np.isfinite(np.asarray(out)[:, :48]))
    ref = dot_product_attention(q, k, v, is_causal=True, implementation="reference")
    assert np.all(np.isnan(np.asarray(ref)[:, :48]))
    dq = jax.grad(
        lambda q: jnp.sum(chunked_dot_product_attention(q, k, v, is_causal=True, block_q=16, block_k=16)[:, :48])
    )(q)
    assert np.all(np.isfinite(np.asarray(dq)[:, :48]))


# --------------------------------------------------------------------------------------------------------------
# memory: no T x S intermediate
# --------------------------------------------------------------------------------------------------------------


def _avals(jaxpr):
    for eqn in jaxpr.eqns:
        for var in list(eqn.invars) + list(eqn.outvars):
            if hasattr(var, "aval") and hasattr(var.aval, "shape"):
                yield var.aval.shape
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _params_jaxprs(eqn):
            yield from _avals(sub)


def _params_jaxprs(eqn):
    for p in eqn.params.values():
        for x in p if isinstance(p, (tuple, list)) else (p,):
            if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr
            elif hasattr(x, "eqns"):
                yield x


def _has_t_by_s(impl, T, S, mask, bias):
    B, N, D = 1, 2, 8
    q = jnp.ones((B, T, N, D))
    kv = jnp.ones((B, S, N, D))

    def loss(q, k, v, b):
        if impl == "chunked":
            out = chunked_dot_product_attention(q, k, v, b, mask, is_causal=True, block_q=32, block_k=64)
        else:
            out = dot_product_attention(q, k, v, b, mask, is_causal=True, implementation=impl)
        return jnp.sum(out)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, kv, kv, bias).jaxpr
    sizes_t, sizes_s = {T, 320}, {S, 448}  # true and padded lengths
    return [s for s in _avals(jaxpr) if set(s) & sizes_t and set(s) & sizes_s]


def test_chunked_jaxpr_has_no_t_by_s_intermediate():
    T, S = 300, 420  # padded to 320 (10 x 32) and 448 (7 x 64)
    mask = jnp.arange(S)[None, None, None, :] < 400  # [B, 1, 1, S] padding mask
    bias = jnp.zeros((1, 1, 1, S))
    assert _has_t_by_s("chunked", T, S, mask, bias) == []
    assert _has_t_by_s("reference", T, S, mask, bias)  # the detector does find the reference's scores


# --------------------------------------------------------------------------------------------------------------
# dropout, dispatch and errors
# --------------------------------------------------------------------------------------------------------------


def test_dropout():
    q, k, v, _, _, _, _ = _make("plain")
    rng = jax.random.key(3)
    f = jax.jit(dot_product_attention, static_argnames=("implementation", "dropout_rate", "deterministic"))
    det = f(q, k, v, dropout_rate=0.5, dropout_rng=rng)
    np.testing.assert_allclose(det, f(q, k, v), rtol=1e-6)
    a = f(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=False)
    b = f(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=False, implementation="chunked")
    np.testing.assert_array_equal(a, b)  # chunked falls back to the reference while dropout is active
    assert not np.allclose(a, det)
    c = f(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(4), deterministic=False)
    assert not np.allclose(a, c)
    # inverted dropout keeps the expected weights: averaged over many keys, close to the deterministic output
    keys = jax.random.split(jax.random.key(5), 200)
    mean = jax.vmap(lambda r: f(q, k, v, dropout_rate=0.5, dropout_rng=r, deterministic=False))(keys).mean(0)
    np.testing.assert_allclose(mean, det, atol=0.15)


def test_vmap_over_an_extra_axis():
    q, k, v, bias, mask, w, causal = _make("everything")
    f = lambda q, k, v: dot_product_attention(q, k, v, bias, mask, is_causal=causal, implementation="chunked")
    qs, ks, vs = (jnp.stack([x, 2 * x]) for x in (q, k, v))
    got = jax.jit(jax.vmap(f))(qs, ks, vs)
    for i in range(2):
        np.testing.assert_allclose(got[i], f(qs[i], ks[i], vs[i]), rtol=1e-5, atol=1e-6)


def test_select_implementation(monkeypatch):
    small = jnp.ones((1, 16, 2, 8))
    big = jnp.ones((1, 1024, 2, 8))
    assert attention.select_implementation(small, small, small) == "chunked"
    assert attention.select_implementation(big, big, big) == "chunked"
    assert attention.select_implementation(big, big, big, dropout_active=True) == "reference"
    one = jnp.ones((1, 1, 2, 8))  # a decoding step: one query per row over cached keys
    assert attention.select_implementation(one, big, big, decoding=True) == "reference"
    assert attention.select_implementation(one, big, big) == "chunked"
    assert attention.select_implementation(small, big, big, decoding=True) == "chunked"  # a prefill
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")  # the GPU rules, without a GPU
    half = small.astype(jnp.bfloat16)
    assert attention.select_implementation(half, half, half) == "cudnn"
    assert attention.select_implementation(small, small, small) == "xla"
    assert attention.select_implementation(one, big, big, decoding=True) == "xla"  # GPU: its own rules
    huge = jax.ShapeDtypeStruct((8, 32768, 8, 8), jnp.float32)
    assert attention.select_implementation(huge, huge, huge) == "chunked"


def _err(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        dot_product_attention(*args, **kwargs)


def test_value_errors():
    q = jnp.ones((2, 5, 4, 8))
    kv = jnp.ones((2, 7, 2, 8))
    _err(r"query must have rank 4.*\(5, 4, 8\)", q[0], kv, kv)
    _err(r"key head_dim 6", q, jnp.ones((2, 7, 2, 6)), kv)
    _err(r"batch sizes differ", q, jnp.ones((3, 7, 2, 8)), jnp.ones((3, 7, 2, 8)))
    _err(r"query heads 4 .* multiple of key/value heads 3", q, jnp.ones((2, 7, 3, 8)), jnp.ones((2, 7, 3, 8)))
    _err(r"mask must be boolean.*float32", q, kv, kv, mask=jnp.ones((2, 1, 1, 7)))
    _err(r"mask has shape \(2, 1, 1, 6\)", q, kv, kv, mask=jnp.ones((2, 1, 1, 6), bool))
    _err(r"bias has shape \(3, 4, 5, 7\)", q, kv, kv, bias=jnp.ones((3, 4, 5, 7)))
    _err(r"implementation='flash' is unknown", q, kv, kv, implementation="flash")
    _err(r"implementation='cudnn' needs a CUDA GPU.*'cpu'", q, kv, kv, implementation="cudnn")
    _err(r"needs dropout_rng", q, kv, kv, dropout_rate=0.1, deterministic=False)
    _err(r"share a dtype", q, kv.astype(jnp.bfloat16), kv)


# --------------------------------------------------------------------------------------------------------------
# MultiHeadAttention
# --------------------------------------------------------------------------------------------------------------


def test_mha_params_and_shapes():
    mha = MultiHeadAttention(num_heads=4, qkv_features=32, out_features=12)
    x = jnp.ones((2, 5, 16))
    params = mha.init(jax.random.key(0), x)["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "query": {"kernel": (16, 4, 8), "bias": (4, 8)},
        "key": {"kernel": (16, 4, 8), "bias": (4, 8)},
        "value": {"kernel": (16, 4, 8), "bias": (4, 8)},
        "out": {"kernel": (4, 8, 12), "bias": (12,)},
    }
    y = jax.jit(mha.apply)({"params": params}, x)
    assert y.shape == (2, 5, 12)
    # the module is the projections around dot_product_attention
    p = params
    q = jnp.einsum("btf,fhd->bthd", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = jnp.einsum("btf,fhd->bthd", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = jnp.einsum("btf,fhd->bthd", x, p["value"]["kernel"]) + p["value"]["bias"]
    want = jnp.einsum("bthd,hdo->bto", dot_product_attention(q, k, v), p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_mha_cross_attention_gqa_and_mask():
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, implementation="chunked")
    xq = jax.random.normal(jax.random.key(1), (2, 5, 16))
    xkv = jax.random.normal(jax.random.key(2), (2, 9, 24))
    mask = (jnp.arange(9) < 7)[None, None, None, :]
    params = mha.init(jax.random.key(0), xq, xkv, mask=mask)
    assert params["params"]["key"]["kernel"].shape == (24, 2, 4)
    assert params["params"]["query"]["kernel"].shape == (16, 4, 4)
    apply = jax.jit(lambda p, xq, xkv: mha.apply(p, xq, xkv, mask=mask))
    y = apply(params, xq, xkv)
    assert y.shape == (2, 5, 16)
    ref = MultiHeadAttention(num_heads=4, num_kv_heads=2, implementation="reference").apply(params, xq, xkv, mask=mask)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    changed = apply(params, xq, xkv.at[:, 8].set(100.0))  # masked key: no effect
    np.testing.assert_allclose(y, changed, rtol=1e-5, atol=1e-6)


def test_mha_bf16_with_float32_params_and_sow():
    mha = MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16, sow_weights=True)
    x = jnp.ones((1, 6, 8), jnp.float32)
    variables = mha.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    y, state = mha.apply({"params": variables["params"]}, x, is_causal=True, mutable=["intermediates"])
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 6, 8)
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (1, 2, 6, 6)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.triu(w[0, 0], 1)).max()) == 0.0


def test_mha_dropout_needs_rng_and_changes_output():
    mha = MultiHeadAttention(num_heads=2, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (1, 6, 8))
    params = mha.init(jax.random.key(0), x)
    det = mha.apply(params, x)
    drop = mha.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(det, drop)
    with pytest.raises(flax.errors.InvalidRngError):
        mha.apply(params, x, deterministic=False)


def test_multi_head_attention_rank2_input_names_shape_and_fix():
    mha = MultiHeadAttention(num_heads=2)
    with pytest.raises(
        ValueError, match=r"inputs_q must be \[batch, length, features\].*\(5, 8\) \(rank 2\).*x\[None\]"
    ):
        mha.init(jax.random.key(0), jnp.ones((5, 8)))
    with pytest.raises(ValueError, match=r"inputs_kv must be \[batch, length, features\].*\(2, 3, 4, 8\)"):
        mha.init(jax.random.key(0), jnp.ones((2, 3, 8)), jnp.ones((2, 3, 4, 8)))
    with pytest.raises(ValueError, match=r"different batch sizes"):
        mha.init(jax.random.key(0), jnp.ones((2, 3, 8)), jnp.ones((3, 3, 8)))
