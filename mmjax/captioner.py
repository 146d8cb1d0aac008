"""Image captioner: a ViT image tower whose tokens a causal text decoder cross-attends (CapPa, ViT-GPT2).

::

    e = vit(images).encoded                          [B, S, vision width]   (class token and patches)
    e = map_pooler(e)   (optional, num_map_queries)  [B, N, vision width]
    e = encoder_proj(e) (optional)                   [B, S, decoder width]
    logits = text_decoder(ids, e)                    [B, T, vocab]

``encoder_proj`` is Hugging Face ``VisionEncoderDecoderModel``'s ``enc_to_dec_proj`` (a Dense, there when the two
widths differ); the cross-attention keys/values can read any width, so it is optional here (``project_encoder``).
Decoding: :meth:`Captioner.encode` once per image, :meth:`Captioner.init_cache`, then :meth:`Captioner.decode` (the
prefill call with ``encoded``, then one token per call); :func:`mmjax.generate.generate` runs the whole loop.

Parameter tree::

    vision/...          the mmjax.vit.ViT tree
    map_pooler/...      mmjax.vit.MAPHead with num_queries probes     (num_map_queries)
    encoder_proj/{kernel,bias}                                         (projection)
    text_decoder/...    the mmjax.decoder.TextDecoder tree
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mmjax.decoder import DecoderCache, DecoderConfig, TextDecoder, init_cache
from mmjax.vit import MAPHead, ViT

__all__ = ["Captioner"]

Array = jax.Array


class Captioner(nn.Module):
    """ViT image tower + :class:`mmjax.decoder.TextDecoder` (see the module docstring).

    Attributes:
      vision: the image tower, a :class:`mmjax.vit.ViT` (its ``encoded`` tokens are used; set ``num_classes=0``).
      decoder: the :class:`mmjax.decoder.DecoderConfig` (sizes and the special ids ``bos_id``/``eos_id``/
        ``pad_id`` that generation uses).
      num_map_queries: ``None`` (cross-attend every image token) or ``N``: pool the tokens to ``N`` first with a
        multi-head attention pooler (:class:`mmjax.vit.MAPHead`).
      project_encoder: add ``encoder_proj`` (Dense to the decoder width); ``None``: only when the widths differ.

    Calls:

    * ``model.apply(v, images, decoder_input_ids, parallel=None, train=False)`` -> ``(logits [B, T, vocab],
      intermediates)`` (teacher forcing; ``parallel`` as in :class:`mmjax.decoder.TextDecoder`).
    * ``model.apply(v, images, method="encode")`` -> ``[B, S, width]``.
    * ``model.init_cache(batch_size, max_length, encoded_length)`` -> :class:`mmjax.decoder.DecoderCache` (no
      parameters needed).
    * ``model.apply(v, tokens, encoded=None, cache=None, method="decode")`` -> ``(logits, cache)``: with a cache,
      the tokens go to positions ``cache.index ..`` (``encoded`` at the prefill call only); without one, a
      teacher-forced forward from position 0 (``encoded`` required) and ``cache`` None.

    >>> import jax.numpy as jnp
    >>> from mmjax.decoder import DecoderConfig
    >>> vit = ViT(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4, num_classes=0, pool_type="gap")
    >>> cfg = DecoderConfig(vocab_size=12, width=8, depth=1, num_heads=2, mlp_dim=16, max_length=8)
    >>> model = Captioner(vision=vit, decoder=cfg)
    >>> images, ids = jnp.zeros((2, 8, 8, 3)), jnp.array([[1, 5, 6], [1, 7, 2]])
    >>> params = model.init(jax.random.key(0), images, ids)["params"]
    >>> logits, _ = model.apply({"params": params}, images, ids)
    >>> e = model.apply({"params": params}, images, method="encode")
    >>> cache = model.init_cache(2, 8, e.shape[1])
    >>> step, cache = model.apply({"params": params}, ids, encoded=e, cache=cache, method="decode")
    >>> logits.shape, e.shape, bool(jnp.allclose(step, logits, atol=1e-5)), sorted(params)
    ((2, 3, 12), (2, 5, 8), True, ['encoder_proj', 'text_decoder', 'vision'])
    """

    vision: ViT
    decoder: DecoderConfig
    num_map_queries: int | None = None
    project_encoder: bool | None = None

    def setup(self):
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"Captioner: decoder must be a DecoderConfig, got {type(self.decoder).__name__}.")
        if self.num_map_queries is not None:
            self.map_pooler = MAPHead(self.vision.get_encoder_config(), num_queries=self.num_map_queries)
        vision_width = self.vision.sizes()["width"]
        project = self.project_encoder
        if project is None:
            project = vision_width != self.decoder.width
        if project:
            self.encoder_proj = nn.Dense(
                self.decoder.width, dtype=self.decoder.dtype, param_dtype=self.decoder.param_dtype
            )
        self.text_decoder = TextDecoder(self.decoder)

    def encode(self, images: Array, *, train: bool = False) -> Array:
        """``images [B, H, W, C]`` -> the tokens the decoder reads ``[B, S, width]``."""
        _, out = self.vision(images, train=train)
        x = out["encoded"]
        if self.num_map_queries is not None:
            x = self.map_pooler(x)
        if hasattr(self, "encoder_proj"):
            x = self.encoder_proj(x)
        return x

    def __call__(
        self, images: Array, decoder_input_ids: Array, *, parallel: Array | None = None, train: bool = False
    ) -> tuple[Array, dict]:
        encoded = self.encode(images, train=train)
        logits, intermediates = self.text_decoder(decoder_input_ids, encoded, parallel=parallel, train=train)
        return logits, {**intermediates, "encoded": encoded}

    def decode(
        self, tokens: Array, encoded: Array | None = None, cache: DecoderCache | None = None
    ) -> tuple[Array, DecoderCache | None]:
        """Decodes ``tokens [B, T]``: over a cache (see the class docstring) or, without one, teacher-forced."""
        if cache is None:
            if encoded is None:
                raise ValueError("Captioner.decode: without a cache, pass encoded=the image tokens (model.encode).")
            logits, _ = self.text_decoder(tokens, encoded)
            return logits, None
        return self.text_decoder.decode(tokens, cache, encoded)

    def init_cache(self, batch_size: int, max_length: int, encoded_length: int) -> DecoderCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` positions over ``encoded_length``
        image tokens (see :func:`mmjax.decoder.init_cache`)."""
        return init_cache(self.decoder, batch_size, max_length, encoded_length)
