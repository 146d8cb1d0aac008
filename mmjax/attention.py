"""Scaled dot-product attention: a plain reference, a memory-lean chunked kernel, and the JAX backends.

``dot_product_attention`` computes, per batch element and query head ``n``,

    out[t] = sum_s softmax_s(scale * q[t] . k[s] + bias[t, s], masked)[s] * v[s]

with the layout of :func:`jax.nn.dot_product_attention`: ``query [B, T, N, D]``, ``key [B, S, K, D]``,
``value [B, S, K, Dv]``, output ``[B, T, N, Dv]``. ``K`` may divide ``N`` (grouped-query attention: query head
``n`` reads key/value head ``n // (N // K)``, as ``torch`` ``enable_gqa=True`` and ``jax.nn`` do).

Implementations (``implementation=``):

* ``"reference"``: the formula written plainly (materialises the ``[B, N, T, S]`` scores). The oracle.
* ``"chunked"``: flash-style. Queries and keys are cut into tiles; an online softmax keeps a running max and sum per
  query row; a ``jax.custom_vjp`` saves only the output and the log-sum-exp per row and recomputes the scores tile by
  tile in the backward pass. Memory is O((T + S) * D), never O(T * S) (unless the caller passes a full
  ``[.., T, S]`` mask or bias, which is then sliced per tile). With ``is_causal`` only the key tiles at or left of the
  diagonal are visited.
* ``"xla"``: :func:`jax.nn.dot_product_attention` with ``implementation="xla"``, rows fully masked by ``mask``
  fixed to zero (it materialises the scores; it computes the softmax in float32 even for float64 inputs, and a row
  whose ``bias`` is all ``-inf`` is ``NaN`` there).
* ``"cudnn"``: :func:`jax.nn.dot_product_attention` with ``implementation="cudnn"`` (GPU only).
* ``None``: picks one for the platform and the shapes (see :func:`select_implementation`).

Conventions shared by every implementation:

* ``mask`` is boolean, ``True`` = attend, broadcastable to ``[B, N, T, S]``; ``bias`` is additive, broadcastable to
  ``[B, N, T, S]``; both may have lower rank (numpy broadcasting from the right).
* ``is_causal``: query ``i`` attends keys ``j <= i + causal_offset``. The default offset 0 is top-left aligned,
  also when ``T != S``: what ``jax.nn.dot_product_attention`` (``tril(ones((T, S)))``) and ``torch`` SDPA
  (``ones(L, S).tril()``) do. ``causal_offset = S - T`` aligns it bottom-right (the queries are the last ``T`` of
  ``S`` positions: a prompt after a prefix, FlashAttention 2's and ``torch``'s ``causal_lower_right``), and a traced
  integer (a KV cache's fill index) places the queries anywhere; the chunked kernel skips the key tiles right of the
  shifted diagonal in both passes, and its tile counts are dynamic, so one compiled program serves every offset.
* A query row with no key to attend (all masked, or every logit ``-inf``) yields **zeros** and zero gradients.
  (``jax.nn.dot_product_attention`` returns ``mean(v)`` there; ``torch`` 2.13 SDPA returns zeros too, older
  versions ``NaN``.)
* Scores and softmax are computed in ``float32`` for ``bfloat16``/``float16`` inputs (``float64`` stays ``float64``);
  the output is cast back to the query dtype.
* Dropout (``dropout_rate > 0`` and ``deterministic=False``) drops attention weights with an inverted-dropout mask
  drawn from ``dropout_rng``. Only the reference path implements it: any other implementation falls back to
  ``"reference"`` while dropout is active.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

IMPLEMENTATIONS = ("reference", "chunked", "xla", "cudnn")

# CPU tile sizes for the chunked kernel (tuned with experiments/bench_attention.py).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _check_broadcast(name: str, x: Array, target: tuple[int, ...]) -> None:
    if x.ndim > 4 or any(a not in (1, b) for a, b in zip(x.shape[::-1], target[::-1])):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, which does not broadcast to [batch, heads, q_len, kv_len] = "
            f"{list(target)}; expected each of its (right-aligned) dims to be 1 or equal to that dim, rank <= 4. "
            f"Reshape it, e.g. a padding mask as [batch, 1, 1, kv_len]."
        )


def _validate_offset(causal_offset, is_causal) -> None:
    if causal_offset is None:
        return
    if not is_causal:
        raise ValueError(
            f"causal_offset={causal_offset!r} is given with is_causal=False; it shifts the causal diagonal, so pass "
            "is_causal=True as well (or drop causal_offset)."
        )
    if isinstance(causal_offset, bool) or jnp.ndim(causal_offset) != 0:
        raise ValueError(
            f"causal_offset must be an integer scalar (a Python int or a 0-d integer array), got "
            f"{causal_offset!r} (shape {jnp.shape(causal_offset)}); one offset serves the whole batch."
        )
    if not jnp.issubdtype(jnp.result_type(causal_offset), jnp.integer):
        raise ValueError(f"causal_offset must be an integer, got dtype {jnp.result_type(causal_offset)}.")


def _validate(query, key, value, bias, mask, implementation, dropout_rate, dropout_rng, deterministic):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, length, heads, head_dim]; got shape {tuple(x.shape)} "
                f"(rank {x.ndim}). Add the missing axes, e.g. x[:, :, None, :] for a single head."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype; got {x.dtype}.")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            f"query, key and value must share a dtype; got query {query.dtype}, key {key.dtype}, "
            f"value {value.dtype}. Cast them to one dtype."
        )
    B, T, N, D = query.shape
    Bk, S, K, Dk = key.shape
    if Bk != B or value.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}; expected the same batch (axis 0) for all three."
        )
    if Dk != D:
        raise ValueError(
            f"key head_dim {Dk} (shape {tuple(key.shape)}) differs from query head_dim {D} "
            f"(shape {tuple(query.shape)}); expected equal last dims."
        )
    if value.shape[1:3] != key.shape[1:3]:
        raise ValueError(
            f"value shape {tuple(value.shape)} must match key shape {tuple(key.shape)} in kv_len and heads (axes 1, 2)."
        )
    if N % K:
        raise ValueError(
            f"query heads {N} (query shape {tuple(query.shape)}) must be a multiple of key/value heads "
            f"{K} (key shape {tuple(key.shape)}) for grouped-query attention."
        )
    target = (B, N, T, S)
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be boolean (True = attend); got dtype {mask.dtype} with shape "
                f"{tuple(mask.shape)}. Use mask.astype(bool), or pass additive scores as bias=."
            )
        _check_broadcast("mask", mask, target)
    if bias is not None:
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias must be a floating dtype; got {bias.dtype}. Boolean masks go in mask=.")
        _check_broadcast("bias", bias, target)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is unknown; expected None or one of {IMPLEMENTATIONS}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}.")
    if dropout_rate > 0.0 and not deterministic and dropout_rng is None:
        raise ValueError(
            f"dropout_rate={dropout_rate} with deterministic=False needs dropout_rng (a PRNG key); got "
            f"None. Pass dropout_rng=jax.random.key(...) or deterministic=True."
        )


def _compute_dtype(dtype) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _as_rank4(x: Array | None) -> Array | None:
    return None if x is None else x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


def _offset(causal_offset: int | Array | None) -> Array:
    """The causal offset as an int32 scalar (0 when None)."""
    return jnp.asarray(0 if causal_offset is None else causal_offset, jnp.int32)


def _causal_valid(T: int, S: int, causal_offset: int | Array | None) -> Array:
    """Boolean ``[T, S]``: key ``j`` is visible to query ``i`` when ``j <= i + causal_offset``."""
    return jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + _offset(causal_offset)


# ----------------------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------------------


def attention_weights(
    query: Array,
    key: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    causal_offset: int | Array | None = None,
) -> Array:
    """Attention probabilities ``softmax(scale * Q K^T + bias, masked)`` as ``[B, N, T, S]`` (compute dtype).

    Rows with nothing to attend are all zeros. Same conventions as :func:`dot_product_attention`.

    >>> q = jnp.ones((1, 3, 2, 4)); k = jnp.ones((1, 5, 2, 4))
    >>> (6 * attention_weights(q, k, is_causal=True)[0, 0]).round().tolist()
    [[6.0, 0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 0.0, 0.0]]
    """
    _validate(query, key, key, bias, mask, "reference", 0.0, None, True)
    _validate_offset(causal_offset, is_causal)
    B, T, N, D = query.shape
    S, K = key.shape[1], key.shape[2]
    G = N // K
    cdt = _compute_dtype(query.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # heads-major (BNTH) operands: XLA:CPU's batched dots run faster on them than on the BTNH einsum
    q = jnp.transpose(query.astype(cdt).reshape(B, T, K, G, D), (0, 2, 3, 1, 4))  # [B, K, G, T, D]
    k = jnp.transpose(key.astype(cdt), (0, 2, 1, 3))  # [B, K, S, D]
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k).reshape(B, N, T, S) * jnp.asarray(scale, cdt)
    if bias is not None:
        s = s + _as_rank4(bias).astype(cdt)
    valid = jnp.ones((1, 1, 1, 1), bool)
    if mask is not None:
        valid = valid & _as_rank4(mask)
    if is_causal:
        valid = valid & _causal_valid(T, S, causal_offset)
    s = jnp.where(valid, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom == 0, 1.0, denom)


def _reference(
    query, key, value, bias, mask, scale, is_causal, causal_offset, dropout_rate, dropout_rng, deterministic
):
    B, T, N, D = query.shape
    S, K, Dv = key.shape[1], key.shape[2], value.shape[3]
    cdt = _compute_dtype(query.dtype)
    p = attention_weights(query, key, bias, mask, scale=scale, is_causal=is_causal, causal_offset=causal_offset)
    if dropout_rate > 0.0 and not deterministic:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    p = p.reshape(B, K, N // K, T, S)
    v = jnp.transpose(value.astype(cdt), (0, 2, 1, 3))  # [B, K, S, Dv]
    out = jnp.transpose(jnp.einsum("bkgts,bksd->bkgtd", p, v), (0, 3, 1, 2, 4)).reshape(B, T, N, Dv)
    return out.astype(query.dtype)


# ----------------------------------------------------------------------------------------------------------------
# chunked (flash-style) kernel
# ----------------------------------------------------------------------------------------------------------------


class _Tiling(NamedTuple):
    T: int  # true query length
    S: int  # true key length
    bq: int
    bk: int
    nq: int
    nk: int
    causal: bool


def _blocks(length: int, block: int) -> tuple[int, int]:
    """Tile size and count covering ``length`` with tiles of at most ``block`` and little padding."""
    n = -(-length // block)
    size = -(-length // n)
    if n > 1:
        size = -(-size // 8) * 8
    return size, n


def _tile(x: Array | None, i, j, cfg: _Tiling) -> Array | None:
    """The (query tile i, key tile j) window of a 5-D [b, k, g, t, s] mask/bias; broadcast dims stay size 1."""
    if x is None:
        return None
    t_full, s_full = x.shape[3] > 1, x.shape[4] > 1
    start = (0, 0, 0, i * cfg.bq if t_full else 0, j * cfg.bk if s_full else 0)
    size = x.shape[:3] + (cfg.bq if t_full else 1, cfg.bk if s_full else 1)
    return lax.dynamic_slice(x, start, size)


def _valid(i, j, mask_tile, off, cfg: _Tiling) -> Array | None:
    """Boolean [.., bq, bk] validity of a tile (key padding, causal, user mask), or None when all valid."""
    valid = None
    cols = j * cfg.bk + lax.broadcasted_iota(jnp.int32, (cfg.bq, cfg.bk), 1)
    if cfg.nk * cfg.bk > cfg.S:
        valid = cols < cfg.S
    if cfg.causal:
        rows = i * cfg.bq + lax.broadcasted_iota(jnp.int32, (cfg.bq, cfg.bk), 0)
        c = cols <= rows + off
        valid = c if valid is None else valid & c
    if mask_tile is not None:
        valid = mask_tile if valid is None else valid & mask_tile
    return valid


def _scores(qb, kb, bias_tile, valid):
    # qb [B, K, G, bq, D] (already scaled), kb [B, K, bk, D] -> [B, K, G, bq, bk]
    s = lax.dot_general(qb, kb, (((4,), (3,)), ((0, 1), (0, 1))), preferred_element_type=qb.dtype)
    if bias_tile is not None:
        s = s + bias_tile
    if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
    return s


def _num_key_blocks(i, off, cfg: _Tiling):
    """Key tiles that query tile ``i`` sees: up to the one holding key ``(i + 1) * bq - 1 + off``."""
    if not cfg.causal:
        return cfg.nk
    return jnp.clip(((i + 1) * cfg.bq + off + cfg.bk - 1) // cfg.bk, 0, cfg.nk)


def _first_query_block(j, off, cfg: _Tiling):
    """The first query tile that sees key tile ``j``: the one holding query row ``j * bk - off``."""
    if not cfg.causal:
        return 0
    return jnp.clip((j * cfg.bk - off) // cfg.bq, 0, cfg.nq)


def _flash_forward(q, k, v, bias, mask, off, cfg: _Tiling):
    B, K, G, _, D = q.shape
    Dv = v.shape[-1]
    dt = q.dtype
    q_blocks = jnp.moveaxis(q.reshape(B, K, G, cfg.nq, cfg.bq, D), 3, 0)

    def q_step(_, xs):
        i, qb = xs

        def k_step(j, carry):
            m, l, acc = carry
            kb = lax.dynamic_slice_in_dim(k, j * cfg.bk, cfg.bk, axis=2)
            vb = lax.dynamic_slice_in_dim(v, j * cfg.bk, cfg.bk, axis=2)
            s = _scores(qb, kb, _tile(bias, i, j, cfg), _valid(i, j, _tile(mask, i, j, cfg), off, cfg))
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = lax.dot_general(p, vb, (((4,), (2,)), ((0, 1), (0, 1))), preferred_element_type=dt)
            return m_new, l, alpha[..., None] * acc + pv

        init = (
            jnp.full((B, K, G, cfg.bq), -jnp.inf, dt),
            jnp.zeros((B, K, G, cfg.bq), dt),
            jnp.zeros((B, K, G, cfg.bq, Dv), dt),
        )
        m, l, acc = lax.fori_loop(0, _num_key_blocks(i, off, cfg), k_step, init)
        empty = l == 0
        o = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return None, (o, lse)

    _, (o, lse) = lax.scan(q_step, None, (jnp.arange(cfg.nq), q_blocks))
    o = jnp.moveaxis(o, 0, 3).reshape(B, K, G, cfg.nq * cfg.bq, Dv)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, cfg.nq * cfg.bq)
    return o, lse


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    axes = tuple(a for a, (n, m) in enumerate(zip(shape, x.shape)) if n == 1 and m != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _tile_t(x: Array | None, i, j, cfg: _Tiling) -> Array | None:
    """The (key tile j, query tile i) window of a key-major 5-D [b, k, s, g, t] mask/bias/bias-gradient."""
    if x is None:
        return None
    s_full, t_full = x.shape[2] > 1, x.shape[4] > 1
    start = (0, 0, j * cfg.bk if s_full else 0, 0, i * cfg.bq if t_full else 0)
    size = x.shape[:2] + (cfg.bk if s_full else 1, x.shape[3], cfg.bq if t_full else 1)
    return lax.dynamic_slice(x, start, size), start


def _valid_t(i, j, mask_tile, off, cfg: _Tiling) -> Array | None:
    """Boolean [.., bk, 1, bq] validity of a key-major tile, or None when all valid."""
    valid = None
    shape = (cfg.bk, 1, cfg.bq)
    cols = j * cfg.bk + lax.broadcasted_iota(jnp.int32, shape, 0)
    if cfg.nk * cfg.bk > cfg.S:
        valid = cols < cfg.S
    if cfg.causal:
        c = cols <= i * cfg.bq + lax.broadcasted_iota(jnp.int32, shape, 2) + off
        valid = c if valid is None else valid & c
    if mask_tile is not None:
        valid = mask_tile if valid is None else valid & mask_tile
    return valid


def _flash_backward(cfg: _Tiling, res, do):
    """Key-major backward: every tile is computed as [bk, (g, bq)] so that all five products are plain
    row-major matmuls (no transposes of a tile)."""
    q, k, v, bias, mask, off, o, lse = res
    B, K, G, Tp, D = q.shape
    dt = q.dtype
    delta = jnp.sum(do * o, axis=-1)  # [B, K, G, Tp]
    key_major = lambda x: None if x is None else x.transpose(0, 1, 4, 2, 3)  # [b, k, g, t, s] -> [b, k, s, g, t]
    bias_t, mask_t = key_major(bias), key_major(mask)
    kt = k.swapaxes(2, 3)  # [B, K, D, Sp]
    batch = ((0, 1), (0, 1))

    def k_step(carry, j):
        dq_t, dbias_t = carry  # dq_t: [B, K, D, G, Tp]
        kb = lax.dynamic_slice_in_dim(k, j * cfg.bk, cfg.bk, axis=2)  # [B, K, bk, D]
        kbt = lax.dynamic_slice_in_dim(kt, j * cfg.bk, cfg.bk, axis=3)  # [B, K, D, bk]
        vb = lax.dynamic_slice_in_dim(v, j * cfg.bk, cfg.bk, axis=2)  # [B, K, bk, Dv]

        def q_step(i, inner):
            dk_j, dv_j, dq_t, dbias_t = inner
            sl = lambda x: lax.dynamic_slice_in_dim(x, i * cfg.bq, cfg.bq, axis=3)
            qb, dob, lse_b, delta_b = sl(q), sl(do), sl(lse), sl(delta)
            s = lax.dot_general(kb, qb, (((3,), (4,)), batch), preferred_element_type=dt)  # [B, K, bk, G, bq]
            if bias_t is not None:
                s = s + _tile_t(bias_t, i, j, cfg)[0]
            valid = _valid_t(i, j, None if mask_t is None else _tile_t(mask_t, i, j, cfg)[0], off, cfg)
            if valid is not None:
                s = jnp.where(valid, s, -jnp.inf)
            p = jnp.exp(s - lse_b[:, :, None])
            dv_j = dv_j + lax.dot_general(p, dob, (((3, 4), (2, 3)), batch), preferred_element_type=dt)
            dp = lax.dot_general(vb, dob, (((3,), (4,)), batch), preferred_element_type=dt)  # [B, K, bk, G, bq]
            ds = p * (dp - delta_b[:, :, None])
            dk_j = dk_j + lax.dot_general(ds, qb, (((3, 4), (2, 3)), batch), preferred_element_type=dt)
            dq_b = lax.dot_general(kbt, ds, (((3,), (2,)), batch), preferred_element_type=dt)  # [B, K, D, G, bq]
            dq_t = lax.dynamic_update_slice_in_dim(
                dq_t, lax.dynamic_slice_in_dim(dq_t, i * cfg.bq, cfg.bq, axis=4) + dq_b, i * cfg.bq, axis=4
            )
            if dbias_t is not None:
                old, start = _tile_t(dbias_t, i, j, cfg)
                dbias_t = lax.dynamic_update_slice(dbias_t, old + _reduce_to(ds, old.shape), start)
            return dk_j, dv_j, dq_t, dbias_t

        init = (jnp.zeros((B, K, cfg.bk, D), dt), jnp.zeros((B, K, cfg.bk, v.shape[-1]), dt), dq_t, dbias_t)
        dk_j, dv_j, dq_t, dbias_t = lax.fori_loop(_first_query_block(j, off, cfg), cfg.nq, q_step, init)
        return (dq_t, dbias_t), (dk_j, dv_j)

    dbias0 = None if bias_t is None else jnp.zeros_like(bias_t)
    (dq_t, dbias_t), (dk, dv) = lax.scan(k_step, (jnp.zeros((B, K, D, G, Tp), dt), dbias0), jnp.arange(cfg.nk))
    dq = dq_t.transpose(0, 1, 3, 4, 2)
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    dbias = None if dbias_t is None else dbias_t.transpose(0, 1, 3, 4, 2)
    return dq, dk, dv, dbias, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, bias, mask, off, cfg: _Tiling):
    return _flash_forward(q, k, v, bias, mask, off, cfg)[0]


def _flash_fwd(q, k, v, bias, mask, off, cfg):
    o, lse = _flash_forward(q, k, v, bias, mask, off, cfg)
    return o, (q, k, v, bias, mask, off, o, lse)


_flash.defvjp(_flash_fwd, _flash_backward)


def _to_tiles5(x: Array | None, N: int, K: int, T: int, Tp: int, S: int, Sp: int, fill) -> Array | None:
    """[.., T|1, S|1] mask/bias -> 5-D [b, k|1, g|1, Tp|1, Sp|1] padded with ``fill``."""
    if x is None:
        return None
    x = _as_rank4(x)
    b, n, t, s = x.shape
    x = x.reshape(b, K, N // K, t, s) if n == N and N > 1 else x.reshape(b, 1, 1, t, s)
    pad_t = Tp - T if t > 1 else 0
    pad_s = Sp - S if s > 1 else 0
    if pad_t or pad_s:
        x = jnp.pad(x, ((0, 0),) * 3 + ((0, pad_t), (0, pad_s)), constant_values=fill)
    return x


def chunked_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    causal_offset: int | Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """The ``"chunked"`` implementation with explicit tile sizes (``block_q`` queries x ``block_k`` keys).

    Exact softmax attention computed tile by tile with an online softmax (Milakov & Gimelshein 2018; Dao et al.,
    FlashAttention, 2022). The backward pass recomputes each tile's probabilities ``P = exp(S - lse)`` from the saved
    log-sum-exp and forms ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dO * O))``, ``dQ = dS K``,
    ``dK = dS^T Q`` (``Q`` pre-scaled), ``dbias = dS`` reduced to the bias's broadcast shape. The outer backward loop
    runs over key tiles (accumulating ``dK``/``dV`` locally) and the inner one over the query tiles that see them.

    Lengths that no tile divides are padded (keys beyond ``S`` are masked). Arguments and result as
    :func:`dot_product_attention` (no dropout); ``block_q``/``block_k`` default to ``DEFAULT_BLOCK_Q`` /
    ``DEFAULT_BLOCK_K`` (256 x 512: on a 2-core AVX-512 CPU tiles from 128 x 256 to 512 x 1024 were within ~10%).

    >>> q = jnp.ones((1, 10, 2, 4)); kv = jnp.ones((1, 7, 2, 4))
    >>> chunked_dot_product_attention(q, kv, kv, is_causal=True, block_q=4, block_k=4).shape
    (1, 10, 2, 4)
    """
    _validate(query, key, value, bias, mask, "chunked", 0.0, None, True)
    _validate_offset(causal_offset, is_causal)
    B, T, N, D = query.shape
    S, K, Dv = key.shape[1], key.shape[2], value.shape[3]
    G = N // K
    cdt = _compute_dtype(query.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bq, nq = _blocks(T, block_q or DEFAULT_BLOCK_Q)
    bk, nk = _blocks(S, block_k or DEFAULT_BLOCK_K)
    Tp, Sp = bq * nq, bk * nk
    cfg = _Tiling(T, S, bq, bk, nq, nk, bool(is_causal))
    q = (query.astype(cdt) * jnp.asarray(scale, cdt)).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    k = key.astype(cdt).transpose(0, 2, 1, 3)
    v = value.astype(cdt).transpose(0, 2, 1, 3)
    if Tp > T:
        q = jnp.pad(q, ((0, 0),) * 3 + ((0, Tp - T), (0, 0)))
    if Sp > S:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    bias5 = None if bias is None else _to_tiles5(bias.astype(cdt), N, K, T, Tp, S, Sp, 0.0)
    mask5 = _to_tiles5(mask, N, K, T, Tp, S, Sp, False)
    o = _flash(q, k, v, bias5, mask5, _offset(causal_offset), cfg)  # [B, K, G, Tp, Dv]
    o = o[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, N, Dv)
    return o.astype(query.dtype)


# ----------------------------------------------------------------------------------------------------------------
# jax.nn backends
# ----------------------------------------------------------------------------------------------------------------


def _row_has_key(mask) -> Array | None:
    """Boolean broadcastable to [B, T, N, 1]: does the query row attend to at least one key?"""
    if mask is None:  # top-left causal alone always leaves key 0 to every row
        return None
    return jnp.any(_as_rank4(mask), axis=-1).transpose(0, 2, 1)[..., None]  # [b, T|1, n, 1]


def _jax_nn(query, key, value, bias, mask, scale, is_causal, causal_offset, implementation):
    T, S = query.shape[1], key.shape[1]
    if is_causal and (mask is not None or causal_offset is not None):
        # jax.nn's causal mask is top-left only: a shifted diagonal (and the empty-row check) goes into the mask.
        causal = _causal_valid(T, S, causal_offset)
        mask = causal if mask is None else _as_rank4(mask) & causal
        is_causal = False
    out = jax.nn.dot_product_attention(
        query,
        key,
        value,
        bias=_as_rank4(bias),
        mask=_as_rank4(mask),
        scale=scale,
        is_causal=is_causal,
        implementation=implementation,
    )
    has_key = _row_has_key(mask)
    if has_key is not None:
        out = jnp.where(has_key, out, jnp.zeros((), out.dtype))
    return out


def _platform() -> str:
    return jax.default_backend()


def _cudnn_supported(query, key, value, bias, mask) -> bool:
    D, Dv = query.shape[-1], value.shape[-1]
    return query.dtype in (jnp.bfloat16, jnp.float16) and D == Dv and D % 8 == 0 and D <= 128


def select_implementation(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    dropout_active: bool = False,
    decoding: bool = False,
) -> str:
    """The implementation ``implementation=None`` uses for these arguments on the default backend.

    * dropout active: ``"reference"`` (the only path with dropout);
    * ``decoding`` (a step over a KV cache or cached keys/values, :class:`MultiHeadAttention` sets it) with one
      query per row, on CPU: ``"reference"``: one row of scores per head, where the chunked kernel's loop over tiles
      is overhead (the attention of a greedy step of ``experiments/bench_generate.py``: op time per step 5.6-5.8 ms
      instead of 6.0-6.1 ms);
    * GPU: ``"cudnn"`` for float16/bfloat16 inputs with equal query/value head_dim, a multiple of 8 up to 128;
      else ``"xla"`` while the ``[B, N, T, S]`` float32 scores fit in 1 GiB; else ``"chunked"``;
    * CPU (and anything else): ``"chunked"``. Measured on a 2-core AVX-512 CPU (B=1, 8 heads, head_dim 64), the
      chunked kernel beats the plain reference at every length from T = S = 64 (forward+backward 0.5 ms vs 0.7 ms)
      to 512 (27 ms vs 92 ms); a single tile has no loop overhead. At the ViTs' shapes (B=128, T=50, 3 heads;
      B=16, T=197, 3 heads) the two take the same time within 4% (2026-12-07, interleaved, after the reference
      moved to heads-major operands), so ``"chunked"`` stays the CPU default at every size.

    >>> x = jnp.ones((1, 8, 1, 4))
    >>> select_implementation(x, x, x), select_implementation(x, x, x, dropout_active=True)
    ('chunked', 'reference')
    >>> select_implementation(x[:, :1], x, x, decoding=True)
    'reference'
    """
    if dropout_active:
        return "reference"
    if decoding and query.shape[1] == 1 and _platform() != "gpu":
        return "reference"
    if _platform() == "gpu":
        if _cudnn_supported(query, key, value, bias, mask):
            return "cudnn"
        B, T, N, _ = query.shape
        if B * N * T * key.shape[1] * 4 <= 2**30:
            return "xla"
    return "chunked"


# ----------------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------------


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    causal_offset: int | Array | None = None,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
) -> Array:
    """Scaled dot-product attention ``softmax(scale * Q K^T + bias, masked) V``.

    Args:
      query: ``[B, T, N, D]``.
      key: ``[B, S, K, D]`` with ``N % K == 0`` (``K < N``: grouped-query attention, query head ``n`` uses
        key/value head ``n // (N // K)``).
      value: ``[B, S, K, Dv]``.
      bias: optional additive logits, broadcastable to ``[B, N, T, S]``; differentiable (its gradient has its shape).
      mask: optional boolean, ``True`` = attend, broadcastable to ``[B, N, T, S]``.
      scale: logit scale, default ``1 / sqrt(D)``.
      is_causal: query ``i`` attends keys ``j <= i + causal_offset`` (top-left aligned when ``T != S``, as in
        ``jax.nn`` and ``torch``, with the default offset 0).
      causal_offset: shifts the causal diagonal (needs ``is_causal``): ``S - T`` aligns it bottom-right (the queries
        are the last ``T`` of ``S`` positions), a traced int32 scalar places the queries at a KV cache's fill index.
        One offset for the whole batch.
      implementation: ``None`` (choose, see :func:`select_implementation`), ``"reference"``, ``"chunked"``,
        ``"xla"`` or ``"cudnn"`` (GPU only).
      dropout_rate: probability of dropping an attention weight (inverted dropout); active only when
        ``deterministic=False``; then every implementation runs ``"reference"``.
      dropout_rng: PRNG key for dropout, required when dropout is active.
      deterministic: disables dropout when True.

    Returns:
      ``[B, T, N, Dv]`` in ``query.dtype``. A query row with no attended key (fully masked) is zero, with zero
      gradients, on every implementation (``jax.nn`` returns ``mean(v)`` there; ``torch`` 2.13 zeros, older
      ``NaN``).

    Raises:
      ValueError: bad ranks, batch / head_dim mismatch, heads not divisible, a non-boolean or non-broadcastable
        mask, a non-broadcastable bias, an unknown implementation or one this platform lacks, dropout without rng.

    >>> q = jnp.ones((2, 5, 4, 8)); kv = jnp.ones((2, 7, 2, 8))
    >>> pad = jnp.arange(7) < 6  # last key is padding
    >>> dot_product_attention(q, kv, kv, mask=pad[None, None, None, :], implementation="chunked").shape
    (2, 5, 4, 8)
    """
    _validate(query, key, value, bias, mask, implementation, dropout_rate, dropout_rng, deterministic)
    _validate_offset(causal_offset, is_causal)
    D = query.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dropout_active = dropout_rate > 0.0 and not deterministic
    if implementation == "cudnn" and _platform() != "gpu":
        raise ValueError(
            f"implementation='cudnn' needs a CUDA GPU; the default backend is {_platform()!r}. Use "
            f"implementation=None, 'chunked', 'xla' or 'reference'."
        )
    if implementation is None:
        implementation = select_implementation(query, key, value, bias, mask, dropout_active=dropout_active)
    if dropout_active or implementation == "reference":
        return _reference(
            query, key, value, bias, mask, scale, is_causal, causal_offset, dropout_rate, dropout_rng, deterministic
        )
    if implementation == "chunked":
        return chunked_dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal, causal_offset=causal_offset
        )
    return _jax_nn(query, key, value, bias, mask, scale, is_causal, causal_offset, implementation)


# ----------------------------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """The keys and values of one self-attention layer, preallocated for ``max_length`` positions: a plain pytree
    that a jitted decoding step takes and returns (no mutable collections).

    Attributes:
      key: ``[B, K, max_length, D]``, the projected keys of positions ``0 .. index - 1`` (zeros after), heads-major
        as the attention kernels multiply them: a decoding step then reads the cache without transposing it (in
        the token-major ``[B, max_length, K, D]`` layout of the projections, XLA:CPU copied every layer's cache
        into heads-major order at every step: 40% of a greedy step of ``experiments/bench_generate.py``).
      value: ``[B, K, max_length, Dv]``.
      index: int32 scalar, the number of positions filled (where the next tokens go).

    >>> c = KVCache.empty(batch=2, max_length=8, num_kv_heads=1, head_dim=4)
    >>> c.key.shape, int(c.index)
    ((2, 1, 8, 4), 0)
    """

    key: Array
    value: Array
    index: Array

    @classmethod
    def empty(cls, batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty cache (zeros, ``index = 0``) for ``batch`` sequences of up to ``max_length`` positions."""
        shape = (batch, num_kv_heads, max_length, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def _append_to_cache(cache: KVCache, k: Array, v: Array) -> KVCache:
    """Writes ``k``/``v`` ``[B, T, K, D]`` at positions ``cache.index .. cache.index + T - 1``."""
    B, K, L, D = cache.key.shape
    if (B, K, D) != (k.shape[0], *k.shape[2:]) or cache.value.shape[3] != v.shape[3]:
        raise ValueError(
            f"MultiHeadAttention: the KV cache holds keys {tuple(cache.key.shape)} and values "
            f"{tuple(cache.value.shape)} ([batch, kv_heads, max_length, head_dim]) but this step projects keys "
            f"{tuple(k.shape)} and values {tuple(v.shape)} ([batch, tokens, kv_heads, head_dim]); make the cache "
            "for this batch size and layer (e.g. a cache from another batch size cannot be reused)."
        )
    if k.shape[1] > L:
        raise ValueError(
            f"MultiHeadAttention: {k.shape[1]} new positions do not fit a KV cache of max_length {L}; make the "
            "cache longer."
        )
    zero = jnp.zeros((), cache.index.dtype)
    start = (zero, zero, cache.index, zero)
    heads_major = lambda x, like: x.astype(like.dtype).swapaxes(1, 2)  # noqa: E731  [B, T, K, D] -> [B, K, T, D]
    return KVCache(
        lax.dynamic_update_slice(cache.key, heads_major(k, cache.key), start),
        lax.dynamic_update_slice(cache.value, heads_major(v, cache.value), start),
        cache.index + k.shape[1],
    )


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-query) attention built on :func:`dot_product_attention`.

    Parameters are laid out like ``flax.linen.MultiHeadDotProductAttention``: ``query``/``key``/``value`` are
    ``DenseGeneral(features=(heads, head_dim))`` (kernel ``[in, heads, head_dim]``, bias ``[heads, head_dim]``; key
    and value use ``num_kv_heads``) and ``out`` is ``DenseGeneral`` over the last two axes (kernel
    ``[heads, head_dim, out]``, bias ``[out]``).

    Attributes:
      num_heads: query heads ``N``.
      qkv_features: total query width ``N * head_dim`` (default: input width). Must be divisible by ``num_heads``.
      out_features: output width (default: ``inputs_q`` width).
      num_kv_heads: key/value heads (default ``num_heads``; fewer = grouped-query attention).
      use_bias: biases in the four projections.
      dropout_rate: dropout on the attention weights (needs a ``"dropout"`` rng when not deterministic).
      implementation: passed to :func:`dot_product_attention`.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initialisers of the projections.
      sow_weights: if True, sow the attention probabilities ``[B, N, T, S]`` (reference path) into
        ``"intermediates"`` as ``"attention_weights"``, e.g. for attention rollout.

    Decoding (all optional, keyword-only at call time):

    * ``kv_cache=KVCache(...)``: self-attention over a cache. The new keys/values are written at positions
      ``index .. index + T - 1`` and the ``T`` queries attend every filled position (with ``is_causal``, key ``j`` is
      visible to query ``t`` when ``j <= index + t``), so a prompt of any length is prefilled in one call and then
      one token per call. Returns ``(y, new_cache)``. ``mask``/``bias`` then span the cache's ``max_length`` keys.
      Writing past ``max_length`` is not checked inside ``jit`` (XLA clamps the write): size the cache for the
      prompt plus every new token.
    * ``key_value=(k, v)``: projected keys/values ``[B, S, K, D]`` computed earlier (``return_key_value=True``),
      used instead of projecting ``inputs_kv`` again: cross-attention keys of the image tokens computed once and
      reused at every decoding step.
    * ``return_key_value=True``: returns ``(y, (k, v))`` with the keys/values this call projected.

    >>> mha = MultiHeadAttention(num_heads=2)
    >>> x = jnp.ones((1, 3, 8))
    >>> params = mha.init(jax.random.key(0), x)
    >>> mha.apply(params, x).shape, params["params"]["query"]["kernel"].shape
    ((1, 3, 8), (8, 2, 4))
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    num_kv_heads: int | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    implementation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    sow_weights: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        is_causal: bool = False,
        deterministic: bool = True,
        kv_cache: KVCache | None = None,
        key_value: tuple[Array, Array] | None = None,
        return_key_value: bool = False,
    ):
        """``inputs_q [B, T, F]``, ``inputs_kv [B, S, F']`` (default ``inputs_q``) -> ``[B, T, out_features]``.

        With ``kv_cache`` returns ``(y, new_cache)``; with ``return_key_value`` returns ``(y, (k, v))`` (see the
        class docstring).

        Raises:
          ValueError: if an input is not rank 3 ``[batch, length, features]`` or the batch sizes differ, a cache
            does not match the batch or the layer, or ``key_value`` comes with ``inputs_kv`` or a cache.
        """
        if key_value is not None and (inputs_kv is not None or kv_cache is not None):
            raise ValueError(
                "MultiHeadAttention: key_value (precomputed keys/values) replaces inputs_kv and cannot be combined "
                "with inputs_kv or kv_cache; pass one of them."
            )
        if inputs_kv is None:
            inputs_kv = inputs_q
        checked = (
            (("inputs_q", inputs_q),) if key_value is not None else (("inputs_q", inputs_q), ("inputs_kv", inputs_kv))
        )
        for name, x in checked:
            if jnp.ndim(x) != 3:
                raise ValueError(
                    f"MultiHeadAttention: {name} must be [batch, length, features] (rank 3), got shape "
                    f"{jnp.shape(x)} (rank {jnp.ndim(x)}); add the missing axis (e.g. x[None] for one sequence, "
                    "x[:, None] for one token per example) or flatten extra axes into length."
                )
        if jnp.shape(inputs_q)[0] != jnp.shape(inputs_kv)[0]:
            raise ValueError(
                f"MultiHeadAttention: inputs_q {jnp.shape(inputs_q)} and inputs_kv {jnp.shape(inputs_kv)} have "
                "different batch sizes (axis 0); pass one key/value sequence per query sequence."
            )
        features = self.qkv_features or inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"qkv_features {features} must be divisible by num_heads {self.num_heads}.")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {kv_heads}.")
        head_dim = features // self.num_heads
        dense = functools.partial(
            nn.DenseGeneral,
            axis=-1,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        q = dense(features=(self.num_heads, head_dim), name="query")(inputs_q)
        if key_value is None:
            k = dense(features=(kv_heads, head_dim), name="key")(inputs_kv)
            v = dense(features=(kv_heads, head_dim), name="value")(inputs_kv)
        else:
            k, v = key_value
            if (
                k.ndim != 4
                or k.shape[0] != q.shape[0]
                or k.shape[2:] != (kv_heads, head_dim)
                or v.shape[:3] != k.shape[:3]
            ):
                raise ValueError(
                    f"MultiHeadAttention: key_value has keys {jnp.shape(k)} and values {jnp.shape(v)}; expected "
                    f"[{q.shape[0]}, S, {kv_heads}, {head_dim}] each (this layer's return_key_value=True output)."
                )
        projected = (k, v)
        causal_offset = None
        if kv_cache is not None:
            kv_cache = _append_to_cache(kv_cache, k, v)
            # token-major views of the heads-major cache: the kernels' own transposes to heads-major cancel them
            k, v = kv_cache.key.swapaxes(1, 2), kv_cache.value.swapaxes(1, 2)
            start = kv_cache.index - q.shape[1]
            if is_causal:
                causal_offset = start
            else:  # attend the filled positions only
                filled = (jnp.arange(k.shape[1]) < kv_cache.index)[None, None, None, :]
                mask = filled if mask is None else _as_rank4(mask) & filled
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        dropout_active = self.dropout_rate > 0.0 and not deterministic
        rng = self.make_rng("dropout") if dropout_active else None
        if self.sow_weights:
            w = attention_weights(q, k, bias, mask, is_causal=is_causal, causal_offset=causal_offset)
            self.sow("intermediates", "attention_weights", w)
            if dropout_active:
                keep = jax.random.bernoulli(rng, 1.0 - self.dropout_rate, w.shape)
                w = jnp.where(keep, w / (1.0 - self.dropout_rate), 0.0)
            B, T, N, _ = q.shape
            w = w.reshape(B, kv_heads, N // kv_heads, T, k.shape[1])
            y = jnp.einsum("bkgts,bskd->btkgd", w, v.astype(w.dtype)).reshape(q.shape).astype(q.dtype)
        else:
            implementation = self.implementation
            if implementation is None and (kv_cache is not None or key_value is not None):
                implementation = select_implementation(
                    q, k, v, bias, mask, dropout_active=dropout_active, decoding=True
                )
            y = dot_product_attention(
                q,
                k,
                v,
                bias,
                mask,
                is_causal=is_causal,
                causal_offset=causal_offset,
                implementation=implementation,
                dropout_rate=self.dropout_rate,
                dropout_rng=rng,
                deterministic=deterministic,
            )
        out_features = self.out_features or inputs_q.shape[-1]
        y = nn.DenseGeneral(
            features=out_features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name="out",
        )(y)
        if kv_cache is not None:
            return y, kv_cache
        if return_key_value:
            return y, projected
        return y
