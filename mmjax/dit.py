"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a ViT over latent
patches whose blocks are modulated by the timestep and the condition through adaLN-Zero.

Data flow of :class:`DiT` (``x [B, H, W, C]`` NHWC, ``p`` the patch size, ``D`` the width,
``N = (H / p) (W / p)`` tokens)::

    tokens = patchify(x) @ W_e + b_e + posemb                          [B, N, D]   (fixed MAE/DiT sin-cos posemb)
    c      = MLP_t(freq(t)) (+ E_label[y]) (+ MLP_text(text_pooled))  [B, D]      (the conditioning vector)
    block_i(tokens, c):                                                            (adaLN-Zero, depth times)
        shift1, scale1, gate1, shift2, scale2, gate2 = split6(Linear_i(silu(c)))   (Linear_i zero-initialised)
        tokens += gate1 * attn(LN(tokens) * (1 + scale1) + shift1)
        tokens += gate_x * cross_attn(LN_x(tokens), text_tokens, mask)            (only with text_token_dim)
        tokens += gate2 * mlp(LN(tokens) * (1 + scale2) + shift2)
    shift, scale = split2(Linear_f(silu(c)))                                       (Linear_f zero-initialised)
    out    = unpatchify((LN(tokens) * (1 + scale) + shift) @ W_o + b_o)            [B, H, W, C_out] (W_o, b_o zero)

``LN`` is a LayerNorm without scale and bias (the modulation replaces them); ``LN_x`` the cross-attention's own
LayerNorm (with scale and bias). The timestep's frequency embedding is (:func:`timestep_embedding`)
``freq(t) = [cos(t w), sin(t w)]`` with ``w_k = exp(-ln(10000) k / (F/2 - shift))``, ``k < F/2``,
``F = frequency_embedding_size``, ``shift = timestep_freq_shift`` (0 in DiT, 1 in diffusers'
``DiTTransformer2DModel``). ``MLP_t`` and ``MLP_text`` are Linear -> SiLU -> Linear.

adaLN-Zero: every modulation Linear, the per-channel cross-attention gate ``gate_x`` and the output Linear start at
zero, so at initialisation each block is the identity and the model output is exactly zero.

Conditioning (fields of :class:`DiT`, inputs of its ``__call__``):

* ``num_classes > 0``: ``labels [B]`` int; a learned table ``label_embedding [num_classes + 1, D]`` whose last row
  (index ``num_classes``) is the null class, as DiT; ``labels == num_classes`` asks for the null class directly.
* ``pooled_text_dim``: ``text_pooled [B, pooled_text_dim]`` is embedded by ``MLP_text`` and added to ``c``; its
  null is a learned vector ``null_text_pooled [pooled_text_dim]`` put in the place of the input.
* ``text_token_dim``: cross-attention to ``text_tokens [B, L, text_token_dim]`` with ``text_mask [B, L]`` (bool,
  True = a real token); a learned ``null_text_token [text_token_dim]`` is appended as token ``L``, attended alone
  when the condition is dropped and masked out otherwise.

Dropping to the null condition (classifier-free guidance, Ho & Salimans 2022) takes all the enabled conditions of an
example together: ``drop`` (bool ``[B]`` or a bool) chooses the examples explicitly (``drop=True``: every example,
the unconditional branch of guidance; the condition inputs may then be left out); with ``drop=None`` and
``deterministic=False`` each example is dropped with probability ``class_dropout_prob`` (rng ``"cond_dropout"``).

Parameter tree (names a converter maps to)::

    embedding/{kernel,bias}           patch embedding, kernel [p, p, C, D] (the layout of nn.Conv)
    timestep_embedder/fc1, fc2        MLP_t: F -> D -> D
    label_embedding                   [num_classes + 1, D]                             (num_classes > 0)
    text_embedder/fc1, fc2            MLP_text: pooled_text_dim -> D -> D              (pooled_text_dim)
    null_text_pooled                  [pooled_text_dim]                                (pooled_text_dim)
    null_text_token                   [text_token_dim]                                 (text_token_dim)
    block_{i}/modulation              Dense D -> 6 D (zero-initialised)
    block_{i}/attn/{query,key,value,out}   mmjax.attention.MultiHeadAttention
    block_{i}/ln_cross/{scale,bias}, cross_attn/, cross_gate [D]                     (text_token_dim)
    block_{i}/mlp/fc1, fc2            Dense D -> mlp_dim -> D (GELU, tanh form)
    final_modulation                  Dense D -> 2 D (zero-initialised)
    final_linear                      Dense D -> p * p * C_out (zero-initialised)
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.attention import MultiHeadAttention
from mmjax.errors import UserError
from mmjax.layer_norm import LayerNorm
from mmjax.layers import ACTIVATIONS, Mlp, posemb_sincos_2d

Dtype = Any
Array = jax.Array

__all__ = ["VARIANTS", "decode_variant", "timestep_embedding", "posemb_sincos_2d_mae", "DiTBlock", "DiT"]

# name: (width, depth, num_heads), the DiT paper's table 1 (mlp_dim = 4 * width).
VARIANTS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
    """Turns a DiT variant string such as ``"XL/2"`` into model sizes.

    ``"<name>/<patch>"`` or ``"<name>"`` with name in ``S, B, L, XL`` (width 384 / 768 / 1024 / 1152, depth
    12 / 12 / 24 / 28, heads 6 / 12 / 16 / 16); ``mlp_dim = 4 * width``.

    Args:
      variant: the variant string.

    Returns:
      dict with ``width``, ``depth``, ``num_heads``, ``mlp_dim`` and, when given, ``patch_size``.

    Raises:
      UserError: for an unknown name or a malformed patch size.

    Example:
      >>> decode_variant("B/4")
      {'width': 768, 'depth': 12, 'num_heads': 12, 'mlp_dim': 3072, 'patch_size': 4}
    """
    match = re.fullmatch(r"([A-Za-z]+)(?:/(\d+))?", variant) if isinstance(variant, str) else None
    if match is None or match.group(1) not in VARIANTS:
        raise UserError(
            f"variant={variant!r} is not a DiT variant; expected '<name>' or '<name>/<patch>' with name in "
            f"{list(VARIANTS)} (e.g. 'XL/2', 'S/4'), or pass width/depth/num_heads/patch_size explicitly."
        )
    width, depth, num_heads = VARIANTS[match.group(1)]
    out = dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=4 * width)
    if match.group(2) is not None:
        patch = int(match.group(2))
        if patch < 1:
            raise UserError(f"variant={variant!r}: the patch size must be a positive integer.")
        out["patch_size"] = patch
    return out


def timestep_embedding(
    t: Array,
    dim: int,
    *,
    max_period: float = 10_000.0,
    freq_shift: float = 0.0,
    cos_first: bool = True,
) -> Array:
    """Sinusoidal embedding of (integer or fractional) diffusion timesteps.

    ``emb(t) = [cos(t w_0), ..., cos(t w_{h-1}), sin(t w_0), ..., sin(t w_{h-1})]`` (``cos_first``; else sines
    first) with ``h = dim // 2`` and ``w_k = exp(-ln(max_period) k / (h - freq_shift))``; an odd ``dim`` gets one
    trailing zero. ``freq_shift=0`` is DiT's (and ADM's) embedding; diffusers' ``DiTTransformer2DModel`` uses
    ``freq_shift=1``. The exponent is computed in float32 in the order DiT and diffusers use
    (``(-ln(max_period) * k) / (h - freq_shift)``) and its ``exp`` rounded correctly to float32; a float32 ``exp``
    (torch's) may be one unit in the last place off for a few ``k``, which moves ``sin(t w_k)`` by up to
    ``t w_k * 2**-23`` (about 6e-5 at ``t = 1000``).

    Args:
      t: timesteps, any shape (usually ``[B]``), integer or floating.
      dim: embedding width (``frequency_embedding_size``, 256 in DiT).
      max_period: the longest period, ``2 pi / w_{min}`` roughly.
      freq_shift: the shift of the frequency denominator (``h - freq_shift`` must be positive).
      cos_first: cosines before sines (DiT); False puts the sines first.

    Returns:
      float32 array ``t.shape + (dim,)``.

    Raises:
      UserError: for ``dim < 2`` or ``h - freq_shift <= 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> emb = timestep_embedding(jnp.array([0, 10]), 8)
      >>> emb.shape, emb[0].tolist()
      ((2, 8), [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2:
        raise UserError(f"timestep_embedding: dim={dim!r} must be an int >= 2 (DiT uses 256).")
    half = dim // 2
    if half - freq_shift <= 0:
        raise UserError(
            f"timestep_embedding: freq_shift={freq_shift!r} with dim={dim} gives a non-positive frequency "
            f"denominator {half} - {freq_shift}; use freq_shift < {half} (0 as DiT, 1 as diffusers)."
        )
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # exp correctly rounded to float32
    args = jnp.asarray(t).astype(jnp.float32)[..., None] * freqs
    parts = [jnp.cos(args), jnp.sin(args)] if cos_first else [jnp.sin(args), jnp.cos(args)]
    if dim % 2:
        parts.append(jnp.zeros(args.shape[:-1] + (1,), jnp.float32))
    return jnp.concatenate(parts, axis=-1)


def posemb_sincos_2d_mae(height: int, width: int, dim: int, dtype: Dtype = jnp.float32) -> Array:
    """The fixed 2-D sine-cosine position embedding of MAE and DiT (``get_2d_sincos_pos_embed``).

    For grid position ``(r, c)`` (row-major token order) and ``k = 0 .. dim/4 - 1`` with
    ``w_k = 10000 ** (-k / (dim/4))``: ``[sin(c w), cos(c w), sin(r w), cos(r w)]``. This is
    :func:`mmjax.layers.posemb_sincos_2d` (whose exponent divides by ``dim/4 - 1``) with the temperature
    ``10000 ** ((dim/4 - 1) / (dim/4))``, which gives the same frequencies.

    Args:
      height, width: the patch grid.
      dim: embedding width, a multiple of 4 and at least 8.
      dtype: output dtype.

    Returns:
      Array ``[1, height * width, dim]``.

    Raises:
      ValueError: if ``dim`` is not a multiple of 4 or smaller than 8.

    Example:
      >>> pe = posemb_sincos_2d_mae(2, 3, 8)
      >>> pe.shape, [round(float(v), 3) for v in pe[0, 1, :4]]  # column 1: sin(1), sin(0.01), cos(1), cos(0.01)
      ((1, 6, 8), [0.841, 0.01, 0.54, 1.0])
    """
    quarter = dim // 4
    temperature = 10_000.0 ** ((quarter - 1) / quarter) if quarter > 1 else 10_000.0
    return posemb_sincos_2d(height, width, dim, temperature=temperature, dtype=dtype)


def _layer_norm(eps, dtype, param_dtype, name, affine=False):
    return LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=param_dtype, name=name)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """One adaLN-Zero DiT block, with an optional pre-LN cross-attention sub-block.

    ``shift1, scale1, gate1, shift2, scale2, gate2 = split6(modulation(silu(c)))`` (``modulation`` zero-initialised),
    then ``x += gate1 * attn(LN1(x) * (1 + scale1) + shift1)``, (cross-attention)
    ``x += cross_gate * cross_attn(ln_cross(x), context, mask)``, and ``x += gate2 * mlp(LN2(x) * (1 + scale2) +
    shift2)``. ``LN1`` / ``LN2`` have no scale or bias; ``cross_gate [width]`` starts at zero, so the block is the
    identity at initialisation.

    Attributes:
      num_heads: attention heads (self- and cross-attention).
      mlp_dim: hidden width of the MLP.
      activation: MLP activation name (``"gelu_tanh"`` in DiT), see :func:`mmjax.layers.get_activation`.
      layer_norm_eps: epsilon of ``LN1`` and ``ln_cross``.
      mlp_layer_norm_eps: epsilon of ``LN2`` (``None``: ``layer_norm_eps``; diffusers uses its ``norm_eps`` here).
      cross_attention: whether the block has the cross-attention sub-block.
      attention_implementation: passed to :class:`mmjax.attention.MultiHeadAttention`.
      dtype: compute dtype; param_dtype: parameter dtype.

    Call: ``block(x, c, context=None, context_mask=None)`` with ``x [B, N, D]``, ``c [B, D]``, ``context
    [B, L, D_ctx]``, ``context_mask [B, L]`` bool (True = attend); returns ``[B, N, D]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = DiTBlock(num_heads=2, mlp_dim=32)
      >>> x, c = jax.random.normal(jax.random.key(0), (2, 4, 8)), jnp.ones((2, 8))
      >>> params = block.init(jax.random.key(1), x, c)["params"]
      >>> bool((block.apply({"params": params}, x, c) == x).all())  # adaLN-Zero: the identity at init
      True
    """

    num_heads: int
    mlp_dim: int
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    mlp_layer_norm_eps: float | None = None
    cross_attention: bool = False
    attention_implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        width = x.shape[-1]
        mod = nn.Dense(
            6 * width,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="modulation",
        )(jax.nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        mlp_eps = self.layer_norm_eps if self.mlp_layer_norm_eps is None else self.mlp_layer_norm_eps

        y = _modulate(_layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "ln1")(x), shift1, scale1)
        y = MultiHeadAttention(
            num_heads=self.num_heads,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(y)
        x = x + gate1[:, None] * y

        if self.cross_attention:
            if context is None:
                raise UserError("DiTBlock: cross_attention=True needs context [batch, length, features]; pass it.")
            y = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "ln_cross", affine=True)(x)
            mask = None if context_mask is None else context_mask[:, None, None, :]
            y = MultiHeadAttention(
                num_heads=self.num_heads,
                qkv_features=width,
                out_features=width,
                implementation=self.attention_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="cross_attn",
            )(y, context, mask=mask)
            gate = self.param("cross_gate", nn.initializers.zeros, (width,), self.param_dtype)
            x = x + gate.astype(y.dtype) * y

        y = _modulate(_layer_norm(mlp_eps, self.dtype, self.param_dtype, "ln2")(x), shift2, scale2)
        y = Mlp(
            hidden_dim=self.mlp_dim,
            activation=self.activation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(y)
        return x + gate2[:, None] * y


class _PatchEmbed(nn.Module):
    """Patch embedding as one matmul: ``[B, H, W, C] -> [B, (H/p)(W/p), D]``, the function and parameters
    (``kernel [p, p, C, D]``, ``bias [D]``) of ``nn.Conv(D, (p, p), strides=(p, p), padding="VALID")`` followed by a
    row-major flatten. Kernel init: Xavier uniform over the flattened ``[p p C, D]`` (as DiT); bias zeros."""

    features: int
    patch: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        p = self.patch
        init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        kernel = self.param("kernel", init, (p, p, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        return patches @ kernel.reshape(p * p * c, self.features) + bias


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero blocks and class, pooled-text and/or text-token conditioning.

    See the module docstring for the formulas, the conditioning modes and the parameter tree. Sizes come from
    ``variant`` (:func:`decode_variant`); any of ``width``, ``depth``, ``num_heads``, ``mlp_dim``, ``patch_size``
    given explicitly overrides it (``variant=None`` needs ``width``, ``depth``, ``num_heads``, ``patch_size``;
    ``mlp_dim`` defaults to ``4 * width``).

    Attributes:
      variant: e.g. ``"XL/2"``, ``"S/4"``, or ``None``.
      width, depth, num_heads, mlp_dim, patch_size: explicit sizes (override the variant).
      out_channels: output channels ``C_out`` (``None``: the input channels, or twice them with ``learn_sigma``).
      learn_sigma: predict the noise and the variance interpolation (``C_out = 2 C``, as DiT); the first ``C``
        output channels are the noise prediction.
      num_classes: class-conditional with this many classes (plus the null class); 0: no class labels.
      pooled_text_dim: width of a pooled text embedding ``text_pooled`` added to the conditioning; ``None``: none.
      text_token_dim: width of caption token embeddings ``text_tokens`` attended by a cross-attention sub-block in
        every block; ``None``: no cross-attention.
      class_dropout_prob: the probability, when training (``deterministic=False`` and ``drop=None``), that an
        example's condition is replaced by the null condition (0.1 in DiT).
      frequency_embedding_size: width ``F`` of the timestep's sinusoidal embedding (256).
      timestep_freq_shift: the ``freq_shift`` of :func:`timestep_embedding` (0 as DiT; 1 as diffusers' DiT).
      activation: MLP activation (``"gelu_tanh"``, the tanh GELU of DiT).
      layer_norm_eps: epsilon of the modulated LayerNorm before attention, of the cross-attention's and of the final
        one (1e-6).
      mlp_layer_norm_eps: epsilon of the modulated LayerNorm before the MLP (``None``: ``layer_norm_eps``).
      attention_implementation: passed to :class:`mmjax.attention.MultiHeadAttention` (``None``: default).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); param_dtype: parameter dtype (float32).

    Output convention (every mmjax model): ``(output, intermediates)``.

    Call: ``out, aux = model.apply({"params": params}, x, t, labels=None, text_pooled=None, text_tokens=None,
    text_mask=None, drop=None, deterministic=True)`` with ``x [B, H, W, C]`` floating (NHWC; ``H``, ``W``
    multiples of the patch size), ``t`` ``[B]`` (or a scalar for all) integer or floating timesteps, ``labels [B]``
    int in ``[0, num_classes]`` (``num_classes`` = the null class; checked when concrete, and under ``jit`` a label
    out of range makes that example's output NaN), ``text_pooled [B, pooled_text_dim]``,
    ``text_tokens [B, L, text_token_dim]``, ``text_mask [B, L]`` bool (default all True), ``drop`` bool ``[B]`` or a
    bool (True = the null condition for that example; overrides the random dropping; the Python ``True`` also lets the
    condition inputs be left out), ``deterministic=False``
    enables the random dropping (rng ``"cond_dropout"``). ``out [B, H, W, C_out]`` float32. ``aux`` holds
    ``patch_tokens`` ``[B, N, D]``, ``embedded`` (with the position embedding), ``timestep_embedding`` ``[B, D]``,
    ``conditioning`` (``c``, ``[B, D]``), ``dropped`` (bool ``[B]``, the examples given the null condition),
    ``block_{i}`` (each block's output) and ``final_tokens`` ``[B, N, p * p * C_out]`` (before unpatchify).

    Raises:
      UserError: at construction for bad sizes or options; at call for images of the wrong rank, dtype, channels or
        a size not divisible by the patch, bad timesteps, labels out of range or not integer, a condition the model
        does not enable, a missing one it requires, wrongly shaped text inputs, a ``drop`` of the wrong shape or
        dtype, or random dropping without a ``"cond_dropout"`` rng.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = DiT(variant="S/2", width=32, depth=2, num_heads=2, num_classes=10, learn_sigma=True)
      >>> x, t, y = jnp.zeros((2, 8, 8, 4)), jnp.array([10, 999]), jnp.array([3, 10])  # 10 = the null class
      >>> params = model.init(jax.random.key(0), x, t, labels=y)["params"]
      >>> out, aux = model.apply({"params": params}, x, t, labels=y)
      >>> out.shape, aux["final_tokens"].shape, float(jnp.abs(out).max())  # adaLN-Zero: zero at init
      ((2, 8, 8, 8), (2, 16, 32), 0.0)
    """

    variant: str | None = "XL/2"
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    patch_size: int | None = None
    out_channels: int | None = None
    learn_sigma: bool = False
    num_classes: int = 0
    pooled_text_dim: int | None = None
    text_token_dim: int | None = None
    class_dropout_prob: float = 0.1
    frequency_embedding_size: int = 256
    timestep_freq_shift: float = 0.0
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    mlp_layer_norm_eps: float | None = None
    attention_implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        self.sizes()  # validate at construction
        super().__post_init__()

    # ------------------------------------------------------------------------------------------------ options

    def sizes(self) -> dict[str, int]:
        """The resolved ``width``, ``depth``, ``num_heads``, ``mlp_dim``, ``patch_size`` (variant + overrides),
        after checking every option.

        Example:
          >>> DiT(variant="B/4", depth=6).sizes()
          {'width': 768, 'depth': 6, 'num_heads': 12, 'mlp_dim': 3072, 'patch_size': 4}
        """
        out = decode_variant(self.variant) if self.variant is not None else {}
        for name in ("width", "depth", "num_heads", "mlp_dim", "patch_size"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
            if name == "mlp_dim" and name not in out and isinstance(out.get("width"), int):
                out[name] = 4 * out["width"]
            if name not in out:
                raise UserError(
                    f"DiT: {name} is not set: variant={self.variant!r} does not define it; pass {name}=... or a "
                    "variant such as 'XL/2'."
                )
            if not isinstance(out[name], int) or isinstance(out[name], bool) or out[name] < 1:
                raise UserError(f"DiT: {name} must be a positive int, got {name}={out[name]!r}.")
        if out["width"] % out["num_heads"]:
            raise UserError(
                f"DiT: width={out['width']} is not divisible by num_heads={out['num_heads']}; choose a width that "
                "is a multiple of num_heads."
            )
        if out["width"] % 4 or out["width"] < 8:
            raise UserError(
                f"DiT: width={out['width']} must be a multiple of 4 and >= 8 (the 2-D sin-cos position embedding)."
            )
        for name in ("out_channels", "pooled_text_dim", "text_token_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"DiT: {name} must be None or a positive int, got {name}={value!r}.")
        if self.learn_sigma and self.out_channels is not None:
            raise UserError(
                f"DiT: learn_sigma=True sets out_channels to twice the input channels, but out_channels="
                f"{self.out_channels} is given too; pass one of them."
            )
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise UserError(f"DiT: num_classes must be an int >= 0 (0 = no class labels), got {self.num_classes!r}.")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise UserError(
                f"DiT: class_dropout_prob={self.class_dropout_prob!r} must be in [0, 1) (DiT uses 0.1; 0 disables "
                "the random dropping)."
            )
        f = self.frequency_embedding_size
        if not isinstance(f, int) or isinstance(f, bool) or f < 2:
            raise UserError(f"DiT: frequency_embedding_size must be an int >= 2 (DiT uses 256), got {f!r}.")
        if not 0.0 <= self.timestep_freq_shift < f // 2:
            raise UserError(
                f"DiT: timestep_freq_shift={self.timestep_freq_shift!r} must be in [0, {f // 2}) (0 as DiT, 1 as "
                "diffusers)."
            )
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise UserError(
                f"DiT: activation={self.activation!r} is not a known activation; expected one of "
                f"{sorted(ACTIVATIONS)} (DiT uses 'gelu_tanh')."
            )
        return out

    def conditions(self) -> tuple[str, ...]:
        """The condition inputs this model takes, in the order ``labels``, ``text_pooled``, ``text_tokens``.

        Example:
          >>> DiT(variant="S/2", num_classes=1000, text_token_dim=64).conditions()
          ('labels', 'text_tokens')
        """
        names = []
        if self.num_classes:
            names.append("labels")
        if self.pooled_text_dim is not None:
            names.append("text_pooled")
        if self.text_token_dim is not None:
            names.append("text_tokens")
        return tuple(names)

    # ------------------------------------------------------------------------------------------------ checks

    def _check_images(self, x: Array, patch: int) -> None:
        if x.ndim != 4:
            raise UserError(
                f"DiT: x must be NHWC [batch, height, width, channels], got shape {x.shape} (rank {x.ndim}); add a "
                "batch or channel axis (an NCHW array: x.transpose(0, 2, 3, 1))."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise UserError(
                f"DiT: x has dtype {x.dtype} (shape {x.shape}); expected a floating array (float32 or bfloat16): "
                "convert with x.astype(jnp.float32)."
            )
        h, w = x.shape[1:3]
        if h % patch or w % patch:
            raise UserError(
                f"DiT: image size {h}x{w} (x.shape={x.shape}) is not divisible by patch_size={patch}; resize, crop "
                f"or pad the inputs to a multiple of {patch}."
            )
        if self.has_variable("params", "embedding"):
            kernel = self.get_variable("params", "embedding")["kernel"]
            if kernel.shape[2] != x.shape[3]:
                raise UserError(
                    f"DiT: x has {x.shape[3]} channels (shape {x.shape}) but the patch embedding expects "
                    f"{kernel.shape[2]}; pass inputs with {kernel.shape[2]} channels."
                )

    @staticmethod
    def _check_timesteps(t, batch: int) -> Array:
        t = jnp.asarray(t)
        if t.dtype == jnp.bool_ or not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
            raise UserError(f"DiT: t has dtype {t.dtype}; expected integer or floating timesteps [batch].")
        if t.ndim == 0:
            return jnp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise UserError(
                f"DiT: t has shape {t.shape} but x has batch {batch}; pass one timestep per example (shape "
                f"({batch},)) or a scalar for all."
            )
        return t

    def _check_labels(self, labels, batch: int, all_null: bool) -> Array:
        if not self.num_classes:
            if labels is not None:
                raise UserError(
                    "DiT: labels were given but the model is not class-conditional (num_classes=0); build it with "
                    "num_classes=... or leave labels out."
                )
            return None
        if labels is None:
            if all_null:
                return jnp.full((batch,), self.num_classes, jnp.int32)
            raise UserError(
                f"DiT: the model is class-conditional (num_classes={self.num_classes}) but labels is None; pass "
                f"labels [batch] int (label {self.num_classes} is the null class) or drop=True for the null condition."
            )
        labels = jnp.asarray(labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise UserError(
                f"DiT: labels have dtype {labels.dtype}; expected integer class ids [batch] (use labels.astype(int))."
            )
        if labels.shape != (batch,):
            raise UserError(f"DiT: labels have shape {labels.shape}; expected ({batch},), one class id per example.")
        if _is_concrete(labels):
            values = np.asarray(labels)
            bad = values[(values < 0) | (values > self.num_classes)]
            if bad.size:
                raise UserError(
                    f"DiT: labels {sorted(set(bad.tolist()))} are out of range; expected class ids in "
                    f"[0, {self.num_classes - 1}], or {self.num_classes} for the null class (num_classes="
                    f"{self.num_classes})."
                )
        return labels

    def _check_text(self, text_pooled, text_tokens, text_mask, batch: int, all_null: bool):
        if self.pooled_text_dim is None:
            if text_pooled is not None:
                raise UserError(
                    "DiT: text_pooled was given but the model takes no pooled text (pooled_text_dim=None); build it "
                    "with pooled_text_dim=... or leave text_pooled out."
                )
        elif text_pooled is None:
            if not all_null:
                raise UserError(
                    f"DiT: the model takes a pooled text embedding (pooled_text_dim={self.pooled_text_dim}) but "
                    f"text_pooled is None; pass text_pooled [batch, {self.pooled_text_dim}] or drop=True."
                )
        else:
            text_pooled = jnp.asarray(text_pooled)
            if text_pooled.shape != (batch, self.pooled_text_dim) or not jnp.issubdtype(
                text_pooled.dtype, jnp.floating
            ):
                raise UserError(
                    f"DiT: text_pooled has shape {text_pooled.shape} and dtype {text_pooled.dtype}; expected floating "
                    f"[{batch}, {self.pooled_text_dim}] (batch, pooled_text_dim)."
                )
        if self.text_token_dim is None:
            if text_tokens is not None or text_mask is not None:
                name = "text_tokens" if text_tokens is not None else "text_mask"
                raise UserError(
                    f"DiT: {name} was given but the model has no cross-attention (text_token_dim=None); build it "
                    "with text_token_dim=... or leave text_tokens and text_mask out."
                )
            return text_pooled, None, None
        if text_tokens is None:
            if text_mask is not None:
                raise UserError("DiT: text_mask was given without text_tokens; pass text_tokens [batch, length, dim].")
            if not all_null:
                raise UserError(
                    f"DiT: the model cross-attends to caption tokens (text_token_dim={self.text_token_dim}) but "
                    f"text_tokens is None; pass text_tokens [batch, length, {self.text_token_dim}] (and text_mask) "
                    "or drop=True."
                )
            return text_pooled, None, None
        text_tokens = jnp.asarray(text_tokens)
        if (
            text_tokens.ndim != 3
            or text_tokens.shape[0] != batch
            or text_tokens.shape[2] != self.text_token_dim
            or not jnp.issubdtype(text_tokens.dtype, jnp.floating)
        ):
            raise UserError(
                f"DiT: text_tokens has shape {text_tokens.shape} and dtype {text_tokens.dtype}; expected floating "
                f"[{batch}, length, {self.text_token_dim}] (batch, length, text_token_dim)."
            )
        if text_mask is None:
            text_mask = jnp.ones(text_tokens.shape[:2], bool)
        text_mask = jnp.asarray(text_mask)
        if text_mask.dtype != jnp.bool_ or text_mask.shape != text_tokens.shape[:2]:
            raise UserError(
                f"DiT: text_mask has shape {text_mask.shape} and dtype {text_mask.dtype}; expected bool "
                f"{tuple(text_tokens.shape[:2])} (True = a real token, False = padding); use mask.astype(bool)."
            )
        return text_pooled, text_tokens, text_mask

    def _drop_mask(self, drop, batch: int, deterministic: bool) -> Array:
        if not self.conditions():
            if drop is not None:
                raise UserError(
                    f"DiT: drop={drop!r} was given but the model is unconditional (no num_classes, pooled_text_dim "
                    "or text_token_dim), so there is no condition to drop; leave drop out."
                )
            return None
        if drop is None:
            if deterministic or self.class_dropout_prob == 0.0:
                return jnp.zeros((batch,), bool)
            if not self.has_rng("cond_dropout"):
                raise UserError(
                    f"DiT: deterministic=False drops the condition with class_dropout_prob={self.class_dropout_prob} "
                    "and needs an rng: apply(..., rngs={'cond_dropout': key}); or pass drop=... or "
                    "deterministic=True."
                )
            return jax.random.bernoulli(self.make_rng("cond_dropout"), self.class_dropout_prob, (batch,))
        if isinstance(drop, (bool, np.bool_)):
            return jnp.full((batch,), bool(drop))
        drop = jnp.asarray(drop)
        if drop.dtype != jnp.bool_ or drop.shape not in ((), (batch,)):
            raise UserError(
                f"DiT: drop has shape {drop.shape} and dtype {drop.dtype}; expected bool ({batch},) or a bool "
                "(True = the null condition for that example); use drop.astype(bool)."
            )
        return jnp.broadcast_to(drop, (batch,))

    # ------------------------------------------------------------------------------------------------ model

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        *,
        labels: Array | None = None,
        text_pooled: Array | None = None,
        text_tokens: Array | None = None,
        text_mask: Array | None = None,
        drop: Array | bool | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, dict[str, Array]]:
        s = self.sizes()
        width, patch = s["width"], s["patch_size"]
        zero_dense = lambda features, name: nn.Dense(  # noqa: E731  (adaLN-Zero: kernel and bias start at zero)
            features, kernel_init=nn.initializers.zeros, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = jnp.asarray(x)
        self._check_images(x, patch)
        batch, h, w, channels = x.shape
        t = self._check_timesteps(t, batch)
        all_null = drop is True
        labels = self._check_labels(labels, batch, all_null)
        text_pooled, text_tokens, text_mask = self._check_text(text_pooled, text_tokens, text_mask, batch, all_null)
        dropped = self._drop_mask(drop, batch, deterministic)
        out_channels = self.out_channels or (2 * channels if self.learn_sigma else channels)
        aux: dict[str, Array] = {}

        # patchify: [B, H, W, C] -> [B, N, p * p * C] (row-major patches, (u, v, c) inside a patch) @ [p p C, D]
        gh, gw = h // patch, w // patch
        tokens = _PatchEmbed(width, patch, self.dtype, self.param_dtype, name="embedding")(x)
        aux["patch_tokens"] = tokens
        tokens = tokens + posemb_sincos_2d_mae(gh, gw, width, dtype=tokens.dtype)
        aux["embedded"] = tokens

        freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.timestep_freq_shift)
        embed_mlp = lambda name: Mlp(  # noqa: E731
            hidden_dim=width,
            out_dim=width,
            activation="silu",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.02),
            name=name,
        )
        c = embed_mlp("timestep_embedder")(freq)
        aux["timestep_embedding"] = c

        if self.num_classes:
            table = self.param(
                "label_embedding", nn.initializers.normal(0.02), (self.num_classes + 1, width), self.param_dtype
            )
            # under jit the labels cannot be checked: one out of [0, num_classes] gives NaN (row num_classes + 1)
            ids = jnp.where((labels >= 0) & (labels <= self.num_classes), labels, self.num_classes + 1)
            ids = jnp.where(dropped, self.num_classes, ids)
            c = c + jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan).astype(c.dtype)
        if self.pooled_text_dim is not None:
            null = self.param(
                "null_text_pooled", nn.initializers.normal(0.02), (self.pooled_text_dim,), self.param_dtype
            )
            if text_pooled is None:
                text_pooled = jnp.broadcast_to(null, (batch, self.pooled_text_dim))
            text_pooled = jnp.where(dropped[:, None], null.astype(text_pooled.dtype), text_pooled)
            c = c + embed_mlp("text_embedder")(text_pooled)
        aux["conditioning"] = c
        if dropped is not None:
            aux["dropped"] = dropped

        context = context_mask = None
        if self.text_token_dim is not None:
            null = self.param("null_text_token", nn.initializers.normal(0.02), (self.text_token_dim,), self.param_dtype)
            if text_tokens is None:
                text_tokens = jnp.zeros((batch, 0, self.text_token_dim), null.dtype)
                text_mask = jnp.zeros((batch, 0), bool)
            null_token = jnp.broadcast_to(null.astype(text_tokens.dtype), (batch, 1, self.text_token_dim))
            context = jnp.concatenate([text_tokens, null_token], axis=1)
            context_mask = jnp.concatenate([text_mask & ~dropped[:, None], dropped[:, None]], axis=1)

        for i in range(s["depth"]):
            tokens = DiTBlock(
                num_heads=s["num_heads"],
                mlp_dim=s["mlp_dim"],
                activation=self.activation,
                layer_norm_eps=self.layer_norm_eps,
                mlp_layer_norm_eps=self.mlp_layer_norm_eps,
                cross_attention=self.text_token_dim is not None,
                attention_implementation=self.attention_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block_{i}",
            )(tokens, c, context, context_mask)
            aux[f"block_{i}"] = tokens

        mod = zero_dense(2 * width, "final_modulation")(jax.nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        y = _modulate(
            _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "final_norm")(tokens), shift, scale
        )
        y = zero_dense(patch * patch * out_channels, "final_linear")(y)
        aux["final_tokens"] = y

        # unpatchify: out[b, r p + u, q p + v, c] = y[b, r gw + q, (u p + v) C_out + c]
        y = y.reshape(batch, gh, gw, patch, patch, out_channels).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(batch, h, w, out_channels).astype(jnp.float32), aux
