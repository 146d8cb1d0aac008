"""Image-text matching models that fuse the two modalities: over one graph of patches and words
(:class:`GraphFusion`), or by attention over the concatenated tokens (:class:`CrossAttentionMatcher`).

Both read an image ``[B, S, S, C]`` (normalised floats) and a caption ``int [B, L]`` (word ids, 0 = padding) and
return a match logit ``[B]`` (``sigmoid(logit)`` = P(the caption describes the image)), as the image-text matching
heads of ALBEF / BLIP do. They share the two encoders:

* :class:`PatchEncoder`: a conv stem (3x3 stride-2 convs, :class:`mmjax.vit.StemConv`) to a ``gh x gw`` grid,
  ``Dense(width)`` and a learned 2-D position embedding: ``[B, P, width]``.
* :class:`WordEncoder`: ``Embed(vocab, width)`` plus a learned position embedding: ``[B, L, width]``.

:class:`GraphFusion` puts the patches, the words and a global node into one graph per pair
(:mod:`mmjax.multimodal_graph`), adds a node-type embedding, and runs ``depth`` residual blocks::

    h = h + Dense(Conv(LN(h)))        Conv: TransformerConv (dot-product attention along the edges, edge-type
    h = h + MLP(LN(h))                      embeddings added to keys and values; no skip term: the residual is one),
                                            GATConv (edge types in the attention) or RGCNConv (a relation per type)

recomputing the feature-space kNN edges (and the ``k``-most-similar patch-word edges) from the current patch and
word states before each block. Readout: the global node (or gated attention pooling over the real nodes), then
``LN`` and ``Dense(1)``. ``patch_word="none"`` removes the patch-word edges: the two modalities then meet only in
the global node (late fusion).

:class:`CrossAttentionMatcher` is the transformer baseline: ``[global token, patches, words]`` (plus type
embeddings) through a pre-LN encoder in which every token attends to every real token (padding words are masked
as keys), the global token read out the same way.

Output convention (every mmjax model): ``(logits [B], intermediates)``; :class:`GraphFusion`'s intermediates hold
``"patch_word_attention"`` ``[depth, B, L, P]``: the attention (mean over heads) of each word over the patches
in each block (rows of padding words are 0; all 0 for RGCN, which has no attention).

>>> import jax, numpy as np
>>> m = GraphFusion(vocab_size=20, context_length=4, image_size=16, stem_features=(8, 8), width=16, depth=1,
...                 heads=2, mlp_dim=32, knn=2)
>>> images, ids = np.zeros((2, 16, 16, 3), np.float32), np.array([[2, 5, 6, 3], [2, 7, 3, 0]])
>>> params = m.init(jax.random.key(0), images, ids)["params"]
>>> logits, aux = m.apply({"params": params}, images, ids)
>>> logits.shape, aux["patch_word_attention"].shape
((2,), (1, 2, 4, 16))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import gnn, segment
from mmjax.graph import Graph
from mmjax.layers import Encoder, EncoderConfig, Mlp
from mmjax.multimodal_graph import EDGE_TYPES, NODE_TYPES, JointGraphLayout, build_joint_graph, joint_edges
from mmjax.vit import StemConv

__all__ = [
    "PatchEncoder",
    "WordEncoder",
    "UnimodalEmbeddings",
    "GraphFusion",
    "CrossAttentionMatcher",
    "check_inputs",
    "CONVS",
    "READOUTS",
]

CONVS = ("transformer", "gat", "rgcn")
READOUTS = ("global", "attention")
_POS_INIT = nn.initializers.normal(0.02)


def check_inputs(images, ids, image_size: int, context_length: int, channels: int | None = None) -> None:
    """Raises ``ValueError`` naming the value when ``images`` is not ``float [B, S, S, C]`` with ``S = image_size``
    or ``ids`` is not ``int [B, context_length]``.

    >>> check_inputs(np.zeros((1, 8, 8, 3)), np.zeros((1, 4), int), 8, 4)  # valid: returns None
    >>> check_inputs(np.zeros((1, 9, 9, 3)), np.zeros((1, 4), int), 8, 4)
    Traceback (most recent call last):
    ...
    ValueError: images must be [B, 8, 8, C] (image_size=8), got shape (1, 9, 9, 3); resize the images or set image_size.
    """
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[1:3] != (image_size, image_size) or (channels and shape[3] != channels):
        c = channels or "C"
        raise ValueError(
            f"images must be [B, {image_size}, {image_size}, {c}] (image_size={image_size}), got shape {shape}; "
            "resize the images or set image_size."
        )
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise ValueError(f"images must be floating point (normalised), got dtype {jnp.result_type(images)}.")
    ids_shape = tuple(np.shape(ids))
    if len(ids_shape) != 2 or ids_shape[0] != shape[0] or ids_shape[1] != context_length:
        raise ValueError(
            f"ids must be int [B={shape[0]}, context_length={context_length}], got shape {ids_shape}; tokenize "
            f"with context_length={context_length} (captions longer than that do not fit)."
        )
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"ids must be integer word ids, got dtype {jnp.result_type(ids)}.")


class PatchEncoder(nn.Module):
    """Conv stem + ``Dense(width)`` + learned 2-D position embedding: ``[B, S, S, C] -> [B, gh * gw, width]``
    (``len(stem_features)`` stride-2 convs with GELU take ``S`` to ``ceil(S / 2 ** k)``).

    Params: ``stem_conv_{i}/{kernel,bias}``, ``embedding/{kernel,bias}``, ``pos_embedding [gh * gw, width]``.

    >>> import jax, numpy as np
    >>> enc = PatchEncoder(width=8, stem_features=(4, 4))
    >>> enc.apply(enc.init(jax.random.key(0), np.zeros((1, 12, 12, 3))), np.zeros((1, 12, 12, 3))).shape
    (1, 9, 8)
    """

    width: int
    stem_features: tuple[int, ...] = (32, 64, 96)
    dtype: Any = None

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images)
        for i, f in enumerate(self.stem_features):
            x = nn.gelu(StemConv(f, dtype=self.dtype, param_dtype=x.dtype, name=f"stem_conv_{i}")(x), approximate=False)
        b, gh, gw, _ = x.shape
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=x.dtype, name="embedding")(x).reshape(b, gh * gw, -1)
        return x + self.param("pos_embedding", _POS_INIT, (gh * gw, self.width), x.dtype)


class WordEncoder(nn.Module):
    """Word embedding + learned position embedding: ``int [B, L] -> [B, L, width]``.

    >>> import jax, numpy as np
    >>> enc = WordEncoder(vocab_size=10, width=8)
    >>> enc.apply(enc.init(jax.random.key(0), np.zeros((2, 5), int)), np.zeros((2, 5), int)).shape
    (2, 5, 8)
    """

    vocab_size: int
    width: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab_size, self.width, param_dtype=self.param_dtype, name="token_embedding")(ids)
        return x + self.param("pos_embedding", _POS_INIT, (ids.shape[1], self.width), x.dtype)


class UnimodalEmbeddings(nn.Module):
    """ALBEF's "align before fuse" embeddings: the mean of the patch features and the mean of the real words'
    features, each through ``Dense(embed_dim)`` and L2-normalised, plus a learned ``logit_scale`` (init
    ``log(10)``): ``(image_embed [B, D], text_embed [B, D], logit_scale [])`` for an image-text contrastive loss on
    the encoders' outputs, before the modalities meet.

    >>> import jax, numpy as np
    >>> m = UnimodalEmbeddings(embed_dim=4)
    >>> args = np.ones((2, 9, 8)), np.ones((2, 3, 8)), np.array([[1, 1, 0], [1, 0, 0]], bool)
    >>> img, txt, scale = m.apply(m.init(jax.random.key(0), *args), *args)
    >>> img.shape, txt.shape, round(float(np.linalg.norm(img[0])), 5)
    ((2, 4), (2, 4), 1.0)
    """

    embed_dim: int

    @nn.compact
    def __call__(self, patches, words, word_mask):
        w = word_mask.astype(words.dtype)[..., None]
        text = jnp.sum(words * w, 1) / jnp.maximum(jnp.sum(w, 1), 1)
        image = jnp.mean(patches, 1)
        unit = lambda v: v / jnp.sqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)  # noqa: E731
        img = unit(nn.Dense(self.embed_dim, param_dtype=patches.dtype, name="image_projection")(image))
        txt = unit(nn.Dense(self.embed_dim, param_dtype=patches.dtype, name="text_projection")(text))
        scale = self.param("logit_scale", nn.initializers.constant(np.log(10.0)), (), patches.dtype)
        return img, txt, scale


def _param_dtype(images):
    t = jnp.result_type(images)
    return t if t == jnp.float64 else jnp.float32  # float64 inputs (tests under x64) give float64 parameters


def _encode(module, images, ids):
    """The shared front of both matchers (called inside their compact ``__call__``): checks, the two encoders and,
    with ``embed_dim``, the unimodal embeddings. Returns ``(param_dtype, ids, patches, words, aux)``."""
    check_inputs(images, ids, module.image_size, module.context_length)
    pdt = _param_dtype(images)
    images, ids = jnp.asarray(images, pdt), jnp.asarray(ids, jnp.int32)
    patches = PatchEncoder(module.width, module.stem_features, module.dtype, name="patches")(images)
    words = WordEncoder(module.vocab_size, module.width, pdt, name="words")(ids)
    aux = {}
    if module.embed_dim:
        aux["image_embed"], aux["text_embed"], aux["logit_scale"] = UnimodalEmbeddings(
            module.embed_dim, name="unimodal"
        )(patches, words, ids != 0)
    return pdt, ids, patches, words, aux


class _Matcher(nn.Module):
    """The fields both matchers share (see :class:`GraphFusion`)."""

    vocab_size: int
    context_length: int = 12
    image_size: int = 48
    stem_features: tuple[int, ...] = (32, 64, 96)
    width: int = 96
    depth: int = 3
    heads: int = 4
    mlp_dim: int = 192
    embed_dim: int = 0
    dtype: Any = None


class GraphFusion(_Matcher):
    """Graph-convolution fusion of image patches and words (see the module docstring for the formula).

    Attributes:
      vocab_size: word ids ``0 .. vocab_size - 1`` (0 = padding).
      context_length: words per caption ``L``.
      image_size: image side ``S``; the grid is ``ceil(S / 2 ** len(stem_features))`` on a side.
      stem_features: channels of the stride-2 stem convs.
      width, depth, heads, mlp_dim: node width, blocks, GAT heads (``width`` divisible by it), MLP hidden width.
      knn: feature-space nearest patches each patch receives from (0: none), recomputed in each block.
      grid_neighbours: 4 or 8.
      patch_word: ``"all"``, ``"none"`` (late fusion) or ``k`` (see :class:`mmjax.multimodal_graph.JointGraphLayout`).
      conv: ``"transformer"`` (:class:`mmjax.gnn.TransformerConv` without its skip term, edge-type embeddings of
        width ``edge_dim`` added to keys and values: a transformer block whose attention follows the graph's edges),
        ``"gat"`` (:class:`mmjax.gnn.GATConv`, edge-type embeddings in the attention) or ``"rgcn"``
        (:class:`mmjax.gnn.RGCNConv` with one relation per edge type, mean aggregation).
      readout: ``"global"`` (the global node's state) or ``"attention"`` (gated attention pooling over real nodes).
      edge_dim: width of the edge-type embedding (transformer, GAT).
      embed_dim: when > 0, also the unimodal embeddings of :class:`UnimodalEmbeddings` (``"image_embed"``,
        ``"text_embed"``, ``"logit_scale"`` in the intermediates) for an auxiliary contrastive loss.
      dtype: compute dtype (``None``: the parameters').

    Call ``apply(variables, images [B, S, S, C] float, ids int [B, L])``; raises ``ValueError`` for other shapes.

    Returns:
      ``(logits [B], {"patch_word_attention": [depth, B, L, P], "nodes": [B * num_nodes, width]})``.

    >>> import jax, numpy as np
    >>> late = GraphFusion(vocab_size=9, context_length=3, image_size=8, stem_features=(4,), width=8, depth=1,
    ...                    heads=1, mlp_dim=8, patch_word="none")
    >>> x, ids = np.zeros((1, 8, 8, 3), np.float32), np.array([[2, 4, 3]])
    >>> logits, aux = late.apply(late.init(jax.random.key(0), x, ids), x, ids)
    >>> float(abs(aux["patch_word_attention"]).sum())  # no patch-word edges
    0.0
    """

    knn: int = 4
    grid_neighbours: int = 4
    patch_word: Any = "all"
    conv: str = "transformer"
    readout: str = "global"
    edge_dim: int = 16

    def layout(self) -> JointGraphLayout:
        """The pair graph's :class:`~mmjax.multimodal_graph.JointGraphLayout` for this model's sizes."""
        g = self.image_size
        for _ in self.stem_features:
            g = -(-g // 2)
        return JointGraphLayout(
            grid=(g, g),
            context_length=self.context_length,
            global_node=True,
            grid_neighbours=self.grid_neighbours,
            knn=self.knn,
            patch_word=self.patch_word,
        )

    @nn.compact
    def __call__(self, images, ids):
        if self.conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {self.conv!r}.")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}.")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}.")
        pdt, ids, patches, words, aux = _encode(self, images, ids)
        layout, word_mask = self.layout(), ids != 0
        global_init = self.param("global_embedding", _POS_INIT, (self.width,), pdt)
        jg = build_joint_graph(patches, words, word_mask, layout, global_init)
        b, n, p, L = ids.shape[0], layout.num_nodes, layout.num_patches, layout.context_length
        h = jg.graph.nodes + nn.Embed(len(NODE_TYPES), self.width, param_dtype=pdt, name="node_type")(jg.node_type)
        edge_embed = nn.Embed(len(EDGE_TYPES), self.edge_dim, param_dtype=pdt, name="edge_type")
        dynamic = bool(layout.knn) or not isinstance(layout.patch_word, str)
        graph, edge_type = jg.graph, jg.edge_type
        offset = (jnp.arange(b, dtype=jnp.int32) * n)[:, None]
        attention = []
        for i in range(self.depth):
            if dynamic and i > 0:  # kNN and similarity edges from the current states (Vision GNN)
                states = h.reshape(b, n, -1)
                s, r, _ = joint_edges(layout, states[:, :p], states[:, p : p + L], word_mask)
                graph = graph._replace(senders=(s + offset).reshape(-1), receivers=(r + offset).reshape(-1))
            x = nn.LayerNorm(dtype=self.dtype, param_dtype=pdt, name=f"block_{i}_ln1")(h)
            g = graph._replace(nodes=x)
            if self.conv in ("gat", "transformer"):
                c, name = self.width // self.heads, f"block_{i}_conv"
                if self.conv == "gat":
                    conv = gnn.GATConv(c, self.heads, edge_dim=self.edge_dim, name=name)
                else:
                    conv = gnn.TransformerConv(c, self.heads, root_weight=False, edge_dim=self.edge_dim, name=name)
                m, alpha = conv(g, edge_embed(edge_type), return_attention=True)
                attention.append(_patch_word_attention(alpha.mean(-1), graph, edge_type, b, n, p, L))
            else:
                m = gnn.RGCNConv(self.width, len(EDGE_TYPES), name=f"block_{i}_conv")(g, edge_type)
                attention.append(jnp.zeros((b, L, p), h.dtype))
            h = h + nn.Dense(self.width, dtype=self.dtype, param_dtype=pdt, name=f"block_{i}_out")(m)
            y = nn.LayerNorm(dtype=self.dtype, param_dtype=pdt, name=f"block_{i}_ln2")(h)
            h = h + Mlp(self.mlp_dim, dtype=self.dtype, param_dtype=pdt, name=f"block_{i}_mlp")(y)
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=pdt, name="final_ln")(h)
        if self.readout == "global":
            pooled = h.reshape(b, n, -1)[:, layout.global_index]
        else:
            real = jnp.concatenate([jnp.ones((b, p), bool), word_mask, jnp.zeros((b, 1), bool)], 1).reshape(-1)
            ids_of_node = jnp.repeat(jnp.arange(b), n)
            gate = nn.Dense(1, param_dtype=pdt, name="readout_gate")(h)[:, 0]
            weights = segment.segment_softmax(gate, ids_of_node, b, mask=real, indices_are_sorted=True)
            pooled = segment.segment_sum(weights[:, None] * h, ids_of_node, b, mask=real, indices_are_sorted=True)
        logits = nn.Dense(1, dtype=self.dtype, param_dtype=pdt, name="head")(pooled)[:, 0]
        return logits, {"patch_word_attention": jnp.stack(attention), "nodes": h, **aux}


def _patch_word_attention(alpha, graph: Graph, edge_type, b, n, p, L):
    """``[B, L, P]``: the attention weight of every patch -> word edge, at (pair, word, patch)."""
    s, r = graph.senders, graph.receivers
    pair, word, patch = r // n, r % n - p, s % n
    keep = (edge_type == EDGE_TYPES.index("patch_word")) & (word >= 0) & (word < L) & (s != r)
    flat = jnp.where(keep, (pair * L + word) * p + patch, 0)
    out = jax.ops.segment_sum(jnp.where(keep, alpha, 0), flat, b * L * p)
    return out.reshape(b, L, p)


class CrossAttentionMatcher(_Matcher):
    """The transformer baseline: a pre-LN encoder over ``[global, patches, words]`` with type embeddings; padding
    words are masked as keys; readout the global token, ``LN``, ``Dense(1)``.

    Attributes: ``vocab_size``, ``context_length``, ``image_size``, ``stem_features``, ``width``, ``depth``,
    ``heads``, ``mlp_dim``, ``embed_dim``, ``dtype`` as in :class:`GraphFusion`.

    Returns:
      ``(logits [B], {"tokens": [B, 1 + P + L, width]})``.

    >>> import jax, numpy as np
    >>> m = CrossAttentionMatcher(vocab_size=9, context_length=3, image_size=8, stem_features=(4,), width=8,
    ...                           depth=1, heads=2, mlp_dim=8)
    >>> x, ids = np.zeros((2, 8, 8, 3), np.float32), np.array([[2, 4, 3], [2, 3, 0]])
    >>> m.apply(m.init(jax.random.key(0), x, ids), x, ids)[0].shape
    (2,)
    """

    @nn.compact
    def __call__(self, images, ids):
        pdt, ids, patches, words, aux = _encode(self, images, ids)
        b, p, L = ids.shape[0], patches.shape[1], ids.shape[1]
        glob = jnp.broadcast_to(self.param("global_embedding", _POS_INIT, (self.width,), pdt), (b, 1, self.width))
        types = jnp.asarray([2] + [0] * p + [1] * L)
        x = jnp.concatenate([glob, patches, words], 1)
        x = x + nn.Embed(len(NODE_TYPES), self.width, param_dtype=pdt, name="token_type")(types)
        real = jnp.concatenate([jnp.ones((b, 1 + p), bool), ids != 0], 1)
        cfg = EncoderConfig(
            num_heads=self.heads,
            mlp_dim=self.mlp_dim,
            depth=self.depth,
            width=self.width,
            activation="gelu",
            final_norm=True,
            dtype=self.dtype,
            param_dtype=pdt,
        )
        y, _ = Encoder(cfg, name="encoder")(x, mask=real[:, None, None, :])
        logits = nn.Dense(1, dtype=self.dtype, param_dtype=pdt, name="head")(y[:, 0])[:, 0]
        return logits, {"tokens": y, **aux}
