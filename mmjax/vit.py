"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), with the options that published
checkpoints need (big_vision, Hugging Face ViT, OpenAI CLIP's image tower).

Parameter tree of :class:`ViT` (names a converter maps to)::

    stem_conv_{i}/{kernel,bias}  convolutional stem: 3x3 stride-2 convs              (stem_features, hybrid ViT)
    embedding/{kernel,bias}   patch embedding, nn.Conv kernel [patch, patch, channels, width] (bias if patch_bias)
    cls                       class token [1, 1, width]                       (class_token=True)
    pos_embedding             learned position embedding [1, tokens, width]   (posemb="learn"; tokens include the
                                                                               class token when cls_posemb=True)
    pre_norm/{scale,bias}     LayerNorm before the encoder                    (pre_norm=True, CLIP's pre_layrnorm)
    encoder/                  mmjax.layers.Encoder: encoderblock_{i}/ (or stacked encoderblock/ when scan=True),
                              encoder_norm/ (final_norm="sequence")
    map_head/                 probe [1, 1, width], attn/, ln/, mlp/           (pool_type="map")
    post_norm/{scale,bias}    LayerNorm of the pooled vector                  (final_norm="pooled", CLIP)
    pre_logits/{kernel,bias}  representation layer Dense + tanh               (representation_size, HF's pooler)
    head/{kernel,bias}        classifier                                      (num_classes > 0)
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.attention import MultiHeadAttention
from mmjax.layers import (
    Encoder,
    EncoderConfig,
    Mlp,
    add_learned_posemb,
    get_activation,
    posemb_sincos_2d,
    refuse_encoder_keywords_beside_config,
)

Dtype = Any
Array = jax.Array

__all__ = ["VARIANTS", "STEM_IMPLS", "decode_variant", "MAPHead", "StemConv", "ViT"]

STEM_IMPLS = ("conv", "matmul")

# name: (width, depth, mlp_dim, num_heads), as in big_vision's decode_variant.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}

_POOL_TYPES = ("token", "gap", "map")
_FINAL_NORMS = ("sequence", "pooled", "none")
_POSEMBS = ("learn", "sincos2d")
# ViT keywords that an EncoderConfig replaces (they must keep their defaults when encoder_config is given)
_ENCODER_KEYWORDS = (
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "activation",
    "layer_norm_eps",
    "dropout_rate",
    "attention_dropout_rate",
    "drop_path_rate",
    "attention_bias",
    "remat",
    "scan",
    "attention_implementation",
    "dtype",
    "param_dtype",
)


def decode_variant(variant: str) -> dict[str, int]:
    """Turns a variant string such as ``"B/16"`` into model sizes.

    ``"<name>/<patch>"`` or ``"<name>"`` with name in ``mu, Ti, S, M, B, L, H`` (big_vision's table).

    Args:
      variant: the variant string.

    Returns:
      dict with ``width``, ``depth``, ``mlp_dim``, ``num_heads`` and, when given, ``patch_size``.

    Raises:
      ValueError: for an unknown name or a malformed patch size.

    Example:
      >>> decode_variant("B/16")
      {'width': 768, 'depth': 12, 'mlp_dim': 3072, 'num_heads': 12, 'patch_size': 16}
    """
    match = re.fullmatch(r"([A-Za-z]+)(?:/(\d+))?", variant) if isinstance(variant, str) else None
    if match is None or match.group(1) not in VARIANTS:
        raise ValueError(
            f"variant={variant!r} is not a ViT variant; expected '<name>' or '<name>/<patch>' with name in "
            f"{list(VARIANTS)} (e.g. 'B/16', 'Ti/4'), or pass width/depth/num_heads/mlp_dim/patch_size explicitly."
        )
    width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if match.group(2) is not None:
        patch = int(match.group(2))
        if patch < 1:
            raise ValueError(f"variant={variant!r}: the patch size must be a positive integer.")
        out["patch_size"] = patch
    return out


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAPHead): a learned probe attends over the tokens, then a residual MLP.

    ``p = attn(probe, x)``; ``y = p + mlp(ln(p))``; returns ``y[:, 0]`` (or all ``num_queries`` rows of ``y``).

    Attributes:
      config: the tower's :class:`mmjax.layers.EncoderConfig`; the head uses its ``num_heads``, ``mlp_dim``,
        ``activation``, ``layer_norm_eps``, ``attention_implementation``, ``dtype`` and ``param_dtype`` (no dropout,
        full attention heads and biases).
      num_queries: ``None`` (one probe, output ``[batch, width]``) or the number ``N`` of learned probes, output
        ``[batch, N, width]`` (a pooler that keeps N tokens, e.g. for a captioner's cross-attention).

    Input ``[batch, tokens, width]`` -> ``[batch, width]`` (``[batch, N, width]``). Parameters ``probe``
    [1, N or 1, width], ``attn``, ``ln``, ``mlp``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mmjax.layers import EncoderConfig
      >>> head = MAPHead(EncoderConfig(num_heads=2, mlp_dim=32))
      >>> x = jnp.ones((3, 5, 8))
      >>> head.apply(head.init(jax.random.key(0), x), x).shape
      (3, 8)
    """

    config: EncoderConfig
    num_queries: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        batch, _, width = x.shape
        n = 1 if self.num_queries is None else self.num_queries
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"MAPHead: num_queries must be None or a positive int, got {self.num_queries!r}.")
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, n, width), cfg.param_dtype)
        probe = jnp.broadcast_to(probe.astype(x.dtype), (batch, n, width))
        p = MultiHeadAttention(
            num_heads=cfg.num_heads,
            implementation=cfg.attention_implementation,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="attn",
        )(probe, x)
        y = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="ln")(p)
        p = p + Mlp(cfg.mlp_dim, activation=cfg.activation, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="mlp")(y)
        return p[:, 0] if self.num_queries is None else p


class StemConv(nn.Module):
    """A 3x3 stride-2 ``'SAME'`` convolution as one matmul over explicit patches (im2col).

    ``y[b, i, j] = bias + sum_{u, v, c} x_pad[b, 2i + u, 2j + v, c] kernel[u, v, c]``, where ``x_pad`` pads
    ``[batch, h, w, c]`` as XLA's ``'SAME'`` does (``ceil(h / 2)`` output rows). Parameters ``kernel
    [3, 3, c, features]`` (LeCun normal) and ``bias [features]`` (zeros) have the names, shapes and initialisers of
    ``nn.Conv(features, (3, 3), strides=(2, 2), padding="SAME")``, so the two are interchangeable; XLA's CPU
    convolution is slow for few channels, one large matmul is not.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    >>> conv = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")
    >>> params = conv.init(jax.random.key(1), x)
    >>> y = StemConv(4).apply(params, x)
    >>> y.shape, bool(jnp.allclose(y, conv.apply(params, x), atol=1e-5))
    ((2, 4, 3, 4), True)
    """

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        ho, wo = -(-h // 2), -(-w // 2)
        pad_h, pad_w = max(2 * ho + 1 - h, 0), max(2 * wo + 1 - w, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        patches = jnp.concatenate(
            [x[:, u : u + 2 * ho : 2, v : v + 2 * wo : 2] for u in range(3) for v in range(3)], -1
        )
        return patches @ kernel.reshape(9 * c, self.features) + bias


class ViT(nn.Module):
    """Vision Transformer: (conv stem) -> patches -> (class token) -> position embedding -> pre-LN encoder -> pool
    -> head.

    Sizes come from ``variant`` (see :func:`decode_variant`); any of ``width``, ``depth``, ``num_heads``,
    ``mlp_dim``, ``patch_size`` given explicitly overrides it (``variant=None`` needs all five). The encoder options
    (sizes, activation, LayerNorm epsilon, dropout, remat, scan, dtypes, ...) are resolved once into an
    :class:`mmjax.layers.EncoderConfig` (:meth:`get_encoder_config`) that the encoder, the MAP head and the
    embedding layers all read; ``encoder_config=EncoderConfig(...)`` passes one whole instead of the keywords.

    Attributes:
      variant: e.g. ``"B/16"``, ``"Ti/4"``, ``"mu/8"``, or ``None``.
      num_classes: classifier outputs; 0 means no head (the pooled vector is returned in place of the logits).
      width, depth, num_heads, mlp_dim, patch_size: explicit sizes (override the variant).
      posemb: ``"learn"`` (learned, normal(0.02) init) or ``"sincos2d"`` (fixed, :func:`posemb_sincos_2d`).
      class_token: prepend a learned class token ``cls``.
      cls_posemb: the learned position embedding also covers the class token (HF, CLIP, timm); if False it covers
        the patches only and the class token is added after it (big_vision).
      pool_type: ``"token"`` (class token; needs ``class_token``), ``"gap"`` (mean of the patch tokens, class
        token excluded) or ``"map"`` (:class:`MAPHead`).
      pre_norm: LayerNorm ``pre_norm`` on the embedded tokens before the encoder (CLIP).
      final_norm: ``"sequence"`` (LayerNorm ``encoder/encoder_norm`` on every token, ViT/HF), ``"pooled"``
        (LayerNorm ``post_norm`` on the pooled vector only, CLIP's post_layernorm) or ``"none"``.
      representation_size: if set, a Dense ``pre_logits`` of this width + ``representation_activation`` after
        pooling (HF ViTModel's pooler).
      representation_activation: activation name of the representation layer (``"tanh"``).
      patch_bias: bias in the patch embedding (False for CLIP).
      stem_features: channel widths of an optional convolutional stem before the patch embedding, one 3x3
        stride-2 conv + GELU each (the hybrid ViT of Dosovitskiy et al. section 3.1, with the small conv stem of
        Xiao et al. 2021, "Early Convolutions Help Transformers See Better"). With ``k`` stem convs and
        ``patch_size=p`` a token covers ``2^k * p`` pixels per side; ``()`` (default) is the plain ViT.
      stem_impl: how the stem convs are computed: ``"conv"`` (``nn.Conv``) or ``"matmul"`` (:class:`StemConv`: the
        same function and parameters as one matmul over explicit 3x3 patches, faster on CPUs for the thin early
        layers).
      activation, layer_norm_eps, dropout_rate, attention_dropout_rate, drop_path_rate, attention_bias, remat, scan,
        attention_implementation: encoder options, see :class:`mmjax.layers.Encoder`. ``dropout_rate`` also
        applies to the embedded tokens.
      head_zero_init: initialise the classifier to zeros (big_vision); else LeCun normal.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); param_dtype: parameter dtype (float32).
      encoder_config: an :class:`mmjax.layers.EncoderConfig` (with ``width`` set) in place of the variant's sizes
        and the encoder keywords above (``width`` ... ``param_dtype``), which must then keep their defaults;
        ``patch_size`` still comes from ``patch_size`` or the variant, and ``final_norm`` from this model's
        ``final_norm``. CLIP builds its image tower this way.

    Output convention (big_vision; every mmjax model): ``(output, intermediates)``, a dict of named stages.

    Call: ``logits, intermediates = model.apply({"params": params}, images, train=False)``; ``images``
    ``[batch, height, width, channels]`` floating (float32 or bfloat16; float64 under ``jax_enable_x64``), already
    normalised (integer pixels raise a ValueError: convert with ``images.astype(jnp.float32) / 255`` and
    normalise); ``train=True`` enables dropout / stochastic depth (rng
    ``'dropout'``). ``logits`` ``[batch, num_classes]`` float32 (``num_classes=0``: the pooled vector
    ``[batch, representation_size or width]``). ``intermediates`` holds ``patch_tokens`` (patch embeddings
    ``[batch, patches, width]``), ``embedded`` (encoder input), ``encoderblock_{i}`` (when ``scan=False``),
    ``encoded`` (encoder output after the final sequence norm, ``[batch, tokens, width]``; equals HF's
    last_hidden_state), ``pooled`` (after pooling and ``post_norm``), ``pre_logits`` (after the representation
    layer) and ``logits`` (when ``num_classes > 0``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ViT(variant="mu/8", num_classes=10)
      >>> images = jnp.zeros((2, 16, 16, 3))
      >>> params = model.init(jax.random.key(0), images)["params"]
      >>> logits, aux = model.apply({"params": params}, images)
      >>> logits.shape, aux["encoded"].shape
      ((2, 10), (2, 5, 32))
    """

    variant: str | None = "B/16"
    num_classes: int = 1000
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    patch_size: int | None = None
    posemb: str = "learn"
    class_token: bool = True
    cls_posemb: bool = True
    pool_type: str = "token"
    pre_norm: bool = False
    final_norm: str = "sequence"
    representation_size: int | None = None
    representation_activation: str = "tanh"
    patch_bias: bool = True
    stem_features: tuple[int, ...] = ()
    stem_impl: str = "conv"
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_bias: bool = True
    remat: bool = False
    scan: bool = False
    attention_implementation: str | None = None
    head_zero_init: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    encoder_config: EncoderConfig | None = None

    def __post_init__(self):
        self.get_encoder_config()  # validate at construction
        super().__post_init__()

    def get_encoder_config(self) -> EncoderConfig:
        """The resolved :class:`mmjax.layers.EncoderConfig` of the encoder (variant + keywords, or
        ``encoder_config`` with this model's ``final_norm``).

        Example:
          >>> cfg = ViT(variant="S/16", depth=6, dropout_rate=0.1).get_encoder_config()
          >>> cfg.width, cfg.depth, cfg.num_heads, cfg.dropout_rate, cfg.final_norm
          (384, 6, 6, 0.1, True)
        """
        s = self.sizes()
        final_norm = self.final_norm == "sequence"
        if self.encoder_config is not None:
            return self.encoder_config.replace(final_norm=final_norm)
        return EncoderConfig(
            width=s["width"],
            depth=s["depth"],
            num_heads=s["num_heads"],
            mlp_dim=s["mlp_dim"],
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            drop_path_rate=self.drop_path_rate,
            attention_bias=self.attention_bias,
            attention_implementation=self.attention_implementation,
            remat=self.remat,
            scan=self.scan,
            final_norm=final_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def sizes(self) -> dict[str, int]:
        """The resolved ``width``, ``depth``, ``mlp_dim``, ``num_heads``, ``patch_size`` (variant + overrides).

        Example:
          >>> ViT(variant="S/16", depth=6).sizes()["depth"]
          6
        """
        out = decode_variant(self.variant) if self.variant is not None else {}
        if self.encoder_config is not None:
            out = self._sizes_from_encoder_config(out.get("patch_size"))
        for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
            if name not in out:
                raise ValueError(
                    f"ViT: {name} is not set: variant={self.variant!r} does not define it; pass {name}=... "
                    f"or a variant such as 'B/16'."
                )
            if not isinstance(out[name], int) or out[name] < 1:
                raise ValueError(f"ViT: {name} must be a positive int, got {out[name]!r}.")
        if out["width"] % out["num_heads"]:
            raise ValueError(f"ViT: width={out['width']} is not divisible by num_heads={out['num_heads']}.")
        checks = [
            ("pool_type", self.pool_type, _POOL_TYPES),
            ("final_norm", self.final_norm, _FINAL_NORMS),
            ("posemb", self.posemb, _POSEMBS),
        ]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"ViT: {name}={value!r} is not valid; expected one of {list(valid)}.")
        if self.pool_type == "token" and not self.class_token:
            raise ValueError("ViT: pool_type='token' needs class_token=True; use pool_type='gap' or 'map'.")
        if self.stem_impl not in STEM_IMPLS:
            raise ValueError(f"ViT: stem_impl must be one of {STEM_IMPLS}, got {self.stem_impl!r}.")
        if any(not isinstance(f, int) or f < 1 for f in self.stem_features):
            raise ValueError(
                f"ViT: stem_features must be a tuple of positive ints (channel widths), got {self.stem_features!r}."
            )
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ViT: num_classes must be an int >= 0 (0 = no head), got {self.num_classes!r}.")
        get_activation(self.activation)
        get_activation(self.representation_activation)
        return out

    def _sizes_from_encoder_config(self, variant_patch: int | None) -> dict[str, int]:
        cfg = self.encoder_config
        if not isinstance(cfg, EncoderConfig):
            raise ValueError(
                f"ViT: encoder_config must be an mmjax.layers.EncoderConfig, got {type(cfg).__name__}; build one "
                "with EncoderConfig(width=..., depth=..., num_heads=..., mlp_dim=...)."
            )
        if cfg.width is None:
            raise ValueError("ViT: encoder_config.width is None; the ViT needs it set (EncoderConfig(width=...)).")
        refuse_encoder_keywords_beside_config(self, _ENCODER_KEYWORDS)
        out = dict(width=cfg.width, depth=cfg.depth, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads)
        patch = self.patch_size if self.patch_size is not None else variant_patch
        if patch is not None:
            out["patch_size"] = patch
        return out

    def _check_images(self, images: Array, patch: int) -> None:
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"ViT: images have dtype {images.dtype} (shape {images.shape}); expected floating images "
                "(float32 or bfloat16; float64 under jax_enable_x64) in NHWC [batch, height, width, channels], "
                "normalised: convert with images.astype(jnp.float32) / 255 and normalise (see mmjax.preprocess)."
            )
        if images.ndim != 4:
            raise ValueError(
                f"ViT: images must be NHWC [batch, height, width, channels], got shape {images.shape} "
                f"(rank {images.ndim}); add a batch axis or a channel axis."
            )
        h, w = images.shape[1:3]
        if self.stem_features:  # each stride-2 'SAME' conv maps n pixels to ceil(n / 2)
            for _ in self.stem_features:
                h, w = -(-h // 2), -(-w // 2)
            if h % patch or w % patch:
                raise ValueError(
                    f"ViT: the conv stem maps images {images.shape[1]}x{images.shape[2]} (images.shape="
                    f"{images.shape}) to {h}x{w}, which is not divisible by patch_size={patch}; resize or crop the "
                    f"images, or change patch_size or stem_features."
                )
        elif h % patch or w % patch:
            raise ValueError(
                f"ViT: image size {h}x{w} (images.shape={images.shape}) is not divisible by patch_size={patch}; "
                f"resize or crop the images to a multiple of {patch}."
            )
        first = "stem_conv_0" if self.stem_features else "embedding"  # the layer that sees the image channels
        if self.has_variable("params", first):
            kernel = self.get_variable("params", first)["kernel"]
            if kernel.shape[2] != images.shape[3]:
                what = "the conv stem" if self.stem_features else "the patch embedding"
                raise ValueError(
                    f"ViT: images have {images.shape[3]} channels (shape {images.shape}) but {what} expects "
                    f"{kernel.shape[2]}."
                )

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
        images = jnp.asarray(images)
        s = self.sizes()
        cfg = self.get_encoder_config()
        width, patch = s["width"], s["patch_size"]
        self._check_images(images, patch)
        deterministic = not train
        out: dict[str, Array] = {}

        x = images
        for i, features in enumerate(self.stem_features):
            if self.stem_impl == "matmul":
                x = StemConv(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=f"stem_conv_{i}")(x)
            else:
                x = nn.Conv(
                    features,
                    (3, 3),
                    strides=(2, 2),
                    padding="SAME",
                    dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype,
                    name=f"stem_conv_{i}",
                )(x)
            x = get_activation("gelu")(x)  # the exact GELU

        x = nn.Conv(
            width,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            use_bias=self.patch_bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="embedding",
        )(x)
        batch, gh, gw, _ = x.shape
        x = x.reshape(batch, gh * gw, width)
        out["patch_tokens"] = x

        def add_cls(x):
            cls = self.param("cls", nn.initializers.zeros, (1, 1, width), cfg.param_dtype)
            return jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, width)), x], axis=1)

        if self.posemb == "sincos2d":
            x = x + posemb_sincos_2d(gh, gw, width, dtype=x.dtype)
            if self.class_token:
                x = add_cls(x)
        elif self.class_token and self.cls_posemb:
            x = add_learned_posemb(self, add_cls(x), param_dtype=cfg.param_dtype, owner="ViT")
        else:
            x = add_learned_posemb(self, x, param_dtype=cfg.param_dtype, owner="ViT")
            if self.class_token:
                x = add_cls(x)
        num_prefix = 1 if self.class_token else 0

        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="pre_norm")(
                x
            )
        out["embedded"] = x

        x, blocks = Encoder(cfg, name="encoder")(x, deterministic=deterministic)
        out.update(blocks)
        out["encoded"] = x

        if self.pool_type == "token":
            pooled = x[:, 0]
        elif self.pool_type == "gap":
            pooled = jnp.mean(x[:, num_prefix:], axis=1)
        else:
            pooled = MAPHead(cfg, name="map_head")(x)
        if self.final_norm == "pooled":
            pooled = nn.LayerNorm(
                epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="post_norm"
            )(pooled)
        out["pooled"] = pooled

        if self.representation_size is not None:
            pooled = nn.Dense(
                self.representation_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="pre_logits"
            )(pooled)
            pooled = get_activation(self.representation_activation)(pooled)
        out["pre_logits"] = pooled

        if self.num_classes == 0:
            return pooled, out
        logits = nn.Dense(
            self.num_classes,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal(),
            name="head",
        )(pooled).astype(jnp.float32)
        out["logits"] = logits
        return logits, out
