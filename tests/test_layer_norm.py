"""Tests of mmjax.layer_norm: the two-pass LayerNorm against a float64 NumPy oracle and flax's, its closed-form
backward against autodiff of the plain formula (float64 exact, float32 bounded), second derivatives, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmjax.layer_norm import LayerNorm, normalize
from tests.tolerances import assert_float32_close, assert_float64_equal, float64

FEATURES = 48


def _inputs(dtype=np.float32, shape=(3, 5, FEATURES), offset=4.0):
    rng = np.random.RandomState(0)
    # an offset mean and uneven scales: the case where one-pass variance loses digits
    return (offset + rng.randn(*shape) * rng.uniform(0.1, 3.0, shape[:-1] + (1,))).astype(dtype)


def _autodiff_normalize(x, eps):
    """The same formula left to JAX's autodiff (the reference for the closed-form backward)."""
    centred = x - x.mean(-1, keepdims=True)
    return centred / jnp.sqrt((centred * centred).mean(-1, keepdims=True) + eps)


def _oracle(x, eps):
    x = np.asarray(x, np.float64)
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_normalize_matches_the_float64_oracle(eps):
    x = _inputs()
    with float64():
        assert_float64_equal(np.asarray(normalize(jnp.asarray(x, jnp.float64), eps)), _oracle(x, eps))
    # float32: a mean over 48 features, then the variance over 48: |y| <= sqrt(48)
    got = normalize(jnp.asarray(x), eps)
    assert got.dtype == jnp.float32
    assert_float32_close(got, _oracle(x, eps), terms=2 * FEATURES, scale=float(np.abs(x).max()))


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_closed_form_backward_equals_autodiff(eps):
    """VJP of a random cotangent: exact in float64, float32 within the round-off of the sums it takes."""
    x, g = _inputs(), np.random.RandomState(1).randn(3, 5, FEATURES).astype(np.float32)
    with float64():
        x64, g64 = jnp.asarray(x, jnp.float64), jnp.asarray(g, jnp.float64)
        got = jax.vjp(lambda v: normalize(v, eps), x64)[1](g64)[0]
        want = jax.vjp(lambda v: _autodiff_normalize(v, eps), x64)[1](g64)[0]
        assert_float64_equal(np.asarray(got), np.asarray(want))
        # and against finite differences of the oracle along one direction (no autodiff on either side)
        direction = np.random.RandomState(2).randn(*x.shape)
        h = 1e-6
        fd = (_oracle(x64 + h * direction, eps) - _oracle(x64 - h * direction, eps)) / (2 * h)
        np.testing.assert_allclose(float(jnp.sum(got * direction)), float(np.sum(fd * g64)), rtol=1e-6)
    got32 = jax.vjp(lambda v: normalize(v, eps), jnp.asarray(x))[1](jnp.asarray(g))[0]
    # dx = rstd * (g - mean(g) - y mean(g y)): terms of size rstd * |g| * |y|, after sums over 48 features
    rstd = 1 / np.sqrt(np.asarray(x, np.float64).var(-1, keepdims=True) + eps)
    scale = float((rstd * np.abs(g).max() * np.sqrt(FEATURES)).max())
    assert_float32_close(got32, np.asarray(want), terms=4 * FEATURES, scale=scale)


def test_second_derivative_through_the_closed_form():
    """grad of grad differentiates the closed-form backward; it equals autodiff's second derivative."""
    x = _inputs(shape=(2, FEATURES))
    w = np.random.RandomState(3).randn(FEATURES)

    def energy(fn):
        return lambda v: jnp.sum(jnp.sin(fn(v, 1e-5) * w))

    with float64():
        x64 = jnp.asarray(x, jnp.float64)
        direction = jnp.asarray(np.random.RandomState(4).randn(*x.shape))
        got = jax.grad(lambda v: jnp.vdot(jax.grad(energy(normalize))(v), direction))(x64)
        want = jax.grad(lambda v: jnp.vdot(jax.grad(energy(_autodiff_normalize))(v), direction))(x64)
        assert_float64_equal(np.asarray(got), np.asarray(want))


def test_bfloat16_is_normalised_in_float32_and_returned_as_bfloat16():
    x = jnp.asarray(_inputs(), jnp.bfloat16)
    y = normalize(x)
    assert y.dtype == jnp.bfloat16
    want = _oracle(np.asarray(x.astype(jnp.float32)), 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=2**-7 * np.abs(want).max())
    assert jax.grad(lambda v: normalize(v).astype(jnp.float32).sum())(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("affine", [False, True])
def test_module_matches_flax_two_pass_layer_norm(affine):
    x = jnp.asarray(_inputs())
    ours = LayerNorm(epsilon=1e-5, use_scale=affine, use_bias=affine)
    theirs = nn.LayerNorm(epsilon=1e-5, use_scale=affine, use_bias=affine, use_fast_variance=False)
    params = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(theirs.init(jax.random.key(0), x))
    if affine:
        rng = np.random.RandomState(5)
        params = {"params": {k: jnp.asarray(rng.randn(FEATURES), jnp.float32) for k in ("scale", "bias")}}
    assert_float32_close(
        ours.apply(params, x), theirs.apply(params, x), terms=2 * FEATURES, scale=3 * float(np.abs(x).max())
    )

    def grads(module, p, v):
        return jax.grad(lambda p, v: jnp.sum(jnp.tanh(module.apply(p, v))), argnums=(0, 1))(p, v)

    with float64():
        p64, x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
        ours64 = LayerNorm(epsilon=1e-5, use_scale=affine, use_bias=affine, param_dtype=jnp.float64)
        theirs64 = theirs.clone(param_dtype=jnp.float64)
        for got, want in zip(jax.tree.leaves(grads(ours64, p64, x64)), jax.tree.leaves(grads(theirs64, p64, x64))):
            assert got.dtype == jnp.float64
            assert_float64_equal(np.asarray(got), np.asarray(want))
    (p_got, x_got), (p_want, x_want) = grads(ours, params, x), grads(theirs, params, x)
    # x: rstd * |scale| * sqrt(F) bounds the terms; scale / bias: sums over the 15 rows of |y| <= sqrt(F) terms
    rstd = 1 / np.sqrt(np.asarray(x, np.float64).var(-1) + 1e-5)
    s_max = float(np.abs(params["params"]["scale"]).max()) if affine else 1.0
    assert_float32_close(x_got, x_want, terms=4 * FEATURES, scale=float(rstd.max()) * s_max * np.sqrt(FEATURES))
    for got, want in zip(jax.tree.leaves(p_got), jax.tree.leaves(p_want)):
        assert_float32_close(got, want, terms=2 * FEATURES, scale=15 * np.sqrt(FEATURES))


def test_module_dtype_is_the_output_dtype():
    x = jnp.asarray(_inputs())
    ln = LayerNorm(dtype=jnp.bfloat16)
    assert ln.apply(ln.init(jax.random.key(0), x), x).dtype == jnp.bfloat16
