"""Hugging Face ``CLIPModel`` <-> :class:`mmjax.clip.CLIP` parameters, both ways, exactly.

Name map (``L`` = layer index, ``T`` = ``text_model``, ``V`` = ``vision_model``; PyTorch Linear weights are
``[out, in]``, our kernels ``[in, out]``)::

    T.embeddings.token_embedding.weight      [V, W]       text/token_embedding/embedding
    T.embeddings.position_embedding.weight   [77, W]      text/pos_embedding
    T.final_layer_norm.{weight,bias}                      text/encoder/encoder_norm/{scale,bias}
    V.embeddings.class_embedding             [W]          vision/cls                 [1, 1, W]
    V.embeddings.patch_embedding.weight      [W, C, p, p] vision/embedding/kernel    [p, p, C, W]
    V.embeddings.position_embedding.weight   [N+1, W]     vision/pos_embedding       [1, N+1, W]
    V.pre_layrnorm / V.post_layernorm                     vision/pre_norm, vision/post_norm
    {T,V}.encoder.layers.L.layer_norm1/2                  {text,vision}/encoder/encoderblock_L/ln1, ln2
    {T,V}.encoder.layers.L.self_attn.{q,k,v}_proj  [H*D, W]   .../attn/{query,key,value}/kernel [W, H, D]
    {T,V}.encoder.layers.L.self_attn.out_proj      [W, H*D]   .../attn/out/kernel               [H, D, W]
    {T,V}.encoder.layers.L.mlp.fc1/fc2                    .../mlp/fc1, fc2
    visual_projection.weight / text_projection.weight [E, W]  visual_projection/kernel, text_projection/kernel [W, E]
    logit_scale                              []           logit_scale

With ``config.scan=True`` the per-layer entries are stacked on a leading axis under ``encoder/encoderblock``.
Every map is a transpose or reshape, so HF -> mmjax -> HF returns identical arrays. Unknown, missing and mis-shaped
keys raise a ValueError naming them. The non-persistent ``*.embeddings.position_ids`` buffers that old
``pytorch_model.bin`` files carry are checked (they must be ``arange``) and dropped. Nothing is unpickled except
through ``torch.load(weights_only=True)``.

Entry points: ``mmjax.convert.from_hf(source)`` (a directory, a ``transformers.CLIPModel`` or a state dict with
its config) -> ``(CLIP model, params)`` through :func:`from_hf_state_dict`; :func:`params_from_hf`;
:func:`to_hf_state_dict`; :func:`to_hf_dir` (loadable by ``transformers.CLIPModel.from_pretrained``);
:func:`convert_hf_dir` / :func:`load_dir` for mmjax's own format (``params.safetensors`` + ``mmjax_config.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.clip import CLIP, CLIPConfig, as_config
from mmjax.convert.io import check_state_dict, load_config, load_state_dict, save_hf_dir, to_numpy_state_dict
from mmjax.errors import UserError
from mmjax.keypath import set_path

__all__ = [
    "hf_shapes",
    "params_from_hf",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "to_hf_dir",
    "convert_hf_dir",
    "save_dir",
    "load_dir",
    "flatten_params",
    "unflatten_params",
]

_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
MMJAX_CONFIG = "mmjax_config.json"
MMJAX_PARAMS = "params.safetensors"


def _layer_shapes(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for ln in ("layer_norm1", "layer_norm2"):
        out[f"{prefix}.{ln}.weight"] = (width,)
        out[f"{prefix}.{ln}.bias"] = (width,)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out[f"{prefix}.self_attn.{proj}.weight"] = (width, width)
        out[f"{prefix}.self_attn.{proj}.bias"] = (width,)
    out[f"{prefix}.mlp.fc1.weight"] = (mlp, width)
    out[f"{prefix}.mlp.fc1.bias"] = (mlp,)
    out[f"{prefix}.mlp.fc2.weight"] = (width, mlp)
    out[f"{prefix}.mlp.fc2.bias"] = (width,)
    return out


def hf_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a Hugging Face ``CLIPModel`` state dict for ``config`` (buffers excluded).

    >>> from mmjax.clip import get_config
    >>> hf_shapes(get_config("tiny"))["vision_model.embeddings.patch_embedding.weight"]
    (32, 3, 8, 8)
    """
    c = config
    if c.vision_stem_features:
        raise UserError(
            f"hf_shapes: vision_stem_features={c.vision_stem_features} (a hybrid image tower) has no "
            "Hugging Face CLIP equivalent; only configs with vision_stem_features=() convert."
        )
    tw, vw = c.text_width, c.vision_width
    s: dict[str, tuple[int, ...]] = {
        "text_model.embeddings.token_embedding.weight": (c.vocab_size, tw),
        "text_model.embeddings.position_embedding.weight": (c.context_length, tw),
        "text_model.final_layer_norm.weight": (tw,),
        "text_model.final_layer_norm.bias": (tw,),
        "vision_model.embeddings.class_embedding": (vw,),
        "vision_model.embeddings.patch_embedding.weight": (vw, c.num_channels, c.patch_size, c.patch_size),
        "vision_model.embeddings.position_embedding.weight": (c.num_patches + 1, vw),
        "vision_model.pre_layrnorm.weight": (vw,),
        "vision_model.pre_layrnorm.bias": (vw,),
        "vision_model.post_layernorm.weight": (vw,),
        "vision_model.post_layernorm.bias": (vw,),
        "visual_projection.weight": (c.embed_dim, vw),
        "text_projection.weight": (c.embed_dim, tw),
        "logit_scale": (),
    }
    for i in range(c.text_depth):
        s.update(_layer_shapes(f"text_model.encoder.layers.{i}", tw, c.text_mlp_dim or 4 * tw))
    for i in range(c.vision_depth):
        s.update(_layer_shapes(f"vision_model.encoder.layers.{i}", vw, c.vision_mlp_dim or 4 * vw))
    return s


def _ln(sd, name):
    return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _block_from_hf(sd, prefix: str, heads: int) -> dict[str, Any]:
    width = sd[f"{prefix}.layer_norm1.weight"].shape[0]
    head_dim = width // heads
    attn = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        w, b = sd[f"{prefix}.self_attn.{theirs}.weight"], sd[f"{prefix}.self_attn.{theirs}.bias"]
        attn[ours] = {"kernel": w.T.reshape(width, heads, head_dim), "bias": b.reshape(heads, head_dim)}
    w = sd[f"{prefix}.self_attn.out_proj.weight"]
    attn["out"] = {"kernel": w.T.reshape(heads, head_dim, width), "bias": sd[f"{prefix}.self_attn.out_proj.bias"]}
    return {
        "ln1": _ln(sd, f"{prefix}.layer_norm1"),
        "ln2": _ln(sd, f"{prefix}.layer_norm2"),
        "attn": attn,
        "mlp": {
            "fc1": {"kernel": sd[f"{prefix}.mlp.fc1.weight"].T, "bias": sd[f"{prefix}.mlp.fc1.bias"]},
            "fc2": {"kernel": sd[f"{prefix}.mlp.fc2.weight"].T, "bias": sd[f"{prefix}.mlp.fc2.bias"]},
        },
    }


def _block_to_hf(block, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for ln, ours in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
        out[f"{prefix}.{ln}.weight"] = block[ours]["scale"]
        out[f"{prefix}.{ln}.bias"] = block[ours]["bias"]
    a = block["attn"]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        k = a[ours]["kernel"]
        out[f"{prefix}.self_attn.{theirs}.weight"] = k.reshape(k.shape[0], -1).T
        out[f"{prefix}.self_attn.{theirs}.bias"] = a[ours]["bias"].reshape(-1)
    k = a["out"]["kernel"]
    out[f"{prefix}.self_attn.out_proj.weight"] = k.reshape(-1, k.shape[-1]).T
    out[f"{prefix}.self_attn.out_proj.bias"] = a["out"]["bias"]
    for fc in ("fc1", "fc2"):
        out[f"{prefix}.mlp.{fc}.weight"] = block["mlp"][fc]["kernel"].T
        out[f"{prefix}.mlp.{fc}.bias"] = block["mlp"][fc]["bias"]
    return out


def _encoder_from_hf(sd, prefix: str, depth: int, heads: int, scan: bool) -> dict[str, Any]:
    blocks = [_block_from_hf(sd, f"{prefix}.encoder.layers.{i}", heads) for i in range(depth)]
    if scan:
        return {"encoderblock": _tree_map(lambda *xs: np.stack(xs), *blocks)}
    return {f"encoderblock_{i}": b for i, b in enumerate(blocks)}


def _encoder_to_hf(enc, prefix: str, depth: int, scan: bool) -> dict[str, np.ndarray]:
    out = {}
    for i in range(depth):
        block = _tree_map(lambda x: x[i], enc["encoderblock"]) if scan else enc[f"encoderblock_{i}"]
        out.update(_block_to_hf(block, f"{prefix}.encoder.layers.{i}"))
    return out


def _tree_map(fn, *trees):
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in first}
    return fn(*trees)


def _contiguous(x) -> np.ndarray:
    # np.ascontiguousarray turns 0-d arrays into 1-d ones; keep the shape.
    x = np.asarray(x)
    return np.ascontiguousarray(x).reshape(x.shape)


def _drop_buffers(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = dict(sd)
    for name in _BUFFERS:
        if name in sd:
            value = np.asarray(sd.pop(name))
            if not np.array_equal(value.reshape(-1), np.arange(value.size)):
                raise UserError(f"state dict: buffer {name!r} must be arange({value.size}); got other values.")
    return sd


def params_from_hf(state_dict: Mapping[str, Any], config: CLIPConfig, dtype: Any = np.float32) -> dict[str, Any]:
    """A Hugging Face ``CLIPModel`` state dict -> mmjax :class:`~mmjax.clip.CLIP` params (numpy arrays).

    Args:
      state_dict: ``{name: tensor or array}``.
      config: the matching :class:`~mmjax.clip.CLIPConfig` (e.g. ``CLIPConfig.from_hf(hf_config)``).
      dtype: cast every array to this dtype (``None`` keeps the checkpoint's dtypes).

    Returns:
      The params tree for ``CLIP(config).apply({"params": params}, ...)``.

    Raises:
      ValueError: naming unknown, missing and mis-shaped keys.

    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> sd = {k: np.zeros(shape, np.float32) for k, shape in hf_shapes(cfg).items()}
    >>> params = params_from_hf(sd, cfg)
    >>> sorted(params), params["vision"]["embedding"]["kernel"].shape
    (['logit_scale', 'text', 'text_projection', 'vision', 'visual_projection'], (8, 8, 3, 32))
    """
    sd = _drop_buffers(to_numpy_state_dict(state_dict))
    check_state_dict(sd, hf_shapes(config), what="Hugging Face CLIP state dict")
    if dtype is not None:
        sd = {k: np.asarray(v, dtype=dtype) for k, v in sd.items()}
    c = config
    T, V = "text_model", "vision_model"
    text = {
        "token_embedding": {"embedding": sd[f"{T}.embeddings.token_embedding.weight"]},
        "pos_embedding": sd[f"{T}.embeddings.position_embedding.weight"],
        "encoder": _encoder_from_hf(sd, T, c.text_depth, c.text_heads, c.scan),
    }
    text["encoder"]["encoder_norm"] = _ln(sd, f"{T}.final_layer_norm")
    vw = c.vision_width
    vision = {
        "cls": sd[f"{V}.embeddings.class_embedding"].reshape(1, 1, vw),
        "embedding": {"kernel": sd[f"{V}.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)},
        "pos_embedding": sd[f"{V}.embeddings.position_embedding.weight"][None],
        "pre_norm": _ln(sd, f"{V}.pre_layrnorm"),
        "encoder": _encoder_from_hf(sd, V, c.vision_depth, c.vision_heads, c.scan),
        "post_norm": _ln(sd, f"{V}.post_layernorm"),
    }
    params = {
        "text": text,
        "vision": vision,
        "visual_projection": {"kernel": sd["visual_projection.weight"].T},
        "text_projection": {"kernel": sd["text_projection.weight"].T},
        "logit_scale": sd["logit_scale"],
    }
    return _tree_map(_contiguous, params)


def to_hf_state_dict(params: Mapping[str, Any], config: CLIPConfig) -> dict[str, np.ndarray]:
    """mmjax CLIP params -> a Hugging Face ``CLIPModel`` state dict (numpy, the params' dtypes).

    Raises:
      ValueError: if ``params`` has a ``logit_bias`` (Hugging Face CLIP has none) or does not match ``config``.

    A round trip through :func:`params_from_hf`:

    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> sd = {k: np.zeros(shape, np.float32) for k, shape in hf_shapes(cfg).items()}
    >>> back = to_hf_state_dict(params_from_hf(sd, cfg), cfg)
    >>> sorted(back) == sorted(sd), back["vision_model.embeddings.patch_embedding.weight"].shape
    (True, (32, 3, 8, 8))
    """
    p = _tree_map(np.asarray, dict(params))
    if "logit_bias" in p:
        raise UserError("to_hf_state_dict: params have a logit_bias, which Hugging Face CLIPModel cannot hold.")
    c = config
    T, V = "text_model", "vision_model"
    try:
        t, v = p["text"], p["vision"]
        sd = {
            f"{T}.embeddings.token_embedding.weight": t["token_embedding"]["embedding"],
            f"{T}.embeddings.position_embedding.weight": t["pos_embedding"],
            f"{T}.final_layer_norm.weight": t["encoder"]["encoder_norm"]["scale"],
            f"{T}.final_layer_norm.bias": t["encoder"]["encoder_norm"]["bias"],
            f"{V}.embeddings.class_embedding": v["cls"].reshape(-1),
            f"{V}.embeddings.patch_embedding.weight": v["embedding"]["kernel"].transpose(3, 2, 0, 1),
            f"{V}.embeddings.position_embedding.weight": v["pos_embedding"][0],
            f"{V}.pre_layrnorm.weight": v["pre_norm"]["scale"],
            f"{V}.pre_layrnorm.bias": v["pre_norm"]["bias"],
            f"{V}.post_layernorm.weight": v["post_norm"]["scale"],
            f"{V}.post_layernorm.bias": v["post_norm"]["bias"],
            "visual_projection.weight": p["visual_projection"]["kernel"].T,
            "text_projection.weight": p["text_projection"]["kernel"].T,
            "logit_scale": p["logit_scale"],
        }
        sd.update(_encoder_to_hf(t["encoder"], T, c.text_depth, c.scan))
        sd.update(_encoder_to_hf(v["encoder"], V, c.vision_depth, c.scan))
    except KeyError as e:
        raise UserError(f"to_hf_state_dict: params lack {e}; expected the tree of mmjax.clip.CLIP({c}).") from e
    sd = {k: _contiguous(x) for k, x in sd.items()}
    check_state_dict(sd, hf_shapes(c), what="mmjax CLIP params (as a Hugging Face state dict)")
    return sd


_CONFIG_OPTIONS = ("scan", "remat", "attention_implementation", "max_logit_scale")


def from_hf_state_dict(state_dict: Mapping[str, Any], config: Any, **model_options: Any) -> tuple[CLIP, dict]:
    """The :func:`mmjax.convert.from_hf` converter for ``model_type == "clip"``: ``(CLIP model, params)``.

    Args:
      state_dict: a Hugging Face ``CLIPModel`` state dict.
      config: its ``config.json`` dict or ``transformers.CLIPConfig`` (or an mmjax :class:`~mmjax.clip.CLIPConfig`).
      **model_options: ``dtype`` / ``param_dtype`` of :class:`~mmjax.clip.CLIP`, and the config fields ``scan``,
        ``remat``, ``attention_implementation``, ``max_logit_scale``.

    Use through the dispatcher::

        from mmjax.convert import from_hf
        model, params = from_hf("clip-vit-base-patch32")      # a local Hugging Face directory
        out = model.apply({"params": params}, images, ids)

    Directly, on a state dict of zeros:

    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> sd = {k: np.zeros(shape, np.float32) for k, shape in hf_shapes(cfg).items()}
    >>> model, params = from_hf_state_dict(sd, cfg, scan=True)
    >>> model.config.scan, params["text"]["token_embedding"]["embedding"].shape
    (True, (64, 32))
    """
    unknown = sorted(set(model_options) - set(_CONFIG_OPTIONS) - {"dtype", "param_dtype"})
    if unknown:
        raise UserError(
            f"from_hf (clip): unknown model options {unknown}; valid: "
            f"{sorted(_CONFIG_OPTIONS + ('dtype', 'param_dtype'))}."
        )
    overrides = {k: model_options.pop(k) for k in _CONFIG_OPTIONS if k in model_options}
    cfg = config.replace(**overrides) if isinstance(config, CLIPConfig) else CLIPConfig.from_hf(config, **overrides)
    param_dtype = model_options.get("param_dtype", np.float32)
    params = params_from_hf(state_dict, cfg, dtype=param_dtype)
    return CLIP(cfg, **model_options), params


def to_hf_dir(model_config: Any, params: Mapping[str, Any], out_dir: str | os.PathLike) -> None:
    """Write ``model.safetensors`` + ``config.json`` that ``transformers.CLIPModel.from_pretrained`` loads.

    ``model_config``: a :class:`~mmjax.clip.CLIPConfig`, a config name, or a :class:`~mmjax.clip.CLIP` model.

    >>> import tempfile
    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> params = params_from_hf({k: np.zeros(s, np.float32) for k, s in hf_shapes(cfg).items()}, cfg)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     to_hf_dir("tiny", params, d)
    ...     sorted(os.listdir(d))
    ['config.json', 'model.safetensors']
    """
    cfg = _config_of(model_config)
    save_hf_dir(out_dir, to_hf_state_dict(params, cfg), cfg.to_hf_dict())


def _config_of(obj: Any) -> CLIPConfig:
    return as_config(obj.config if isinstance(obj, CLIP) else obj)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (numpy arrays).

    >>> flatten_params({"a": {"b": np.zeros(2)}, "c": np.ones(())})
    {'a/b': array([0., 0.]), 'c': array(1.)}
    """
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, name + "/"))
        else:
            out[name] = np.asarray(v)
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`.

    >>> unflatten_params({"a/b": 1, "c": 2})
    {'a': {'b': 1}, 'c': 2}
    """
    out: dict[str, Any] = {}
    for name, v in flat.items():
        set_path(out, name, v, sep="/", what="params")
    return out


def save_dir(config: CLIPConfig, params: Mapping[str, Any], out_dir: str | os.PathLike) -> None:
    """Write mmjax's format: ``params.safetensors`` (flat ``a/b/c`` keys) and ``mmjax_config.json``.

    >>> import tempfile
    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> params = params_from_hf({k: np.zeros(s, np.float32) for k, s in hf_shapes(cfg).items()}, cfg)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_dir(cfg, params, d)
    ...     sorted(os.listdir(d))
    ['mmjax_config.json', 'params.safetensors']
    """
    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    flat = {k: _contiguous(v) for k, v in flatten_params(params).items()}
    save_file(flat, os.path.join(out_dir, MMJAX_PARAMS), metadata={"format": "mmjax", "model": "clip"})
    with open(os.path.join(out_dir, MMJAX_CONFIG), "w") as f:
        json.dump({"model": "clip", "config": config.to_dict()}, f, indent=2)


def load_dir(directory: str | os.PathLike) -> tuple[CLIPConfig, dict[str, Any]]:
    """Read what :func:`save_dir` / :func:`convert_hf_dir` wrote: ``(CLIPConfig, params)``.

    >>> import tempfile
    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> params = params_from_hf({k: np.zeros(s, np.float32) for k, s in hf_shapes(cfg).items()}, cfg)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_dir(cfg, params, d)
    ...     cfg2, params2 = load_dir(d)
    >>> cfg2 == cfg, params2["text"]["pos_embedding"].shape == params["text"]["pos_embedding"].shape
    (True, True)
    """
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    cfg_path, params_path = os.path.join(directory, MMJAX_CONFIG), os.path.join(directory, MMJAX_PARAMS)
    for path in (cfg_path, params_path):
        if not os.path.isfile(path):
            raise UserError(f"load_dir: {path!r} is missing; expected a directory written by convert_hf_dir/save_dir.")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("model") != "clip":
        raise UserError(f"load_dir: {cfg_path!r} describes model {meta.get('model')!r}, not 'clip'.")
    return CLIPConfig.from_dict(meta["config"]), unflatten_params(load_file(params_path))


def convert_hf_dir(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> CLIPConfig:
    """Convert a Hugging Face CLIP directory to mmjax's format in ``out_dir`` (see :func:`save_dir`).

    Returns the :class:`~mmjax.clip.CLIPConfig`; :func:`load_dir` reads the result back.

    A Hugging Face directory written by :func:`to_hf_dir`, converted and read back:

    >>> import tempfile
    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> params = params_from_hf({k: np.zeros(s, np.float32) for k, s in hf_shapes(cfg).items()}, cfg)
    >>> with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
    ...     to_hf_dir(cfg, params, src)
    ...     converted = convert_hf_dir(src, out)
    ...     loaded_cfg, loaded = load_dir(out)
    >>> converted.embed_dim, loaded_cfg == converted, sorted(loaded) == sorted(params)
    (16, True, True)
    """
    model, params = from_hf_state_dict(load_state_dict(src_dir), load_config(src_dir))
    cfg = _config_of(model)
    save_dir(cfg, params, out_dir)
    return cfg
