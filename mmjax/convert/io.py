"""Reading and writing Hugging Face style checkpoints as flat ``{name: numpy array}`` state dicts.

A state dict here is a ``dict[str, np.ndarray]`` with PyTorch's dotted names (``"vit.layers.0.mlp.fc1.weight"``).
Nothing in this module imports torch at import time: ``safetensors`` files are read with ``safetensors.numpy``;
``pytorch_model.bin`` is read only if torch is installed, with ``torch.load(..., weights_only=True)`` (no arbitrary
unpickling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.errors import UserError

__all__ = [
    "load_config",
    "load_state_dict",
    "to_numpy_state_dict",
    "check_state_dict",
    "save_hf_dir",
    "f32",
    "dense_from_torch",
    "attention_from_torch",
]

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"
_CONFIG = "config.json"


def _check_dir(directory: str | os.PathLike) -> str:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise UserError(f"directory={directory!r} is not a directory; pass a folder with config.json and weights.")
    return directory


def load_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads ``config.json`` of a Hugging Face model directory.

    Args:
      directory: a folder containing ``config.json``.

    Returns:
      The configuration as a dict (``model_type`` names the architecture).

    Raises:
      ValueError: if the folder or its ``config.json`` is missing.

    Example:
      >>> import tempfile, json, os
      >>> d = tempfile.mkdtemp(); json.dump({"model_type": "vit"}, open(os.path.join(d, "config.json"), "w"))
      >>> load_config(d)["model_type"]
      'vit'
    """
    directory = _check_dir(directory)
    path = os.path.join(directory, _CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{path!r} does not exist; the directory needs the model's config.json.")
    with open(path) as f:
        return json.load(f)


def load_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads the weights of a Hugging Face model directory into numpy arrays.

    Looks for, in order: ``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin``.
    Safetensors are read with ``safetensors.numpy.load_file`` (no torch needed; bfloat16 arrives as
    ``ml_dtypes.bfloat16``). ``pytorch_model.bin`` needs torch and is read with ``weights_only=True``.

    Args:
      directory: the model folder.

    Returns:
      ``{name: array}`` with the checkpoint's own names.

    Raises:
      ValueError: no weights file; or only ``pytorch_model.bin`` without torch installed (the message says how to
        convert it to safetensors).

    Example:
      >>> import tempfile, numpy as np
      >>> d = tempfile.mkdtemp(); save_hf_dir(d, {"w": np.ones((2, 3), np.float32)}, {"model_type": "toy"})
      >>> load_state_dict(d)["w"].shape
      (2, 3)
    """
    directory = _check_dir(directory)
    single = os.path.join(directory, _SAFETENSORS)
    index = os.path.join(directory, _SAFETENSORS_INDEX)
    torch_bin = os.path.join(directory, _TORCH_BIN)
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.numpy import load_file

        if os.path.isfile(single):
            return dict(load_file(single))
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(load_file(os.path.join(directory, shard)))
        return out
    if os.path.isfile(torch_bin):
        try:
            import torch
        except ImportError as e:
            raise UserError(
                f"{torch_bin!r} is a PyTorch pickle and torch is not installed. Convert it once where torch is "
                "available: `from safetensors.torch import save_file; import torch; "
                f"save_file(torch.load('{torch_bin}', weights_only=True), '{single}', metadata={{'format': 'pt'}})`, "
                "or install torch."
            ) from e
        return to_numpy_state_dict(torch.load(torch_bin, map_location="cpu", weights_only=True))
    raise UserError(
        f"directory={directory!r} has no weights: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX} or {_TORCH_BIN} "
        f"(found {sorted(os.listdir(directory))})."
    )


def _tensor_to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch.Tensor: handled by duck typing, torch is not imported here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16: reinterpret the bits
            import ml_dtypes
            import torch

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Turns a PyTorch ``state_dict`` (or any mapping of array-likes) into ``{name: np.ndarray}``.

    Tensors are detached and moved to the CPU; bfloat16 is kept (as ``ml_dtypes.bfloat16``), other dtypes map to
    their numpy equivalent. Works without importing torch for numpy inputs.

    Args:
      state_dict: mapping from names to ``torch.Tensor`` / numpy / jax arrays.

    Returns:
      A new dict with numpy arrays.

    Raises:
      ValueError: if a key is not a string.

    Example:
      >>> to_numpy_state_dict({"b": [1.0, 2.0]})["b"].dtype
      dtype('float64')
    """
    out = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise UserError(f"state_dict keys must be strings, got {name!r} ({type(name).__name__}).")
        out[name] = _tensor_to_numpy(value)
    return out


def check_state_dict(
    given: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str = "state dict",
    display: Mapping[str, str] | None = None,
) -> None:
    """Checks that ``given`` has exactly the names and shapes of ``expected``.

    Args:
      given: ``{name: array}`` (anything with ``.shape``) or ``{name: shape}``.
      expected: ``{name: shape}``.
      what: how to call ``given`` in the message (e.g. ``"Hugging Face ViT state dict"``).
      display: optional ``{key: name to print}`` for keys of ``given`` (e.g. the checkpoint's original names when
        ``given`` was renamed); a renamed key is printed as ``original (= key)``.

    Raises:
      ValueError: naming every unknown key (in ``given`` only), every missing key (in ``expected`` only) and every
        mis-shaped key with both shapes.

    Example:
      >>> import numpy as np
      >>> check_state_dict({"w": np.zeros((2, 3))}, {"w": (2, 3)})
      >>> check_state_dict({"w": np.zeros((2, 3)), "x": np.zeros(1)}, {"w": (3, 2)})
      Traceback (most recent call last):
      ...
      mmjax.errors.UserError: state dict does not match: unknown keys ['x']; mis-shaped keys ['w: got (2, 3), expected (3, 2)']
    """
    shape_of = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # noqa: E731
    display = display or {}
    show = lambda k: k if display.get(k, k) == k else f"{display[k]} (= {k})"  # noqa: E731
    unknown = [show(k) for k in sorted(set(given) - set(expected))]
    missing = sorted(set(expected) - set(given))
    misshaped = [
        f"{show(k)}: got {shape_of(given[k])}, expected {tuple(expected[k])}"
        for k in sorted(set(given) & set(expected))
        if shape_of(given[k]) != tuple(expected[k])
    ]
    problems = []
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if missing:
        problems.append(f"missing keys {missing}")
    if misshaped:
        problems.append(f"mis-shaped keys {misshaped}")
    if problems:
        raise UserError(f"{what} does not match: " + "; ".join(problems))


def save_hf_dir(directory: str | os.PathLike, state_dict: Mapping[str, Any], config: Mapping[str, Any] | Any) -> None:
    """Writes ``model.safetensors`` and ``config.json`` (the layout ``from_pretrained`` reads).

    Args:
      directory: output folder (created if needed).
      state_dict: ``{name: array}``; arrays are written contiguous, in their dtype.
      config: a dict, or an object with ``to_dict()`` (a ``transformers`` config).

    Example:
      >>> import tempfile, numpy as np
      >>> d = tempfile.mkdtemp(); save_hf_dir(d, {"w": np.zeros(3, np.float32)}, {"model_type": "toy"})
      >>> sorted(os.listdir(d))
      ['config.json', 'model.safetensors']
    """
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # np.ascontiguousarray makes 0-d arrays 1-d (e.g. CLIP's logit_scale []): restore the shape.
    tensors = {
        k: np.ascontiguousarray(a).reshape(a.shape)
        for k, a in ((k, _tensor_to_numpy(v)) for k, v in state_dict.items())
    }
    save_file(tensors, os.path.join(directory, _SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)


def f32(x: Any) -> np.ndarray:
    """``x`` (a NumPy array, or anything ``np.asarray`` takes) as float32.

    >>> f32([1, 2]).dtype
    dtype('float32')
    """
    return np.asarray(x, dtype=np.float32)


def dense_from_torch(sd: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
    """A flax ``Dense`` from the PyTorch ``nn.Linear`` ``name`` (``weight [out, in]`` -> ``kernel [in, out]``).

    >>> dense_from_torch({"fc.weight": np.ones((3, 2)), "fc.bias": np.zeros(3)}, "fc")["kernel"].shape
    (2, 3)
    """
    return {"kernel": f32(sd[name + ".weight"]).T, "bias": f32(sd[name + ".bias"])}


def attention_from_torch(
    sd: Mapping[str, Any], prefix: str, names: tuple[str, str, str, str], width: int, heads: int
) -> dict[str, dict[str, np.ndarray]]:
    """:class:`mmjax.attention.MultiHeadAttention` params from four PyTorch ``nn.Linear`` s ``prefix + name``.

    ``names`` are the query, key, value and output projections (e.g. ``("q_proj", "k_proj", "v_proj", "o_proj")``);
    ``weight [width, width]`` becomes ``kernel [width, heads, head_dim]`` (``[heads, head_dim, width]`` for the
    output); a missing query/key/value bias becomes zeros.

    >>> sd = {f"a.{n}.weight": np.eye(4) for n in "qkvo"} | {"a.o.bias": np.zeros(4)}
    >>> p = attention_from_torch(sd, "a.", ("q", "k", "v", "o"), width=4, heads=2)
    >>> p["query"]["kernel"].shape, p["query"]["bias"].shape, p["out"]["kernel"].shape
    ((4, 2, 2), (2, 2), (2, 2, 4))
    """
    hd = width // heads
    attn = {}
    for ours, theirs in zip(("query", "key", "value"), names[:3]):
        b = sd.get(prefix + f"{theirs}.bias")
        attn[ours] = {
            "kernel": f32(sd[prefix + f"{theirs}.weight"]).T.reshape(width, heads, hd),
            "bias": np.zeros((heads, hd), np.float32) if b is None else f32(b).reshape(heads, hd),
        }
    w_out = f32(sd[prefix + f"{names[3]}.weight"])
    attn["out"] = {"kernel": w_out.T.reshape(heads, hd, width), "bias": f32(sd[prefix + f"{names[3]}.bias"])}
    return attn
