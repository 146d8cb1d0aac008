"""Hugging Face ``OwlViTForObjectDetection`` weights -> mmjax :class:`~mmjax.detection.OWLViT` (``box_anchor="corner"``).

OWL-ViT's towers are CLIP's: the ``owlvit.*`` keys are a ``CLIPModel`` state dict (:mod:`mmjax.convert.hf_clip`
converts them into the ``clip/`` subtree); the heads map one to one (``kernel = weight.T``)::

    layer_norm.{weight,bias}                 -> merge_norm/{scale,bias}
    class_head.{dense0,logit_shift,logit_scale}.{weight,bias} -> class_head/{dense0,logit_shift,logit_scale}/...
    box_head.{dense0,dense1,dense2}.{weight,bias}            -> box_head/{dense0,dense1,dense2}/...

Hugging Face's text tower pools at the highest token id (``input_ids.argmax(-1)``, :class:`mmjax.clip.CLIPConfig`'s
``text_pooling="argmax"``) and its box bias sits on the cells' corners (:func:`mmjax.detection.box_bias`). Hugging
Face masks a query whose first id is 0; pass ``query_mask`` to :class:`~mmjax.detection.OWLViT` for the same.

>>> cfg = {"model_type": "owlvit", "projection_dim": 8,
...        "text_config": {"vocab_size": 20, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
...                        "num_attention_heads": 2, "max_position_embeddings": 6},
...        "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
...                          "num_attention_heads": 2, "image_size": 16, "patch_size": 8}}
>>> config_from_hf(cfg).text_pooling, config_from_hf(cfg).image_size
('argmax', 16)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.clip import CLIPConfig
from mmjax.convert import hf_clip
from mmjax.convert.io import check_state_dict, to_numpy_state_dict
from mmjax.detection import OWLViT

__all__ = ["config_from_hf", "params_from_hf", "from_hf_state_dict"]

PREFIX = "owlvit."
_HEADS = {
    "class_head": ("dense0", "logit_shift", "logit_scale"),
    "box_head": ("dense0", "dense1", "dense2"),
}


def config_from_hf(hf_config: Any) -> CLIPConfig:
    """The :class:`~mmjax.clip.CLIPConfig` of a ``transformers.OwlViTConfig`` (or its dict): CLIP's sizes, argmax
    text pooling (see the module docstring).

    >>> config_from_hf({"model_type": "owlvit", "projection_dim": 8, "text_config": {"vocab_size": 20}}).eot_id
    19
    """
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if d.get("model_type", "owlvit") != "owlvit":
        raise ValueError(f"config_from_hf: model_type must be 'owlvit', got {d.get('model_type')!r}.")
    vocab = int((d.get("text_config") or {}).get("vocab_size", 49408))
    return CLIPConfig.from_hf({**d, "model_type": "clip"}, text_pooling="argmax", eot_id=vocab - 1)


def _head_shapes(c: CLIPConfig) -> dict[str, tuple[int, ...]]:
    w, e = c.vision_width, c.embed_dim
    out = {"layer_norm.weight": (w,), "layer_norm.bias": (w,)}
    sizes = {
        "class_head": {"dense0": e, "logit_shift": 1, "logit_scale": 1},
        "box_head": {"dense0": w, "dense1": w, "dense2": 4},
    }
    for head, layers in sizes.items():
        for name, n in layers.items():
            out[f"{head}.{name}.weight"] = (n, w)
            out[f"{head}.{name}.bias"] = (n,)
    return out


def params_from_hf(state_dict: Mapping[str, Any], config: CLIPConfig, dtype: Any = np.float32) -> dict[str, Any]:
    """An ``OwlViTForObjectDetection`` state dict -> :class:`~mmjax.detection.OWLViT` params (numpy arrays).

    Raises:
      ValueError: naming unknown, missing and mis-shaped keys.

    >>> from mmjax.clip import get_config
    >>> cfg = get_config("tiny")
    >>> shapes = {PREFIX + k: s for k, s in hf_clip.hf_shapes(cfg).items()} | _head_shapes(cfg)
    >>> params = params_from_hf({k: np.zeros(s, np.float32) for k, s in shapes.items()}, cfg)
    >>> sorted(params), params["box_head"]["dense2"]["kernel"].shape
    (['box_head', 'class_head', 'clip', 'merge_norm'], (32, 4))
    """
    sd = to_numpy_state_dict(state_dict)
    towers = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    for end in ("weight", "bias"):  # OWL-ViT spells CLIP's "pre_layrnorm" correctly
        if f"vision_model.pre_layernorm.{end}" in towers:
            towers[f"vision_model.pre_layrnorm.{end}"] = towers.pop(f"vision_model.pre_layernorm.{end}")
    heads = {k: v for k, v in sd.items() if not k.startswith(PREFIX) and k != "box_bias"}
    check_state_dict(heads, _head_shapes(config), what="Hugging Face OWL-ViT heads")
    cast = (lambda a: np.ascontiguousarray(a, dtype=dtype)) if dtype is not None else np.ascontiguousarray  # noqa: E731
    dense = lambda name: {"kernel": cast(heads[f"{name}.weight"].T), "bias": cast(heads[f"{name}.bias"])}  # noqa: E731
    params = {
        "clip": hf_clip.params_from_hf(towers, config, dtype=dtype),
        "merge_norm": {"scale": cast(heads["layer_norm.weight"]), "bias": cast(heads["layer_norm.bias"])},
    }
    for head, layers in _HEADS.items():
        params[head] = {name: dense(f"{head}.{name}") for name in layers}
    return params


def from_hf_state_dict(state_dict: Mapping[str, Any], config: Any, **model_options: Any) -> tuple[OWLViT, dict]:
    """``(OWLViT(config, box_anchor="corner", **model_options), params)`` from an ``OwlViTForObjectDetection``
    state dict and its config (the :func:`mmjax.convert.from_hf` entry for ``model_type="owlvit"``).

    >>> cfg = {"model_type": "owlvit", "projection_dim": 32, "text_config": {"vocab_size": 64, "hidden_size": 32,
    ...        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...        "max_position_embeddings": 8}, "vision_config": {"hidden_size": 32, "intermediate_size": 64,
    ...        "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16, "patch_size": 8}}
    >>> c = config_from_hf(cfg)
    >>> shapes = {PREFIX + k: s for k, s in hf_clip.hf_shapes(c).items()} | _head_shapes(c)
    >>> model, params = from_hf_state_dict({k: np.zeros(s, np.float32) for k, s in shapes.items()}, cfg)
    >>> model.box_anchor, params["class_head"]["dense0"]["kernel"].shape
    ('corner', (32, 32))
    """
    clip_config = config_from_hf(config)
    return OWLViT(clip_config, box_anchor="corner", **model_options), params_from_hf(state_dict, clip_config)
