"""Text transformer: token + learned position embeddings, causal pre-LN blocks, final LayerNorm, pooling.

This is CLIP's text tower (and GPT-2's body without the head). With ids ``[B, T]`` (``T <= context_length``)::

    x = token_embedding[ids] + pos_embedding[:T]                       [B, T, width]
    x = encoder_norm(blocks(x, causal mask [& padding mask]))          [B, T, width]
    pooled = x[b, index(b)]  (or the mean over valid tokens)           [B, width]

Pooling (``pooling``):

* ``"eot"``: the first position where ``ids == eot_id`` (Hugging Face CLIP when ``eos_token_id != 2``).
  A row without ``eot_id`` pools position 0, as ``argmax`` of an all-False row does in Hugging Face.
* ``"argmax"``: ``argmax(ids)``, the highest id (OpenAI CLIP, and Hugging Face configs with the legacy
  ``eos_token_id == 2``): the end-of-text token has the largest id in OpenAI's vocabulary.
* ``"last"``: the last valid token (``attention_mask``; the last position when there is no mask).
* ``"first"``: position 0.
* ``"mean"``: the mean over valid tokens.

Parameter tree (what the converter maps)::

    token_embedding/embedding       [vocab_size, width]
    pos_embedding                   [context_length, width]
    encoder/encoderblock_{i}/...    see mmjax.layers (encoder/encoderblock/... with scan=True)
    encoder/encoder_norm/{scale,bias}   the final LayerNorm
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Encoder, EncoderConfig, refuse_encoder_keywords_beside_config

__all__ = ["TextTransformer", "pool_tokens", "POOLING_MODES"]

Array = jax.Array
Dtype = Any

POOLING_MODES = ("eot", "argmax", "last", "first", "mean")

# TextTransformer keywords that an EncoderConfig replaces (they must keep their defaults when encoder_config is given)
_ENCODER_KEYWORDS = (
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "activation",
    "layer_norm_eps",
    "dropout_rate",
    "attention_dropout_rate",
    "remat",
    "scan",
    "attention_implementation",
    "dtype",
    "param_dtype",
)


def pool_tokens(
    x: Array, ids: Array, mode: str = "eot", eot_id: int = 49407, attention_mask: Array | None = None
) -> Array:
    """Pool token features ``x [B, T, W]`` to ``[B, W]`` (see the module docstring for the modes).

    Args:
      x: token features ``[B, T, W]``.
      ids: token ids ``[B, T]`` (used by ``"eot"`` and ``"argmax"``).
      mode: one of :data:`POOLING_MODES`.
      eot_id: the end-of-text id for ``"eot"``.
      attention_mask: optional ``[B, T]`` (True/1 = real token) for ``"last"`` and ``"mean"``.

    Returns:
      ``[B, W]`` in the dtype of ``x``.

    >>> x = jnp.arange(12.0).reshape(1, 4, 3)
    >>> ids = jnp.array([[5, 9, 7, 7]])
    >>> pool_tokens(x, ids, "eot", eot_id=7).tolist(), pool_tokens(x, ids, "argmax").tolist()
    ([[6.0, 7.0, 8.0]], [[3.0, 4.0, 5.0]])
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}.")
    B, T, _ = x.shape
    if mode == "mean":
        if attention_mask is None:
            return jnp.mean(x, axis=1)
        m = attention_mask.astype(x.dtype)[..., None]
        return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
    if mode == "eot":
        index = jnp.argmax(ids == eot_id, axis=-1)
    elif mode == "argmax":
        index = jnp.argmax(ids, axis=-1)
    elif mode == "first":
        index = jnp.zeros((B,), jnp.int32)
    else:  # last
        if attention_mask is None:
            index = jnp.full((B,), T - 1, jnp.int32)
        else:
            positions = jnp.arange(T)[None, :]
            index = jnp.max(jnp.where(attention_mask.astype(bool), positions, 0), axis=-1)
    return jnp.take_along_axis(x, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]


class TextTransformer(nn.Module):
    """Causal text transformer with end-of-text pooling (CLIP's text tower).

    Attributes:
      vocab_size: number of token ids.
      width: model width.
      depth: number of blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width (default ``4 * width``).
      context_length: number of learned positions (inputs may be shorter).
      activation: MLP activation (CLIP: ``"quick_gelu"``).
      layer_norm_eps: LayerNorm epsilon (CLIP: 1e-5).
      pooling: one of :data:`POOLING_MODES`.
      eot_id: end-of-text id for ``"eot"`` pooling.
      causal: causal self-attention (True for CLIP).
      dropout_rate, attention_dropout_rate: dropout (rng ``"dropout"`` when ``train=True``).
      remat, scan, attention_implementation: passed to :class:`mmjax.layers.Encoder`.
      dtype: compute dtype; param_dtype: parameter dtype.
      encoder_config: an :class:`mmjax.layers.EncoderConfig` (with ``width`` set) in place of the encoder keywords
        above (``width`` ... ``param_dtype``, which must then keep their defaults); CLIP builds its text tower this
        way. Either way the options are resolved once (:meth:`get_encoder_config`) and passed whole.

    Output convention (big_vision; every mmjax model): ``(output, intermediates)``.

    Call: ``model.apply(variables, ids, attention_mask=None, train=False)`` with ``ids`` int ``[B, T]`` and
    an optional ``attention_mask`` ``[B, T]`` (True/1 = real token, combined with the causal mask). Returns
    ``(pooled [B, width], intermediates)``; ``intermediates`` holds ``"tokens"`` (the normalised token features
    ``[B, T, width]``), ``"embeddings"`` and the per-block outputs ``"encoderblock_{i}"``.

    >>> model = TextTransformer(vocab_size=10, width=8, depth=1, num_heads=2, context_length=5, eot_id=9)
    >>> ids = jnp.array([[1, 4, 9, 0, 0]])
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> pooled, aux = model.apply({"params": params}, ids)
    >>> pooled.shape, aux["tokens"].shape
    ((1, 8), (1, 5, 8))
    """

    vocab_size: int
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    context_length: int = 77
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pooling: str = "eot"
    eot_id: int = 49407
    causal: bool = True
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    remat: bool = False
    scan: bool = False
    attention_implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    encoder_config: EncoderConfig | None = None

    def get_encoder_config(self) -> EncoderConfig:
        """The :class:`mmjax.layers.EncoderConfig` of the encoder (causal blocks and the final LayerNorm).

        Example:
          >>> TextTransformer(vocab_size=10, width=8, depth=1, num_heads=2).get_encoder_config().mlp_dim
          32
        """
        if self.encoder_config is not None:
            cfg = self.encoder_config
            if not isinstance(cfg, EncoderConfig) or cfg.width is None:
                raise ValueError(
                    f"TextTransformer: encoder_config must be an mmjax.layers.EncoderConfig with width set, got "
                    f"{cfg!r}."
                )
            refuse_encoder_keywords_beside_config(self, _ENCODER_KEYWORDS)
            return cfg.replace(final_norm=True)
        for name in ("width", "depth", "num_heads"):
            if getattr(self, name) is None:
                raise ValueError(
                    f"TextTransformer: {name} is not set; pass {name}=... (or encoder_config=EncoderConfig(...))."
                )
        return EncoderConfig(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            attention_implementation=self.attention_implementation,
            remat=self.remat,
            scan=self.scan,
            final_norm=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @nn.compact
    def __call__(
        self, ids: Array, attention_mask: Array | None = None, *, train: bool = False
    ) -> tuple[Array, dict[str, Array]]:
        ids = jnp.asarray(ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"TextTransformer: ids must be an integer array [batch, length], got shape {ids.shape} and dtype "
                f"{ids.dtype}; tokenize the texts first (mmjax.tokenizer)."
            )
        B, T = ids.shape
        if T > self.context_length:
            raise ValueError(
                f"TextTransformer: ids have length {T} > context_length={self.context_length}; tokenize with "
                f"context_length={self.context_length} or build the model with a longer context."
            )
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != (B, T):
                raise ValueError(
                    f"TextTransformer: attention_mask must have the shape of ids {(B, T)}, got {attention_mask.shape}."
                )
            attention_mask = attention_mask.astype(bool)
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"TextTransformer: pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        cfg = self.get_encoder_config()

        embed = nn.Embed(
            self.vocab_size,
            cfg.width,
            embedding_init=nn.initializers.normal(0.02),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="token_embedding",
        )
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.01), (self.context_length, cfg.width), cfg.param_dtype
        )
        x = embed(ids)
        x = x + pos[:T].astype(x.dtype)
        deterministic = not train
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        encoded, intermediates = Encoder(cfg, name="encoder")(
            x, mask=mask, is_causal=self.causal, deterministic=deterministic
        )
        pooled = pool_tokens(encoded, ids, self.pooling, self.eot_id, attention_mask)
        aux = dict(intermediates, embeddings=x, tokens=encoded)
        return pooled, aux
