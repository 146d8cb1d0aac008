"""CoCa (Yu et al. 2022, "Contrastive Captioners are Image-Text Foundation Models"): CLIP's two towers plus a
multimodal text decoder that cross-attends the image tower's tokens, trained with both losses.

::

    pooled, tokens = vision(images)                   [B, vision_width], [B, S, vision_width]  (S = 1 + patches)
    u = normalize(visual_projection(pooled))          [B, embed_dim]     (CLIP's image embedding)
    v = normalize(text_projection(text(ids)))         [B, embed_dim]     (CLIP's text embedding)
    logits_per_image = exp(min(logit_scale, max_logit_scale)) * u v^T    [B, B]   (logits_per_text its transpose)
    e = encoder_proj(encoder_norm(tokens))            [B, S, decoder width]  (each step optional)
    logits = text_decoder(decoder_input_ids, e)       [B, T, vocab]      (causal, cross-attends e)

    loss = caption_loss_weight * CE(logits, next tokens) + contrastive_loss_weight * CLIP softmax loss
         (CoCa's weights: 2.0 and 1.0; :class:`mmjax.train.coca.CoCaTask` computes it)

``tokens`` is the image tower's ``encoded`` intermediate (class token and patches, before CLIP's ``post_norm``,
which normalises the pooled token only); ``encoder_norm`` is a LayerNorm over every token (on by default, as
open_clip's CoCa applies ``ln_post`` to the tokens it hands the decoder) and ``encoder_proj`` a Dense to the decoder
width (Hugging Face ``VisionEncoderDecoderModel``'s ``enc_to_dec_proj``; by default only when the widths differ).

Where this departs from the paper, on purpose: CoCa's multimodal decoder reads the *outputs of the unimodal text
tower* (the lower half of one text decoder) and cross-attends the image tokens; here the decoder is a separate
:class:`mmjax.decoder.TextDecoder` with its own token embedding ("CLIP's two towers + the multimodal decoder on the
image tokens"), so a trained CLIP drops in unchanged and captioning runs on a KV cache of the decoder alone. CoCa's
attentional poolers (one query for the contrastive embedding, 256 for the decoder) are not used: the contrastive
embedding is CLIP's class token, and the decoder reads every image token.

Generation: the model follows :class:`mmjax.captioner.Captioner`'s contract (``decoder``, ``encode``,
``init_cache``, ``decode``), so :func:`mmjax.generate.generate` and :func:`mmjax.generate.log_likelihood` take it
unchanged.

Parameter tree::

    clip/...                    exactly mmjax.clip.CLIP's tree (vision, text, visual_projection, text_projection,
                                logit_scale, logit_bias): a trained CLIP's params drop in
    encoder_norm/{scale,bias}   [vision_width]                       (normalize_encoded)
    encoder_proj/{kernel,bias}  [vision_width, decoder width]        (project_encoder)
    text_decoder/...            the mmjax.decoder.TextDecoder tree

Example (a tiny random CoCa):
    >>> import jax, jax.numpy as jnp
    >>> from mmjax.decoder import DecoderConfig
    >>> dec = DecoderConfig(vocab_size=64, width=16, depth=1, num_heads=2, mlp_dim=32, max_length=12, eos_id=63)
    >>> model = CoCa("tiny", decoder=dec)
    >>> images, ids = jnp.zeros((2, 16, 16, 3)), jnp.array([[1, 5, 63, 0], [1, 63, 0, 0]], jnp.int32)
    >>> params = model.init(jax.random.key(0), images, ids, ids[:, :-1])["params"]
    >>> out = model.apply({"params": params}, images, ids, ids[:, :-1])
    >>> out.logits.shape, out.logits_per_image.shape, out.encoded.shape
    ((2, 3, 64), (2, 2), (2, 5, 16))
    >>> sorted(params)
    ['clip', 'encoder_norm', 'encoder_proj', 'text_decoder']
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmjax.clip import CLIP, as_config
from mmjax.decoder import DecoderCache, DecoderConfig, TextDecoder, init_cache
from mmjax.layers import l2_normalize

__all__ = ["CoCa", "CoCaOutput"]

Array = jax.Array


def _wide(x: Array) -> Array:
    """``x`` in float32, or wider (float64 stays float64, so a float64 check sees no float32 rounding)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@flax.struct.dataclass
class CoCaOutput:
    """What :class:`CoCa` returns (a pytree): CLIP's outputs (:class:`mmjax.clip.CLIPOutput`'s fields) and the
    caption logits.

    Attributes:
      logits: caption logits ``[B, T, vocab]`` for ``decoder_input_ids`` (teacher forcing).
      image_embeds, text_embeds: L2-normalised embeddings ``[B, embed_dim]`` (float32, or float64 with float64
        parameters).
      logits_per_image: ``logit_scale * image_embeds @ text_embeds.T (+ logit_bias)`` ``[B_i, B_t]``;
        logits_per_text: its transpose.
      logit_scale: ``exp(min(logit_scale, max_logit_scale))`` (scalar); logit_bias: the bias, or ``None``.
      encoded: the image tokens the decoder read ``[B, S, decoder width]``.
      image_intermediates, text_intermediates, decoder_intermediates: each part's named intermediates
        (:class:`mmjax.vit.ViT`, :class:`mmjax.text.TextTransformer`, :class:`mmjax.decoder.TextDecoder`).

    >>> from mmjax.decoder import DecoderConfig
    >>> dec = DecoderConfig(vocab_size=64, width=32, depth=1, num_heads=2, mlp_dim=32, max_length=12)
    >>> model = CoCa("tiny", decoder=dec)
    >>> images, ids = jnp.zeros((3, 16, 16, 3)), jnp.ones((3, 4), jnp.int32)
    >>> out = model.apply(model.init(jax.random.key(0), images, ids, ids), images, ids, ids)
    >>> out.logits.shape, out.logits_per_text.shape, sorted(out.decoder_intermediates)
    ((3, 4, 64), (3, 3), ['decoderblock_0', 'pre_logits'])
    """

    logits: Array
    image_embeds: Array
    text_embeds: Array
    logits_per_image: Array
    logits_per_text: Array
    logit_scale: Array
    encoded: Array
    logit_bias: Array | None = None
    image_intermediates: dict[str, Array] | None = None
    text_intermediates: dict[str, Array] | None = None
    decoder_intermediates: dict[str, Array] | None = None


class CoCa(nn.Module):
    """CLIP + a multimodal text decoder over the image tower's tokens (see the module docstring).

    Attributes:
      config: the CLIP part: a :class:`mmjax.clip.CLIPConfig`, a name in :data:`mmjax.clip.CONFIGS`, a dict or an
        ``ml_collections.ConfigDict`` (turned into a CLIPConfig, so the module stays hashable for
        :func:`mmjax.generate.generate`'s compiled programs).
      decoder: the :class:`mmjax.decoder.DecoderConfig` (sizes, dtype, and the special ids ``bos_id``/``eos_id``/
        ``pad_id`` that generation uses).
      project_encoder: add ``encoder_proj`` (a Dense to the decoder width); ``None``: only when the widths differ.
      normalize_encoded: a LayerNorm ``encoder_norm`` on the image tokens before the decoder reads them.
      dtype, param_dtype: the CLIP towers' compute and parameter dtypes (the decoder's are in ``decoder``).

    Calls:

    * ``model.apply(v, images, ids, decoder_input_ids, attention_mask=None, train=False)`` -> :class:`CoCaOutput`
      (one pass of the image tower serves both the contrastive embedding and the decoder).
    * ``model.apply(v, images, method="encode")`` -> the decoder's image tokens ``[B, S, decoder width]``.
    * ``model.init_cache(batch_size, max_length, encoded_length)`` -> :class:`mmjax.decoder.DecoderCache` (no
      parameters needed).
    * ``model.apply(v, tokens, encoded=None, cache=None, method="decode")`` -> ``(logits, cache)`` as
      :class:`mmjax.captioner.Captioner`'s: over a cache (``encoded`` at the prefill call), or teacher-forced from
      position 0 without one.
    * ``model.apply(v, images, normalize=False, method="encode_image")`` and ``model.apply(v, ids,
      attention_mask=None, normalize=False, method="encode_text")``: CLIP's projected features
      (:meth:`mmjax.clip.CLIP.encode_image`, :meth:`mmjax.clip.CLIP.encode_text`).

    >>> from mmjax.clip import CLIP
    >>> from mmjax.decoder import DecoderConfig
    >>> dec = DecoderConfig(vocab_size=64, width=16, depth=1, num_heads=2, mlp_dim=32, max_length=12, eos_id=63)
    >>> model = CoCa("tiny", decoder=dec)
    >>> images, ids = jnp.zeros((2, 16, 16, 3)), jnp.array([[1, 5, 63], [1, 63, 0]], jnp.int32)
    >>> params = model.init(jax.random.key(0), images, ids, ids)["params"]
    >>> clip_params = CLIP("tiny").init(jax.random.key(1), images, ids)["params"]
    >>> params = {**params, "clip": clip_params}  # a trained CLIP drops in
    >>> e = model.apply({"params": params}, images, method="encode")
    >>> cache = model.init_cache(2, 12, e.shape[1])
    >>> step, cache = model.apply({"params": params}, ids, encoded=e, cache=cache, method="decode")
    >>> out = model.apply({"params": params}, images, ids, ids)
    >>> bool(jnp.allclose(step, out.logits, atol=1e-5)), e.shape, int(cache.index)
    (True, (2, 5, 16), 3)
    """

    config: Any = "ViT-B/32"
    decoder: DecoderConfig | None = None
    project_encoder: bool | None = None
    normalize_encoded: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # a hashable CLIPConfig (generate's compiled programs are cached per model)
        object.__setattr__(self, "config", as_config(self.config))
        super().__post_init__()

    def setup(self):
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"CoCa: decoder must be a DecoderConfig, got {type(self.decoder).__name__}.")
        cfg, dec = self.config, self.decoder
        self.clip = CLIP(cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.normalize_encoded:
            self.encoder_norm = nn.LayerNorm(
                epsilon=cfg.vision_layer_norm_eps, dtype=dec.dtype, param_dtype=dec.param_dtype
            )
        project = self.project_encoder
        if project is None:
            project = cfg.vision_width != dec.width
        if project:
            self.encoder_proj = nn.Dense(dec.width, dtype=dec.dtype, param_dtype=dec.param_dtype)
        self.text_decoder = TextDecoder(dec)

    # -- parts ----------------------------------------------------------------------------------------------------
    def _image(self, images: Array, train: bool) -> tuple[Array, Array, dict]:
        """``(image features [B, embed_dim], decoder tokens [B, S, width], image intermediates)``: one tower pass.

        Through CLIP's submodules (the same parameters as :meth:`mmjax.clip.CLIP.encode_image`), keeping the
        features' precision at float32 or wider (CLIP casts them to float32)."""
        images = jnp.asarray(images)
        self.clip._check_images(images)
        pooled, aux = self.clip.vision(images, train=train)
        return _wide(self.clip.visual_projection(pooled)), self._tokens(aux["encoded"]), aux

    def _tokens(self, encoded: Array) -> Array:
        if self.normalize_encoded:
            encoded = self.encoder_norm(encoded)
        if hasattr(self, "encoder_proj"):
            encoded = self.encoder_proj(encoded)
        return encoded

    def encode(self, images: Array, *, train: bool = False) -> Array:
        """``images [B, H, W, C]`` -> the tokens the decoder reads ``[B, S, decoder width]`` (S = 1 + patches)."""
        images = jnp.asarray(images)
        self.clip._check_images(images)
        _, aux = self.clip.vision(images, train=train)
        return self._tokens(aux["encoded"])

    def encode_image(self, images: Array, normalize: bool = False, train: bool = False) -> Array:
        """CLIP's image features ``[B, embed_dim]`` (:meth:`mmjax.clip.CLIP.encode_image`)."""
        return self.clip.encode_image(images, normalize=normalize, train=train)

    def encode_text(
        self, ids: Array, attention_mask: Array | None = None, normalize: bool = False, train: bool = False
    ) -> Array:
        """CLIP's text features ``[B, embed_dim]`` (:meth:`mmjax.clip.CLIP.encode_text`)."""
        return self.clip.encode_text(ids, attention_mask, normalize=normalize, train=train)

    def __call__(
        self,
        images: Array,
        ids: Array,
        decoder_input_ids: Array,
        *,
        attention_mask: Array | None = None,
        train: bool = False,
    ) -> CoCaOutput:
        """Both towers, their similarity logits and the teacher-forced caption logits (see :class:`CoCaOutput`).

        ``ids [B_t, L]`` feed the text tower (``attention_mask`` as in :class:`mmjax.clip.CLIP`);
        ``decoder_input_ids [B_i, T]`` the decoder (usually the same captions without their last position)."""
        image_feats, encoded, image_aux = self._image(images, train)
        pooled, text_aux = self.clip.text(ids, attention_mask, train=train)
        image_embeds = l2_normalize(image_feats)
        text_embeds = l2_normalize(_wide(self.clip.text_projection(pooled)))
        scale, bias = self.clip.scale_and_bias()
        sims = scale * (image_embeds @ text_embeds.T)
        if bias is not None:
            sims = sims + bias
        logits, dec_aux = self.text_decoder(decoder_input_ids, encoded, train=train)
        return CoCaOutput(
            logits=logits,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logits_per_image=sims,
            logits_per_text=sims.T,
            logit_scale=scale,
            encoded=encoded,
            logit_bias=bias,
            image_intermediates=image_aux,
            text_intermediates=text_aux,
            decoder_intermediates=dec_aux,
        )

    # -- generation (mmjax.generate's contract) -------------------------------------------------------------------
    def decode(
        self, tokens: Array, encoded: Array | None = None, cache: DecoderCache | None = None
    ) -> tuple[Array, DecoderCache | None]:
        """Decodes ``tokens [B, T]``: over a cache (see the class docstring) or, without one, teacher-forced."""
        if cache is None:
            if encoded is None:
                raise ValueError("CoCa.decode: without a cache, pass encoded=the image tokens (model.encode).")
            logits, _ = self.text_decoder(tokens, encoded)
            return logits, None
        return self.text_decoder.decode(tokens, cache, encoded)

    def init_cache(self, batch_size: int, max_length: int, encoded_length: int) -> DecoderCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` positions over ``encoded_length``
        image tokens (see :func:`mmjax.decoder.init_cache`)."""
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"CoCa: decoder must be a DecoderConfig, got {type(self.decoder).__name__}.")
        return init_cache(self.decoder, batch_size, max_length, encoded_length)
