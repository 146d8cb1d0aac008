"""LayerNorm with exact two-pass statistics and a closed-form derivative.

``y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias`` over the last axis, ``var(x) = mean((x - mean(x))^2)``
(two passes, as PyTorch and diffusers compute it; flax's ``use_fast_variance=True`` uses ``mean(x^2) - mean(x)^2``
instead, which loses digits when ``|mean| >> std``).

The backward pass is given in closed form (a ``jax.custom_vjp``): with ``y = (x - mean) * r``,
``r = 1 / sqrt(var + eps)``, the cotangent ``g`` of ``y`` gives ``dx = r * (g - mean(g) - y * mean(g * y))`` (means
over the last axis), and only ``y`` and ``r`` are kept for it. Left to autodiff, the two-pass statistics give
XLA:CPU a backward pass that recomputes the residual stream's cotangent inside several large fusions; the closed
form is a few small ones, and the DiT's parameter gradient on the CPU takes about half the time (``use_fast_variance``
style statistics are as fast but less exact; a ``custom_jvp`` with the same formula was not faster). Reverse mode
only: ``jax.jvp`` / ``jax.jacfwd`` through it raise (JAX's rule for ``custom_vjp``); ``grad`` of ``grad`` works.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array


def _statistics(x: Array, eps: float) -> tuple[Array, Array]:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred * rstd, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x: Array, eps: float) -> Array:
    return _statistics(x, eps)[0]


def _normalize_fwd(x: Array, eps: float):
    y, rstd = _statistics(x, eps)
    return y, (y, rstd)


def _normalize_bwd(eps: float, residuals, g: Array):
    del eps
    y, rstd = residuals
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gy = jnp.mean(g * y, axis=-1, keepdims=True)
    return (rstd * (g - mean_g - y * mean_gy),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _normalize_promoted(x: Array, eps: float) -> Array:
    """:func:`_normalize` on ``x`` promoted to at least float32; the result stays in that dtype."""
    return _normalize(x.astype(jnp.promote_types(x.dtype, jnp.float32)), float(eps))


def normalize(x: Array, eps: float = 1e-6) -> Array:
    """``(x - mean(x)) / sqrt(var(x) + eps)`` over the last axis (two-pass variance), in ``x``'s dtype.

    Statistics are computed in at least float32 (a bfloat16 ``x`` is promoted and the result cast back).
    Reverse-mode differentiable by the closed form in the module docstring.

    Example:
      >>> import jax.numpy as jnp
      >>> y = normalize(jnp.array([[1.0, 2.0, 3.0]]), eps=0.0)
      >>> [round(float(v), 4) for v in y[0]], round(float(jnp.var(y)), 4)
      ([-1.2247, 0.0, 1.2247], 1.0)
    """
    return _normalize_promoted(x, eps).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis by :func:`normalize`, with optional ``scale`` / ``bias`` ``[features]``.

    The parameters have flax ``nn.LayerNorm``'s names, shapes and initialisers (scale ones, bias zeros), so a
    parameter tree of one fits the other; the output equals ``nn.LayerNorm(use_fast_variance=False)``'s.

    Attributes:
      epsilon: added to the variance.
      use_scale / use_bias: learn ``scale`` / ``bias``.
      dtype: output dtype (``None``: the promoted dtype of ``x`` and the parameters); param_dtype: parameters'.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (2, 5)) * 3 + 1
      >>> ln = LayerNorm(epsilon=1e-5)
      >>> params = ln.init(jax.random.key(1), x)
      >>> y = ln.apply(params, x)
      >>> ref = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False).apply(params, x)
      >>> bool(jnp.allclose(y, ref, atol=1e-6)), sorted(params["params"])
      (True, ['bias', 'scale'])
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype) if self.use_bias else None
        dtype = self.dtype or jnp.result_type(x, *(p for p in (scale, bias) if p is not None))
        y = _normalize_promoted(x, self.epsilon)  # scale and bias applied before the cast, as flax's LayerNorm
        if scale is not None:
            y = y * scale.astype(y.dtype)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y.astype(dtype)
