"""Open-vocabulary detection with a CLIP image tower, as OWL-ViT (Minderer et al. 2022) builds it.

Every patch token of CLIP's image tower becomes one box prediction, scored against text queries embedded by CLIP's
text tower::

    x = post_norm(vision(images).encoded)                [B, 1 + P, W]   (CLIP's post_norm on every token)
    t = merge_norm(x[:, 1:] * x[:, :1])                  [B, P, W]       (class token merged: multiply + LayerNorm)
    box = sigmoid(box_head(t) + box_bias)                [B, P, 4]       normalised (cx, cy, w, h) in [0, 1]
    c = class_proj(t) / |.|,   q = text(queries) / |.|   [B, P, D], [(B,) Q, D]
    logits = (c q^T + shift(t)) * (elu(scale(t)) + 1)    [B, P, Q]       sigmoid(logits) = P(token p shows query q)

``box_head`` is an MLP (Dense W, GELU, Dense W, GELU, Dense 4); ``box_bias`` centres each token's box on its own grid
cell: ``logit((i + 0.5) / g)`` for the centre of cell ``i`` of a ``g x g`` grid and ``logit(1 / g)`` for the size, so
an untrained head predicts the cell itself (OWL-ViT's bias uses the cell's corner; the centre is where the token's
receptive field is). ``shift`` and ``scale`` are per-token Dense layers to one number; ``shift``'s bias starts at
``log(p / (1 - p))`` with the prior ``p = 0.01``, so every query starts unlikely (RetinaNet's prior, OWL-ViT's
``prior_prob``). Queries are any text: their ids go through the CLIP text tower and ``text_projection``.

Parameter tree::

    clip/...                         exactly mmjax.clip.CLIP's tree: a trained CLIP's params drop in
    merge_norm/{scale,bias}          [W]
    class_head/dense0/{kernel,bias}  [W, D]      (D = CLIP's embed_dim)
    class_head/logit_shift/...       [W, 1]
    class_head/logit_scale/...       [W, 1]
    box_head/dense{0,1,2}/...        [W, W], [W, W], [W, 4]

>>> import jax, jax.numpy as jnp
>>> model = OWLViT("tiny")
>>> images, queries = jnp.zeros((2, 16, 16, 3)), jnp.array([[1, 5, 63, 0], [1, 63, 0, 0]], jnp.int32)
>>> params = model.init(jax.random.key(0), images, queries)["params"]
>>> out = model.apply({"params": params}, images, queries)
>>> out.logits.shape, out.boxes.shape  # 4 tokens (16 px, patch 8) x 2 queries
((2, 4, 2), (2, 4, 4))
>>> sorted(params)
['box_head', 'class_head', 'clip', 'merge_norm']
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmjax import boxes as bx
from mmjax.clip import CLIP, as_config
from mmjax.layer_norm import normalize
from mmjax.matching import assign_targets

__all__ = [
    "OWLViT",
    "ClassHead",
    "BoxHead",
    "DetectionOutput",
    "box_bias",
    "matching_cost",
    "detection_loss",
    "LOSS_DEFAULTS",
    "PRIOR_PROB",
]

Array = jax.Array

#: The initial probability of every (token, query) pair (OWL-ViT's ``prior_prob``).
PRIOR_PROB = 0.01


def _logit(p):
    return jnp.log(p) - jnp.log1p(-p)


ANCHORS = ("centre", "corner")


def box_bias(grid: int, dtype=jnp.float32, anchor: str = "centre") -> Array:
    """``[grid * grid, 4]`` logits that put each token's box on its own cell of a ``g x g`` grid, row-major.

    ``anchor="centre"``: ``logit((j + 0.5) / g)``, ``logit((i + 0.5) / g)`` for the centre (x, then y) of cell
    ``(i, j)`` and ``logit(1 / g)`` for width and height (``sigmoid`` of the bias is the cell's box; ``1 / g`` is
    clipped to ``1 - 1e-4`` for ``g = 1``). ``anchor="corner"``: OWL-ViT's bias (scenic, Hugging Face): the cell's
    bottom-right corner ``c = ((j + 1) / g, (i + 1) / g)`` and size ``1 / g`` through
    ``log(c + 1e-4) - log1p(-c + 1e-4)``.

    >>> import numpy as np
    >>> np.asarray(jax.nn.sigmoid(box_bias(2))).round(3).tolist()
    [[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]
    >>> np.asarray(jax.nn.sigmoid(box_bias(2, anchor="corner"))).round(3)[0].tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    if int(grid) < 1:
        raise ValueError(f"grid must be a positive int (tokens per side), got {grid!r}.")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor={anchor!r} is not valid; choose one of {ANCHORS}.")
    if anchor == "corner":
        corner = jnp.arange(1, grid + 1, dtype=dtype) / grid
        cy, cx = jnp.meshgrid(corner, corner, indexing="ij")
        xy = jnp.clip(jnp.stack([cx.ravel(), cy.ravel()], axis=-1), 0.0, 1.0)
        size = jnp.full((grid * grid, 2), 1.0 / grid, dtype)
        eps_logit = lambda v: jnp.log(v + 1e-4) - jnp.log1p(-v + 1e-4)  # noqa: E731
        return jnp.concatenate([eps_logit(xy), eps_logit(size)], axis=-1)
    centres = (jnp.arange(grid, dtype=dtype) + 0.5) / grid
    cy, cx = jnp.meshgrid(centres, centres, indexing="ij")
    size = jnp.full((grid * grid, 2), min(1.0 / grid, 1.0 - 1e-4), dtype)
    return _logit(jnp.concatenate([jnp.stack([cx.ravel(), cy.ravel()], axis=-1), size], axis=-1))


@flax.struct.dataclass
class DetectionOutput:
    """What :class:`OWLViT` returns (a pytree).

    Attributes:
      logits: ``[B, P, Q]`` per (token, query) logits; ``sigmoid`` gives the probability that token ``p``'s box
        shows query ``q``. Masked-out queries hold ``finfo.min``.
      boxes: ``[B, P, 4]`` normalised ``(cx, cy, w, h)`` in ``[0, 1]`` (multiply by the image size for pixels).
      class_embeds: ``[B, P, D]`` the tokens' unit-norm class embeddings (in the text embedding space).
      query_embeds: ``[(B,) Q, D]`` the unit-norm query embeddings.
      tokens: ``[B, P, W]`` the merged, normalised image tokens the heads read.

    >>> out = DetectionOutput(*(jnp.zeros(1),) * 5)
    >>> out.logits.shape
    (1,)
    """

    logits: Array
    boxes: Array
    class_embeds: Array
    query_embeds: Array
    tokens: Array


def _unit(v: Array) -> Array:
    return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


class ClassHead(nn.Module):
    """OWL-ViT's class head: ``logits = (unit(dense0(t)) . unit(q) + logit_shift(t)) * (elu(logit_scale(t)) + 1)``.

    Tokens ``t [B, P, W]``, query embeddings ``q [Q, D]`` or ``[B, Q, D]``, optional ``query_mask [(B,) Q]``;
    returns ``(logits [B, P, Q], unit class embeddings [B, P, D], unit queries)`` in float32 (or wider).

    >>> head = ClassHead(embed_dim=4)
    >>> t, q = jnp.ones((1, 3, 8)), jnp.ones((2, 4))
    >>> logits, c, qn = head.apply(head.init(jax.random.key(0), t, q), t, q)
    >>> logits.shape, bool(jnp.all(jax.nn.sigmoid(logits) < 0.5))
    ((1, 3, 2), True)
    """

    embed_dim: int
    prior_prob: float = PRIOR_PROB
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, query_embeds: Array, query_mask: Array | None = None):
        dense = lambda n, name, **kw: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)  # noqa: E731
        b = tokens.shape[0]
        q = jnp.asarray(query_embeds)
        if q.ndim not in (2, 3) or q.shape[-1] != self.embed_dim or (q.ndim == 3 and q.shape[0] != b):
            raise ValueError(
                f"OWLViT: query embeddings must be [Q, {self.embed_dim}] or [{b}, Q, {self.embed_dim}] "
                f"(one set per image), got {q.shape}."
            )
        wide = jnp.promote_types(tokens.dtype, jnp.float32)
        c = _unit(dense(self.embed_dim, "dense0")(tokens).astype(wide))
        qn = _unit(q.astype(wide))
        sim = jnp.einsum("bpd,qd->bpq", c, qn) if qn.ndim == 2 else jnp.einsum("bpd,bqd->bpq", c, qn)
        prior = math.log(self.prior_prob / (1.0 - self.prior_prob))
        shift = dense(1, "logit_shift", bias_init=nn.initializers.constant(prior))(tokens).astype(wide)
        scale = nn.elu(dense(1, "logit_scale")(tokens).astype(wide)) + 1.0
        logits = (sim + shift) * scale
        if query_mask is not None:
            mask = jnp.asarray(query_mask, bool)
            if mask.shape != qn.shape[:-1]:
                raise ValueError(
                    f"OWLViT: query_mask must have shape {qn.shape[:-1]} (one per query), got {mask.shape}."
                )
            logits = jnp.where(mask[None] if mask.ndim == 1 else mask[:, None, :], logits, jnp.finfo(wide).min)
        return logits, c, qn


class BoxHead(nn.Module):
    """OWL-ViT's box head: ``sigmoid(dense2(gelu(dense1(gelu(dense0(t))))) + box_bias(g))``, tokens ``[B, g*g, W]``
    -> normalised ``(cx, cy, w, h)`` ``[B, g*g, 4]`` in float32 (or wider); exact GELU.

    >>> head = BoxHead(width=8)
    >>> t = jnp.zeros((1, 4, 8))
    >>> import numpy as np
    >>> np.asarray(head.apply(head.init(jax.random.key(0), t), t))[0, 3].round(3).tolist()  # zero tokens: its cell
    [0.75, 0.75, 0.5, 0.5]
    """

    width: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    anchor: str = "centre"

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        p = tokens.shape[-2]
        grid = math.isqrt(p)
        if grid * grid != p:
            raise ValueError(f"OWLViT: the image tower gives {p} tokens, not a square grid; boxes need a g x g grid.")
        h = tokens
        for i in range(2):
            h = nn.gelu(
                nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense{i}")(h),
                approximate=False,
            )
        raw = nn.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype, name="dense2")(h)
        wide = jnp.promote_types(raw.dtype, jnp.float32)
        return jax.nn.sigmoid(raw.astype(wide) + box_bias(grid, wide, self.anchor))


class OWLViT(nn.Module):
    """CLIP's towers with OWL-ViT's box and class heads on every image token (see the module docstring).

    Attributes:
      config: the CLIP config (a :class:`mmjax.clip.CLIPConfig`, a name in :data:`mmjax.clip.CONFIGS`, a dict).
      dtype, param_dtype: as :class:`mmjax.clip.CLIP`; the heads compute in ``dtype`` and return float32 (or wider).
      prior_prob: initial probability of every (token, query) pair.
      box_anchor: ``"centre"`` (each token's box starts on its cell) or ``"corner"`` (OWL-ViT's bias, as Hugging
        Face's ``OwlViTForObjectDetection``; :func:`box_bias`).

    Methods (``model.apply(..., method=...)``):
      ``__call__(images, query_ids=None, *, query_embeds=None, query_mask=None, train=False)`` ->
        :class:`DetectionOutput`. Queries are ids ``[Q, T]`` (the same for every image) or ``[B, Q, T]`` (one set
        per image) for the text tower, or precomputed ``query_embeds [(B,) Q, D]`` (:meth:`embed_queries`).
        ``query_mask [(B,) Q]`` (True = a real query) sets the logits of padding queries to ``finfo.min``.
      ``embed_queries(query_ids, train=False)`` -> ``[..., D]`` CLIP text features (unnormalised).
      ``image_tokens(images, train=False)`` -> ``[B, P, W]`` the merged tokens.

    >>> model = OWLViT("tiny")
    >>> images, ids = jnp.zeros((1, 16, 16, 3)), jnp.ones((2, 3, 4), jnp.int32)
    >>> params = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), ids)["params"]
    >>> q = model.apply({"params": params}, ids[0], method="embed_queries")
    >>> model.apply({"params": params}, images, query_embeds=q).logits.shape
    (1, 4, 3)
    """

    config: Any = "ViT-B/32"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    prior_prob: float = PRIOR_PROB
    box_anchor: str = "centre"

    def setup(self):
        cfg = as_config(self.config)
        self.cfg = cfg
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"OWLViT: prior_prob must lie in (0, 1), got {self.prior_prob!r}.")
        self.clip = CLIP(cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        self.merge_norm = nn.LayerNorm(
            epsilon=cfg.vision_layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="merge_norm"
        )
        self.class_head = ClassHead(cfg.embed_dim, self.prior_prob, self.dtype, self.param_dtype)
        self.box_head = BoxHead(cfg.vision_width, self.dtype, self.param_dtype, self.box_anchor)

    def image_tokens(self, images: Array, train: bool = False) -> Array:
        """``[B, P, W]``: CLIP's image tokens after ``post_norm``, the class token merged in (see the module
        docstring)."""
        images = jnp.asarray(images)
        self.clip._check_images(images)
        pooled, aux = self.clip.vision(images, train=train)
        if self.is_initializing():  # CLIP's whole tree, so that a trained CLIP's params drop in (and come back out)
            self.clip.visual_projection(pooled)
        x = aux["encoded"]
        post = self.clip.vision.variables["params"]["post_norm"]
        x = normalize(x, self.cfg.vision_layer_norm_eps) * post["scale"].astype(x.dtype) + post["bias"].astype(x.dtype)
        return self.merge_norm(x[:, 1:] * x[:, :1])

    def embed_queries(self, query_ids: Array, train: bool = False) -> Array:
        """Query ids ``[..., T]`` -> CLIP text features ``[..., D]`` (``text_projection`` of the pooled token, as
        :meth:`mmjax.clip.CLIP.encode_text`), float32 or wider."""
        ids = jnp.asarray(query_ids)
        if ids.ndim < 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"OWLViT: query ids must be int [Q, T] or [B, Q, T], got {ids.dtype} {ids.shape}.")
        pooled, _ = self.clip.text(ids.reshape(-1, ids.shape[-1]), None, train=train)
        feats = self.clip.text_projection(pooled)  # CLIP's encode_text, but float64 stays float64
        return feats.astype(jnp.promote_types(feats.dtype, jnp.float32)).reshape(*ids.shape[:-1], -1)

    def __call__(
        self,
        images: Array,
        query_ids: Array | None = None,
        *,
        query_embeds: Array | None = None,
        query_mask: Array | None = None,
        train: bool = False,
    ) -> DetectionOutput:
        if (query_ids is None) == (query_embeds is None):
            raise ValueError("OWLViT: give exactly one of query_ids ([Q, T] or [B, Q, T]) and query_embeds.")
        tokens = self.image_tokens(images, train=train)
        if query_embeds is None:
            query_embeds = self.embed_queries(query_ids, train=train)
        logits, class_embeds, query_embeds = self.class_head(tokens, query_embeds, query_mask)
        return DetectionOutput(
            logits=logits,
            boxes=self.box_head(tokens),
            class_embeds=class_embeds,
            query_embeds=query_embeds,
            tokens=tokens,
        )


#: OWL-ViT's loss weights and focal parameters (scenic ``owl_vit/configs/clip_b32.py``).
LOSS_DEFAULTS = dict(class_weight=1.0, bbox_weight=1.0, giou_weight=1.0, focal_alpha=0.3, focal_gamma=2.0)


def _focal_terms(logits, alpha, gamma):
    """Per (token, query): the focal loss if the query were a positive, and if it were a negative."""
    p = jax.nn.sigmoid(logits)
    pos = alpha * (1.0 - p) ** gamma * -jax.nn.log_sigmoid(logits)
    neg = (1.0 - alpha) * p**gamma * -jax.nn.log_sigmoid(-logits)
    return pos, neg


def matching_cost(
    logits,
    boxes,
    targets,
    target_boxes,
    query_mask=None,
    *,
    class_weight=1.0,
    bbox_weight=1.0,
    giou_weight=1.0,
    focal_alpha=0.3,
    focal_gamma=2.0,
):
    """DETR-style matching cost ``[B, P, K]`` of every prediction against every ground-truth box::

        C = class_weight * C_class + bbox_weight * |b_p - b_k|_1 - giou_weight * GIoU(b_p, b_k)
        C_class[p, k] = mean over the queries q that box k answers of (focal_pos[p, q] - focal_neg[p, q])

    with ``focal_pos = alpha (1 - s)^gamma (-log s)``, ``focal_neg = (1 - alpha) s^gamma (-log(1 - s))``,
    ``s = sigmoid(logits)`` (Deformable DETR's focal cost, averaged over a box's labels as OWL-ViT's multi-label
    targets give several per box); boxes are normalised ``(cx, cy, w, h)``, GIoU on their corners.

    Args:
      logits: ``[B, P, Q]``; boxes: ``[B, P, 4]``; targets: ``[B, K, Q]`` 1 where box ``k`` answers query ``q``;
      target_boxes: ``[B, K, 4]``; query_mask: ``[B, Q]`` (padding queries count for no box).

    >>> import numpy as np
    >>> b = jnp.array([[[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]])
    >>> cost = matching_cost(jnp.zeros((1, 2, 1)), b, jnp.ones((1, 1, 1)), b[:, 1:])
    >>> np.asarray(cost[0, :, 0], np.float64).round(3).tolist()  # the second prediction is the box itself
    [1.431, -1.069]
    """
    pos, neg = _focal_terms(logits, focal_alpha, focal_gamma)
    t = targets.astype(pos.dtype)
    if query_mask is not None:
        t = t * query_mask[:, None, :].astype(pos.dtype)
    c_class = jnp.einsum("bpq,bkq->bpk", pos - neg, t) / jnp.maximum(t.sum(-1), 1.0)[:, None, :]
    c_bbox = jnp.abs(boxes[:, :, None, :] - target_boxes[:, None, :, :]).sum(-1)
    corners = bx.cxcywh_to_xyxy
    c_giou = -bx.pairwise_giou(corners(boxes), corners(target_boxes))  # [B, P, K]
    return class_weight * c_class + bbox_weight * c_bbox + giou_weight * c_giou


def detection_loss(
    logits,
    boxes,
    targets,
    target_boxes,
    target_valid,
    query_mask=None,
    *,
    class_weight=1.0,
    bbox_weight=1.0,
    giou_weight=1.0,
    focal_alpha=0.3,
    focal_gamma=2.0,
    matcher="jax",
):
    """OWL-ViT's loss: Hungarian matching of predictions to ground truth per image, then sigmoid focal loss on every
    (token, query) pair, L1 and GIoU on the matched boxes, each normalised by the image's number of boxes::

        a = assign_targets(C, target_valid)          [B, P]   (C = matching_cost(...), no gradient)
        y[b, p, q] = targets[b, a_p, q] if a_p >= 0 else 0
        L_b = ( class_weight * sum_pq focal(logits, y) + sum_{p: a_p >= 0} (bbox_weight |b_p - t_{a_p}|_1
              + giou_weight (1 - GIoU(b_p, t_{a_p}))) ) / max(1, #boxes_b)
        loss = mean_b L_b

    Args:
      logits: ``[B, P, Q]`` from :class:`OWLViT` (unmasked; padding queries are dropped through ``query_mask``).
      boxes: ``[B, P, 4]`` predicted normalised ``(cx, cy, w, h)``.
      targets: ``[B, K, Q]`` 1 where ground-truth box ``k`` answers query ``q`` (several queries may name a box:
        "a red sneaker" and "a sneaker").
      target_boxes: ``[B, K, 4]`` normalised ``(cx, cy, w, h)``; target_valid: ``[B, K]`` False for padding.
      query_mask: ``[B, Q]`` False for padding queries (None: all real).
      class_weight, bbox_weight, giou_weight, focal_alpha, focal_gamma: :data:`LOSS_DEFAULTS` (OWL-ViT's).
      matcher: ``"jax"`` or ``"scipy"`` (:func:`mmjax.matching.assign_targets`).

    Returns:
      ``(loss, {"class_loss", "bbox_loss", "giou_loss": [B] per image, "assigned": [B, P]})``.

    >>> b = jnp.array([[[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]])
    >>> loss, aux = detection_loss(jnp.zeros((1, 2, 1)), b, jnp.ones((1, 1, 1)), b[:, 1:], jnp.ones((1, 1), bool))
    >>> aux["assigned"].tolist(), float(aux["bbox_loss"][0]), float(aux["giou_loss"][0])
    ([[-1, 0]], 0.0, 0.0)
    """
    logits = jnp.asarray(logits)
    wide = jnp.promote_types(logits.dtype, jnp.float32)
    logits, boxes = logits.astype(wide), jnp.asarray(boxes).astype(wide)
    targets, target_boxes = jnp.asarray(targets).astype(wide), jnp.asarray(target_boxes).astype(wide)
    valid = jnp.asarray(target_valid, bool)
    b, p, q = logits.shape
    k = targets.shape[1]
    want = {"boxes": (b, p, 4), "targets": (b, k, q), "target_boxes": (b, k, 4), "target_valid": (b, k)}
    for name, value in (
        ("boxes", boxes),
        ("targets", targets),
        ("target_boxes", target_boxes),
        ("target_valid", valid),
    ):
        if value.shape != want[name]:
            raise ValueError(
                f"detection_loss: {name} must have shape {want[name]} (logits {logits.shape}), got {value.shape}."
            )
    qmask = jnp.ones((b, q), bool) if query_mask is None else jnp.asarray(query_mask, bool)
    if qmask.shape != (b, q):
        raise ValueError(f"detection_loss: query_mask must have shape {(b, q)}, got {qmask.shape}.")
    weights = dict(class_weight=class_weight, bbox_weight=bbox_weight, giou_weight=giou_weight)
    focal = dict(focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    cost = matching_cost(*jax.lax.stop_gradient((logits, boxes)), targets, target_boxes, qmask, **weights, **focal)
    assigned = jax.lax.stop_gradient(assign_targets(cost, valid, method=matcher))  # [B, P]
    matched = assigned >= 0
    index = jnp.maximum(assigned, 0)
    y = jnp.take_along_axis(targets, index[..., None], axis=1) * matched[..., None]  # [B, P, Q]
    per_pair = bx.sigmoid_focal_loss(logits, y, alpha=focal_alpha, gamma=focal_gamma)
    num_boxes = jnp.maximum(valid.sum(-1), 1).astype(wide)
    class_loss = jnp.where(qmask[:, None, :], per_pair, 0.0).sum((1, 2)) / num_boxes
    t = jnp.take_along_axis(target_boxes, index[..., None], axis=1)  # [B, P, 4]
    l1 = jnp.where(matched, jnp.abs(boxes - t).sum(-1), 0.0).sum(-1) / num_boxes
    corners = bx.cxcywh_to_xyxy
    g = jnp.where(matched, 1.0 - bx.giou(corners(boxes), corners(t)), 0.0).sum(-1) / num_boxes
    per_image = class_weight * class_loss + bbox_weight * l1 + giou_weight * g
    return per_image.mean(), {"class_loss": class_loss, "bbox_loss": l1, "giou_loss": g, "assigned": assigned}
