"""Shared transformer building blocks: activations, MLP, pre-LN encoder block and encoder stack, position embeddings.

These are used by the image tower (:mod:`mmjax.vit`), the text tower and CLIP, so every option a known checkpoint
needs is a field here rather than a fork of the block.

Parameter names (what a converter maps to)::

    Encoder                         (depth blocks; optional final LayerNorm)
      encoderblock_{i}/             one per layer when ``scan=False``
      encoderblock/                 all layers stacked on a leading axis of size ``depth`` when ``scan=True``
        ln1/{scale,bias}            LayerNorm before attention
        attn/{query,key,value}/     DenseGeneral, kernel [width, heads, head_dim], bias [heads, head_dim]
        attn/out/                   DenseGeneral, kernel [heads, head_dim, width], bias [width]
        ln2/{scale,bias}            LayerNorm before the MLP
        mlp/fc1/{kernel,bias}       Dense width -> mlp_dim
        mlp/fc2/{kernel,bias}       Dense mlp_dim -> width
      encoder_norm/{scale,bias}     final LayerNorm (``final_norm=True``)

Every encoder option (sizes, activation, dropout, remat, scan, dtypes, ...) lives in one frozen
:class:`EncoderConfig`, which :class:`EncoderBlock` and :class:`Encoder` take whole; :class:`mmjax.vit.ViT`,
:class:`mmjax.text.TextTransformer` and :class:`mmjax.clip.CLIP` build one and pass it down.

Parameters are float32 by default (``param_dtype``); ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.attention import MultiHeadAttention

Dtype = Any
Array = jax.Array

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "drop_path",
    "Mlp",
    "EncoderConfig",
    "refuse_encoder_keywords_beside_config",
    "EncoderBlock",
    "Encoder",
    "posemb_sincos_2d",
    "add_learned_posemb",
    "LearnedPositionEmbedding",
    "l2_normalize",
    "stack_layers",
    "unstack_layers",
]


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,  # x * Phi(x), exact erf form (PyTorch / Hugging Face "gelu")
    "gelu_tanh": _gelu_tanh,  # tanh approximation (flax nn.gelu default, HF "gelu_new"/"gelu_pytorch_tanh")
    "quick_gelu": _quick_gelu,  # x * sigmoid(1.702 x) (OpenAI CLIP)
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # = swish, x * sigmoid(x)
    "elu": jax.nn.elu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the elementwise activation function called ``name``.

    Valid names: ``gelu`` (exact, ``x * Phi(x)`` with the normal CDF ``Phi``), ``gelu_tanh``
    (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``), ``quick_gelu`` (``x * sigmoid(1.702 x)``), ``relu``,
    ``silu`` (``x * sigmoid(x)``), ``elu``, ``tanh``, ``sigmoid``, ``identity``. This is the one activation table of
    mmjax: the transformers and the graph models (:mod:`mmjax.graph_models`) all look their names up here, so
    ``"gelu"`` means the exact GELU everywhere (as in PyTorch and Hugging Face) and ``"gelu_tanh"`` the
    approximation (flax's ``nn.gelu`` default).

    Args:
      name: one of the names above.

    Returns:
      A function mapping an array to an array of the same shape and dtype.

    Raises:
      ValueError: if ``name`` is not a known activation (the message lists the valid names).

    Example:
      >>> import jax.numpy as jnp
      >>> float(get_activation("relu")(jnp.array(-2.0)))
      0.0
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not a known activation; expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def drop_path(x: Array, rate: float | Array, rng: Array) -> Array:
    """Stochastic depth: zeroes whole examples of a residual branch with probability ``rate``.

    ``y[b] = x[b] * m[b] / (1 - rate)`` with ``m[b] ~ Bernoulli(1 - rate)``, one draw per example (leading axis),
    so the expectation of ``y`` equals ``x``. ``rate`` may be a traced scalar (used under ``nn.scan``).

    Args:
      x: array ``[batch, ...]``, the output of a residual branch.
      rate: drop probability in ``[0, 1)``.
      rng: a PRNG key.

    Returns:
      Array of the shape and dtype of ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> drop_path(jnp.ones((4, 3)), 0.0, jax.random.key(0)).tolist()[0]
      [1.0, 1.0, 1.0]
    """
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rng, keep, mask_shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class Mlp(nn.Module):
    """Transformer feed-forward block: ``fc2(dropout(act(fc1(x))))``.

    Attributes:
      hidden_dim: width of the hidden layer (``mlp_dim``).
      out_dim: output width; ``None`` keeps the input width.
      activation: activation name, see :func:`get_activation`.
      dropout_rate: dropout after the activation (active when ``deterministic=False``; rng ``'dropout'``).
      use_bias: whether ``fc1``/``fc2`` have biases.
      dtype: compute dtype (``None``: from the inputs).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initialisers of the two Dense layers.

    Input ``[..., d]`` -> output ``[..., out_dim or d]``. Parameters ``fc1/{kernel,bias}``, ``fc2/{kernel,bias}``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mlp = Mlp(hidden_dim=8)
      >>> params = mlp.init(jax.random.key(0), jnp.ones((2, 4)))["params"]
      >>> mlp.apply({"params": params}, jnp.ones((2, 4))).shape
      (2, 4)
    """

    hidden_dim: int
    out_dim: int | None = None
    activation: str = "gelu"
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        act = get_activation(self.activation)
        out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
        dense = lambda feat, name: nn.Dense(  # noqa: E731
            feat,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name=name,
        )
        x = dense(self.hidden_dim, "fc1")(x)
        x = act(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return dense(out_dim, "fc2")(x)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """All options of a pre-LN transformer encoder, in one frozen (hashable) dataclass passed whole.

    :class:`EncoderBlock` and :class:`Encoder` take one; :class:`mmjax.vit.ViT` and
    :class:`mmjax.text.TextTransformer` build one from their keyword arguments (or take one as ``encoder_config``)
    and :class:`mmjax.clip.CLIPConfig` builds one per tower.

    Attributes:
      num_heads: attention heads; the width must be divisible by it.
      mlp_dim: hidden width of the MLP.
      depth: number of blocks (used by :class:`Encoder`).
      width: the model width, or ``None`` to take it from the inputs (when set, inputs of another width raise).
      activation: MLP activation name (``gelu``, ``gelu_tanh``, ``quick_gelu``, ..., see :func:`get_activation`).
      layer_norm_eps: LayerNorm epsilon (1e-6 big_vision/timm, 1e-5 CLIP/PyTorch, 1e-12 HF ViT).
      dropout_rate: dropout on both residual branches and inside the MLP.
      attention_dropout_rate: dropout on the attention probabilities.
      drop_path_rate: stochastic-depth probability: of the last block in an :class:`Encoder` (the rate grows
        linearly from 0 over the blocks, see :meth:`drop_path_rates`), of the block itself in an
        :class:`EncoderBlock` used alone.
      num_kv_heads: key/value heads for grouped-query attention (``None``: ``num_heads``).
      attention_bias: biases in the four attention projections (query, key, value, out).
      attention_implementation: passed to :class:`mmjax.attention.MultiHeadAttention` (``None``: default).
      remat: recompute each block's activations in the backward pass (``nn.remat``): less memory, more compute.
      scan: run the blocks with ``nn.scan``: parameters stacked on a leading axis of size ``depth`` under
        ``encoderblock/`` (faster compile for deep models; no per-block intermediates).
      final_norm: apply the LayerNorm ``encoder_norm`` to the encoder output.
      dtype: compute dtype (``None``: from the inputs); param_dtype: parameter dtype.

    Raises:
      ValueError: for a non-positive size, a drop-path rate outside ``[0, 1)``, an unknown activation or a width
        not divisible by ``num_heads``.

    Example:
      >>> cfg = EncoderConfig(num_heads=2, mlp_dim=16, depth=3, drop_path_rate=0.1)
      >>> cfg.drop_path_rates().tolist(), cfg.replace(depth=1).depth
      ([0.0, 0.05000000074505806, 0.10000000149011612], 1)
    """

    num_heads: int
    mlp_dim: int
    depth: int = 1
    width: int | None = None
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    num_kv_heads: int | None = None
    attention_bias: bool = True
    attention_implementation: str | None = None
    remat: bool = False
    scan: bool = False
    final_norm: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        for name in ("num_heads", "mlp_dim", "depth", "width", "num_kv_heads"):
            value = getattr(self, name)
            if value is None and name in ("width", "num_kv_heads"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EncoderConfig: {name} must be a positive int, got {name}={value!r}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(
                f"EncoderConfig: drop_path_rate must be in [0, 1), got drop_path_rate={self.drop_path_rate!r}."
            )
        if self.width is not None and self.width % self.num_heads:
            raise ValueError(
                f"EncoderConfig: width={self.width} is not divisible by num_heads={self.num_heads}; "
                "choose a width that is a multiple of num_heads."
            )
        get_activation(self.activation)  # an unknown name raises here, listing the valid ones

    def replace(self, **changes) -> EncoderConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def drop_path_rates(self) -> np.ndarray:
        """The per-block stochastic-depth rates, ``[depth]`` float32, linear from 0 to ``drop_path_rate``."""
        if self.depth == 1:
            return np.full((1,), self.drop_path_rate, np.float32)
        return np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)


def refuse_encoder_keywords_beside_config(module: nn.Module, keywords: tuple[str, ...]) -> None:
    """Raise if ``module`` got ``encoder_config`` together with any of its encoder ``keywords`` set.

    A model such as :class:`mmjax.vit.ViT` takes its encoder options either as keywords or whole as an
    :class:`EncoderConfig`; a keyword that differs from its default beside a config would be silently ignored.

    Example:
      >>> from mmjax.text import TextTransformer
      >>> cfg = EncoderConfig(width=8, depth=1, num_heads=2, mlp_dim=16)
      >>> try:
      ...     refuse_encoder_keywords_beside_config(TextTransformer(vocab_size=5, depth=3, encoder_config=cfg), ("depth",))
      ... except ValueError as e:
      ...     print(str(e).split(";")[0])
      TextTransformer: encoder_config is given together with the encoder keywords depth=3
    """
    name = type(module).__name__
    defaults = {f.name: f.default for f in dataclasses.fields(type(module))}
    clash = [n for n in keywords if getattr(module, n) != defaults[n]]
    if clash:
        given = ", ".join(f"{n}={getattr(module, n)!r}" for n in clash)
        raise ValueError(
            f"{name}: encoder_config is given together with the encoder keywords {given}; pass the encoder options "
            "in one place, e.g. encoder_config=config.replace(...)."
        )


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block (ViT / CLIP / GPT-2 style).

    ``x = x + drop_path(dropout(attn(ln1(x))))`` then ``x = x + drop_path(dropout(mlp(ln2(x))))``.

    Attributes:
      config: the :class:`EncoderConfig` (its ``depth``, ``remat``, ``scan`` and ``final_norm`` concern the
        :class:`Encoder` and are not used here; ``drop_path_rate`` is this block's rate).

    Call: ``block(x, mask=None, is_causal=False, deterministic=True)`` with ``x`` ``[batch, tokens, width]``;
    ``mask`` bool, True = attend, broadcastable to ``[batch, heads, tokens, tokens]``. Returns ``[batch, tokens,
    width]``. Submodules ``ln1``, ``attn``, ``ln2``, ``mlp``. Dropout and drop-path use the rng ``'dropout'``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = EncoderBlock(EncoderConfig(num_heads=2, mlp_dim=16))
      >>> x = jnp.ones((1, 3, 8))
      >>> params = block.init(jax.random.key(0), x)["params"]
      >>> block.apply({"params": params}, x, is_causal=True).shape
      (1, 3, 8)
    """

    config: EncoderConfig

    def __call__(
        self, x: Array, mask: Array | None = None, is_causal: bool = False, deterministic: bool = True
    ) -> Array:
        rate = self.config.drop_path_rate
        return self._block(x, mask, is_causal, deterministic, rate, rate > 0)

    @nn.compact
    def _block(self, x, mask, is_causal, deterministic, rate, use_drop_path):
        cfg = self.config
        if x.ndim != 3:
            raise ValueError(
                f"EncoderBlock: x must be [batch, tokens, width], got shape {x.shape}; reshape the inputs."
            )
        if x.shape[-1] % cfg.num_heads:
            raise ValueError(
                f"EncoderBlock: width {x.shape[-1]} (last axis of x) is not divisible by num_heads={cfg.num_heads}."
            )
        if cfg.width is not None and x.shape[-1] != cfg.width:
            raise ValueError(
                f"EncoderBlock: x has width {x.shape[-1]} (shape {x.shape}) but the config says width={cfg.width}; "
                "embed the inputs to the model width first."
            )
        stochastic = use_drop_path and not deterministic

        def residual(branch):
            branch = nn.Dropout(cfg.dropout_rate)(branch, deterministic=deterministic)
            if stochastic:
                branch = drop_path(branch, rate, self.make_rng("dropout"))
            return branch

        ln = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        y = ln("ln1")(x)
        y = MultiHeadAttention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            use_bias=cfg.attention_bias,
            dropout_rate=cfg.attention_dropout_rate,
            implementation=cfg.attention_implementation,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="attn",
        )(y, mask=mask, is_causal=is_causal, deterministic=deterministic)
        x = x + residual(y)
        y = ln("ln2")(x)
        y = Mlp(
            hidden_dim=cfg.mlp_dim,
            activation=cfg.activation,
            dropout_rate=cfg.dropout_rate,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="mlp",
        )(y, deterministic=deterministic)
        return x + residual(y)


class _StaticBlock(EncoderBlock):
    """EncoderBlock with the static flags as fields, for ``nn.remat``/``nn.scan``: ``(x, rate, mask) -> (x, None)``."""

    static_is_causal: bool = False
    static_deterministic: bool = True
    use_drop_path: bool = False

    def __call__(self, x, rate, mask):  # type: ignore[override]
        y = self._block(x, mask, self.static_is_causal, self.static_deterministic, rate, self.use_drop_path)
        return y, None


class Encoder(nn.Module):
    """A stack of ``config.depth`` pre-LN :class:`EncoderBlock` s with an optional final LayerNorm.

    The stochastic-depth rate grows linearly over the layers: block ``i`` drops with
    ``drop_path_rate * i / (depth - 1)`` (0 for the first block, ``drop_path_rate`` for the last).

    Attributes:
      config: the :class:`EncoderConfig` (depth, heads, MLP, dropout, remat, scan, final_norm, dtypes, ...).

    Call: ``encoder(x, mask=None, is_causal=False, deterministic=True)`` with ``x`` ``[batch, tokens, width]``;
    returns ``(y, intermediates)`` where ``y`` is ``[batch, tokens, width]`` and ``intermediates`` maps
    ``"encoderblock_{i}"`` to the output of block ``i`` (empty when ``scan=True``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> enc = Encoder(EncoderConfig(depth=2, num_heads=2, mlp_dim=16))
      >>> x = jnp.ones((1, 3, 8))
      >>> params = enc.init(jax.random.key(0), x)["params"]
      >>> y, aux = enc.apply({"params": params}, x)
      >>> y.shape, sorted(aux)
      ((1, 3, 8), ['encoderblock_0', 'encoderblock_1'])
    """

    config: EncoderConfig

    @nn.compact
    def __call__(
        self, x: Array, mask: Array | None = None, is_causal: bool = False, deterministic: bool = True
    ) -> tuple[Array, dict[str, Array]]:
        cfg = self.config
        rates = cfg.drop_path_rates()
        block_kwargs = dict(
            config=cfg,
            static_is_causal=is_causal,
            static_deterministic=deterministic,
            use_drop_path=cfg.drop_path_rate > 0,
        )
        block_cls = _StaticBlock
        if cfg.remat:
            block_cls = nn.remat(block_cls, prevent_cse=not cfg.scan)
        intermediates: dict[str, Array] = {}
        if cfg.scan:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=cfg.depth,
            )
            x, _ = scanned(**block_kwargs, name="encoderblock")(x, jnp.asarray(rates), mask)
        else:
            for i in range(cfg.depth):
                x, _ = block_cls(**block_kwargs, name=f"encoderblock_{i}")(x, float(rates[i]), mask)
                intermediates[f"encoderblock_{i}"] = x
        if cfg.final_norm:
            x = nn.LayerNorm(
                epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="encoder_norm"
            )(x)
        return x, intermediates


def posemb_sincos_2d(
    height: int, width: int, dim: int, temperature: float = 10_000.0, dtype: Dtype = jnp.float32
) -> Array:
    """Fixed 2-D sine-cosine position embedding (MoCo v3; big_vision ``posemb_sincos_2d``).

    For grid position ``(r, c)`` (row-major token order) and ``k = 0 .. dim/4 - 1`` with
    ``omega_k = temperature ** (-k / (dim/4 - 1))``, the embedding is the concatenation
    ``[sin(c omega), cos(c omega), sin(r omega), cos(r omega)]``.

    Args:
      height, width: the patch grid (tokens = ``height * width``).
      dim: embedding width, divisible by 4 (and at least 8).
      temperature: the base of the frequencies.
      dtype: output dtype.

    Returns:
      Array ``[1, height * width, dim]``.

    Raises:
      ValueError: if ``dim`` is not a multiple of 4 or smaller than 8.

    Example:
      >>> posemb_sincos_2d(2, 3, 8).shape
      (1, 6, 8)
    """
    if dim % 4 or dim < 8:
        raise ValueError(
            f"posemb_sincos_2d: dim must be a multiple of 4 and >= 8, got dim={dim}; use a learned posemb instead."
        )
    quarter = dim // 4
    omega = 1.0 / (temperature ** (np.arange(quarter, dtype=np.float64) / (quarter - 1)))
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    angle_r = rows.reshape(-1, 1) * omega[None, :]
    angle_c = cols.reshape(-1, 1) * omega[None, :]
    pe = np.concatenate([np.sin(angle_c), np.cos(angle_c), np.sin(angle_r), np.cos(angle_r)], axis=1)
    return jnp.asarray(pe[None], dtype)


def add_learned_posemb(
    module: nn.Module,
    x: Array,
    *,
    stddev: float = 0.02,
    param_dtype: Dtype = jnp.float32,
    name: str = "pos_embedding",
    owner: str = "LearnedPositionEmbedding",
) -> Array:
    """``x + pos_embedding`` with a learned ``[1, tokens, width]`` parameter ``name`` declared on ``module``.

    The one implementation of the learned position embedding: :class:`LearnedPositionEmbedding` and
    :class:`mmjax.vit.ViT` (whose parameter sits directly in its own tree) both call it. Call it from inside a
    module's ``@nn.compact`` method.

    Args:
      module: the module that owns the parameter (usually ``self``).
      x: ``[batch, tokens, width]``.
      stddev: standard deviation of the normal initialiser.
      param_dtype: parameter dtype.
      name: the parameter's name.
      owner: the name the error message starts with.

    Returns:
      ``x + pos_embedding`` in the dtype of ``x``.

    Raises:
      ValueError: if the parameter exists with a shape other than ``[1, tokens, width]`` (inputs of another size
        than at ``init``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> class AddPos(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return add_learned_posemb(self, x)
      >>> AddPos().init(jax.random.key(0), jnp.zeros((2, 5, 4)))["params"]["pos_embedding"].shape
      (1, 5, 4)
    """
    shape = (1,) + tuple(x.shape[1:])
    if module.has_variable("params", name):
        have = tuple(module.get_variable("params", name).shape)
        if have != shape:
            raise ValueError(
                f"{owner}: the inputs give {x.shape[1]} tokens of width {x.shape[2]} (shape {tuple(x.shape)}) but "
                f"{name} has shape {have} (expected {shape}); use the image/sequence size the parameters were made "
                "for."
            )
    pe = module.param(name, nn.initializers.normal(stddev), shape, param_dtype)
    return x + pe.astype(x.dtype)


class LearnedPositionEmbedding(nn.Module):
    """Adds a learned position embedding ``pos_embedding`` of shape ``[1, tokens, width]`` to ``x``.

    A module wrapper of :func:`add_learned_posemb` (the parameter then lives in this module's own scope).

    Attributes:
      stddev: initialiser standard deviation (normal).
      param_dtype: parameter dtype.

    Input ``[batch, tokens, width]`` -> same shape. The parameter's shape is fixed at ``init``; applying to a
    different number of tokens raises a ValueError.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> pe = LearnedPositionEmbedding()
      >>> params = pe.init(jax.random.key(0), jnp.zeros((2, 5, 4)))["params"]
      >>> params["pos_embedding"].shape
      (1, 5, 4)
    """

    stddev: float = 0.02
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return add_learned_posemb(self, x, stddev=self.stddev, param_dtype=self.param_dtype)


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """``x / max(|x|, eps)`` along ``axis``, computed in float32 or wider.

    The one L2 normalisation of mmjax: :class:`mmjax.clip.CLIP` normalises its embeddings with it and
    :mod:`mmjax.evaluate` its inputs. A ``jax.Array`` (or a tracer, under ``jit``) is normalised with ``jax.numpy``;
    anything else (NumPy arrays, lists) with NumPy on the host, so float64 evaluation stays float64 without
    ``jax_enable_x64``. Both compute ``x.astype(promote_types(x.dtype, float32))`` divided by its clamped norm.

    Args:
      x: an array or array-like.
      axis: the axis to normalise along.
      eps: the floor of the norm (an all-zero vector stays zero).

    Returns:
      An array of the shape of ``x`` and the kind of ``x`` (``jax.Array`` or ``np.ndarray``), dtype
      ``promote_types(x.dtype, float32)``.

    Example:
      >>> import jax.numpy as jnp
      >>> l2_normalize(jnp.array([[3.0, 4.0]])).tolist(), l2_normalize(np.array([[3.0, 4.0]])).tolist()
      ([[0.6000000238418579, 0.800000011920929]], [[0.6, 0.8]])
    """
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x)
    x = x.astype(xp.promote_types(x.dtype, xp.float32))
    return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), eps)


def stack_layers(params: dict[str, Any], depth: int, prefix: str = "encoderblock") -> dict[str, Any]:
    """Turns per-layer parameters ``{prefix}_{i}`` into the stacked ``{prefix}`` tree that ``Encoder(scan=True)``
    uses (every leaf gets a leading axis of size ``depth``). Other entries (e.g. ``encoder_norm``) are kept.

    Args:
      params: the ``Encoder``'s parameter dict with ``scan=False``.
      depth: number of layers.
      prefix: layer name prefix.

    Returns:
      The ``scan=True`` parameter dict.

    Raises:
      ValueError: if a layer ``{prefix}_{i}`` for ``i < depth`` is missing.

    Example:
      >>> import numpy as np
      >>> p = {"encoderblock_0": {"w": np.zeros(2)}, "encoderblock_1": {"w": np.ones(2)}}
      >>> stack_layers(p, 2)["encoderblock"]["w"].shape
      (2, 2)
    """
    names = [f"{prefix}_{i}" for i in range(depth)]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"stack_layers: missing layers {missing} (have {sorted(params)}); check depth={depth}.")
    out = {k: v for k, v in params.items() if k not in names}
    out[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
    return out


def unstack_layers(params: dict[str, Any], prefix: str = "encoderblock") -> dict[str, Any]:
    """Inverse of :func:`stack_layers`: splits the stacked ``{prefix}`` tree into ``{prefix}_{i}`` entries.

    Example:
      >>> import numpy as np
      >>> sorted(unstack_layers({"encoderblock": {"w": np.zeros((3, 2))}}))
      ['encoderblock_0', 'encoderblock_1', 'encoderblock_2']
    """
    if prefix not in params:
        raise ValueError(f"unstack_layers: no stacked entry {prefix!r} in {sorted(params)}.")
    depth = jax.tree.leaves(params[prefix])[0].shape[0]
    out = {k: v for k, v in params.items() if k != prefix}
    for i in range(depth):
        out[f"{prefix}_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[prefix])
    return out
