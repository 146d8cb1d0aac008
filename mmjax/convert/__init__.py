"""Hugging Face <-> mmjax parameter trees.

:func:`from_hf` reads a ``transformers`` model instance, a ``(state_dict, config)`` pair or a local model directory
and dispatches on ``config["model_type"]`` to a converter registered in ``CONVERTERS``. A converter is a function
``convert(state_dict: dict[str, np.ndarray], config: dict, **model_options) -> (model, params)``; adding an
architecture is one line in ``CONVERTERS`` (``"module:function"``, imported only when used) or a call to
:func:`register`. Neither torch nor transformers is imported here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from mmjax.convert.io import (
    check_state_dict,
    load_config,
    load_state_dict,
    save_hf_dir,
    to_numpy_state_dict,
)
from mmjax.errors import UserError

__all__ = [
    "CONVERTERS",
    "register",
    "from_hf",
    "load_config",
    "load_state_dict",
    "to_numpy_state_dict",
    "check_state_dict",
    "save_hf_dir",
]

# config.model_type -> "module:function" (imported lazily) or a callable.
CONVERTERS: dict[str, str | Callable[..., Any]] = {
    "vit": "mmjax.convert.hf_vit:from_hf_state_dict",
    "clip": "mmjax.convert.hf_clip:from_hf_state_dict",
    "vision-encoder-decoder": "mmjax.convert.hf_vision_encoder_decoder:from_hf_state_dict",
    "owlvit": "mmjax.convert.hf_owlvit:from_hf_state_dict",
}


def register(model_type: str, converter: str | Callable[..., Any]) -> None:
    """Registers ``converter`` (a callable or ``"module:function"``) for HF configs with ``model_type``.

    Example:
      >>> register("toy", lambda state_dict, config, **kw: ("model", dict(state_dict)))
      >>> from_hf({"w": [1.0]}, {"model_type": "toy"})[0]
      'model'
      >>> del CONVERTERS["toy"]
    """
    CONVERTERS[model_type] = converter


def _resolve(model_type: Any) -> Callable[..., Any]:
    if model_type not in CONVERTERS:
        raise UserError(
            f"config model_type={model_type!r} has no converter; supported: {sorted(CONVERTERS)} "
            "(add one with mmjax.convert.register)."
        )
    target = CONVERTERS[model_type]
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise UserError(f"config must be a dict or a transformers config (with to_dict()), got {type(config).__name__}.")


def from_hf(source: Any, config: Any = None, **model_options: Any) -> tuple[Any, Any]:
    """Converts a Hugging Face model into an mmjax ``(model, params)`` pair.

    ``source`` may be:

    * a local directory (``str`` / ``PathLike``) with ``config.json`` and ``model.safetensors`` (or a sharded
      index, or ``pytorch_model.bin`` when torch is installed);
    * a ``transformers`` model instance (anything with ``state_dict()`` and ``config``), e.g. ``ViTModel``,
      ``ViTForImageClassification``, ``CLIPModel``, ``VisionEncoderDecoderModel`` (ViT + GPT-2);
    * a state dict ``{name: tensor or array}`` with ``config`` given (dict or ``transformers`` config), or a
      ``(state_dict, config)`` tuple.

    The result is used as ``model.apply({"params": params}, images)``.

    Args:
      source: see above.
      config: the config when ``source`` is a state dict.
      **model_options: extra options for the mmjax model (e.g. ``dtype=jnp.bfloat16``, ``scan=True``).

    Returns:
      ``(model, params)``.

    Raises:
      ValueError: unsupported ``model_type``; missing config; unknown / missing / mis-shaped weights (each named).

    Example:
      >>> import numpy as np
      >>> from mmjax.convert.hf_vit import expected_shapes
      >>> cfg = {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...        "intermediate_size": 16, "patch_size": 4, "image_size": 8, "num_channels": 3}
      >>> sd = {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg, num_classes=0, pooler=False).items()}
      >>> model, params = from_hf(sd, cfg)
      >>> model.apply({"params": params}, np.zeros((1, 8, 8, 3), np.float32))[0].shape
      (1, 8)
    """
    if isinstance(source, (str, os.PathLike)):
        if config is not None:
            raise UserError("from_hf(directory): config comes from the directory's config.json; do not pass one.")
        config_dict = load_config(source)
        state_dict = load_state_dict(source)
    elif isinstance(source, tuple) and len(source) == 2 and config is None:
        state_dict, config_dict = to_numpy_state_dict(source[0]), _config_dict(source[1])
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        if config is not None:
            raise UserError("from_hf(model): the config is taken from model.config; do not pass one.")
        config_dict = _config_dict(source.config)
        state_dict = to_numpy_state_dict(source.state_dict())
    elif isinstance(source, Mapping):
        if config is None:
            raise UserError("from_hf(state_dict): pass config=... (a dict or transformers config) as well.")
        state_dict, config_dict = to_numpy_state_dict(source), _config_dict(config)
    else:
        raise UserError(
            f"source must be a model directory, a transformers model, a state dict (with config=) or a "
            f"(state_dict, config) tuple; got {type(source).__name__}."
        )
    if "model_type" not in config_dict:
        raise UserError(f"config has no 'model_type' (keys: {sorted(config_dict)}); cannot choose a converter.")
    return _resolve(config_dict["model_type"])(state_dict, config_dict, **model_options)
