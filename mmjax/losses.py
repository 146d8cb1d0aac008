"""Classification and contrastive losses, with negatives drawn from the global batch.

The losses:

* :func:`softmax_cross_entropy`: classification cross-entropy with label smoothing and example weights (optax
  underneath), and :func:`softmax_cross_entropy_sum`, its unsmoothed sum over the real examples of a batch (what
  evaluation adds up).
* :func:`softmax_contrastive_loss`: CLIP's symmetric InfoNCE over image/text pairs.
* :func:`sigmoid_contrastive_loss`: SigLIP's pairwise sigmoid loss, optionally chunked so that the full
  ``B x B`` logit matrix is never built.

Parallelism. Every contrastive loss returns the mean over the *global* batch however the batch is spread:

* One device, or ``jax.jit`` over arrays sharded with a ``NamedSharding``: call with ``axis_name=None``; the
  arrays are global and XLA partitions the computation.
* Inside ``jax.pmap`` or ``jax.shard_map`` over an axis ``axis_name``: the inputs are the local shard. Each
  device gathers the other shards with ``lax.all_gather`` (SigLIP's chunked form instead passes text shards
  round a ring with ``lax.ppermute``), computes its own row block of the logit matrix, and the block sums are
  ``lax.psum``-ed and divided by the global batch. Every device returns the same global loss.

Gradients under ``pmap`` follow the usual data-parallel convention: ``psum`` transposes to ``psum`` there, so
the gradient on device ``d`` is ``D`` times device ``d``'s share of the global gradient (``D`` = axis size),
exactly what a per-device mean loss gives in plain data parallelism; ``lax.pmean`` of the per-device
gradients of replicated parameters is therefore the gradient of the global-batch loss. The same holds under
``shard_map(check_vma=False)``. Under ``shard_map(check_vma=True)`` with replicated parameters passed as
``P()``, JAX sums the gradient itself and every device already holds the global gradient (``pmean`` is then a
no-op). ``tests/test_losses.py`` checks all three against the single-device loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = [
    "softmax_cross_entropy",
    "softmax_cross_entropy_sum",
    "softmax_contrastive_loss",
    "sigmoid_contrastive_loss",
]


# ----------------------------------------------------------------------------------------------- checks


def _check_pair(image_embeds, text_embeds):
    for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if jnp.ndim(x) != 2:
            raise ValueError(
                f"{name} must have rank 2 [batch, dim], got shape {jnp.shape(x)}; "
                "flatten extra axes or add a batch axis with x[None]."
            )
    if jnp.shape(image_embeds) != jnp.shape(text_embeds):
        raise ValueError(
            f"image_embeds and text_embeds must have the same [batch, dim] shape, got "
            f"{jnp.shape(image_embeds)} and {jnp.shape(text_embeds)}; pair row i of one with row i of the "
            "other and project both to the same width."
        )
    dtype = jnp.promote_types(jnp.result_type(image_embeds, text_embeds), jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {dtype}.")
    return jnp.asarray(image_embeds, dtype), jnp.asarray(text_embeds, dtype)


def _check_scalar(name, x, dtype):
    if jnp.size(x) != 1:
        raise ValueError(
            f"{name} must be a scalar (shape () or (1,)), got shape {jnp.shape(x)}; "
            "use one learned temperature/bias for the whole batch."
        )
    return jnp.reshape(jnp.asarray(x, dtype), ())


def _axis_size_and_index(axis_name):
    return lax.axis_size(axis_name), lax.axis_index(axis_name)


# -------------------------------------------------------------------------------------- classification


def _check_labels(logits, labels, where):
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of logits without its class axis: logits {logits.shape} needs "
            f"labels {logits.shape[:-1]}, got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if where is not None and jnp.shape(where) != labels.shape:
        raise ValueError(
            f"where must have the shape of labels {labels.shape} (one weight per example, 1 = counted), "
            f"got {jnp.shape(where)}."
        )
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), labels


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0, where=None):
    """Mean softmax cross-entropy of integer labels, with optional label smoothing and example weights.

    ``loss = mean_i -sum_c t_ic log softmax(logits_i)_c`` with ``t_i = (1 - eps) onehot(labels_i) + eps / C``;
    with ``where`` (weights ``m_i``, e.g. a 0/1 mask of the examples that count), ``sum_i m_i l_i / max(sum_i m_i,
    1)``. This is the training loss of the classification tasks.

    Args:
      logits: ``[..., C]`` unnormalised class scores.
      labels: ``[...]`` integer class indices in ``[0, C)``.
      label_smoothing: ``eps`` in ``[0, 1)``.
      where: optional ``[...]`` weights (same shape as ``labels``).

    Returns:
      Scalar mean loss (float32 or wider).

    >>> import jax.numpy as jnp
    >>> float(softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log 4
    1.3862943649291992
    >>> logits = jnp.array([[0.0, 0.0], [5.0, 0.0]])
    >>> float(softmax_cross_entropy(logits, jnp.array([1, 0]), where=jnp.array([1.0, 0.0])))  # the first row: log 2
    0.6931471824645996
    """
    logits, labels = _check_labels(logits, labels, where)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=logits.dtype), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    if where is None:
        return jnp.mean(per_example)
    return jnp.sum(per_example * where) / jnp.maximum(jnp.sum(where), 1.0)


def softmax_cross_entropy_sum(logits, labels, where=None):
    """Sum over examples of the softmax cross-entropy of integer labels (no smoothing), weighted by ``where``.

    ``sum_i m_i (logsumexp(logits_i) - logits_i[labels_i])``: what evaluation adds up over batches before dividing
    by the number of real examples (``where`` = the mask of real, non-padding examples). The per-example value is
    computed as log-sum-exp minus the label's logit (``optax.softmax_cross_entropy_with_integer_labels``), which
    equals :func:`softmax_cross_entropy`'s at ``eps = 0`` up to float round-off.

    Args:
      logits: ``[..., C]`` unnormalised class scores.
      labels: ``[...]`` integer class indices in ``[0, C)``.
      where: optional ``[...]`` weights (same shape as ``labels``); ``None`` counts every example.

    Returns:
      Scalar sum (float32 or wider).

    >>> import jax.numpy as jnp
    >>> float(softmax_cross_entropy_sum(jnp.zeros((3, 2)), jnp.array([0, 1, 1]), where=jnp.array([1.0, 1.0, 0.0])))
    1.3862943649291992
    """
    logits, labels = _check_labels(logits, labels, where)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per_example) if where is None else jnp.sum(per_example * where)


# ------------------------------------------------------------------------------------------- softmax


def _softmax_rows_sum(queries, keys, scale, row_offset):
    """Sum over rows of CE(scale * q @ k.T, row_offset + row), i.e. one row block of the CLIP loss."""
    logits = scale * (queries @ keys.T)  # [b, B]
    labels = row_offset + jnp.arange(queries.shape[0])
    logz = jax.nn.logsumexp(logits, axis=-1)
    positive = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.sum(logz - positive)


def softmax_contrastive_loss(image_embeds, text_embeds, logit_scale, axis_name=None):
    """CLIP's symmetric contrastive loss, averaged over the global batch.

    With ``s = exp(logit_scale)`` and ``L = s * I @ T.T`` (``[B, B]``, row ``i`` = image ``i`` against all
    texts), the loss is::

        loss = ( sum_i CE(L[i, :], i) + sum_j CE(L[:, j], j) ) / (2 B),   CE(z, k) = logsumexp(z) - z_k

    Args:
      image_embeds: ``[b, dim]`` L2-normalised image embeddings (the local shard under ``axis_name``).
      text_embeds: ``[b, dim]`` L2-normalised text embeddings; row ``i`` is the caption of image ``i``.
      logit_scale: scalar log-temperature; the logits are multiplied by ``exp(logit_scale)``.
      axis_name: ``None`` for global arrays (one device or ``jit`` with shardings), or the name of the
        ``pmap``/``shard_map`` axis the batch is split over; negatives then come from every shard.

    Returns:
      Scalar loss of the global batch (``B = b * axis_size``), identical on every device.

    >>> import jax.numpy as jnp
    >>> e = jnp.eye(3)
    >>> round(float(softmax_contrastive_loss(e, e, jnp.log(10.0))), 6)  # -log(e^10 / (e^10 + 2))
    9.1e-05
    """
    img, txt = _check_pair(image_embeds, text_embeds)
    scale = jnp.exp(_check_scalar("logit_scale", logit_scale, img.dtype))
    if axis_name is None:
        total = _softmax_rows_sum(img, txt, scale, 0) + _softmax_rows_sum(txt, img, scale, 0)
        return total / (2 * img.shape[0])
    size, index = _axis_size_and_index(axis_name)
    all_img = lax.all_gather(img, axis_name, tiled=True)  # [B, dim]
    all_txt = lax.all_gather(txt, axis_name, tiled=True)
    offset = index * img.shape[0]
    local = _softmax_rows_sum(img, all_txt, scale, offset) + _softmax_rows_sum(txt, all_img, scale, offset)
    return lax.psum(local, axis_name) / (2 * img.shape[0] * size)


# ------------------------------------------------------------------------------------------- sigmoid


def _sigmoid_block_sum(img, txt, scale, bias, row_offset, col_offset):
    """sum_{i,j} -log sigmoid(z_ij (scale img_i . txt_j + bias)) over one block, z = +1 where i == j."""
    logits = scale * (img @ txt.T) + bias
    rows = row_offset + jnp.arange(img.shape[0])[:, None]
    cols = col_offset + jnp.arange(txt.shape[0])[None, :]
    sign = jnp.where(rows == cols, 1.0, -1.0).astype(logits.dtype)
    return -jnp.sum(jax.nn.log_sigmoid(sign * logits))


def _sigmoid_chunked_sum(img, txt, scale, bias, row_offset, col_offset, chunk_size):
    """Block sum over text chunks of ``chunk_size`` rows; each step is rematerialised in the backward pass,
    so neither pass holds more than ``[b, chunk_size]`` logits."""
    n = txt.shape[0]
    chunk = min(chunk_size, n)
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    txt_padded = jnp.pad(txt, ((0, pad), (0, 0))).reshape(num_chunks, chunk, txt.shape[1])
    valid = (jnp.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk)

    @jax.checkpoint
    def step(carry, xs):
        k, block, mask = xs
        logits = scale * (img @ block.T) + bias  # [b, chunk]
        rows = row_offset + jnp.arange(img.shape[0])[:, None]
        cols = col_offset + k * chunk + jnp.arange(chunk)[None, :]
        sign = jnp.where(rows == cols, 1.0, -1.0).astype(logits.dtype)
        terms = jnp.where(mask[None, :], -jax.nn.log_sigmoid(sign * logits), 0.0)
        return carry, jnp.sum(terms)

    # Per-chunk sums as scan outputs (not a carry), so the body's types never depend on the shard_map axis.
    _, sums = lax.scan(step, None, (jnp.arange(num_chunks), txt_padded, valid))
    return jnp.sum(sums)


def sigmoid_contrastive_loss(image_embeds, text_embeds, logit_scale, logit_bias, axis_name=None, chunk_size=None):
    """SigLIP's pairwise sigmoid loss, averaged over the images of the global batch.

    With ``s = exp(logit_scale)``, ``l_ij = s * img_i . txt_j + logit_bias`` and ``z_ij = +1`` if ``i == j``
    (a matching pair) else ``-1``, the loss is (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training", Algorithm 1: summed over all texts for each image, averaged over the images)::

        loss = -(1 / B) * sum_{i=1..B} sum_{j=1..B} log sigmoid(z_ij * l_ij)

    Args:
      image_embeds: ``[b, dim]`` L2-normalised image embeddings (the local shard under ``axis_name``).
      text_embeds: ``[b, dim]`` L2-normalised text embeddings; row ``i`` is the caption of image ``i``.
      logit_scale: scalar log-temperature (SigLIP initialises it to ``log 10``).
      logit_bias: scalar bias (SigLIP initialises it to ``-10``).
      axis_name: ``None`` for global arrays, or the ``pmap``/``shard_map`` axis the batch is split over.
      chunk_size: if given, the texts are visited in chunks of this many rows (the last one masked when it
        does not divide the batch), each step rematerialised in the backward pass, so at most
        ``[b, chunk_size]`` logits exist at once. Under ``axis_name`` the text shards also travel round the
        device ring with ``lax.ppermute`` instead of being gathered (SigLIP's chunked implementation): the
        forward pass holds one foreign text shard at a time, and the backward pass keeps only the ``[B, dim]``
        shards it received (never a ``[b, B]`` logit block).

    Returns:
      Scalar loss of the global batch, identical on every device.

    >>> import jax.numpy as jnp
    >>> e = jnp.eye(2)
    >>> round(float(sigmoid_contrastive_loss(e, e, 0.0, 0.0)), 6)  # log(1 + e^-1) + log 2
    1.006409
    """
    img, txt = _check_pair(image_embeds, text_embeds)
    scale = jnp.exp(_check_scalar("logit_scale", logit_scale, img.dtype))
    bias = _check_scalar("logit_bias", logit_bias, img.dtype)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    b = img.shape[0]
    if axis_name is None:
        if chunk_size is None:
            total = _sigmoid_block_sum(img, txt, scale, bias, 0, 0)
        else:
            total = _sigmoid_chunked_sum(img, txt, scale, bias, 0, 0, chunk_size)
        return total / b
    size, index = _axis_size_and_index(axis_name)
    row_offset = index * b
    if chunk_size is None:
        all_txt = lax.all_gather(txt, axis_name, tiled=True)  # [B, dim]
        local = _sigmoid_block_sum(img, all_txt, scale, bias, row_offset, 0)
    else:
        # Ring: at step k this device holds the text shard of device (index + k) mod size.
        perm = [(d, (d - 1) % size) for d in range(size)]

        def block(shard, k):
            owner = (index + k) % size
            return _sigmoid_chunked_sum(img, shard, scale, bias, row_offset, owner * b, chunk_size)

        def ring_step(shard, k):
            shard = lax.ppermute(shard, axis_name, perm)
            return shard, block(shard, k)

        _, sums = lax.scan(ring_step, txt, jnp.arange(1, size))
        local = block(txt, 0) + jnp.sum(sums)
    return lax.psum(local, axis_name) / (b * size)
