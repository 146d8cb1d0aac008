"""Segment reductions over the leading axis that ignore padding and give 0 for empty segments.

A *segment* is the set of rows ``data[e]`` with ``segment_ids[e] == s``. Graph layers use them to aggregate
per-edge messages at their receiver (``segment_ids = receivers``) and to pool nodes per graph.

Conventions shared by every function here:

* ``data`` is ``[E, ...]``, ``segment_ids`` is ``[E]`` (integer), the result is ``[num_segments, ...]``.
* ``mask`` (optional, boolean ``[E]``): rows with ``mask == False`` are ignored, as if absent (use it for padding).
* Rows whose id is outside ``[0, num_segments)`` are dropped (``jax.ops`` semantics).
* An empty segment (no row, or all rows masked) yields **0**, never ``-inf`` or ``NaN`` (also for ``max`` and in
  gradients).
* ``num_segments`` must be a static Python int so that results have static shapes under ``jax.jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "segment_sum",
    "segment_mean",
    "segment_max",
    "segment_softmax",
    "segment_count",
    "AGGREGATIONS",
    "segment_aggregate",
]


def _check(data, segment_ids, num_segments, mask):
    if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 0:
        raise ValueError(
            f"num_segments must be a static non-negative Python int, got {num_segments!r}; pass "
            "e.g. graph.nodes.shape[0] (not a traced value)."
        )
    data = jnp.asarray(data)
    segment_ids = jnp.asarray(segment_ids)
    if data.ndim < 1:
        raise ValueError(f"data must have a leading segment axis [E, ...], got a scalar of shape {data.shape}.")
    if segment_ids.ndim != 1 or segment_ids.shape[0] != data.shape[0]:
        raise ValueError(
            f"segment_ids must have shape [E] = [{data.shape[0]}] to match data {data.shape}, got {segment_ids.shape}."
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}; cast with .astype(int32).")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != segment_ids.shape:
            raise ValueError(f"mask must have shape {segment_ids.shape} like segment_ids, got {mask.shape}.")
        mask = mask.astype(bool)
    return data, segment_ids, mask


def _expand(m, data):
    return m.reshape(m.shape + (1,) * (data.ndim - 1))


def segment_sum(data, segment_ids, num_segments: int, mask=None, indices_are_sorted: bool = False) -> Array:
    """Sum of the rows of each segment: ``out[s] = sum_{e: ids[e] = s, mask[e]} data[e]``.

    Args:
      data: ``[E, ...]`` values.
      segment_ids: ``[E]`` integer segment of each row.
      num_segments: static number of segments ``S``.
      mask: optional boolean ``[E]``; ``False`` rows are ignored.
      indices_are_sorted: promise that ``segment_ids`` is non-decreasing (faster on some backends).

    Returns:
      ``[S, ...]``; empty segments are 0.

    >>> import jax.numpy as jnp
    >>> segment_sum(jnp.array([1., 2., 3.]), jnp.array([0, 0, 2]), 3).tolist()
    [3.0, 0.0, 3.0]
    """
    data, segment_ids, mask = _check(data, segment_ids, num_segments, mask)
    if mask is not None:
        data = jnp.where(_expand(mask, data), data, jnp.zeros((), data.dtype))
    return jax.ops.segment_sum(data, segment_ids, num_segments, indices_are_sorted=indices_are_sorted)


def segment_count(segment_ids, num_segments: int, mask=None, dtype=jnp.float32) -> Array:
    """Number of (unmasked) rows in each segment, ``[S]``.

    >>> import jax.numpy as jnp
    >>> segment_count(jnp.array([0, 0, 2]), 3).tolist()
    [2.0, 0.0, 1.0]
    """
    segment_ids = jnp.asarray(segment_ids)
    ones = jnp.ones(segment_ids.shape, dtype)
    return segment_sum(ones, segment_ids, num_segments, mask)


def segment_mean(data, segment_ids, num_segments: int, mask=None, indices_are_sorted: bool = False) -> Array:
    """Mean of the rows of each segment: ``out[s] = sum_{e in s} data[e] / max(|s|, 1)``; empty segments are 0.

    >>> import jax.numpy as jnp
    >>> segment_mean(jnp.array([1., 3., 5.]), jnp.array([0, 0, 2]), 3).tolist()
    [2.0, 0.0, 5.0]
    """
    data, segment_ids, mask = _check(data, segment_ids, num_segments, mask)
    total = segment_sum(data, segment_ids, num_segments, mask, indices_are_sorted)
    count = segment_count(segment_ids, num_segments, mask, dtype=total.dtype)
    return total / _expand(jnp.maximum(count, 1), total)


def segment_max(data, segment_ids, num_segments: int, mask=None, indices_are_sorted: bool = False) -> Array:
    """Maximum over the rows of each segment: ``out[s] = max_{e in s} data[e]``; empty segments are 0 (not -inf).

    >>> import jax.numpy as jnp
    >>> segment_max(jnp.array([1., -3., -5.]), jnp.array([0, 0, 2]), 3).tolist()
    [1.0, 0.0, -5.0]
    """
    data, segment_ids, mask = _check(data, segment_ids, num_segments, mask)
    if mask is not None:
        # Masked rows go to an out-of-range id and are dropped.
        segment_ids = jnp.where(mask, segment_ids, num_segments)
    out = jax.ops.segment_max(data, segment_ids, num_segments, indices_are_sorted=indices_are_sorted and mask is None)
    count = segment_count(segment_ids, num_segments)
    return jnp.where(_expand(count > 0, out), out, jnp.zeros((), out.dtype))


def segment_softmax(logits, segment_ids, num_segments: int, mask=None, indices_are_sorted: bool = False) -> Array:
    """Softmax of ``logits`` within each segment: ``out[e] = exp(x[e] - m_s) / sum_{e' in s} exp(x[e'] - m_s)``.

    ``m_s`` is the segment maximum (for stability; it does not change the result). Masked rows get weight 0 and do
    not enter the normaliser. ``logits`` may carry trailing axes (e.g. attention heads ``[E, H]``); each trailing
    index is normalised separately.

    Returns:
      ``[E, ...]`` weights that sum to 1 over every non-empty segment.

    >>> import jax.numpy as jnp
    >>> w = segment_softmax(jnp.array([0., 0., 5.]), jnp.array([0, 0, 1]), 2)
    >>> [round(v, 3) for v in w.tolist()]
    [0.5, 0.5, 1.0]
    """
    logits, segment_ids, mask = _check(logits, segment_ids, num_segments, mask)
    seg_max = segment_max(logits, segment_ids, num_segments, mask, indices_are_sorted)
    shifted = logits - jax.lax.stop_gradient(seg_max)[segment_ids.clip(0, max(num_segments - 1, 0))]
    if mask is not None:
        shifted = jnp.where(_expand(mask, logits), shifted, -jnp.inf)
    unnorm = jnp.exp(shifted)
    denom = segment_sum(unnorm, segment_ids, num_segments, indices_are_sorted=indices_are_sorted)
    denom = denom[segment_ids.clip(0, max(num_segments - 1, 0))]
    return unnorm / jnp.where(denom > 0, denom, jnp.ones((), denom.dtype))


AGGREGATIONS = {"sum": segment_sum, "mean": segment_mean, "max": segment_max}


def segment_aggregate(
    name: str, data, segment_ids, num_segments: int, mask=None, indices_are_sorted: bool = False
) -> Array:
    """Dispatch to :func:`segment_sum`, :func:`segment_mean` or :func:`segment_max` by ``name``.

    >>> import jax.numpy as jnp
    >>> segment_aggregate("mean", jnp.array([2., 4.]), jnp.array([1, 1]), 2).tolist()
    [0.0, 3.0]
    """
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {name!r}.")
    return AGGREGATIONS[name](data, segment_ids, num_segments, mask, indices_are_sorted)
