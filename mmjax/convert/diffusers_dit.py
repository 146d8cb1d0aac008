"""diffusers ``DiTTransformer2DModel`` -> :class:`mmjax.dit.DiT` parameters (class-conditional DiT, e.g.
``facebook/DiT-XL-2-256``'s ``transformer/``).

Takes the state dict as ``{name: array}`` (numpy arrays, or torch tensors turned into numpy by
:func:`mmjax.convert.io.to_numpy_state_dict` without importing torch) and the model's config as a dict (its
``config.json``, or ``dict(model.config)``); neither torch nor diffusers is imported here.

Mapping (diffusers name -> mmjax name; ``W`` a torch Linear weight ``[out, in]``, kernels are ``W.T``)::

    pos_embed.proj.weight [D, C, p, p] / .bias             -> embedding/kernel [p, p, C, D] (transpose 2, 3, 1, 0) / bias
    transformer_blocks.0.norm1.emb.timestep_embedder.linear_1 / linear_2
                                                           -> timestep_embedder/fc1 / fc2
    transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight [K + 1, D]
                                                           -> label_embedding (row K: the null class)
    transformer_blocks.{i}.norm1.linear [6 D, D]           -> block_{i}/modulation (same chunk order: shift, scale,
                                                              gate for attention, then for the MLP)
    transformer_blocks.{i}.attn1.to_q / to_k / to_v        -> block_{i}/attn/query / key / value: kernel -> [D, H, hd]
                                                              (bias [H, hd]; zeros when attention_bias=False)
    transformer_blocks.{i}.attn1.to_out.0                  -> block_{i}/attn/out: kernel -> [H, hd, D]
    transformer_blocks.{i}.ff.net.0.proj / ff.net.2        -> block_{i}/mlp/fc1 / fc2
    proj_out_1 [2 D, D]                                    -> final_modulation (shift, scale)
    proj_out_2 [p p C_out, D]                              -> final_linear (same (u, v, c) order inside a patch)

diffusers gives every block its own copy of the timestep and label embedders (``norm1.emb``) and the final layer
uses block 0's; DiT has one embedder shared by all blocks, and the checkpoints converted from DiT hold the same
weights in every copy. The converter therefore reads block 0's copy and checks that every other block's is equal
(else it raises, naming the first differing weight). Other facts of diffusers' DiT that the mmjax options carry:
its timestep embedding uses ``downscale_freq_shift=1`` (``timestep_freq_shift=1.0``; DiT's own code uses 0), the
LayerNorm before the MLP uses the config's ``norm_eps`` (``mlp_layer_norm_eps``; 1e-5 by default) and the others
1e-6, and ``activation_fn="gelu-approximate"`` is the tanh GELU.

The position embedding: diffusers scales the patch grid to its ``sample_size`` grid (``base_size``) when an input has
another size; mmjax's DiT uses the integer patch grid at every size (the formula of DiT's code). At the config's
``sample_size`` the two are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.io import attention_from_torch, check_state_dict, dense_from_torch, f32, to_numpy_state_dict
from mmjax.dit import DiT
from mmjax.errors import UserError

__all__ = ["DIFFUSERS_ACTIVATIONS", "dit_options", "expected_shapes", "from_diffusers_state_dict"]

# diffusers FeedForward activation_fn names (the plain GELU kinds) -> mmjax.layers activation names.
DIFFUSERS_ACTIVATIONS = {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}

_EMBEDDER = "norm1.emb."


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    raise UserError(
        f"config must be a dict (the model's config.json, or dict(model.config)), got {type(config).__name__}."
    )


def dit_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`mmjax.dit.DiT` keyword arguments equivalent to a diffusers ``DiTTransformer2DModel`` config.

    Args:
      config: the config as a dict (keys as diffusers names them; missing keys take diffusers' defaults).

    Returns:
      dict of DiT options (sizes, ``num_classes = num_embeds_ada_norm``, ``out_channels``, activation, LayerNorm
      epsilons, ``timestep_freq_shift=1.0``).

    Raises:
      UserError: for a ``norm_type`` other than ``"ada_norm_zero"``, ``norm_elementwise_affine=True``, an
        activation other than ``"gelu-approximate"`` / ``"gelu"``, no ``num_embeds_ada_norm``, or a width that is
        not a multiple of 4 (each names the value).

    Example:
      >>> opts = dit_options({"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 2,
      ...                     "in_channels": 4, "num_embeds_ada_norm": 10})
      >>> opts["width"], opts["num_classes"], opts["out_channels"], opts["activation"], opts["mlp_layer_norm_eps"]
      (32, 10, 4, 'gelu_tanh', 1e-05)
    """
    config = _config_dict(config)
    get = lambda key, default=None: config.get(key, default)  # noqa: E731
    norm_type = get("norm_type", "ada_norm_zero")
    if norm_type != "ada_norm_zero":
        raise UserError(f"diffusers DiT config norm_type={norm_type!r} is not supported; mmjax DiT is 'ada_norm_zero'.")
    if get("norm_elementwise_affine", False):
        raise UserError(
            "diffusers DiT config norm_elementwise_affine=True is not supported; mmjax DiT's modulated LayerNorms "
            "have no scale and bias (norm_elementwise_affine=False, diffusers' default)."
        )
    activation = get("activation_fn", "gelu-approximate")
    if activation not in DIFFUSERS_ACTIVATIONS:
        raise UserError(
            f"diffusers DiT config activation_fn={activation!r} is not supported; expected one of "
            f"{sorted(DIFFUSERS_ACTIVATIONS)}."
        )
    num_classes = get("num_embeds_ada_norm", 1000)
    if num_classes is None:
        raise UserError("diffusers DiT config num_embeds_ada_norm=None: the class-conditional DiT needs the classes.")
    heads, head_dim = int(get("num_attention_heads", 16)), int(get("attention_head_dim", 72))
    width = heads * head_dim
    if width % 4:
        raise UserError(
            f"diffusers DiT config num_attention_heads={heads} x attention_head_dim={head_dim} = {width} is not a "
            "multiple of 4, which the 2-D sin-cos position embedding needs."
        )
    in_channels = int(get("in_channels", 4))
    out_channels = get("out_channels")
    return dict(
        variant=None,
        width=width,
        depth=int(get("num_layers", 28)),
        num_heads=heads,
        mlp_dim=4 * width,
        patch_size=int(get("patch_size", 2)),
        out_channels=in_channels if out_channels is None else int(out_channels),
        num_classes=int(num_classes),
        frequency_embedding_size=256,
        timestep_freq_shift=1.0,
        activation=DIFFUSERS_ACTIVATIONS[activation],
        layer_norm_eps=1e-6,
        mlp_layer_norm_eps=float(get("norm_eps", 1e-5)),
    )


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The names and shapes a ``DiTTransformer2DModel`` state dict of this config has.

    Example:
      >>> cfg = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1, "in_channels": 4,
      ...        "patch_size": 2, "num_embeds_ada_norm": 10}
      >>> shapes = expected_shapes(cfg)
      >>> shapes["pos_embed.proj.weight"], shapes["proj_out_2.weight"], len(shapes)
      ((32, 4, 2, 2), (16, 32), 25)
    """
    config = _config_dict(config)
    o = dit_options(config)
    d, p, m = o["width"], o["patch_size"], o["mlp_dim"]
    channels = int(config.get("in_channels", 4))
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed.proj.weight": (d, channels, p, p),
        "pos_embed.proj.bias": (d,),
        "proj_out_1.weight": (2 * d, d),
        "proj_out_1.bias": (2 * d,),
        "proj_out_2.weight": (p * p * o["out_channels"], d),
        "proj_out_2.bias": (p * p * o["out_channels"],),
    }
    bias = bool(config.get("attention_bias", True))
    for i in range(o["depth"]):
        pre = f"transformer_blocks.{i}."
        emb = pre + _EMBEDDER
        shapes[emb + "timestep_embedder.linear_1.weight"] = (d, 256)
        shapes[emb + "timestep_embedder.linear_1.bias"] = (d,)
        shapes[emb + "timestep_embedder.linear_2.weight"] = (d, d)
        shapes[emb + "timestep_embedder.linear_2.bias"] = (d,)
        shapes[emb + "class_embedder.embedding_table.weight"] = (o["num_classes"] + 1, d)
        shapes[pre + "norm1.linear.weight"] = (6 * d, d)
        shapes[pre + "norm1.linear.bias"] = (6 * d,)
        for proj in ("to_q", "to_k", "to_v"):
            shapes[pre + f"attn1.{proj}.weight"] = (d, d)
            if bias:
                shapes[pre + f"attn1.{proj}.bias"] = (d,)
        shapes[pre + "attn1.to_out.0.weight"] = (d, d)
        shapes[pre + "attn1.to_out.0.bias"] = (d,)
        shapes[pre + "ff.net.0.proj.weight"] = (m, d)
        shapes[pre + "ff.net.0.proj.bias"] = (m,)
        shapes[pre + "ff.net.2.weight"] = (d, m)
        shapes[pre + "ff.net.2.bias"] = (d,)
    return shapes


_f32, _dense = f32, dense_from_torch


def _check_shared_embedder(sd: Mapping[str, np.ndarray], depth: int) -> None:
    first = "transformer_blocks.0." + _EMBEDDER
    names = sorted(k[len(first) :] for k in sd if k.startswith(first))
    for i in range(1, depth):
        for name in names:
            key = f"transformer_blocks.{i}.{_EMBEDDER}{name}"
            if not np.array_equal(sd[key], sd[first + name]):
                raise UserError(
                    f"diffusers DiT state dict: {key} differs from {first + name}; mmjax DiT has one timestep and "
                    "label embedder shared by all blocks (as DiT, and as the checkpoints converted from it, which "
                    "repeat the same weights in every block), so per-block embedders cannot be converted."
                )


def from_diffusers_state_dict(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], **model_options: Any
) -> tuple[DiT, dict[str, Any]]:
    """Builds the :class:`mmjax.dit.DiT` and its parameters from a diffusers ``DiTTransformer2DModel``.

    ``model.apply({"params": params}, x_nhwc, t, labels=y)[0]`` then equals diffusers'
    ``model(x_nchw, timestep=t, class_labels=y).sample`` transposed to NHWC, for any label in
    ``[0, num_embeds_ada_norm]`` (the last one the null class) at images of the config's ``sample_size``.

    Args:
      state_dict: ``{name: array}`` (numpy arrays or torch tensors) with diffusers' names.
      config: the model config as a dict (``config.json`` or ``dict(model.config)``).
      **model_options: extra :class:`mmjax.dit.DiT` fields (``dtype``, ``attention_implementation``,
        ``class_dropout_prob``, ...).

    Returns:
      ``(model, params)`` with jax arrays of the model's ``param_dtype``.

    Raises:
      UserError: naming every unknown, missing or mis-shaped weight, an unsupported config value, or a block whose
        embedder differs from block 0's.

    Example:
      >>> import numpy as np
      >>> cfg = {"num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 2, "in_channels": 4,
      ...        "patch_size": 2, "num_embeds_ada_norm": 3}
      >>> sd = {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}
      >>> model, params = from_diffusers_state_dict(sd, cfg)
      >>> params["label_embedding"].shape, params["block_1"]["attn"]["query"]["kernel"].shape
      ((4, 8), (8, 2, 4))
    """
    config = _config_dict(config)
    sd = to_numpy_state_dict(state_dict)
    check_state_dict(sd, expected_shapes(config), what="diffusers DiTTransformer2DModel state dict")
    options = dit_options(config)
    options.update(model_options)
    model = DiT(**options)
    width, heads, depth = options["width"], options["num_heads"], options["depth"]
    _check_shared_embedder(sd, depth)

    emb = "transformer_blocks.0." + _EMBEDDER
    patch_w = _f32(sd["pos_embed.proj.weight"])
    params: dict[str, Any] = {
        "embedding": {"kernel": patch_w.transpose(2, 3, 1, 0), "bias": _f32(sd["pos_embed.proj.bias"])},
        "timestep_embedder": {
            "fc1": _dense(sd, emb + "timestep_embedder.linear_1"),
            "fc2": _dense(sd, emb + "timestep_embedder.linear_2"),
        },
        "label_embedding": _f32(sd[emb + "class_embedder.embedding_table.weight"]),
        "final_modulation": _dense(sd, "proj_out_1"),
        "final_linear": _dense(sd, "proj_out_2"),
    }
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        params[f"block_{i}"] = {
            "modulation": _dense(sd, pre + "norm1.linear"),
            "attn": attention_from_torch(sd, pre + "attn1.", ("to_q", "to_k", "to_v", "to_out.0"), width, heads),
            "mlp": {"fc1": _dense(sd, pre + "ff.net.0.proj"), "fc2": _dense(sd, pre + "ff.net.2")},
        }
    params = jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)
    return model, params
