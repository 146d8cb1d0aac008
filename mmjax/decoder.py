"""Causal text decoder with cross-attention to encoder tokens, and its KV cache (captioning, CoCa, CapPa).

With ids ``[B, T]`` at positions ``p_0 .. p_0 + T - 1`` (``p_0 = 0`` without a cache, the cache's fill index with
one) and encoder tokens ``e [B, S, width]``::

    x = token_embedding[ids] + pos_embedding[p_0 : p_0 + T]                           [B, T, width]
    for each block:  x = x + self_attn(ln1(x), causal)          (keys/values go into the cache)
                     x = x + cross_attn(ln2(x), e)              (keys/values of e computed once per cache)
                     x = x + mlp(ln3(x))
    logits = decoder_norm(x) @ token_embedding^T    (tied)   or   head(decoder_norm(x))   [B, T, vocab]

This is GPT-2's block with cross-attention (``add_cross_attention=True``: ``ln_1, attn, ln_cross_attn,
crossattention, ln_2, mlp``, final ``ln_f``, learned positions, ``lm_head`` tied to ``wte``) and the decoder of
big_vision's CapPa / open_clip's CoCa. CapPa's parallel prediction: rows of the batch marked ``parallel`` see all
``T`` positions (no causal mask); the task feeds them all-``mask_id`` inputs.

Decoding keeps everything in a plain pytree (:class:`DecoderCache`), so a jitted step takes and returns it: per layer
a :class:`mmjax.attention.KVCache` of self-attention keys/values preallocated for ``max_length`` positions, and the
cross-attention keys/values of the encoder tokens, computed when ``encoded`` is passed (the prefill call) and reused
by every later step. A prompt of any length is prefilled in one call; every attention implementation supports the
shifted causal diagonal this needs (:func:`mmjax.attention.dot_product_attention` ``causal_offset``).

Parameter tree (what a converter maps)::

    token_embedding/embedding                 [vocab_size, width]
    pos_embedding                             [max_length, width]
    decoderblock_{i}/ln1, ln2, ln3/{scale,bias}
    decoderblock_{i}/self_attn/{query,key,value,out}     as mmjax.attention.MultiHeadAttention
    decoderblock_{i}/cross_attn/{query,key,value,out}    key/value kernels [width, heads, head_dim]
    decoderblock_{i}/mlp/fc1, fc2             as mmjax.layers.Mlp
    decoder_norm/{scale,bias}
    head/kernel [width, vocab_size] (+ head/bias)         only when tie_embeddings=False
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mmjax.attention import KVCache, MultiHeadAttention
from mmjax.layers import Mlp, get_activation

__all__ = ["DecoderConfig", "DecoderCache", "DecoderBlock", "TextDecoder", "init_cache", "reorder_cache"]

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """All options of a :class:`TextDecoder`, frozen (hashable, so a jitted generation loop can key on it).

    Attributes:
      vocab_size: number of token ids.
      width: model width (divisible by ``num_heads``).
      depth: number of decoder blocks.
      num_heads: attention heads (self- and cross-attention).
      mlp_dim: hidden width of the MLP.
      max_length: positions of the learned position embedding: the longest sequence (start token, prompt and
        generated tokens) the decoder reads.
      activation: MLP activation (``"gelu"`` exact, ``"gelu_tanh"`` = GPT-2's ``gelu_new``, ...; see
        :func:`mmjax.layers.get_activation`).
      layer_norm_eps: LayerNorm epsilon (1e-5: GPT-2 / PyTorch).
      tie_embeddings: logits from the token embedding's transpose (GPT-2's tied ``lm_head``); else a ``head`` Dense.
      head_bias: a bias in the untied ``head``.
      cross_attention: blocks attend to encoder tokens (False: a plain causal language model).
      dropout_rate: dropout on the embeddings and both residual branches (training only).
      attention_dropout_rate: dropout on the attention probabilities.
      attention_implementation: passed to :func:`mmjax.attention.dot_product_attention` (``None``: the default).
      bos_id: the decoder start token (first of every sequence).
      eos_id: end of text: generation stops a sequence there.
      pad_id: padding after end of text.
      mask_id: the [MASK] input of CapPa's parallel prediction (``None``: no parallel prediction).
      dtype: compute dtype (``None``: float32); param_dtype: parameter dtype.

    Raises:
      ValueError: a non-positive size, a width not divisible by the heads, an unknown activation, or a special id
        outside the vocabulary.

    >>> cfg = DecoderConfig(vocab_size=10, width=8, depth=1, num_heads=2, mlp_dim=16, max_length=6)
    >>> cfg.head_dim, cfg.replace(depth=2).depth
    (4, 2)
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    max_length: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_bias: bool = False
    cross_attention: bool = True
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_implementation: str | None = None
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    mask_id: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecoderConfig: {name} must be a positive int, got {name}={value!r}.")
        if self.width % self.num_heads:
            raise ValueError(
                f"DecoderConfig: width={self.width} is not divisible by num_heads={self.num_heads}; choose a width "
                "that is a multiple of num_heads."
            )
        for name in ("bos_id", "eos_id", "pad_id", "mask_id"):
            value = getattr(self, name)
            if value is None and name == "mask_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"DecoderConfig: {name}={value!r} must be a token id in [0, vocab_size={self.vocab_size})."
                )
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DecoderConfig: {name} must be in [0, 1), got {getattr(self, name)!r}.")
        get_activation(self.activation)

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``width // num_heads``."""
        return self.width // self.num_heads

    def replace(self, **changes) -> DecoderConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


class DecoderCache(NamedTuple):
    """Everything a decoding step carries: a plain pytree (jit, ``lax.while_loop`` and ``tree.map`` take it).

    Attributes:
      self_attention: one :class:`mmjax.attention.KVCache` per block, ``[B, heads, max_length, head_dim]`` each.
      cross_key_value: per block, the projected ``(keys, values)`` of the encoder tokens, ``[B, heads, S,
        head_dim]`` each, heads-major as the KV cache (zeros until the prefill call passes ``encoded``); ``()``
        without cross-attention. Their batch may also be ``B / K``: then the ``K`` sequences ``b * K .. b * K + K -
        1`` (the beams of image ``b``) share the keys/values of row ``b`` (``reorder_cache(..., cross=False)`` makes
        such a cache).

    ``index`` (a property) is the number of positions filled: where the next tokens go.

    >>> cache = init_cache(DecoderConfig(10, 8, 2, 2, 16, 6), batch_size=3, max_length=5, encoded_length=4)
    >>> len(cache.self_attention), cache.self_attention[0].key.shape, int(cache.index)
    (2, (3, 2, 5, 4), 0)
    """

    self_attention: tuple[KVCache, ...]
    cross_key_value: tuple[tuple[Array, Array], ...]

    @property
    def index(self) -> Array:
        """int32 scalar: positions filled so far."""
        return self.self_attention[0].index

    @property
    def batch_size(self) -> int:
        """The batch the cache was made for."""
        return self.self_attention[0].key.shape[0]

    @property
    def max_length(self) -> int:
        """Positions the cache can hold."""
        return self.self_attention[0].key.shape[2]


def init_cache(config: DecoderConfig, batch_size: int, max_length: int, encoded_length: int = 0) -> DecoderCache:
    """An empty :class:`DecoderCache` for ``batch_size`` sequences of up to ``max_length`` positions.

    Args:
      config: the decoder's config.
      batch_size: sequences decoded together (beams included).
      max_length: positions to hold: start token + prompt + new tokens; at most ``config.max_length``.
      encoded_length: encoder tokens ``S`` the cross-attention reads (ignored without cross-attention).

    Returns:
      A cache of zeros with ``index = 0``, in the compute dtype (``config.dtype`` or float32).

    Raises:
      ValueError: ``max_length`` outside ``[1, config.max_length]`` or a non-positive size.

    >>> cfg = DecoderConfig(vocab_size=10, width=8, depth=1, num_heads=2, mlp_dim=16, max_length=6)
    >>> init_cache(cfg, 2, 6, encoded_length=3).cross_key_value[0][0].shape  # [B, heads, S, head_dim]
    (2, 2, 3, 4)
    """
    if not isinstance(max_length, int) or not 1 <= max_length <= config.max_length:
        raise ValueError(
            f"init_cache: max_length={max_length!r} must be in [1, {config.max_length}] (the decoder has "
            f"{config.max_length} positions); shorten the prompt or max_new_tokens, or use a decoder with more "
            "positions."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"init_cache: batch_size must be a positive int, got {batch_size!r}.")
    dtype = config.dtype or jnp.float32
    heads, head_dim = config.num_heads, config.head_dim
    layers = tuple(KVCache.empty(batch_size, max_length, heads, head_dim, dtype) for _ in range(config.depth))
    cross = ()
    if config.cross_attention:
        if not isinstance(encoded_length, int) or encoded_length < 1:
            raise ValueError(
                f"init_cache: encoded_length={encoded_length!r} must be the positive number of encoder tokens the "
                "cross-attention reads."
            )
        shape = (batch_size, heads, encoded_length, head_dim)
        cross = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.depth))
    return DecoderCache(layers, cross)


def reorder_cache(cache: DecoderCache, indices: Array, *, cross: bool = True) -> DecoderCache:
    """The cache of the batch rows ``indices`` (``new[b] = old[indices[b]]``), e.g. the surviving beams.

    Args:
      cache: a :class:`DecoderCache` of batch ``B``.
      indices: int ``[B']`` row indices into ``[0, B)``.
      cross: also gather the cross-attention keys/values. ``False`` keeps them as they are: right when every row
        ``b * K + k`` of the new batch comes from a row of the same image ``b`` (beam search: the beams of an image
        are expanded from it and reordered among themselves), since the decoder then reads image ``b``'s keys for
        the ``K`` rows ``b * K ..`` (see :class:`DecoderCache`); it saves gathering ``K`` copies of the image's keys
        and values at every step.

    Returns:
      A cache of batch ``B'`` with the same fill index.

    >>> cfg = DecoderConfig(vocab_size=10, width=8, depth=1, num_heads=2, mlp_dim=16, max_length=6)
    >>> c = init_cache(cfg, 2, 4, 3)
    >>> reorder_cache(c, jnp.array([1, 1, 0])).self_attention[0].key.shape
    (3, 2, 4, 4)
    >>> beams = reorder_cache(c, jnp.array([0, 0, 0, 1, 1, 1]), cross=False)  # 3 beams per image, keys shared
    >>> beams.self_attention[0].key.shape, beams.cross_key_value[0][0].shape
    ((6, 2, 4, 4), (2, 2, 3, 4))
    """
    take = lambda x: jnp.take(x, indices, axis=0)
    layers = tuple(KVCache(take(c.key), take(c.value), c.index) for c in cache.self_attention)
    kv = tuple((take(k), take(v)) for k, v in cache.cross_key_value) if cross else cache.cross_key_value
    return DecoderCache(layers, kv)


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention to encoder tokens, MLP (each residual).

    Call: ``block(x, encoded=None, *, mask=None, is_causal=True, kv_cache=None, cross_key_value=None,
    deterministic=True)`` with ``x [B, T, width]``; returns ``(y, kv_cache, cross_key_value)`` where the cache
    is advanced (``None`` without one) and ``cross_key_value`` are the encoder keys/values used, heads-major
    ``[B, heads, S, head_dim]`` each (projected from ``encoded`` when it is given, else the ones passed in).

    Attributes:
      config: the :class:`DecoderConfig`.

    >>> cfg = DecoderConfig(vocab_size=10, width=8, depth=1, num_heads=2, mlp_dim=16, max_length=6)
    >>> x, e = jnp.ones((1, 3, 8)), jnp.ones((1, 4, 8))
    >>> params = DecoderBlock(cfg).init(jax.random.key(0), x, e)["params"]
    >>> DecoderBlock(cfg).apply({"params": params}, x, e)[0].shape
    (1, 3, 8)
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array | None = None,
        *,
        mask: Array | None = None,
        is_causal: bool = True,
        kv_cache: KVCache | None = None,
        cross_key_value: tuple[Array, Array] | None = None,
        deterministic: bool = True,
    ):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        attention = lambda name: MultiHeadAttention(  # noqa: E731
            num_heads=cfg.num_heads,
            dropout_rate=cfg.attention_dropout_rate,
            implementation=cfg.attention_implementation,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name=name,
        )
        dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731

        y = attention("self_attn")(
            ln("ln1")(x), mask=mask, is_causal=is_causal, kv_cache=kv_cache, deterministic=deterministic
        )
        if kv_cache is not None:
            y, kv_cache = y
        x = x + dropout(y)
        if cfg.cross_attention:
            cross = attention("cross_attn")
            if encoded is not None:
                y, projected = cross(ln("ln2")(x), encoded, return_key_value=True, deterministic=deterministic)
                cross_key_value = tuple(a.swapaxes(1, 2) for a in projected)  # stored heads-major
            elif cross_key_value is not None:
                # keys/values of B / K images for B rows: the K rows of an image (its beams) become K * T queries
                # of that image; the same attention, with each image's keys read once
                h = ln("ln2")(x)
                images = cross_key_value[0].shape[0]
                h = h.reshape(images, -1, h.shape[-1])
                token_major = tuple(a.swapaxes(1, 2) for a in cross_key_value)  # cancels the kernels' transposes
                y = cross(h, key_value=token_major, deterministic=deterministic).reshape(x.shape)
            else:
                raise ValueError(
                    "DecoderBlock: cross-attention needs the encoder tokens (encoded=...) or their cached keys and "
                    "values (cross_key_value=...); pass the image tokens at the first (prefill) call."
                )
            x = x + dropout(y)
        y = Mlp(
            hidden_dim=cfg.mlp_dim,
            activation=cfg.activation,
            dropout_rate=cfg.dropout_rate,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="mlp",
        )(ln("ln3")(x), deterministic=deterministic)
        return x + dropout(y), kv_cache, cross_key_value


class TextDecoder(nn.Module):
    """Token + position embeddings, ``depth`` :class:`DecoderBlock` s, final LayerNorm, logits (see the module
    docstring for the formula and the parameter tree).

    Attributes:
      config: the :class:`DecoderConfig`.

    Two entry points:

    * ``decoder(tokens, encoded, *, parallel=None, train=False)`` -> ``(logits [B, T, vocab] float32,
      intermediates)``: the teacher-forced forward (logits float32, or float64 with float64 parameters) over positions ``0 .. T-1``. ``parallel`` (bool ``[B]``) drops
      the causal mask for the marked rows (CapPa). ``intermediates`` maps ``"decoderblock_{i}"`` to each block's
      output and ``"pre_logits"`` to the normalised features.
    * ``decoder.apply(variables, tokens, cache, encoded=None, method="decode")`` -> ``(logits, new_cache)``: the
      tokens go to positions ``cache.index ..``; pass ``encoded`` at the first call (it fills the cache's
      cross-attention keys/values), ``None`` after.

    >>> cfg = DecoderConfig(vocab_size=10, width=8, depth=2, num_heads=2, mlp_dim=16, max_length=6)
    >>> dec = TextDecoder(cfg)
    >>> ids, e = jnp.array([[1, 4, 5]]), jnp.ones((1, 4, 8))
    >>> params = dec.init(jax.random.key(0), ids, e)["params"]
    >>> full, _ = dec.apply({"params": params}, ids, e)
    >>> cache = init_cache(cfg, batch_size=1, max_length=6, encoded_length=4)
    >>> first, cache = dec.apply({"params": params}, ids[:, :2], cache, encoded=e, method="decode")
    >>> last, cache = dec.apply({"params": params}, ids[:, 2:], cache, method="decode")
    >>> bool(jnp.allclose(last[:, 0], full[:, 2], atol=1e-5)), int(cache.index)
    (True, 3)
    """

    config: DecoderConfig

    def __call__(
        self, tokens: Array, encoded: Array | None = None, *, parallel: Array | None = None, train: bool = False
    ) -> tuple[Array, dict[str, Array]]:
        logits, _, intermediates = self._forward(tokens, encoded, None, parallel, not train)
        return logits, intermediates

    def decode(self, tokens: Array, cache: DecoderCache, encoded: Array | None = None) -> tuple[Array, DecoderCache]:
        """``tokens [B, T]`` at positions ``cache.index .. cache.index + T - 1`` -> ``(logits [B, T, vocab],
        advanced cache)``. ``encoded [B, S, width]`` at the prefill call (stored), ``None`` after."""
        logits, cache, _ = self._forward(tokens, encoded, cache, None, True)
        return logits, cache

    def _check(self, tokens, encoded, cache, parallel) -> None:
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"TextDecoder: tokens must be integer ids [batch, length], got shape {tuple(tokens.shape)} dtype "
                f"{tokens.dtype}; tokenize the text first (one row per sequence)."
            )
        B, T = tokens.shape
        limit = cfg.max_length if cache is None else cache.max_length
        if T > limit:
            raise ValueError(
                f"TextDecoder: {T} tokens do not fit {limit} positions ("
                + ("config.max_length" if cache is None else "the cache's max_length")
                + "); shorten the sequence or make room for it."
            )
        if cache is not None and cache.batch_size != B:
            raise ValueError(
                f"TextDecoder: the cache was made for batch {cache.batch_size} but tokens have batch {B} (shape "
                f"{tuple(tokens.shape)}); make a cache for this batch (init_cache) or reorder it (reorder_cache)."
            )
        if cache is not None and cfg.cross_attention and B % cache.cross_key_value[0][0].shape[0]:
            raise ValueError(
                f"TextDecoder: the cache's cross-attention keys have batch {cache.cross_key_value[0][0].shape[0]}, "
                f"which does not divide the tokens' batch {B}; they must hold one row per sequence or one per "
                "image for K sequences each (beams: reorder_cache(..., cross=False))."
            )
        if cache is not None and cache.max_length > cfg.max_length:
            raise ValueError(
                f"TextDecoder: the cache holds {cache.max_length} positions but the decoder has only "
                f"{cfg.max_length} (config.max_length)."
            )
        if encoded is not None:
            if encoded.ndim != 3 or encoded.shape[0] != B:
                raise ValueError(
                    f"TextDecoder: encoded must be [batch={B}, tokens, width], got shape {tuple(encoded.shape)}."
                )
            if cache is not None and cfg.cross_attention and cache.cross_key_value[0][0].shape[2] != encoded.shape[1]:
                raise ValueError(
                    f"TextDecoder: the cache was made for {cache.cross_key_value[0][0].shape[2]} encoder tokens, "
                    f"encoded has {encoded.shape[1]} (shape {tuple(encoded.shape)}); pass encoded_length="
                    f"{encoded.shape[1]} to init_cache."
                )
        elif cfg.cross_attention and cache is None:
            raise ValueError(
                "TextDecoder: this decoder cross-attends (config.cross_attention=True) and needs encoded=[batch, "
                "tokens, width] encoder tokens."
            )
        if parallel is not None and jnp.shape(parallel) != (B,):
            raise ValueError(f"TextDecoder: parallel must be a boolean [batch={B}], got shape {jnp.shape(parallel)}.")

    @nn.compact
    def _forward(self, tokens, encoded, cache, parallel, deterministic):
        cfg = self.config
        tokens = jnp.asarray(tokens)
        self._check(tokens, encoded, cache, parallel)
        B, T = tokens.shape
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=nn.initializers.normal(0.02),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="token_embedding",
        )
        pos_table = self.param(
            "pos_embedding", nn.initializers.normal(0.01), (cfg.max_length, cfg.width), cfg.param_dtype
        )
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        positions = lax.dynamic_slice_in_dim(pos_table, start, T, axis=0)
        x = embed(tokens)  # compute dtype: config.dtype, else the parameters' (float32, or float64 under x64)
        x = x + positions.astype(x.dtype)[None]
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if encoded is not None and cfg.dtype is not None:
            encoded = encoded.astype(cfg.dtype)

        mask, is_causal = None, True
        if parallel is not None:  # CapPa: marked rows see every position
            causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
            mask = (causal[None] | jnp.asarray(parallel, bool)[:, None, None])[:, None]  # [B, 1, T, T]
            is_causal = False

        intermediates: dict[str, Array] = {}
        layers, cross = [], []
        for i in range(cfg.depth):
            x, kv, ckv = DecoderBlock(cfg, name=f"decoderblock_{i}")(
                x,
                encoded,
                mask=mask,
                is_causal=is_causal,
                kv_cache=None if cache is None else cache.self_attention[i],
                cross_key_value=None if cache is None or not cfg.cross_attention else cache.cross_key_value[i],
                deterministic=deterministic,
            )
            intermediates[f"decoderblock_{i}"] = x
            layers.append(kv)
            cross.append(ckv)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="decoder_norm")(
            x
        )
        intermediates["pre_logits"] = x
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=cfg.head_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head"
            )(x)
        new_cache = None
        if cache is not None:
            new_cache = DecoderCache(tuple(layers), tuple(cross) if cfg.cross_attention else ())
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), new_cache, intermediates
