"""CLIP (Radford et al. 2021): an image tower and a text tower projected into one embedding space.

::

    f_img = visual_projection(ViT(images))          [B_i, embed_dim]   (HF get_image_features)
    f_txt = text_projection(TextTransformer(ids))   [B_t, embed_dim]   (HF get_text_features)
    u = f_img / |f_img|,  v = f_txt / |f_txt|
    logits_per_image = exp(min(logit_scale, log 100)) * u v^T (+ logit_bias)     [B_i, B_t]
    logits_per_text  = logits_per_image^T

The image tower is :class:`mmjax.vit.ViT` with CLIP's options (pre-norm before the encoder, class-token pooling
and a LayerNorm on the pooled token, quick_gelu, LayerNorm eps 1e-5, no patch bias); the text tower is
:class:`mmjax.text.TextTransformer`. ``logit_bias`` (SigLIP) exists when ``config.logit_bias_init`` is set.

Parameter tree::

    vision/...                 mmjax.vit.ViT (embedding, cls, pos_embedding, pre_norm, encoder, post_norm)
    text/...                   mmjax.text.TextTransformer (token_embedding, pos_embedding, encoder)
    visual_projection/kernel   [vision_width, embed_dim]
    text_projection/kernel     [text_width, embed_dim]
    logit_scale                []  (log of the temperature's inverse; init log(1/0.07))
    logit_bias                 []  (only with logit_bias_init)

Inputs: images NHWC float32, already normalised (:mod:`mmjax.preprocess`); ids int32 ``[B, T]``
(:mod:`mmjax.tokenizer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmjax.layers import EncoderConfig, l2_normalize
from mmjax.text import POOLING_MODES, TextTransformer
from mmjax.vit import ViT

__all__ = ["CLIPConfig", "CLIPOutput", "CLIP", "CONFIGS", "get_config", "as_config", "l2_normalize"]

Array = jax.Array

_HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Sizes and options of a :class:`CLIP` model (frozen, hashable; build with keywords or :meth:`from_dict`).

    Attributes:
      embed_dim: the joint embedding width (HF ``projection_dim``).
      image_size, patch_size, num_channels: input images ``[image_size, image_size, num_channels]``.
      vision_width, vision_depth, vision_heads, vision_mlp_dim: image tower sizes (mlp default 4 x width).
      vision_stem_features: channel widths of a convolutional stem in the image tower (3x3 stride-2 convs, see
        :class:`mmjax.vit.ViT` ``stem_features``); ``()`` (default) is OpenAI CLIP's plain ViT. A stem makes the
        tower a hybrid ViT with ``(image_size // (patch_size * 2**len(stem))) ** 2`` tokens; it has no Hugging
        Face equivalent.
      vision_stem_impl: ``"conv"`` or ``"matmul"`` (the same stem computed as im2col matmuls, faster on CPUs; see
        :class:`mmjax.vit.StemConv`).
      vocab_size, context_length: text tower vocabulary and number of positions.
      text_width, text_depth, text_heads, text_mlp_dim: text tower sizes (mlp default 4 x width).
      vision_activation, text_activation: MLP activations (``"quick_gelu"`` for OpenAI CLIP).
      vision_layer_norm_eps, text_layer_norm_eps: LayerNorm epsilons (1e-5).
      text_pooling: ``"eot"`` (first ``eot_id``), ``"argmax"`` (highest id; HF legacy ``eos_token_id == 2``),
        ``"last"``, ``"first"`` or ``"mean"``.
      eot_id: the end-of-text id.
      logit_scale_init: initial ``logit_scale`` (log(1/0.07) = 2.6593).
      max_logit_scale: the clamp applied when the scale is used (log(100)); ``None`` disables it.
      logit_bias_init: if not ``None``, a learnable ``logit_bias`` with this initial value (SigLIP uses -10).
      remat, scan, attention_implementation: passed to both encoders (see :class:`mmjax.layers.Encoder`).

    >>> cfg = CLIPConfig(embed_dim=8, image_size=16, patch_size=8, vision_width=16, vision_depth=1, vision_heads=2,
    ...                  vocab_size=50, context_length=8, text_width=16, text_depth=1, text_heads=2, eot_id=49)
    >>> CLIPConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int | None = None
    vision_stem_features: tuple[int, ...] = ()
    vision_stem_impl: str = "conv"
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int | None = None
    vision_activation: str = "quick_gelu"
    text_activation: str = "quick_gelu"
    vision_layer_norm_eps: float = 1e-5
    text_layer_norm_eps: float = 1e-5
    text_pooling: str = "eot"
    eot_id: int = 49407
    logit_scale_init: float = math.log(1 / 0.07)
    max_logit_scale: float | None = math.log(100.0)
    logit_bias_init: float | None = None
    remat: bool = False
    scan: bool = False
    attention_implementation: str | None = None

    def __post_init__(self):
        for name in (
            "embed_dim",
            "image_size",
            "patch_size",
            "num_channels",
            "vision_width",
            "vision_depth",
            "vision_heads",
            "vocab_size",
            "context_length",
            "text_width",
            "text_depth",
            "text_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CLIPConfig: {name} must be a positive int, got {value!r}.")
        stem = self.vision_stem_features
        if isinstance(stem, list):
            object.__setattr__(self, "vision_stem_features", tuple(stem))
            stem = self.vision_stem_features
        if not isinstance(stem, tuple) or any(not isinstance(f, int) or f < 1 for f in stem):
            raise ValueError(f"CLIPConfig: vision_stem_features must be a tuple of positive ints, got {stem!r}.")
        if self.image_size % self.token_stride:
            raise ValueError(
                f"CLIPConfig: image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
                + (f" x stem stride {2 ** len(stem)}" if stem else "")
                + "."
            )
        for tower in ("vision", "text"):
            w, h = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if w % h:
                raise ValueError(f"CLIPConfig: {tower}_width={w} is not divisible by {tower}_heads={h}.")
        if self.text_pooling not in POOLING_MODES:
            raise ValueError(f"CLIPConfig: text_pooling must be one of {POOLING_MODES}, got {self.text_pooling!r}.")
        if not 0 <= self.eot_id < self.vocab_size:
            raise ValueError(f"CLIPConfig: eot_id={self.eot_id} must be in [0, vocab_size={self.vocab_size}).")

    @property
    def token_stride(self) -> int:
        """Pixels per image token along each side: ``patch_size * 2 ** len(vision_stem_features)``."""
        return self.patch_size * 2 ** len(self.vision_stem_features)

    @property
    def num_patches(self) -> int:
        """Image tokens (patches) per image: ``(image_size // token_stride) ** 2``."""
        return (self.image_size // self.token_stride) ** 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
        """Build from a dict or ``ml_collections.ConfigDict``; unknown keys raise ValueError naming them."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") and not isinstance(d, Mapping) else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"CLIPConfig: unknown keys {unknown}; valid keys are {sorted(names)}.")
        return cls(**d)

    def replace(self, **changes) -> CLIPConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def vision_encoder_config(self, dtype: Any = None, param_dtype: Any = jnp.float32) -> EncoderConfig:
        """The image tower's :class:`mmjax.layers.EncoderConfig` (the ``vision_*`` fields, remat/scan/attention).

        >>> get_config("tiny").vision_encoder_config().mlp_dim
        128
        """
        return EncoderConfig(
            width=self.vision_width,
            depth=self.vision_depth,
            num_heads=self.vision_heads,
            mlp_dim=self.vision_mlp_dim or 4 * self.vision_width,
            activation=self.vision_activation,
            layer_norm_eps=self.vision_layer_norm_eps,
            remat=self.remat,
            scan=self.scan,
            attention_implementation=self.attention_implementation,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def text_encoder_config(self, dtype: Any = None, param_dtype: Any = jnp.float32) -> EncoderConfig:
        """The text tower's :class:`mmjax.layers.EncoderConfig` (the ``text_*`` fields, remat/scan/attention).

        >>> get_config("tiny").text_encoder_config().activation
        'quick_gelu'
        """
        return EncoderConfig(
            width=self.text_width,
            depth=self.text_depth,
            num_heads=self.text_heads,
            mlp_dim=self.text_mlp_dim or 4 * self.text_width,
            activation=self.text_activation,
            layer_norm_eps=self.text_layer_norm_eps,
            remat=self.remat,
            scan=self.scan,
            attention_implementation=self.attention_implementation,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> CLIPConfig:
        """Build from a ``transformers.CLIPConfig`` or its ``config.json`` dict.

        Text pooling follows Hugging Face: ``"argmax"`` when the text config's ``eos_token_id == 2`` (configs
        written before transformers PR #24773, e.g. ``openai/clip-vit-base-patch32``), else ``"eot"`` at
        ``eos_token_id``.
        """
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = d.get("model_type", "clip")
        if model_type != "clip":
            raise ValueError(f"CLIPConfig.from_hf: model_type must be 'clip', got {model_type!r}.")
        # very old config.json files keep the tower settings in text_config_dict / vision_config_dict
        t = dict(d.get("text_config") or d.get("text_config_dict") or {})
        v = dict(d.get("vision_config") or d.get("vision_config_dict") or {})

        def act(name, where):
            if name not in _HF_ACTIVATIONS:
                raise ValueError(
                    f"CLIPConfig.from_hf: {where}.hidden_act={name!r} is not supported; "
                    f"expected one of {sorted(_HF_ACTIVATIONS)}."
                )
            return _HF_ACTIVATIONS[name]

        eos = int(t.get("eos_token_id", 49407))
        kwargs = dict(
            embed_dim=int(d.get("projection_dim", 512)),
            image_size=int(v.get("image_size", 224)),
            patch_size=int(v.get("patch_size", 32)),
            num_channels=int(v.get("num_channels", 3)),
            vision_width=int(v.get("hidden_size", 768)),
            vision_depth=int(v.get("num_hidden_layers", 12)),
            vision_heads=int(v.get("num_attention_heads", 12)),
            vision_mlp_dim=int(v.get("intermediate_size", 3072)),
            vocab_size=int(t.get("vocab_size", 49408)),
            context_length=int(t.get("max_position_embeddings", 77)),
            text_width=int(t.get("hidden_size", 512)),
            text_depth=int(t.get("num_hidden_layers", 12)),
            text_heads=int(t.get("num_attention_heads", 8)),
            text_mlp_dim=int(t.get("intermediate_size", 2048)),
            vision_activation=act(v.get("hidden_act", "quick_gelu"), "vision_config"),
            text_activation=act(t.get("hidden_act", "quick_gelu"), "text_config"),
            vision_layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
            text_layer_norm_eps=float(t.get("layer_norm_eps", 1e-5)),
            text_pooling="argmax" if eos == 2 else "eot",
            eot_id=eos if eos != 2 else int(t.get("vocab_size", 49408)) - 1,
            logit_scale_init=float(d.get("logit_scale_init_value", 2.6592)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict of the equivalent ``transformers.CLIPConfig`` (model_type ``"clip"``)."""
        inv = {
            "quick_gelu": "quick_gelu",
            "gelu": "gelu",
            "gelu_tanh": "gelu_pytorch_tanh",
            "relu": "relu",
            "silu": "silu",
        }
        for name in ("vision_activation", "text_activation"):
            if getattr(self, name) not in inv:
                raise ValueError(f"to_hf_dict: {name}={getattr(self, name)!r} has no Hugging Face equivalent.")
        if self.text_pooling not in ("eot", "argmax"):
            raise ValueError(
                f"to_hf_dict: text_pooling={self.text_pooling!r} has no Hugging Face equivalent; "
                "Hugging Face CLIP pools at the end-of-text token ('eot' or 'argmax')."
            )
        if self.logit_bias_init is not None:
            raise ValueError("to_hf_dict: Hugging Face CLIPModel has no logit_bias; use logit_bias_init=None.")
        if self.vision_stem_features:
            raise ValueError(
                f"to_hf_dict: vision_stem_features={self.vision_stem_features} (a hybrid image tower) "
                "has no Hugging Face CLIP equivalent; use vision_stem_features=()."
            )
        return {
            "model_type": "clip",
            "architectures": ["CLIPModel"],
            "projection_dim": self.embed_dim,
            "logit_scale_init_value": self.logit_scale_init,
            "text_config": {
                "model_type": "clip_text_model",
                "vocab_size": self.vocab_size,
                "hidden_size": self.text_width,
                "intermediate_size": self.text_mlp_dim or 4 * self.text_width,
                "projection_dim": self.embed_dim,
                "num_hidden_layers": self.text_depth,
                "num_attention_heads": self.text_heads,
                "max_position_embeddings": self.context_length,
                "hidden_act": inv[self.text_activation],
                "layer_norm_eps": self.text_layer_norm_eps,
                "eos_token_id": 2 if self.text_pooling == "argmax" else self.eot_id,
                "bos_token_id": max(self.eot_id - 1, 0),
                "pad_token_id": 1,
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": self.vision_width,
                "intermediate_size": self.vision_mlp_dim or 4 * self.vision_width,
                "projection_dim": self.embed_dim,
                "num_hidden_layers": self.vision_depth,
                "num_attention_heads": self.vision_heads,
                "num_channels": self.num_channels,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_act": inv[self.vision_activation],
                "layer_norm_eps": self.vision_layer_norm_eps,
            },
        }


def _openai(embed, image, patch, vw, vd, tw, td) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        image_size=image,
        patch_size=patch,
        vision_width=vw,
        vision_depth=vd,
        vision_heads=vw // 64,
        text_width=tw,
        text_depth=td,
        text_heads=tw // 64,
    )


#: Named configurations: OpenAI's released sizes, and tiny ones for tests.
CONFIGS: dict[str, CLIPConfig] = {
    "ViT-B/32": _openai(512, 224, 32, 768, 12, 512, 12),
    "ViT-B/16": _openai(512, 224, 16, 768, 12, 512, 12),
    "ViT-L/14": _openai(768, 224, 14, 1024, 24, 768, 12),
    "ViT-L/14-336": _openai(768, 336, 14, 1024, 24, 768, 12),
    "tiny": CLIPConfig(
        embed_dim=16,
        image_size=16,
        patch_size=8,
        vision_width=32,
        vision_depth=2,
        vision_heads=4,
        vocab_size=64,
        context_length=12,
        text_width=32,
        text_depth=2,
        text_heads=4,
        eot_id=63,
    ),
    "tiny-siglip": CLIPConfig(
        embed_dim=16,
        image_size=16,
        patch_size=8,
        vision_width=32,
        vision_depth=2,
        vision_heads=4,
        vocab_size=64,
        context_length=12,
        text_width=32,
        text_depth=2,
        text_heads=4,
        eot_id=63,
        logit_scale_init=math.log(10.0),
        logit_bias_init=-10.0,
    ),
}


def get_config(name: str, **overrides) -> CLIPConfig:
    """A named configuration from :data:`CONFIGS`, with optional field overrides.

    >>> get_config("ViT-L/14-336").image_size, get_config("tiny", vocab_size=100).vocab_size
    (336, 100)
    """
    if name not in CONFIGS:
        raise ValueError(f"get_config: unknown CLIP config {name!r}; expected one of {sorted(CONFIGS)}.")
    return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]


def as_config(config: Any) -> CLIPConfig:
    """A :class:`CLIPConfig` from a CLIPConfig, a name in :data:`CONFIGS`, a dict or a ConfigDict.

    >>> cfg = as_config("tiny")
    >>> as_config(cfg.to_dict()) == cfg, as_config(cfg) is cfg, cfg.embed_dim
    (True, True, 16)
    """
    if isinstance(config, CLIPConfig):
        return config
    if isinstance(config, str):
        return get_config(config)
    if isinstance(config, Mapping) or hasattr(config, "to_dict"):
        return CLIPConfig.from_dict(config)
    raise ValueError(
        f"CLIP: config must be a CLIPConfig, a name in {sorted(CONFIGS)}, a dict or an ml_collections.ConfigDict; "
        f"got {type(config).__name__}."
    )


@flax.struct.dataclass
class CLIPOutput:
    """What :class:`CLIP` returns (a pytree).

    Attributes:
      image_embeds: L2-normalised image embeddings ``[B_i, embed_dim]`` float32.
      text_embeds: L2-normalised text embeddings ``[B_t, embed_dim]`` float32.
      logits_per_image: ``scale * image_embeds @ text_embeds.T (+ bias)``, ``[B_i, B_t]``.
      logits_per_text: its transpose, ``[B_t, B_i]``.
      logit_scale: the scale used, ``exp(min(logit_scale, max_logit_scale))`` (scalar).
      logit_bias: the bias used (scalar), or ``None``.
      image_intermediates: the image tower's intermediates (:class:`mmjax.vit.ViT`: ``patch_tokens``,
        ``embedded``, ``encoderblock_{i}``, ``encoded``, ``pooled``, ...).
      text_intermediates: the text tower's intermediates (:class:`mmjax.text.TextTransformer`: ``embeddings``,
        ``encoderblock_{i}``, ``tokens``).

    >>> model = CLIP("tiny")
    >>> images, ids = jnp.zeros((3, 16, 16, 3)), jnp.ones((2, 4), jnp.int32)
    >>> out = model.apply(model.init(jax.random.key(0), images, ids), images, ids)
    >>> out.image_embeds.shape, out.logits_per_text.shape, out.logit_bias is None
    ((3, 16), (2, 3), True)
    >>> out.image_intermediates["encoded"].shape, out.text_intermediates["tokens"].shape
    ((3, 5, 32), (2, 4, 32))
    """

    image_embeds: Array
    text_embeds: Array
    logits_per_image: Array
    logits_per_text: Array
    logit_scale: Array
    logit_bias: Array | None = None
    image_intermediates: dict[str, Array] | None = None
    text_intermediates: dict[str, Array] | None = None


class CLIP(nn.Module):
    """The two-tower CLIP model.

    Attributes:
      config: a :class:`CLIPConfig`, a name in :data:`CONFIGS`, a dict or an ``ml_collections.ConfigDict``.
      dtype: compute dtype of the towers (e.g. ``jnp.bfloat16``); embeddings and logits are float32.
      param_dtype: parameter dtype.

    Output convention: big_vision's ``(output, intermediates)`` of the towers is kept whole: :class:`CLIPOutput`
    carries the embeddings and logits and each tower's intermediates (``image_intermediates``,
    ``text_intermediates``); ``encode_image``/``encode_text`` return the projected features alone, like Hugging
    Face's ``get_image_features``/``get_text_features``.

    Methods (use with ``model.apply(..., method=...)``):
      ``__call__(images, ids, attention_mask=None, train=False)`` -> :class:`CLIPOutput`.
      ``encode_image(images, normalize=False, train=False)`` -> projected image features ``[B, embed_dim]``;
        unnormalised by default, like Hugging Face ``get_image_features``.
      ``encode_text(ids, attention_mask=None, normalize=False, train=False)`` -> projected text features.

    >>> model = CLIP("tiny")
    >>> images, ids = jnp.zeros((2, 16, 16, 3)), jnp.array([[1, 5, 63, 0], [1, 63, 0, 0]], jnp.int32)
    >>> params = model.init(jax.random.key(0), images, ids)["params"]
    >>> out = model.apply({"params": params}, images, ids)
    >>> out.logits_per_image.shape, model.apply({"params": params}, ids, method="encode_text").shape
    ((2, 2), (2, 16))
    """

    config: Any = "ViT-B/32"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = as_config(self.config)
        self.cfg = cfg
        self.vision = ViT(
            variant=None,
            num_classes=0,
            encoder_config=cfg.vision_encoder_config(self.dtype, self.param_dtype),
            patch_size=cfg.patch_size,
            stem_features=cfg.vision_stem_features,
            stem_impl=cfg.vision_stem_impl,
            posemb="learn",
            class_token=True,
            cls_posemb=True,
            pool_type="token",
            pre_norm=True,
            final_norm="pooled",
            patch_bias=False,
        )
        self.text = TextTransformer(
            vocab_size=cfg.vocab_size,
            encoder_config=cfg.text_encoder_config(self.dtype, self.param_dtype),
            context_length=cfg.context_length,
            pooling=cfg.text_pooling,
            eot_id=cfg.eot_id,
        )
        proj = lambda name, width: nn.Dense(  # noqa: E731
            cfg.embed_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(width**-0.5),
            name=name,
        )
        self.visual_projection = proj("visual_projection", cfg.vision_width)
        self.text_projection = proj("text_projection", cfg.text_width)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(cfg.logit_scale_init), (), self.param_dtype
        )
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.initializers.constant(cfg.logit_bias_init), (), self.param_dtype
            )

    def _check_images(self, images):
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"CLIP: images must be NHWC [batch, {want[0]}, {want[1]}, {want[2]}] (normalised, see "
                f"mmjax.preprocess), got shape {tuple(images.shape)}."
            )

    def encode_image(self, images: Array, normalize: bool = False, train: bool = False) -> Array:
        """Images ``[B, H, W, C]`` -> ``visual_projection(vision(images))`` ``[B, embed_dim]`` (float32).

        With ``normalize=True`` the result is L2-normalised (``image_embeds`` of :class:`CLIPOutput`).
        """
        feats, _ = self._image_features(images, train)
        return l2_normalize(feats) if normalize else feats

    def _image_features(self, images, train):
        images = jnp.asarray(images)
        self._check_images(images)
        pooled, aux = self.vision(images, train=train)
        return self.visual_projection(pooled).astype(jnp.float32), aux

    def _text_features(self, ids, attention_mask, train):
        pooled, aux = self.text(ids, attention_mask, train=train)
        return self.text_projection(pooled).astype(jnp.float32), aux

    def encode_text(
        self, ids: Array, attention_mask: Array | None = None, normalize: bool = False, train: bool = False
    ) -> Array:
        """Ids ``[B, T]`` -> ``text_projection(text(ids))`` ``[B, embed_dim]`` (float32).

        ``attention_mask`` ``[B, T]`` (True/1 = real token) is combined with the causal mask.
        """
        feats, _ = self._text_features(ids, attention_mask, train)
        return l2_normalize(feats) if normalize else feats

    def scale_and_bias(self) -> tuple[Array, Array | None]:
        """``(exp(min(logit_scale, max_logit_scale)), logit_bias or None)`` in float32."""
        s = self.logit_scale.astype(jnp.float32)
        if self.cfg.max_logit_scale is not None:
            s = jnp.minimum(s, self.cfg.max_logit_scale)
        bias = self.logit_bias.astype(jnp.float32) if self.cfg.logit_bias_init is not None else None
        return jnp.exp(s), bias

    def __call__(
        self, images: Array, ids: Array, attention_mask: Array | None = None, train: bool = False
    ) -> CLIPOutput:
        """Both towers and the similarity logits; see :class:`CLIPOutput`."""
        image_feats, image_aux = self._image_features(images, train)
        text_feats, text_aux = self._text_features(ids, attention_mask, train)
        image_embeds, text_embeds = l2_normalize(image_feats), l2_normalize(text_feats)
        scale, bias = self.scale_and_bias()
        logits = scale * (image_embeds @ text_embeds.T)
        if bias is not None:
            logits = logits + bias
        return CLIPOutput(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logits_per_image=logits,
            logits_per_text=logits.T,
            logit_scale=scale,
            logit_bias=bias,
            image_intermediates=image_aux,
            text_intermediates=text_aux,
        )
